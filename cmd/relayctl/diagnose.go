package main

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/relay-project/relay/store"
)

// Verdict codes. They are stable: scripts and alerts may match them.
const (
	verdictOK                = "ok"
	verdictUnreachable       = "relay_unreachable"
	verdictUnauthorized      = "unauthorized"
	verdictSplitRegistry     = "split_registry"
	verdictNoAgent           = "no_agent"
	verdictStale             = "stale"
	verdictAgentTimeout      = "agent_timeout"
	verdictAgentDisconnected = "agent_disconnected"
	verdictAgentError        = "agent_error"
	verdictTWSDisconnected   = "tws_disconnected"
)

// verdict is the one-line result of a diagnosis: a code, the cause and the fix.
type verdict struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Fix     string `json:"fix"`
	// Replica is the replica the verdict points at, when there is one.
	Replica string `json:"replica,omitempty"`
	// ProviderID is the provider the verdict is about, when there is one.
	ProviderID string `json:"provider_id,omitempty"`
}

// Fixes shared by several verdicts.
const (
	fixRedis = "Check that every replica uses the same REDIS_URL and RELAY_REDIS_PREFIX " +
		"and can reach Redis, then read the logs of the replicas named in the message."
	fixUnreachable = "Check the URL, DNS and the load balancer, and that the relay listens " +
		"(GET /healthz on each replica)."
)

// diagnose turns what a doctor run collected into one verdict. It is a pure
// function of obs.
//
// Problems that hide every later finding come first: a relay that cannot be
// reached or rejects the token, a replica whose Redis fails, calls that
// failed, then replicas that disagree. Only then are the providers judged.
func diagnose(obs observations) verdict {
	if v, found := checkReachable(obs); found {
		return v
	}
	// A replica that reports its own Redis failure comes before calls
	// that failed, because such a replica often responds slowly or not at
	// all, and the report names it.
	if v, found := checkStoreHealth(obs); found {
		return v
	}
	if v, found := checkFailedCalls(obs); found {
		return v
	}
	if v, found := checkSplit(obs); found {
		return v
	}
	if obs.UserID == "" {
		return checkCluster(obs)
	}
	return checkUser(obs)
}

// checkReachable finds a relay that no call reached, a server that is not
// a relay, and calls the relay rejected for their token.
func checkReachable(obs observations) (verdict, bool) {
	calls := obs.calls()
	if len(calls) == 0 {
		return verdict{Code: verdictUnreachable, Message: "The doctor was interrupted before its first call to " + obs.URL + ".", Fix: fixUnreachable}, true
	}
	var failures []string
	unauthorized := 0
	notFound := ""
	for _, c := range calls {
		if f := c.failure(); f != "" {
			failures = append(failures, f)
		}
		if c.APIErr != nil && c.APIErr.Code == codeUnauthorized {
			unauthorized++
		}
		if c.Status == http.StatusNotFound && notFound == "" {
			notFound = c.Path
		}
	}

	switch {
	case notFound != "":
		v := verdict{
			Code:    verdictUnreachable,
			Message: fmt.Sprintf("The server at %s responded 404 Not Found for %s: it is not a relay, or a relay version without that endpoint.", obs.URL, notFound),
			Fix:     "Check that -url points at the relay or its load balancer, with any path prefix the balancer adds, and that every replica runs a current relay version.",
		}
		return v, true
	case unauthorized > 0:
		v := verdict{
			Code:    verdictUnauthorized,
			Message: fmt.Sprintf("The relay rejected the bearer token on %d of %d calls (HTTP 401 unauthorized).", unauthorized, len(calls)),
			Fix: "Pass the relay's RELAY_API_TOKEN with -token or the " + tokenEnv + " environment variable. " +
				"If only some calls fail, the replicas are configured with different tokens.",
		}
		return v, true
	case len(failures) == len(calls):
		v := verdict{
			Code:    verdictUnreachable,
			Message: fmt.Sprintf("Cannot reach the relay at %s: %s.", obs.URL, failures[0]),
			Fix:     fixUnreachable,
		}
		return v, true
	}
	return verdict{}, false
}

// checkFailedCalls finds calls that got no usable response while others did.
func checkFailedCalls(obs observations) (verdict, bool) {
	calls := obs.calls()
	var failures []string
	for _, c := range calls {
		if f := c.failure(); f != "" {
			failures = append(failures, f)
		}
	}
	if len(failures) == 0 {
		return verdict{}, false
	}
	return verdict{
		Code: verdictUnreachable,
		Message: fmt.Sprintf("%d of %d calls to the relay at %s failed, first: %s.",
			len(failures), len(calls), obs.URL, failures[0]),
		Fix: "Check the load balancer's backends: one replica may be down, overloaded or not a relay. " + fixUnreachable,
	}, true
}

