package relay

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/auth"
)

// uiTestToken is the RELAY_API_TOKEN of the status page tests, so that they
// cover the page's token field and show that its files need no token.
const uiTestToken = "status-page-token"

func TestUIServesPage(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.APIToken = uiTestToken })
	base, err := url.Parse(rs[0].base)
	if err != nil {
		t.Fatal(err)
	}
	noRedirects := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

	for _, from := range []string{"/", "/ui"} {
		resp, _ := uiGet(t, noRedirects, base.JoinPath(from).String())
		if resp.StatusCode != http.StatusFound {
			t.Errorf("GET %s: status %d, want 302", from, resp.StatusCode)
			continue
		}
		location, err := url.Parse(resp.Header.Get("Location"))
		if err != nil {
			t.Errorf("GET %s: invalid Location %q: %v", from, resp.Header.Get("Location"), err)
			continue
		}
		if got := resp.Request.URL.ResolveReference(location).Path; got != "/ui/" {
			t.Errorf("GET %s redirects to %s, want /ui/", from, got)
		}
	}

	resp, page := uiGet(t, noRedirects, base.JoinPath("/ui/").String())
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /ui/: status %d, want 200 without a token: %s", resp.StatusCode, page)
	}
	if got := resp.Header.Get("Content-Type"); got != "text/html; charset=utf-8" {
		t.Errorf("GET /ui/: Content-Type %q, want text/html; charset=utf-8", got)
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
		t.Errorf("GET /ui/: Content-Security-Policy %q, want one that allows only the page's own scripts", csp)
	}
	if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
		t.Errorf("GET /ui/: X-Content-Type-Options %q, want nosniff", got)
	}
	if !strings.Contains(page, "<title>relay status</title>") {
		t.Errorf("GET /ui/ did not return the status page: %.200s", page)
	}

	wantTypes := map[string]string{
		".js":  "text/javascript; charset=utf-8",
		".css": "text/css; charset=utf-8",
	}
	assets := regexp.MustCompile(`(?:src|href)="([^"]+)"`).FindAllStringSubmatch(page, -1)
	loaded := map[string]bool{}
	for _, match := range assets {
		ref := match[1]
		if strings.Contains(ref, "//") {
			t.Errorf("the page loads %s from another host; it must work offline", ref)
			continue
		}
		assetURL := resp.Request.URL.ResolveReference(&url.URL{Path: ref})
		assetResp, body := uiGet(t, noRedirects, assetURL.String())
		if assetResp.StatusCode != http.StatusOK || body == "" {
			t.Errorf("GET %s: status %d with %d bytes, want 200 and a body", assetURL.Path, assetResp.StatusCode, len(body))
			continue
		}
		ext := filepath.Ext(ref)
		if got := assetResp.Header.Get("Content-Type"); got != wantTypes[ext] {
			t.Errorf("GET %s: Content-Type %q, want %q", assetURL.Path, got, wantTypes[ext])
		}
		loaded[ext] = true
	}
	if !loaded[".js"] || !loaded[".css"] {
		t.Errorf("the page loaded a script: %v, a style sheet: %v, want both", loaded[".js"], loaded[".css"])
	}

	if resp, _ := uiGet(t, noRedirects, base.JoinPath("/ui/missing.js").String()); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /ui/missing.js: status %d, want 404", resp.StatusCode)
	}
	// Mounting the page must leave the API behind its token.
	if resp, _ := uiGet(t, noRedirects, base.JoinPath("/options/relay/cluster").String()); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /options/relay/cluster without a token: status %d, want 401", resp.StatusCode)
	}
}

func uiGet(t *testing.T, client *http.Client, u string) (*http.Response, string) {
	t.Helper()
	resp, err := client.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", u, err)
	}
	return resp, string(body)
}

