package main

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/relay-project/relay/store"
)

// relayNow is the relay clock of every observation built by the unit tests.
var relayNow = time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)

// fixture describes observations for a unit test: the cluster responses of
// the samples in turn, the registry listings in turn, and the live response.
type fixture struct {
	user     string
	clusters []clusterResponse
	// registries are the providers of each registry response. A nil entry is
	// a response with no providers.
	registries [][]store.Provider
	// registryErr, when set, replaces every second registry response.
	registryErr *apiError
	live        *ibStatusResponse
	// transportErr, when set, replaces every call's response.
	transportErr string
	// failEvery, when above zero, replaces every n-th cluster response by a
	// 502 of a load balancer.
	failEvery int
	samples   int
}

// observe builds the observations of f, one second per call.
func (f fixture) observe() observations {
	obs := observations{
		URL: "http://relay:8000", UserID: f.user, StaleAfter: 30 * time.Second,
		StatusWait: 3750 * time.Millisecond, RelayNow: relayNow,
	}
	n := f.samples
	if n == 0 {
		n = 6
	}
	at := relayNow.Add(-time.Minute)
	tick := func() time.Time {
		at = at.Add(time.Second)
		return at
	}
	for i := range n {
		var s sample
		s.Cluster = call[clusterResponse]{callMeta: callMeta{Path: "/options/relay/cluster", At: tick(), Status: http.StatusOK}}
		switch {
		case f.transportErr != "":
			s.Cluster.Status, s.Cluster.Err = 0, f.transportErr
		case f.failEvery > 0 && i%f.failEvery == 0:
			s.Cluster.Status, s.Cluster.Err = http.StatusBadGateway, `HTTP 502 Bad Gateway, not a relay error object: "bad gateway"`
		case len(f.clusters) > 0:
			response := f.clusters[i%len(f.clusters)]
			s.Cluster.Response = &response
		default:
			response := healthyCluster("r1", "r1")
			s.Cluster.Response = &response
		}

		s.Registry = call[registryResponse]{callMeta: callMeta{Path: "/options/relay/registry", At: tick(), Status: http.StatusOK}}
		switch {
		case f.transportErr != "":
			s.Registry.Status, s.Registry.Err = 0, f.transportErr
		case f.registryErr != nil && i%2 == 1:
			s.Registry.Status, s.Registry.APIErr = errorStatus[f.registryErr.Code], f.registryErr
		default:
			var providers []store.Provider
			if len(f.registries) > 0 {
				providers = f.registries[i%len(f.registries)]
			}
			s.Registry.Response = &registryResponse{ProvidersConnected: len(providers), Providers: providers}
		}
		obs.Samples = append(obs.Samples, s)
	}
	if f.user != "" && f.transportErr == "" {
		live := f.live
		if live == nil {
			live = &ibStatusResponse{Message: "No IB data provider connected", ProviderStatuses: []providerStatus{}}
		}
		obs.Live = &call[ibStatusResponse]{callMeta: callMeta{Path: "/options/relay/ib-status", At: tick(), Status: http.StatusOK}, Response: live}
	}
	return obs
}

// errorStatus is the HTTP status of each relay error code the fixtures use.
var errorStatus = map[string]int{
	codeUnauthorized:        http.StatusUnauthorized,
	codeRegistryUnavailable: http.StatusServiceUnavailable,
	"not_found":             http.StatusNotFound,
}

func healthyCluster(id string, sees ...string) clusterResponse {
	a := clusterResponse{Replica: id, Store: store.Health{Backend: "redis", RegistryOK: true, PubSubOK: true}, Time: relayNow}
	for _, s := range sees {
		a.Replicas = append(a.Replicas, store.Replica{ID: s, LastSeen: relayNow})
	}
	return a
}

// provider returns a provider of user on replica whose last heartbeat and
// agent_state are heartbeatAge old.
func provider(id, user, replica string, heartbeatAge time.Duration) store.Provider {
	connected := true
	return store.Provider{
		ID: id, UserID: user, InstanceID: replica, AgentVersion: "1.39.1",
		ConnectedAt: relayNow.Add(-time.Hour), LastHeartbeat: relayNow.Add(-heartbeatAge),
		StateAt: relayNow.Add(-heartbeatAge), IBConnected: &connected, IsActive: true,
	}
}