// clusterViews returns the latest cluster response of each replica that
// responded, by replica id.
func clusterViews(obs observations) map[string]clusterResponse {
	views := map[string]clusterResponse{}
	for _, s := range obs.Samples {
		if a := s.Cluster.Response; a != nil {
			views[a.Replica] = *a
		}
	}
	return views
}

// checkStoreHealth finds replicas that report a failing registry or
// pub/sub connection.
func checkStoreHealth(obs observations) (verdict, bool) {
	views := clusterViews(obs)
	var unhealthy []string
	for _, id := range sortedKeys(views) {
		if !views[id].Store.OK() {
			unhealthy = append(unhealthy, id)
		}
	}
	if len(unhealthy) == 0 {
		return verdict{}, false
	}

	// A failing registry is a harder failure than a pub/sub stall, which
	// the store may repair by resubscribing within a few beats, so it is
	// named first.
	slices.SortStableFunc(unhealthy, func(a, b string) int {
		return boolOrder(!views[a].Store.RegistryOK, !views[b].Store.RegistryOK)
	})
	var parts []string
	for _, id := range unhealthy {
		h := views[id].Store
		parts = append(parts, fmt.Sprintf("replica %s reports registry_ok=%t pubsub_ok=%t for %s (last error: %s)",
			id, h.RegistryOK, h.PubSubOK, formatAge(obs.RelayNow.Sub(h.Since)), orNone(h.LastError)))
	}

	first := unhealthy[0]
	return verdict{
		Code:    verdictSplitRegistry,
		Message: capitalize(strings.Join(parts, "; ")) + ".",
		Fix: "Check the Redis connectivity of replica " + first + " (REDIS_URL, network, Redis health) and its logs. " +
			"Until Redis is back it sees only its own agents.",
		Replica: first,
	}, true
}

// boolOrder orders true before false.
func boolOrder(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return -1
	}
	return 1
}

// checkSplit finds replicas that do not share one registry: responses of
// registry_unavailable, replicas without Redis behind one URL, replicas
// that list different replicas, and providers that some responses list and
// others do not.
func checkSplit(obs observations) (verdict, bool) {
	views := clusterViews(obs)
	ids := sortedKeys(views)
	split := func(message, fix, replica string) (verdict, bool) {
		return verdict{Code: verdictSplitRegistry, Message: message, Fix: fix, Replica: replica}, true
	}

	for _, c := range obs.calls() {
		if c.APIErr != nil && c.APIErr.Code == codeRegistryUnavailable {
			return split(fmt.Sprintf("A replica responded to %s with registry_unavailable: %s", c.Path, c.APIErr.Message), fixRedis, "")
		}
	}

	if len(ids) > 1 {
		var memory []string
		for _, id := range ids {
			if views[id].Store.Backend == "memory" {
				memory = append(memory, id)
			}
		}
		if len(memory) > 0 {
			return split(fmt.Sprintf("%d replicas respond at %s, but these run with the in-process registry (REDIS_URL unset), so each sees only its own agents: %s.",
				len(ids), obs.URL, strings.Join(memory, ", ")),
				"Set the same REDIS_URL on every replica behind the load balancer.", memory[0])
		}
	}

	if v, found := checkReplicaLists(views, ids); found {
		return v, true
	}
	if message := providerGaps(obs); message != "" {
		return split(message, fixRedis, "")
	}
	return verdict{}, false
}

// checkReplicaLists finds replicas that list different live replicas.
func checkReplicaLists(views map[string]clusterResponse, ids []string) (verdict, bool) {
	var sees []string
	distinct := map[string]bool{}
	for _, id := range ids {
		list := replicaIDs(views[id].Replicas)
		key := strings.Join(list, ",")
		distinct[key] = true
		sees = append(sees, fmt.Sprintf("%s sees [%s]", id, strings.Join(list, " ")))
	}
	if len(distinct) <= 1 {
		return verdict{}, false
	}
	// The replica that lists the fewest replicas is the likeliest to be cut
	// off from the others.
	narrowest := slices.MinFunc(ids, func(a, b string) int { return len(views[a].Replicas) - len(views[b].Replicas) })
	return verdict{
		Code:    verdictSplitRegistry,
		Message: "Replicas disagree about the live replicas: " + strings.Join(sees, "; ") + ".",
		Fix:     fixRedis,
		Replica: narrowest,
	}, true
}