// TestStatusPageInBrowser loads the page in headless Chromium from replica
// 0 of two, with agents on both, and reads the rendered tables.
// RELAY_UPDATE_SCREENSHOT=1 writes docs/status-page.png.
func TestStatusPageInBrowser(t *testing.T) {
	browser := startChromium(t)

	keys, err := auth.ParseKeys(strings.NewReader(testKeys + "key-mallory <b>mallory</b>\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs := newCluster(t, "memory", 2, func(c *Config) {
		c.APIToken = uiTestToken
		c.Auth = keys
	})

	// The API needs the token, so startAgent gets no replicas to check the
	// registry through. The page itself waits for the agents to appear.
	alice := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true})
	bob := startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-bob", Version: "1.38.2", ReconnectDelay: time.Hour})
	carol := dialRaw(t, rs[0])
	carolID := carol.auth("key-carol")
	carol.send(`{"type":"boot_phase","phase":"ib_connecting","detail":"Connecting to TWS","progress":0.4,"timestamp":1796413970.85}`)
	intruder := dialRaw(t, rs[1])
	intruder.send(`{"type":"auth","api_key":"wrong-key","version":"1.39.1"}`)
	if m := intruder.read(); m["success"] != false {
		t.Fatalf("auth with an unknown key: got %v, want a failed auth_response", m)
	}

	browser.navigate(rs[0].base + "/")
	state := browser.waitPage(10*time.Second, "the banner asking for the API token", func(s pageState) bool {
		return strings.Contains(s.Banner, "requires a bearer token")
	})
	if state.RefreshState != "refresh failed" {
		t.Errorf("refresh state %q without a token, want refresh failed", state.RefreshState)
	}
	if state.Path != "/ui/" {
		t.Errorf("page path %q after loading /, want /ui/", state.Path)
	}

	browser.evaluate(`document.getElementById("token-input").value = "`+uiTestToken+`";
		document.getElementById("token-form").requestSubmit(); true`, nil)
	state = browser.waitPage(8*time.Second, "three providers and one authentication failure", func(s pageState) bool {
		return len(s.Providers) == 3 && len(s.AuthFailures) == 1 && len(s.Replicas) == 2 && s.Banner == ""
	})
	var stored string
	browser.evaluate(`sessionStorage.getItem("relay.apiToken")`, &stored)
	if stored != uiTestToken {
		t.Errorf("sessionStorage token %q, want the one entered", stored)
	}
	if state.RefreshState != "live" || !strings.HasPrefix(state.LastRefresh, "Refreshed at ") {
		t.Errorf("refresh state %q with status line %q, want live and the refresh time", state.RefreshState, state.LastRefresh)
	}

	wantStore := map[string]string{
		"replica":  rs[0].srv.ReplicaID(),
		"draining": "serving",
		"backend":  "memory",
		"registry": "OK",
		"pubsub":   "OK",
	}
	for field, want := range wantStore {
		if got := state.Store[field]; got != want {
			t.Errorf("store panel %s = %q, want %q", field, got, want)
		}
	}

	replicas := rowsByKey(state.Replicas)
	for i, r := range rs {
		row, ok := replicas[r.srv.ReplicaID()]
		if !ok {
			t.Errorf("replica %s missing from the replicas table %v", r.srv.ReplicaID(), state.Replicas)
			continue
		}
		if wantThis := i == 0; strings.Contains(row["id"], "this replica") != wantThis {
			t.Errorf("replica %s shown as %q, want the \"this replica\" badge only on replica 0", r.srv.ReplicaID(), row["id"])
		}
		if row["providers"] != fmt.Sprint(2-i) {
			t.Errorf("replica %s: providers %q, want %d", r.srv.ReplicaID(), row["providers"], 2-i)
		}
	}

	providers := rowsByKey(state.Providers)
	wantProviders := []struct {
		id, user, version, replica, tws, boot string
	}{
		{alice.ProviderID(), "alice", "1.39.1", rs[0].srv.ReplicaID(), "connected", "—"},
		{bob.ProviderID(), "bob", "1.38.2", rs[1].srv.ReplicaID(), "not connected", "—"},
		{carolID, "carol", "1.39.1", rs[0].srv.ReplicaID(), "unknown", "ib_connecting: Connecting to TWS"},
	}
	for _, want := range wantProviders {
		row, ok := providers[want.id]
		if !ok {
			t.Errorf("provider %s of %s missing from the providers table", want.id, want.user)
			continue
		}
		got := [5]string{row["user"], row["version"], row["replica"], row["tws"], row["boot"]}
		if got != [5]string{want.user, want.version, want.replica, want.tws, want.boot} {
			t.Errorf("provider %s row (user, version, replica, TWS, boot phase) = %q, want %q", want.id, got,
				[5]string{want.user, want.version, want.replica, want.tws, want.boot})
		}
		if !strings.HasSuffix(row["heartbeat"], " ago") && want.user != "carol" {
			t.Errorf("provider %s heartbeat %q, want an age", want.id, row["heartbeat"])
		}
	}

	wantFailure := map[string]string{
		"reason":      "invalid API key",
		"replica":     rs[1].srv.ReplicaID(),
		"ip":          "127.0.0.1",
		"fingerprint": auth.Fingerprint("wrong-key"),
	}
	for column, want := range wantFailure {
		if got := state.AuthFailures[0][column]; got != want {
			t.Errorf("authentication failure %s = %q, want %q", column, got, want)
		}
	}

	if os.Getenv("RELAY_UPDATE_SCREENSHOT") == "1" {
		browser.screenshot(filepath.Join("..", "docs", "status-page.png"))
	}

	// bob's agent stops, as when its user closes it. Its ReconnectDelay of
	// an hour keeps it from dialing again during the test.
	bob.Disconnect()
	stopped := time.Now()
	// The page polls every 2 s. The limit allows the poll in flight, the
	// next one and slack for a loaded machine.
	state = browser.waitPage(8*time.Second, "bob's provider removed", func(s pageState) bool {
		_, listed := rowsByKey(s.Providers)[bob.ProviderID()]
		return !listed
	})
	t.Logf("the page dropped the disconnected provider %v after the agent closed", time.Since(stopped).Round(10*time.Millisecond))
	if len(state.Providers) != 2 {
		t.Errorf("%d providers shown after bob disconnected, want alice and carol: %v", len(state.Providers), state.Providers)
	}

	// Text from agents must appear as text: a user id and a boot phase
	// detail that contain HTML.
	mallory := dialRaw(t, rs[0])
	malloryID := mallory.auth("key-mallory")
	mallory.send(`{"type":"boot_phase","phase":"ib_connecting","detail":"<img src=x onerror=\"window.injected=1\">","progress":0.1,"timestamp":1796413970.85}`)
	state = browser.waitPage(8*time.Second, "mallory's boot phase", func(s pageState) bool {
		return strings.Contains(rowsByKey(s.Providers)[malloryID]["boot"], "<img")
	})
	row := rowsByKey(state.Providers)[malloryID]
	if row["user"] != "<b>mallory</b>" {
		t.Errorf("user cell %q, want the user id as literal text", row["user"])
	}
	if row["boot"] != `ib_connecting: <img src=x onerror="window.injected=1">` {
		t.Errorf("boot phase cell %q, want the detail as literal text", row["boot"])
	}
	if state.InjectedElements != 0 || state.InjectedScript {
		t.Errorf("agent text was parsed as HTML: %d injected elements, script ran: %v", state.InjectedElements, state.InjectedScript)
	}
}