// liveResponse returns a live ib-status response that lists providers and their statuses.
func liveResponse(providers []store.Provider, statuses ...providerStatus) *ibStatusResponse {
	a := &ibStatusResponse{AgentConnected: len(providers) > 0, Source: "relay", Providers: providers, ProviderStatuses: statuses}
	for _, st := range statuses {
		if st.Connected {
			a.Connected = true
		}
	}
	return a
}

func agentStatus(p store.Provider, connected bool, message string) providerStatus {
	return providerStatus{ProviderID: p.ID, UserID: p.UserID, InstanceID: p.InstanceID, Connected: connected, Source: "agent", Message: message}
}

func failedStatus(p store.Provider, code, message string) providerStatus {
	return providerStatus{ProviderID: p.ID, UserID: p.UserID, InstanceID: p.InstanceID, Connected: *p.IBConnected, Source: "heartbeat_cache", Error: code, Message: message}
}

func TestDiagnose(t *testing.T) {
	fresh := provider("p-fresh", "alice", "r1", 2*time.Second)
	old := provider("p-old", "alice", "r2", 90*time.Second)
	oldState := provider("p-oldstate", "alice", "r1", 2*time.Second)
	oldState.StateAt = relayNow.Add(-5 * time.Minute)
	bob := provider("p-bob", "bob", "r1", 2*time.Second)
	bobStale := provider("p-bob", "bob", "r2", 45*time.Second)
	unhealthy := healthyCluster("r2")
	unhealthy.Store.RegistryOK = false
	unhealthy.Store.LastError = "dial tcp 10.0.0.5:6379: connect: connection refused"
	stalled := healthyCluster("r1", "r1")
	stalled.Store.PubSubOK = false
	stalled.Store.Since = relayNow.Add(-500 * time.Millisecond)
	memoryA := healthyCluster("m1", "m1")
	memoryA.Store.Backend = "memory"
	memoryB := healthyCluster("m2", "m2")
	memoryB.Store.Backend = "memory"

	cases := map[string]struct {
		fixture      fixture
		wantCode     string
		wantReplica  string
		wantProvider string
		wantParts    []string
	}{
		"nothing responds": {
			fixture:  fixture{user: "alice", transportErr: "dial tcp 10.0.0.1:8000: connect: connection refused", samples: 1},
			wantCode: verdictUnreachable, wantParts: []string{"Cannot reach the relay at http://relay:8000", "connection refused"},
		},
		"one backend of the balancer fails": {
			fixture:  fixture{user: "alice", failEvery: 2, registries: [][]store.Provider{{fresh}}, live: liveResponse([]store.Provider{fresh}, agentStatus(fresh, true, "IB TWS connected"))},
			wantCode: verdictUnreachable, wantParts: []string{"3 of 13 calls", "502 Bad Gateway"},
		},
		"not a relay": {
			fixture:  fixture{user: "alice", registryErr: &apiError{Code: "not_found", Message: "Not Found"}},
			wantCode: verdictUnreachable, wantParts: []string{"404 Not Found for /options/relay/registry"},
		},
		"token rejected": {
			fixture:  fixture{user: "alice", registryErr: &apiError{Code: codeUnauthorized, Message: "Missing or invalid bearer token"}},
			wantCode: verdictUnauthorized, wantParts: []string{"on 3 of 13 calls"},
		},
		"replica store unhealthy": {
			fixture:     fixture{user: "alice", clusters: []clusterResponse{healthyCluster("r1", "r1"), unhealthy}},
			wantCode:    verdictSplitRegistry,
			wantReplica: "r2",
			wantParts:   []string{"Replica r2 reports registry_ok=false pubsub_ok=true for", "connection refused"},
		},
		"registry failure named before pub/sub stall": {
			fixture:     fixture{user: "alice", clusters: []clusterResponse{stalled, unhealthy}},
			wantCode:    verdictSplitRegistry,
			wantReplica: "r2",
			wantParts:   []string{"replica r1 reports registry_ok=true pubsub_ok=false for 0.5s"},
		},
		"replica store unhealthy and calls failed": {
			fixture:     fixture{user: "alice", failEvery: 3, clusters: []clusterResponse{healthyCluster("r1", "r1"), unhealthy}},
			wantCode:    verdictSplitRegistry,
			wantReplica: "r2",
		},
		"registry unavailable response": {
			fixture:  fixture{user: "alice", registryErr: &apiError{Code: codeRegistryUnavailable, Message: "The cluster registry is unavailable."}},
			wantCode: verdictSplitRegistry, wantParts: []string{"registry_unavailable"},
		},
		"replicas without Redis behind one URL": {
			fixture:     fixture{clusters: []clusterResponse{memoryA, memoryB}},
			wantCode:    verdictSplitRegistry,
			wantReplica: "m1",
			wantParts:   []string{"in-process registry", "m1, m2"},
		},
		"replica lists differ": {
			fixture:     fixture{clusters: []clusterResponse{healthyCluster("r1", "r1", "r2"), healthyCluster("r2", "r2")}},
			wantCode:    verdictSplitRegistry,
			wantReplica: "r2",
			wantParts:   []string{"r1 sees [r1 r2]", "r2 sees [r2]"},
		},
		"provider listed with gaps": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}, nil},
				live:       liveResponse([]store.Provider{fresh}, agentStatus(fresh, true, "IB TWS connected")),
			},
			wantCode:  verdictSplitRegistry,
			wantParts: []string{"provider p-fresh of user alice on replica r1 is listed in 3 of 6 responses"},
		},
		"provider connects during the check": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{nil, nil, {fresh}, {fresh}, {fresh}, {fresh}},
				live:       liveResponse([]store.Provider{fresh}, agentStatus(fresh, true, "IB TWS connected")),
			},
			wantCode: verdictOK, wantReplica: "r1", wantProvider: "p-fresh",
		},
		"no agent": {
			fixture:  fixture{user: "alice", registries: [][]store.Provider{{bob}}},
			wantCode: verdictNoAgent, wantParts: []string{"No agent of user alice", "No failed agent authentication"},
		},
		"registry lists agent the live replica misses": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}},
				live:       liveResponse(nil),
			},
			wantCode: verdictSplitRegistry, wantReplica: "r1", wantProvider: "p-fresh",
			wantParts: []string{"sees no agent of the user"},
		},
		"connected": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh, bob}},
				live:       liveResponse([]store.Provider{fresh}, agentStatus(fresh, true, "IB TWS connected")),
			},
			wantCode: verdictOK, wantReplica: "r1", wantProvider: "p-fresh",
			wantParts: []string{`reports TWS connected: "IB TWS connected"`},
		},
		"connected only in the cache": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}},
				live:       liveResponse([]store.Provider{fresh}, failedStatus(fresh, codeTimeout, "The agent did not respond to ib_status within 3750 ms.")),
			},
			wantCode: verdictAgentTimeout, wantReplica: "r1", wantProvider: "p-fresh",
			wantParts: []string{"on replica r1", "last heartbeat 2.0s ago", "within 3.75s"},
		},
		"heartbeat stale": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{old}},
				live:       liveResponse([]store.Provider{old}, failedStatus(old, codeTimeout, "")),
			},
			wantCode: verdictStale, wantReplica: "r2", wantProvider: "p-old",
			wantParts: []string{"last heartbeat 1m30s ago, more than 30s"},
		},
		"cached state old": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{oldState}},
				live:       liveResponse([]store.Provider{oldState}, failedStatus(oldState, codeTimeout, "")),
			},
			wantCode: verdictStale, wantReplica: "r1", wantProvider: "p-oldstate",
			wantParts: []string{"last agent_state is 5m0s old"},
		},
		"TWS not connected": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}},
				live:       liveResponse([]store.Provider{fresh}, agentStatus(fresh, false, "IB TWS not connected")),
			},
			wantCode: verdictTWSDisconnected, wantReplica: "r1", wantProvider: "p-fresh",
			wantParts: []string{`reports TWS not connected: "IB TWS not connected"`},
		},
		"stale agent outranks TWS not connected": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh, old}},
				live:       liveResponse([]store.Provider{fresh, old}, agentStatus(fresh, false, "IB TWS not connected"), failedStatus(old, codeTimeout, "")),
			},
			wantCode: verdictStale, wantReplica: "r2", wantProvider: "p-old",
		},
		"one of two agents connected": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{old, fresh}},
				live:       liveResponse([]store.Provider{old, fresh}, failedStatus(old, codeTimeout, ""), agentStatus(fresh, true, "IB TWS connected")),
			},
			wantCode: verdictOK, wantReplica: "r1", wantProvider: "p-fresh",
		},
		"agent disconnects during the check": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}},
				live:       liveResponse([]store.Provider{fresh}, failedStatus(fresh, codeProviderDisconnected, "The agent is no longer connected.")),
			},
			wantCode: verdictAgentDisconnected, wantProvider: "p-fresh",
		},
		"agent responds with error": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}},
				live:       liveResponse([]store.Provider{fresh}, failedStatus(fresh, "agent_error", "ib_insync not ready")),
			},
			wantCode: verdictAgentError, wantProvider: "p-fresh",
			wantParts: []string{"(agent_error): ib_insync not ready"},
		},
		"agent's replica unreachable over Redis": {
			fixture: fixture{
				user:       "alice",
				registries: [][]store.Provider{{fresh}},
				live:       liveResponse([]store.Provider{fresh}, failedStatus(fresh, codeRegistryUnavailable, "The request could not be routed.")),
			},
			wantCode: verdictSplitRegistry, wantReplica: "r1",
		},
		"cluster without user healthy": {
			fixture:  fixture{registries: [][]store.Provider{{fresh, bob}}},
			wantCode: verdictOK, wantParts: []string{"Every replica reached (1)", "with 2 providers"},
		},
		"cluster without user with stale provider": {
			fixture:     fixture{registries: [][]store.Provider{{fresh, bobStale}}},
			wantCode:    verdictStale,
			wantReplica: "r2", wantProvider: "p-bob",
			wantParts: []string{"1 of 2 providers", "last heartbeat 45s ago"},
		},
	}

	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			v := diagnose(tc.fixture.observe())
			if v.Code != tc.wantCode {
				t.Fatalf("verdict %s (%s), want %s", v.Code, v.Message, tc.wantCode)
			}
			if tc.wantReplica != "" && v.Replica != tc.wantReplica {
				t.Errorf("replica %q, want %q", v.Replica, tc.wantReplica)
			}
			if tc.wantProvider != "" && v.ProviderID != tc.wantProvider {
				t.Errorf("provider %q, want %q", v.ProviderID, tc.wantProvider)
			}
			for _, part := range tc.wantParts {
				if !strings.Contains(v.Message, part) {
					t.Errorf("message %q does not contain %q", v.Message, part)
				}
			}
			if v.Fix == "" {
				t.Error("verdict has no fix")
			}
			if strings.Contains(v.Message, "\n") || strings.Contains(v.Fix, "\n") {
				t.Errorf("verdict spans several lines: %q %q", v.Message, v.Fix)
			}
		})
	}
}