// providerView is one response that lists providers, in the order of the calls.
type providerView struct {
	at        time.Time
	providers []store.Provider
	// userOnly means the response lists one user's providers only.
	userOnly bool
}

// providerGaps looks for a provider that one response lists, a later
// response does not, and a still later response lists again. Behind a
// balancer that alternates between replicas, that pattern means the
// replicas disagree. A provider that connects or disconnects during the
// check is listed in one run of responses only and is not reported.
func providerGaps(obs observations) string {
	var views []providerView
	for _, s := range obs.Samples {
		if a := s.Registry.Response; a != nil {
			views = append(views, providerView{at: s.Registry.At, providers: a.Providers})
		}
		if s.Cached != nil && s.Cached.Response != nil {
			views = append(views, providerView{at: s.Cached.At, providers: s.Cached.Response.Providers, userOnly: true})
		}
	}
	slices.SortStableFunc(views, func(a, b providerView) int { return a.at.Compare(b.at) })

	known := map[string]store.Provider{}
	var order []string
	for _, v := range views {
		for _, p := range v.providers {
			if _, ok := known[p.ID]; !ok {
				order = append(order, p.ID)
			}
			known[p.ID] = p
		}
	}

	for _, id := range order {
		p := known[id]
		var presence []bool
		for _, v := range views {
			if v.userOnly && p.UserID != obs.UserID {
				continue
			}
			presence = append(presence, slices.ContainsFunc(v.providers, func(q store.Provider) bool { return q.ID == id }))
		}
		if hasGap(presence) {
			listed := 0
			for _, present := range presence {
				if present {
					listed++
				}
			}
			return fmt.Sprintf("Replicas disagree about the providers: provider %s of user %s on replica %s is listed in %d of %d responses, with gaps between them.",
				id, p.UserID, p.InstanceID, listed, len(presence))
		}
	}
	return ""
}

// hasGap reports whether presence holds true, then false, then true again.
func hasGap(presence []bool) bool {
	seen, missing := false, false
	for _, present := range presence {
		switch {
		case present && missing:
			return true
		case present:
			seen = true
		case seen:
			missing = true
		}
	}
	return false
}

// latestProviders merges every provider record the run saw. For each id it
// keeps the record with the newest heartbeat, because the replicas' views
// lag the holding replica by up to one beat.
func latestProviders(obs observations, userID string) []store.Provider {
	byID := map[string]store.Provider{}
	var order []string
	add := func(list []store.Provider) {
		for _, p := range list {
			if userID != "" && p.UserID != userID {
				continue
			}
			old, ok := byID[p.ID]
			if !ok {
				order = append(order, p.ID)
			}
			if !ok || p.LastHeartbeat.After(old.LastHeartbeat) {
				byID[p.ID] = p
			}
		}
	}
	// The live response comes first, so that its order (the order routing
	// prefers) leads the list.
	if obs.Live != nil && obs.Live.Response != nil {
		add(obs.Live.Response.Providers)
	}
	for _, s := range obs.Samples {
		if a := s.Registry.Response; a != nil {
			add(a.Providers)
		}
		if s.Cached != nil && s.Cached.Response != nil {
			add(s.Cached.Response.Providers)
		}
	}
	out := make([]store.Provider, 0, len(order))
	for _, id := range order {
		out = append(out, byID[id])
	}
	return out
}

// authFailures returns the failed agent authentications of every cluster
// response, without repeats, newest first.
func authFailures(obs observations) []store.AuthFailure {
	seen := map[store.AuthFailure]bool{}
	var out []store.AuthFailure
	for _, s := range obs.Samples {
		if a := s.Cluster.Response; a != nil {
			for _, f := range a.AuthFailures {
				if !seen[f] {
					seen[f] = true
					out = append(out, f)
				}
			}
		}
	}
	slices.SortStableFunc(out, func(a, b store.AuthFailure) int { return b.At.Compare(a.At) })
	return out
}

