// Operator status page of the relay. It polls the cluster view and the
// provider registry every 2 s and renders them. All text is set with
// textContent and never parsed as HTML, because user ids, versions, boot
// phase details and failure reasons come from agents and cannot be trusted.
"use strict";

(() => {
  const POLL_INTERVAL_MS = 2000;
  const FETCH_TIMEOUT_MS = 5000;
  const TOKEN_STORAGE_KEY = "relay.apiToken";

  // Relative to /ui/, so that the page also works under a proxy path prefix.
  const CLUSTER_URL = "../options/relay/cluster";
  const REGISTRY_URL = "../options/relay/registry";

  // NOTE: the page cannot read the cluster's RELAY_BEAT_INTERVAL or the
  // agents' heartbeat interval. These thresholds assume the defaults: a 1 s
  // replica beat, and agents that send a heartbeat every 10 s as agentsim does.
  const REPLICA_LATE_MS = 3000;
  const HEARTBEAT_LATE_MS = 30000;

  const byId = (id) => document.getElementById(id);

  // Server clock minus browser clock, from the last cluster view. Ages are
  // measured against the server clock, so a wrong browser clock does not
  // make every agent look late.
  let clockOffsetMs = 0;
  let lastSuccessAt = null;
  let timer = null;
  let refreshRunning = false;
  let refreshAgain = false;
  // Used when sessionStorage is unavailable, as in some private windows.
  let tokenInMemory = "";

  // --- API token -----------------------------------------------------------

  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_STORAGE_KEY) || "";
    } catch {
      return tokenInMemory;
    }
  }

  function writeToken(token) {
    tokenInMemory = token;
    try {
      if (token) {
        sessionStorage.setItem(TOKEN_STORAGE_KEY, token);
      } else {
        sessionStorage.removeItem(TOKEN_STORAGE_KEY);
      }
    } catch {
      // sessionStorage is unavailable, so the token lives until the page is closed.
    }
  }

  function setUpTokenForm() {
    const form = byId("token-form");
    const input = byId("token-input");
    input.value = readToken();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      writeToken(input.value.trim());
      refreshNow();
    });
    byId("token-clear").addEventListener("click", () => {
      input.value = "";
      writeToken("");
      refreshNow();
    });
  }

  // --- Fetching ------------------------------------------------------------

  // getJSON fetches url and returns the decoded JSON body. It throws an Error
  // whose status property is the HTTP status, or 0 when no response arrived.
  async function getJSON(url) {
    const headers = { Accept: "application/json" };
    const token = readToken();
    if (token) {
      headers.Authorization = "Bearer " + token;
    }

    let response;
    try {
      response = await fetch(url, {
        headers,
        cache: "no-store",
        signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
    } catch (err) {
      const text = err.name === "TimeoutError"
        ? `no answer within ${FETCH_TIMEOUT_MS / 1000} s`
        : `request failed: ${err.message}`;
      throw Object.assign(new Error(text), { status: 0 });
    }

    let body = null;
    try {
      body = await response.json();
    } catch {
      // A body that is not JSON is reported below.
    }
    if (!response.ok) {
      const code = body && typeof body.error === "string" ? ` ${body.error}` : "";
      const message = body && typeof body.message === "string" ? `: ${body.message}` : "";
      throw Object.assign(new Error(`HTTP ${response.status}${code}${message}`), { status: response.status });
    }
    if (body === null || typeof body !== "object") {
      throw Object.assign(new Error(`HTTP ${response.status} with a body that is not a JSON object`), { status: response.status });
    }
    return body;
  }

  // refreshNow starts a refresh at once, or right after the running one.
  function refreshNow() {
    clearTimeout(timer);
    if (refreshRunning) {
      refreshAgain = true;
      return;
    }
    poll();
  }

  // poll refreshes once and schedules the next refresh when it ends, so
  // that slow responses never make refreshes overlap.
  async function poll() {
    refreshRunning = true;
    try {
      await refresh();
    } catch (err) {
      showStatus([{ what: "Rendering the page", err }]);
    } finally {
      refreshRunning = false;
    }
    if (refreshAgain) {
      refreshAgain = false;
      poll();
      return;
    }
    timer = setTimeout(poll, POLL_INTERVAL_MS);
  }

  async function refresh() {
    const [cluster, registry] = await Promise.allSettled([getJSON(CLUSTER_URL), getJSON(REGISTRY_URL)]);
    const failures = [];

    if (cluster.status === "fulfilled") {
      const serverTime = parseTime(cluster.value.time);
      if (serverTime !== null) {
        clockOffsetMs = serverTime - Date.now();
      }
      renderCluster(cluster.value);
    } else {
      failures.push({ what: "Cluster view (GET /options/relay/cluster)", err: cluster.reason });
    }
    markStale(["store-section", "replicas-section", "auth-failures-section"], cluster.status !== "fulfilled");

    if (registry.status === "fulfilled") {
      renderProviders(registry.value);
    } else {
      failures.push({ what: "Provider registry (GET /options/relay/registry)", err: registry.reason });
    }
    markStale(["providers-section"], registry.status !== "fulfilled");

    if (failures.length === 0) {
      lastSuccessAt = Date.now();
    }
    showStatus(failures);
  }

  // --- Status line and error banner -----------------------------------------

  function showStatus(failures) {
    const badge = byId("refresh-state");
    const lastRefresh = byId("last-refresh");
    const banner = byId("error-banner");
    const now = Date.now();

    if (failures.length === 0) {
      badge.textContent = "live";
      badge.className = "badge ok";
      lastRefresh.textContent = `Refreshed at ${formatClock(now)}.`;
      banner.hidden = true;
      banner.replaceChildren();
      byId("token-form").classList.remove("needs-token");
      return;
    }

    badge.textContent = "refresh failed";
    badge.className = "badge bad";
    lastRefresh.textContent = lastSuccessAt === null
      ? `Refresh failed at ${formatClock(now)}. No refresh has succeeded yet.`
      : `Refresh failed at ${formatClock(now)}. Last full refresh at ${formatClock(lastSuccessAt)}, ${formatAge(now - lastSuccessAt)} ago.`;

    const list = document.createElement("ul");
    let needsToken = false;
    for (const { what, err } of failures) {
      const item = document.createElement("li");
      item.textContent = `${what}: ${err && err.message ? err.message : String(err)}`;
      list.append(item);
      needsToken = needsToken || (err && err.status === 401);
    }
    const heading = document.createElement("strong");
    heading.textContent = "The status page could not refresh. The data shown below may be out of date.";
    banner.replaceChildren(heading, list);
    if (needsToken) {
      const hint = document.createElement("p");
      hint.textContent = readToken()
        ? "The API rejected the saved token. Enter the relay's RELAY_API_TOKEN in the API token field and save it."
        : "The API requires a bearer token. Enter the relay's RELAY_API_TOKEN in the API token field and save it.";
      banner.append(hint);
    }
    byId("token-form").classList.toggle("needs-token", needsToken);
    banner.hidden = false;
  }

  function markStale(sectionIds, stale) {
    for (const id of sectionIds) {
      byId(id).classList.toggle("stale", stale);
    }
  }

  // --- Rendering -----------------------------------------------------------

  function renderCluster(view) {
    const store = view.store || {};
    byId("served-by").textContent = `served by replica ${view.replica}`;

    setFact("replica", view.replica);
    setFact("draining", view.draining ? "draining: new agents are turned away" : "serving", view.draining ? "bad" : "ok");
    setFact("backend", store.backend || "unknown");
    setFact("registry", store.registry_ok ? "OK" : "failing", store.registry_ok ? "ok" : "bad");
    setFact("pubsub", store.pubsub_ok ? "OK" : "failing", store.pubsub_ok ? "ok" : "bad");
    setFact("since", formatTimeAndAge(parseTime(store.since)));
    setFact("last-error", store.last_error || "none", store.last_error ? "bad" : "");

    renderReplicas(view.replicas || [], view.replica, view.draining);
    renderAuthFailures(view.auth_failures || []);
  }

  function setFact(field, text, state) {
    const dd = document.querySelector(`#store [data-field="${field}"]`);
    dd.textContent = text;
    dd.className = state || "";
  }

  function renderReplicas(replicas, servingReplica, draining) {
    byId("replicas-count").textContent = `(${replicas.length})`;
    const rows = replicas.map((r) => {
      const lastSeen = parseTime(r.last_seen);
      const lastSeenAge = lastSeen === null ? null : serverNow() - lastSeen;
      const late = lastSeenAge === null || lastSeenAge > REPLICA_LATE_MS;

      const idCell = cell("id", r.id, "mono");
      if (r.id === servingReplica) {
        idCell.append(" ", badge("this replica", "info"));
        if (draining) {
          idCell.append(" ", badge("draining", "bad"));
        }
      }
      return row(r.id, [
        idCell,
        cell("addr", r.addr || "—", "mono"),
        cell("version", r.version || "—"),
        timeCell("started", parseTime(r.started_at)),
        cell("last-seen", lastSeenAge === null ? "never" : `${formatAge(lastSeenAge)} ago`, late ? "late" : "fresh"),
        cell("providers", String(r.providers ?? 0), "num"),
        cell("pending", String(r.pending_requests ?? 0), "num"),
      ]);
    });
    fillTable("replicas", rows, "No replica is registered. The registry may be unavailable.");
  }

  function renderProviders(registry) {
    const providers = registry.providers || [];
    byId("providers-count").textContent = `(${providers.length})`;
    const rows = providers.map((p) => {
      const heartbeat = parseTime(p.last_heartbeat);
      const heartbeatAge = heartbeat === null ? null : serverNow() - heartbeat;
      const accounts = Array.isArray(p.ib_accounts) ? p.ib_accounts.join(", ") : "";
      const boot = p.boot_phase
        ? [p.boot_phase.phase, p.boot_phase.detail].filter(Boolean).join(": ")
        : "—";

      const bootCell = cell("boot", boot, p.boot_phase ? "late" : "muted");
      if (!p.boot_phase) {
        bootCell.title = "No start-up phase pending: the agent sent boot_complete or reports no phases.";
      }
      return row(p.id, [
        cell("user", p.user_id),
        cell("id", p.id, "mono"),
        cell("version", p.agent_version || "—"),
        cell("replica", p.instance_id || "—", "mono"),
        cell("accounts", accounts || "—", "mono"),
        timeCell("connected", parseTime(p.connected_at)),
        cell("heartbeat", heartbeatAge === null ? "none yet" : `${formatAge(heartbeatAge)} ago`,
          heartbeatAge === null || heartbeatAge > HEARTBEAT_LATE_MS ? "late" : "fresh"),
        twsCell(p),
        bootCell,
      ]);
    });
    fillTable("providers", rows, "No provider is connected to any replica.");
  }

  // twsCell shows the TWS state of the agent's last agent_state message:
  // ib_connected is true, false, or null before the first one arrives.
  function twsCell(p) {
    const stateAt = parseTime(p.state_at);
    let td;
    if (p.ib_connected === true) {
      td = cell("tws", "connected", "ok");
    } else if (p.ib_connected === false) {
      td = cell("tws", "not connected", "bad");
    } else {
      td = cell("tws", "unknown", "muted");
    }
    td.title = stateAt === null
      ? "The agent has sent no agent_state message yet."
      : `From the agent_state message received ${formatAge(serverNow() - stateAt)} ago.`;
    return td;
  }

  function renderAuthFailures(failures) {
    byId("auth-failures-count").textContent = `(${failures.length})`;
    const rows = failures.map((f, i) => row(String(i), [
      cell("at", formatTimeAndAge(parseTime(f.at)), "mono"),
      cell("ip", f.ip || "—", "mono"),
      cell("fingerprint", f.key_fingerprint || "—", "mono"),
      cell("reason", f.reason || "—"),
      cell("replica", f.replica_id || "—", "mono"),
    ]));
    fillTable("auth-failures", rows, "No authentication failure is recorded.");
  }

  // --- DOM helpers -----------------------------------------------------------

  function cell(column, text, className) {
    const td = document.createElement("td");
    td.dataset.col = column;
    td.textContent = text;
    if (className) {
      td.className = className;
    }
    return td;
  }

  // timeCell shows how long ago ms was, with the local date and time as its tooltip.
  function timeCell(column, ms) {
    const td = cell(column, ms === null ? "—" : `${formatAge(serverNow() - ms)} ago`);
    if (ms !== null) {
      td.title = formatDateTime(ms);
    }
    return td;
  }

  function badge(text, state) {
    const span = document.createElement("span");
    span.className = `badge ${state}`;
    span.textContent = text;
    return span;
  }

  function row(key, cells) {
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    tr.append(...cells);
    return tr;
  }

  // fillTable replaces the table's rows, or shows emptyText in one row. It
  // leaves the table unchanged while the operator has text selected in it,
  // so that a refresh does not clear the selection of an id being copied.
  function fillTable(tableId, rows, emptyText) {
    const table = byId(tableId);
    const tbody = table.tBodies[0];
    const selection = window.getSelection();
    if (selection && !selection.isCollapsed && tbody.contains(selection.anchorNode)) {
      return;
    }

    const fragment = document.createDocumentFragment();
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = document.createElement("td");
      td.colSpan = table.tHead.rows[0].cells.length;
      td.textContent = emptyText;
      tr.append(td);
      fragment.append(tr);
    }
    for (const tr of rows) {
      fragment.append(tr);
    }
    tbody.replaceChildren(fragment);
  }

  // --- Time ------------------------------------------------------------------

  function serverNow() {
    return Date.now() + clockOffsetMs;
  }

  // parseTime reads an RFC 3339 time as Go encodes it, with up to nine
  // fraction digits, and returns milliseconds since the epoch. It returns
  // null for a missing value and for Go's zero time, which means unset.
  function parseTime(value) {
    if (typeof value !== "string") {
      return null;
    }
    const match = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$/.exec(value);
    if (!match) {
      return null;
    }
    const fraction = match[2] ? match[2].slice(0, 4) : "";
    const ms = Date.parse(match[1] + fraction + match[3]);
    if (!Number.isFinite(ms) || ms <= 0) {
      return null;
    }
    return ms;
  }

  function formatAge(ms) {
    const seconds = Math.max(0, ms) / 1000;
    if (seconds < 10) {
      return `${seconds.toFixed(1)} s`;
    }
    if (seconds < 120) {
      return `${Math.round(seconds)} s`;
    }
    const minutes = Math.floor(seconds / 60);
    if (minutes < 120) {
      return `${minutes} min`;
    }
    const hours = Math.floor(minutes / 60);
    if (hours < 48) {
      return `${hours} h ${minutes % 60} min`;
    }
    return `${Math.floor(hours / 24)} d`;
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  // formatClock returns the local time of day of ms, as HH:MM:SS.
  function formatClock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // formatDateTime returns the local date and time of ms, as YYYY-MM-DD HH:MM:SS.
  function formatDateTime(ms) {
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${formatClock(ms)}`;
  }

  // formatTimeAndAge returns the local time of ms, with the date unless it
  // is today, followed by its age.
  function formatTimeAndAge(ms) {
    if (ms === null) {
      return "—";
    }
    const today = new Date().toDateString() === new Date(ms).toDateString();
    const when = today ? formatClock(ms) : formatDateTime(ms);
    return `${when} (${formatAge(serverNow() - ms)} ago)`;
  }

  setUpTokenForm();
  poll();
})();