func TestHasGap(t *testing.T) {
	cases := map[string]struct {
		presence []bool
		want     bool
	}{
		"always listed":      {[]bool{true, true, true}, false},
		"never listed":       {[]bool{false, false}, false},
		"appears":            {[]bool{false, true, true}, false},
		"disappears":         {[]bool{true, true, false}, false},
		"alternates":         {[]bool{true, false, true, false}, true},
		"one gap late":       {[]bool{false, true, true, false, true}, true},
		"listed once":        {[]bool{false, true, false}, false},
		"empty":              {nil, false},
		"back after absence": {[]bool{true, false, false, true}, true},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			if got := hasGap(tc.presence); got != tc.want {
				t.Errorf("hasGap(%v) = %t, want %t", tc.presence, got, tc.want)
			}
		})
	}
}

func TestRelayClockOffset(t *testing.T) {
	local := time.Date(2025, 3, 14, 15, 0, 0, 0, time.UTC)
	var samples []sample
	for i, offset := range []time.Duration{2 * time.Second, 3 * time.Second, 90 * time.Second} {
		at := local.Add(time.Duration(i) * time.Second)
		response := clusterResponse{Time: at.Add(100 * time.Millisecond).Add(offset)}
		samples = append(samples, sample{Cluster: call[clusterResponse]{
			callMeta: callMeta{At: at, Took: 200 * time.Millisecond}, Response: &response,
		}})
	}
	if got := relayClockOffset(samples); got != 3*time.Second {
		t.Errorf("offset %v, want the median 3s", got)
	}
	if got := relayClockOffset(nil); got != 0 {
		t.Errorf("offset without responses %v, want 0", got)
	}
}

func TestFormatAge(t *testing.T) {
	cases := map[time.Duration]string{
		-time.Second:                          "0s",
		1500 * time.Millisecond:               "1.5s",
		42*time.Second + 400*time.Millisecond: "42s",
		3*time.Hour + 29*time.Second:          "3h0m0s",
	}
	for d, want := range cases {
		if got := formatAge(d); got != want {
			t.Errorf("formatAge(%v) = %q, want %q", d, got, want)
		}
	}
}