// checkCluster judges a run without a user: every provider of the cluster
// must have a recent heartbeat.
func checkCluster(obs observations) verdict {
	providers := latestProviders(obs, "")
	var stale []store.Provider
	for _, p := range providers {
		if obs.RelayNow.Sub(p.LastHeartbeat) > obs.StaleAfter {
			stale = append(stale, p)
		}
	}
	if len(stale) > 0 {
		oldest := slices.MinFunc(stale, func(a, b store.Provider) int { return a.LastHeartbeat.Compare(b.LastHeartbeat) })
		return verdict{
			Code: verdictStale,
			Message: fmt.Sprintf("%d of %d providers have sent no heartbeat for more than %s; the oldest is provider %s of user %s on replica %s, last heartbeat %s ago.",
				len(stale), len(providers), obs.StaleAfter, oldest.ID, oldest.UserID, oldest.InstanceID, formatAge(obs.RelayNow.Sub(oldest.LastHeartbeat))),
			Fix:        fixStale,
			Replica:    oldest.InstanceID,
			ProviderID: oldest.ID,
		}
	}
	return verdict{
		Code: verdictOK,
		Message: fmt.Sprintf("Every replica reached (%d) sees the same registry, with %s.",
			len(clusterViews(obs)), plural(len(providers), "provider")),
		Fix: "Nothing to fix. Add -user to check one user's agent.",
	}
}

const fixStale = "The agent is hung, or its network drops traffic while the socket stays open. " +
	"Check the agent's log and the trader's network, and restart the agent."

// Ranks of the per-provider findings of checkUser. When no provider of the
// user reports TWS connected, the verdict is the finding of lowest rank.
const (
	rankSplit = iota
	rankStale
	rankTimeout
	rankDisconnected
	rankAgentError
	rankTWS
)

// checkUser judges one user's providers, from the registry responses and
// the live ib-status response.
func checkUser(obs observations) verdict {
	providers := latestProviders(obs, obs.UserID)
	if len(providers) == 0 {
		return noAgent(obs)
	}

	var live *ibStatusResponse
	if obs.Live != nil {
		live = obs.Live.Response
	}
	if live == nil || !live.AgentConnected {
		p := providers[0]
		return verdict{
			Code: verdictSplitRegistry,
			Message: fmt.Sprintf("The registry lists provider %s of user %s on replica %s, but the replica that responded to the live ib-status sees no agent of the user. The replicas disagree, unless the agent disconnected during the check.",
				p.ID, obs.UserID, p.InstanceID),
			Fix:        fixRedis + " Run the doctor again to tell a disconnect from a split.",
			Replica:    p.InstanceID,
			ProviderID: p.ID,
		}
	}

	statuses := map[string]providerStatus{}
	for _, st := range live.ProviderStatuses {
		statuses[st.ProviderID] = st
	}
	for _, p := range providers {
		if st, ok := statuses[p.ID]; ok && st.Source == "agent" && st.Connected {
			return verdict{
				Code: verdictOK,
				Message: fmt.Sprintf("Agent %s of user %s on replica %s is connected and reports TWS connected: %q.",
					p.ID, obs.UserID, p.InstanceID, orDefault(st.Message, live.Message)),
				Fix:        "Nothing to fix. If the dashboard still shows disconnected, check which relay URL the web app's backend calls.",
				Replica:    p.InstanceID,
				ProviderID: p.ID,
			}
		}
	}

	best := verdict{}
	bestRank := rankTWS + 1
	for _, p := range providers {
		v, rank := judgeProvider(obs, live, p, statuses)
		if rank < bestRank {
			best, bestRank = v, rank
		}
	}
	return best
}