// pageState is what the status page shows, as read from its DOM.
type pageState struct {
	Path         string            `json:"path"`
	Banner       string            `json:"banner"` // text of the error banner, empty while it is hidden
	RefreshState string            `json:"refreshState"`
	LastRefresh  string            `json:"lastRefresh"`
	Store        map[string]string `json:"store"`
	// Table rows map each cell's data-col to its text, and "key" to the row's data-key.
	Replicas         []map[string]string `json:"replicas"`
	Providers        []map[string]string `json:"providers"`
	AuthFailures     []map[string]string `json:"authFailures"`
	InjectedElements int                 `json:"injectedElements"`
	InjectedScript   bool                `json:"injectedScript"`
}

const readPageState = `(() => {
	const rows = (id) => Array.from(document.querySelectorAll("#" + id + " tbody tr[data-key]")).map((tr) => {
		const row = { key: tr.dataset.key };
		for (const td of tr.cells) row[td.dataset.col] = td.textContent;
		return row;
	});
	const banner = document.getElementById("error-banner");
	if (banner === null) return JSON.stringify({ path: location.pathname }); // still loading
	const store = {};
	for (const dd of document.querySelectorAll("#store dd")) store[dd.dataset.field] = dd.textContent;
	return JSON.stringify({
		path: location.pathname,
		banner: banner.hidden ? "" : banner.textContent,
		refreshState: document.getElementById("refresh-state").textContent,
		lastRefresh: document.getElementById("last-refresh").textContent,
		store,
		replicas: rows("replicas"),
		providers: rows("providers"),
		authFailures: rows("auth-failures"),
		injectedElements: document.querySelectorAll("main img, main b").length,
		injectedScript: window.injected !== undefined,
	});
})()`

func rowsByKey(rows []map[string]string) map[string]map[string]string {
	out := make(map[string]map[string]string, len(rows))
	for _, row := range rows {
		out[row["key"]] = row
	}
	return out
}

// chromium is a headless Chromium process and a DevTools Protocol session
// attached to one of its pages.
type chromium struct {
	t       *testing.T
	conn    *websocket.Conn
	session string // sessionId of the page target
	nextID  int64
	output  *syncBuffer
}