// judgeProvider explains why provider p does not report TWS connected, and
// returns the rank of that finding.
func judgeProvider(obs observations, live *ibStatusResponse, p store.Provider, statuses map[string]providerStatus) (verdict, int) {
	heartbeatAge := obs.RelayNow.Sub(p.LastHeartbeat)
	agentName := fmt.Sprintf("Agent %s of user %s on replica %s", p.ID, p.UserID, p.InstanceID)
	v := verdict{Replica: p.InstanceID, ProviderID: p.ID}
	st, checked := statuses[p.ID]

	switch {
	case heartbeatAge > obs.StaleAfter:
		v.Code = verdictStale
		v.Message = fmt.Sprintf("%s sent its last heartbeat %s ago, more than %s.", agentName, formatAge(heartbeatAge), obs.StaleAfter)
		v.Fix = fixStale
		return v, rankStale

	case checked && st.Source != "agent" && st.Error != "" && !p.StateAt.IsZero() && obs.RelayNow.Sub(p.StateAt) > obs.StaleAfter:
		v.Code = verdictStale
		v.Message = fmt.Sprintf("%s did not respond to ib_status (%s), and its last agent_state is %s old, more than %s, so the relay's cached TWS state is out of date.",
			agentName, st.Error, formatAge(obs.RelayNow.Sub(p.StateAt)), obs.StaleAfter)
		v.Fix = fixStale
		return v, rankStale

	case !checked:
		v.Code = verdictSplitRegistry
		v.Message = fmt.Sprintf("%s is in the registry, but the replica that responded to the live ib-status did not check it.", agentName)
		v.Fix = fixRedis
		return v, rankSplit
	}

	switch st.Error {
	case "":
		v.Code = verdictTWSDisconnected
		v.Message = fmt.Sprintf("%s is connected and reports TWS not connected: %q.", agentName, orDefault(st.Message, live.Message))
		if live.BootPhase != nil {
			v.Message += fmt.Sprintf(" The agent is starting up (%s: %s).", live.BootPhase.Phase, live.BootPhase.Detail)
		}
		v.Fix = "Start TWS or IB Gateway on the trader's PC and log in, then check its API settings " +
			"(socket clients enabled, the port the agent connects to, trusted IPs) and the agent's log."
		return v, rankTWS

	case codeTimeout:
		v.Code = verdictAgentTimeout
		v.Message = fmt.Sprintf("%s is registered (last heartbeat %s ago) but did not respond to ib_status within %s.",
			agentName, formatAge(heartbeatAge), obs.StatusWait)
		v.Fix = fmt.Sprintf("The agent is busy or hung, or replica %s cannot deliver requests to it. "+
			"Check the agent's log, and the log of replica %s for this provider id.", p.InstanceID, p.InstanceID)
		return v, rankTimeout

	case codeRegistryUnavailable:
		v.Code = verdictSplitRegistry
		v.Message = fmt.Sprintf("%s could not be asked for its status: %s", agentName, orDefault(st.Message, "the request could not be routed over Redis."))
		v.Fix = "Check the Redis connectivity of replica " + p.InstanceID + " and of the replica that responded."
		return v, rankSplit

	case codeProviderDisconnected:
		v.Code = verdictAgentDisconnected
		v.Message = fmt.Sprintf("%s disconnected while its status was being checked: %s", agentName, orDefault(st.Message, "no reason given."))
		v.Fix = "The agent usually reconnects within seconds; run the doctor again. " +
			"If it keeps disconnecting, check the agent's log and the trader's network."
		return v, rankDisconnected
	}

	v.Code = verdictAgentError
	v.Message = fmt.Sprintf("%s responded to ib_status with an error (%s): %s", agentName, st.Error, orDefault(st.Message, "no message."))
	v.Fix = "Check the agent's log around this time, and update the agent if its version is old."
	return v, rankAgentError
}

// noAgent builds the no_agent verdict, with the latest failed agent
// authentications as the likely cause.
func noAgent(obs observations) verdict {
	v := verdict{
		Code: verdictNoAgent,
		Fix: "Check the relay URL and the API key configured in the agent, and the agent's log. " +
			"A key's fingerprint is the first 12 hex digits of its SHA-256: printf %s KEY | sha256sum | cut -c1-12.",
	}
	failures := authFailures(obs)
	message := fmt.Sprintf("No agent of user %s is registered on any replica.", obs.UserID)
	if len(failures) == 0 {
		v.Message = message + " No failed agent authentication is recorded either, so the agent does not reach this relay."
		return v
	}
	// A rejected key maps to no user, so the failures are the whole
	// cluster's, and the operator compares fingerprints.
	f := failures[0]
	v.Message = fmt.Sprintf("%s The cluster recorded %s of any user. The latest: key fingerprint %s from %s on replica %s, %s ago (%s).",
		message, plural(len(failures), "failed agent authentication"), f.KeyFingerprint, f.IP, f.ReplicaID, formatAge(obs.RelayNow.Sub(f.At)), f.Reason)
	v.Replica = f.ReplicaID
	return v
}

func replicaIDs(list []store.Replica) []string {
	ids := make([]string, 0, len(list))
	for _, r := range list {
		ids = append(ids, r.ID)
	}
	slices.Sort(ids)
	return ids
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// formatAge prints a duration rounded for people: tenths of a second below
// 10 s, whole seconds below an hour, minutes above.
func formatAge(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fs", d.Seconds())
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

// plural returns n and noun, with an s unless n is 1.
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func orNone(s string) string { return orDefault(s, "none") }

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