// startChromium starts headless Chromium on loopback and attaches to a new
// page. Without a Chromium binary the test is skipped, unless
// RELAY_REQUIRE_BROWSER=1. Cleanup closes the browser, waits for it and its
// helper processes to exit, and kills by PID any that still run after 5 s.
func startChromium(t *testing.T) *chromium {
	t.Helper()
	binary := ""
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			binary = p
			break
		}
	}
	if binary == "" {
		if os.Getenv("RELAY_REQUIRE_BROWSER") == "1" {
			t.Fatal("Chromium is required (RELAY_REQUIRE_BROWSER=1) but not on PATH. Install the Debian package chromium.")
		}
		t.Skip("Chromium not on PATH, skipping the browser test. Install the Debian package chromium to run it.")
	}

	profile := t.TempDir()
	cmd := exec.Command(binary,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--disable-crash-reporter", "--hide-scrollbars",
		"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
		"--window-size=1280,900", "--user-data-dir="+profile, "about:blank")
	output := &syncBuffer{}
	cmd.Stdout = output
	cmd.Stderr = output
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", binary, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()

	b := &chromium{t: t, output: output}
	t.Cleanup(func() {
		// Chromium's helper processes (zygotes, GPU, renderers) can outlive
		// the browser process by a moment, so they are waited for too.
		helpers := childProcesses(cmd.Process.Pid)
		if b.conn != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			b.call(ctx, "", "Browser.close", nil, nil)
			cancel()
			b.conn.CloseNow()
		}
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			t.Logf("Chromium (PID %d) still runs 5 s after Browser.close, killing it", cmd.Process.Pid)
			cmd.Process.Kill()
			<-exited
		}
		waitOrKill(t, helpers, 5*time.Second)
	})

	// Chromium writes the port it chose and the browser target's path to
	// DevToolsActivePort in the profile directory.
	var endpoint string
	eventually(t, 15*time.Second, func() bool {
		select {
		case <-exited:
			t.Fatalf("Chromium exited before it opened its DevTools port; its output:\n%s", output)
		default:
		}
		data, err := os.ReadFile(filepath.Join(profile, "DevToolsActivePort"))
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		if err != nil || len(lines) != 2 {
			return false
		}
		endpoint = "ws://127.0.0.1:" + lines[0] + lines[1]
		return true
	}, "Chromium did not open its DevTools port within 15 s; its output:\n%s", output)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, endpoint, nil)
	if err != nil {
		t.Fatalf("connect to Chromium DevTools at %s: %v", endpoint, err)
	}
	conn.SetReadLimit(64 << 20) // screenshots arrive base64-encoded in one message
	b.conn = conn

	var target struct {
		TargetID string `json:"targetId"`
	}
	if err := b.call(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank"}, &target); err != nil {
		t.Fatal(err)
	}
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	if err := b.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached); err != nil {
		t.Fatal(err)
	}
	b.session = attached.SessionID
	return b
}

type cdpRequest struct {
	ID        int64  `json:"id"`
	Method    string `json:"method"`
	Params    any    `json:"params,omitempty"`
	SessionID string `json:"sessionId,omitempty"`
}

type cdpResponse struct {
	ID     int64           `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// call sends one DevTools Protocol command and waits for its response,
// skipping the events that arrive in between. An empty session addresses the
// browser target.
func (b *chromium) call(ctx context.Context, session, method string, params, result any) error {
	b.nextID++
	id := b.nextID
	frame, err := json.Marshal(cdpRequest{ID: id, Method: method, Params: params, SessionID: session})
	if err != nil {
		return err
	}
	if err := b.conn.Write(ctx, websocket.MessageText, frame); err != nil {
		return fmt.Errorf("DevTools %s: send: %w", method, err)
	}
	for {
		_, data, err := b.conn.Read(ctx)
		if err != nil {
			return fmt.Errorf("DevTools %s: read: %w", method, err)
		}
		var resp cdpResponse
		if err := json.Unmarshal(data, &resp); err != nil {
			return fmt.Errorf("DevTools %s: invalid JSON %.200q: %w", method, data, err)
		}
		if resp.ID != id {
			continue
		}
		if resp.Error != nil {
			return fmt.Errorf("DevTools %s failed: %d %s", method, resp.Error.Code, resp.Error.Message)
		}
		if result == nil {
			return nil
		}
		return json.Unmarshal(resp.Result, result)
	}
}

// pageCall sends a command to the page, failing the test after 10 s.
func (b *chromium) pageCall(method string, params, result any) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.call(ctx, b.session, method, params, result); err != nil {
		b.t.Fatal(err)
	}
}

func (b *chromium) navigate(u string) {
	b.t.Helper()
	var result struct {
		ErrorText string `json:"errorText"`
	}
	b.pageCall("Page.navigate", map[string]any{"url": u}, &result)
	if result.ErrorText != "" {
		b.t.Fatalf("navigate to %s: %s", u, result.ErrorText)
	}
}

// evaluate runs a JavaScript expression in the page and decodes its value into out.
func (b *chromium) evaluate(expression string, out any) {
	b.t.Helper()
	var result struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	b.pageCall("Runtime.evaluate", map[string]any{"expression": expression, "returnByValue": true}, &result)
	if ex := result.ExceptionDetails; ex != nil {
		b.t.Fatalf("JavaScript failed: %s %s\nexpression: %s", ex.Text, ex.Exception.Description, expression)
	}
	if out != nil {
		if err := json.Unmarshal(result.Result.Value, out); err != nil {
			b.t.Fatalf("JavaScript value %.200s: %v", result.Result.Value, err)
		}
	}
}

func (b *chromium) readState() pageState {
	b.t.Helper()
	var encoded string
	b.evaluate(readPageState, &encoded)
	var state pageState
	if err := json.Unmarshal([]byte(encoded), &state); err != nil {
		b.t.Fatalf("page state %.200s: %v", encoded, err)
	}
	return state
}

// waitPage reads the page every 100 ms until cond holds, and fails the test
// with the last state read when timeout passes first.
func (b *chromium) waitPage(timeout time.Duration, what string, cond func(pageState) bool) pageState {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		state := b.readState()
		if cond(state) {
			return state
		}
		if time.Now().After(deadline) {
			shown, _ := json.MarshalIndent(state, "", "  ")
			b.t.Fatalf("the page did not show %s within %v; it shows:\n%s", what, timeout, shown)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// screenshot writes a PNG of the whole page to path.
func (b *chromium) screenshot(path string) {
	b.t.Helper()
	var height int
	b.evaluate(`document.documentElement.scrollHeight`, &height)
	b.pageCall("Emulation.setDeviceMetricsOverride", map[string]any{
		"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false,
	}, nil)
	var shot struct {
		Data string `json:"data"`
	}
	b.pageCall("Page.captureScreenshot", map[string]any{"format": "png"}, &shot)
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	if err != nil {
		b.t.Fatalf("screenshot: invalid base64: %v", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("wrote %s (%d bytes)", path, len(png))
}

// process identifies a process by its PID and start time, so that a PID
// that another process reuses is never signalled.
type process struct {
	pid   int
	start string
}

// procStat reads a process's state, parent PID and start time from
// /proc/PID/stat. It returns ok false where the process or /proc is absent.
func procStat(pid int) (state string, ppid int, start string, ok bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, "", false
	}
	// Field 2, the command name in parentheses, may contain spaces, so the
	// fields are counted from its closing parenthesis. After it come state
	// (field 3), the parent PID (field 4) and, at field 22, the start time.
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return "", 0, "", false
	}
	fields := strings.Fields(string(data[end+1:]))
	if len(fields) < 20 {
		return "", 0, "", false
	}
	ppid, err = strconv.Atoi(fields[1])
	if err != nil {
		return "", 0, "", false
	}
	return fields[0], ppid, fields[19], true
}

// childProcesses returns the descendants of root. It reads /proc, so it
// returns none on systems without it.
func childProcesses(root int) []process {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]process{}
	for _, entry := range entries {
		pid, err := strconv.Atoi(entry.Name())
		if err != nil {
			continue
		}
		if _, ppid, start, ok := procStat(pid); ok {
			children[ppid] = append(children[ppid], process{pid: pid, start: start})
		}
	}
	var out []process
	queue := []int{root}
	for len(queue) > 0 {
		parent := queue[0]
		queue = queue[1:]
		for _, child := range children[parent] {
			out = append(out, child)
			queue = append(queue, child.pid)
		}
	}
	return out
}

// running reports whether p still runs. An exited process that waits to be
// reaped (a zombie) counts as not running.
func (p process) running() bool {
	state, _, start, ok := procStat(p.pid)
	return ok && start == p.start && state != "Z"
}

// waitOrKill waits up to timeout for procs to exit and kills, by PID, those
// that still run then.
func waitOrKill(t *testing.T, procs []process, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, p := range procs {
		for p.running() && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if !p.running() {
			continue
		}
		t.Logf("Chromium helper process %d still runs %v after the browser closed, killing it", p.pid, timeout)
		if proc, err := os.FindProcess(p.pid); err == nil {
			proc.Kill()
		}
	}
}

// syncBuffer collects a process's output from its copying goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
