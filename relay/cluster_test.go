package relay

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// Each test here runs against both stores with three replicas. Agents
// connect to replica a only; calls go through b and c as well.

func TestRegistrySameOnEveryReplica(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 3, nil)
			alice := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true}, rs...)
			bob := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-bob", Version: "1.10.0"}, rs...)

			for _, r := range rs {
				reg := r.registry(t)
				if reg.ProvidersConnected != 2 {
					t.Fatalf("%s: providers_connected = %d, want 2", r.srv.ReplicaID(), reg.ProvidersConnected)
				}
				byID := map[string]string{}
				for _, p := range reg.Providers {
					byID[p.ID] = p.UserID + "@" + p.InstanceID + "@" + p.AgentVersion
				}
				if got, want := byID[alice.ProviderID()], "alice@"+rs[0].srv.ReplicaID()+"@1.39.1"; got != want {
					t.Errorf("%s: alice's provider = %q, want %q", r.srv.ReplicaID(), got, want)
				}
				if got, want := byID[bob.ProviderID()], "bob@"+rs[0].srv.ReplicaID()+"@1.10.0"; got != want {
					t.Errorf("%s: bob's provider = %q, want %q", r.srv.ReplicaID(), got, want)
				}
			}
			// provider-status is the same listing under the old path.
			var legacy registryListing
			if status := rs[2].getJSON(t, "/ws/provider-status", &legacy); status != http.StatusOK || legacy.ProvidersConnected != 2 {
				t.Errorf("/ws/provider-status: status %d, providers %d", status, legacy.ProvidersConnected)
			}
		})
	}
}

func TestIBStatusSameOnEveryReplica(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 3, nil)
			alice := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true}, rs...)
			startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-bob", TWSConnected: false}, rs...)

			for _, r := range rs {
				live := r.ibStatus(t, "user_id=alice")
				if !live.Connected || !live.AgentConnected {
					t.Errorf("%s: alice live: connected=%v agent_connected=%v, want both true (%q)", r.srv.ReplicaID(), live.Connected, live.AgentConnected, live.Message)
				}
				if live.ConnectedProvider == nil || *live.ConnectedProvider != alice.ProviderID() {
					t.Errorf("%s: connected_provider = %v, want %s", r.srv.ReplicaID(), live.ConnectedProvider, alice.ProviderID())
				}
				if len(live.ProviderStatuses) != 1 || live.ProviderStatuses[0].Source != "agent" {
					t.Errorf("%s: provider_statuses = %+v, want one answered by the agent", r.srv.ReplicaID(), live.ProviderStatuses)
				}
				if live.AgentVersion == nil || *live.AgentVersion != "1.39.1" {
					t.Errorf("%s: agent_version = %v, want 1.39.1", r.srv.ReplicaID(), live.AgentVersion)
				}
				if live.Message != "IB TWS connected" {
					t.Errorf("%s: message = %q, want IB TWS connected", r.srv.ReplicaID(), live.Message)
				}

				bob := r.ibStatus(t, "user_id=bob")
				if bob.Connected || !bob.AgentConnected || bob.Message != "IB TWS not connected" {
					t.Errorf("%s: bob live = connected %v, agent_connected %v, %q", r.srv.ReplicaID(), bob.Connected, bob.AgentConnected, bob.Message)
				}
				for _, p := range bob.Providers {
					if p.UserID != "bob" {
						t.Errorf("%s: bob's ib-status lists %s's provider %s", r.srv.ReplicaID(), p.UserID, p.ID)
					}
				}

				carol := r.ibStatus(t, "user_id=carol")
				if carol.Connected || carol.AgentConnected || carol.Message != "No IB data provider connected" {
					t.Errorf("%s: carol = %+v, want no agent", r.srv.ReplicaID(), carol)
				}
			}

			// The cache answer needs the agent_state to have reached every replica.
			for _, r := range rs {
				eventually(t, 3*time.Second, func() bool {
					c := r.ibStatus(t, "user_id=alice&source=cache")
					return c.Connected && len(c.ProviderStatuses) == 1 && c.ProviderStatuses[0].Source == "heartbeat_cache"
				}, "%s: cached ib-status for alice never reported connected", r.srv.ReplicaID())
				c := r.ibStatus(t, "user_id=bob&source=cache")
				if c.Connected || !c.AgentConnected {
					t.Errorf("%s: bob cached = %+v", r.srv.ReplicaID(), c)
				}
			}

			all := rs[1].ibStatus(t, "")
			if len(all.ProviderStatuses) != 2 || !all.Connected {
				t.Errorf("ib-status without user_id: %d statuses, connected %v; want 2 and true", len(all.ProviderStatuses), all.Connected)
			}
		})
	}
}

func TestRequestAcrossReplicas(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 3, nil)
			alice := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true}, rs...)

			for _, r := range rs {
				status, ans := r.request(t, map[string]any{"user_id": "alice", "request_type": "echo", "payload": map[string]any{"n": 42, "s": "x\ny"}})
				if status != http.StatusOK {
					t.Fatalf("%s: status %d: %+v", r.srv.ReplicaID(), status, ans)
				}
				if ans.ProviderID != alice.ProviderID() || ans.InstanceID != rs[0].srv.ReplicaID() || !ans.Success {
					t.Errorf("%s: answer %+v", r.srv.ReplicaID(), ans)
				}
				if string(ans.Data) != `{"n":42,"s":"x\ny"}` && string(ans.Data) != `{"n": 42, "s": "x\ny"}` {
					var got map[string]any
					json.Unmarshal(ans.Data, &got)
					if got["n"] != 42.0 || got["s"] != "x\ny" {
						t.Errorf("%s: echo data = %s", r.srv.ReplicaID(), ans.Data)
					}
				}

				status, ans = r.request(t, map[string]any{"user_id": "alice", "request_type": "no_such_request"})
				if status != http.StatusOK || ans.Success || ans.Error == nil || *ans.Error != "Unknown request type: no_such_request" {
					t.Errorf("%s: unknown type: status %d, %+v", r.srv.ReplicaID(), status, ans)
				}
			}

			status, ans := rs[1].request(t, map[string]any{"user_id": "carol", "request_type": "get_positions"})
			if status != http.StatusServiceUnavailable || ans.ErrorCode != "no_provider" {
				t.Errorf("carol without agent: status %d, error %q; want 503 no_provider", status, ans.ErrorCode)
			}
		})
	}
}

func TestRequestsInFlightOutOfOrder(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 3, nil)
			startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice"}, rs...)

			delays := []int{300, 50, 200, 10, 150, 250}
			var wg sync.WaitGroup
			errs := make(chan string, len(delays))
			for i, ms := range delays {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rs[i%len(rs)]
					status, ans := r.request(t, map[string]any{"user_id": "alice", "request_type": "sleep", "payload": map[string]any{"ms": ms}})
					var data struct {
						SleptMS int `json:"slept_ms"`
					}
					json.Unmarshal(ans.Data, &data)
					if status != http.StatusOK || data.SleptMS != ms {
						errs <- fmt.Sprintf("sleep %d through %s: status %d, data %s", ms, r.srv.ReplicaID(), status, ans.Data)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for e := range errs {
				t.Error(e)
			}
		})
	}
}

func TestLargeAnswerArrivesWhole(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", ChainBytes: 2_000_000}, rs...)

			status, ans := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "fetch_chain", "payload": map[string]any{"ticker": "SPY"}})
			if status != http.StatusOK || !ans.Success {
				t.Fatalf("fetch_chain: status %d, %+v", status, ans.Message)
			}
			if len(ans.Data) < 2_000_000 {
				t.Errorf("fetch_chain data is %d bytes, want at least 2,000,000", len(ans.Data))
			}
			if !json.Valid(ans.Data) {
				t.Error("fetch_chain data is not valid JSON")
			}
		})
	}
}

func TestClosedAgentLeavesEveryRegistry(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 3, nil)
			a := dialRaw(t, rs[0])
			id := a.auth("key-alice")
			for _, r := range rs {
				eventually(t, 3*time.Second, func() bool { return r.hasProvider(t, id) }, "%s never listed %s", r.srv.ReplicaID(), id)
			}
			a.conn.Close(1000, "bye")
			for _, r := range rs {
				eventually(t, 2*time.Second, func() bool { return !r.hasProvider(t, id) }, "%s still lists %s after its socket closed", r.srv.ReplicaID(), id)
			}
		})
	}
}

func TestSilentAgentTimesOutAtDeadline(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", Silent: true, TWSConnected: true}, rs...)

			start := time.Now()
			status, ans := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "get_positions", "timeout_ms": 400})
			elapsed := time.Since(start)
			if status != http.StatusGatewayTimeout || ans.ErrorCode != "timeout" {
				t.Errorf("silent agent: status %d, error %q; want 504 timeout", status, ans.ErrorCode)
			}
			if elapsed < 400*time.Millisecond || elapsed > 1500*time.Millisecond {
				t.Errorf("timeout answered after %v, want about 400ms", elapsed)
			}

			st := rs[1].ibStatus(t, "user_id=alice&timeout_ms=300")
			if len(st.ProviderStatuses) != 1 || st.ProviderStatuses[0].Error != "timeout" || st.ProviderStatuses[0].Source != "heartbeat_cache" {
				t.Errorf("ib-status of a silent agent: statuses %+v", st.ProviderStatuses)
			}
		})
	}
}

func TestProviderChoiceAcrossReplicas(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			old := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", Version: "1.9.0"}, rs...)
			newer := startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-alice2", Version: "1.10.0"}, rs...)

			for _, r := range rs {
				_, ans := r.request(t, map[string]any{"user_id": "alice", "request_type": "echo"})
				if ans.ProviderID != newer.ProviderID() {
					t.Errorf("%s: request went to %s, want the 1.10.0 agent %s (not %s)", r.srv.ReplicaID(), ans.ProviderID, newer.ProviderID(), old.ProviderID())
				}
				_, ans = r.request(t, map[string]any{"user_id": "alice", "request_type": "echo", "provider_id": old.ProviderID()})
				if ans.ProviderID != old.ProviderID() {
					t.Errorf("%s: provider_id request went to %s, want %s", r.srv.ReplicaID(), ans.ProviderID, old.ProviderID())
				}
				// Bob has no agent: account requests never fall back to alice's.
				status, ans := r.request(t, map[string]any{"user_id": "bob", "request_type": "get_positions", "allow_fallback": true})
				if status != http.StatusServiceUnavailable {
					t.Errorf("%s: bob's get_positions with fallback: status %d via %s, want 503", r.srv.ReplicaID(), status, ans.ProviderID)
				}
				status, ans = r.request(t, map[string]any{"user_id": "bob", "request_type": "echo", "allow_fallback": true})
				if status != http.StatusOK || ans.ProviderID != newer.ProviderID() {
					t.Errorf("%s: bob's echo with fallback: status %d via %s", r.srv.ReplicaID(), status, ans.ProviderID)
				}
			}
		})
	}
}

func TestAccountEventsFromEveryReplica(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			a := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice"}, rs...)
			before := float64(time.Now().UnixMicro())/1e6 - 1
			for i := range 3 {
				if err := a.SendAccountEvent("order_filled", map[string]any{"order_id": i}); err != nil {
					t.Fatal(err)
				}
			}
			var out struct {
				Events []map[string]any `json:"events"`
			}
			eventually(t, 3*time.Second, func() bool {
				rs[1].getJSON(t, fmt.Sprintf("/options/relay/account-events?user_id=alice&since=%f", before), &out)
				return len(out.Events) == 3
			}, "account events through the other replica: got %d, want 3", len(out.Events))
			var ids []float64
			for _, ev := range out.Events {
				if ev["event"] != "order_filled" || ev["received_at"] == nil {
					t.Errorf("event %v lacks event or received_at", ev)
				}
				ids = append(ids, ev["order_id"].(float64))
			}
			if !slices.Equal(ids, []float64{0, 1, 2}) {
				t.Errorf("events in order %v, want oldest first [0 1 2]", ids)
			}
			last := out.Events[2]["received_at"].(float64)
			rs[1].getJSON(t, fmt.Sprintf("/options/relay/account-events?user_id=alice&since=%f", last), &out)
			if len(out.Events) != 0 {
				t.Errorf("since the last event: got %d events, want 0", len(out.Events))
			}
			rs[1].getJSON(t, "/options/relay/account-events?user_id=bob", &out)
			if len(out.Events) != 0 {
				t.Errorf("bob sees %d of alice's events", len(out.Events))
			}
		})
	}
}

// TestStaleRegistryEntry makes the registry name a replica that no longer
// holds the agent's socket: the caller gets a definite answer at once, and a
// request by user retries on the user's other agent.
func TestStaleRegistryEntry(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			ghost := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", Version: "2.0.0"}, rs...)

			// Forget the socket on r0 while its registry entry stays.
			rs[0].srv.mu.Lock()
			delete(rs[0].srv.agents, ghost.ProviderID())
			rs[0].srv.mu.Unlock()

			start := time.Now()
			status, ans := rs[1].request(t, map[string]any{"user_id": "alice", "provider_id": ghost.ProviderID(), "request_type": "echo", "timeout_ms": 5000})
			if status != http.StatusBadGateway || ans.ErrorCode != "provider_disconnected" {
				t.Errorf("stale provider: status %d %q, want 502 provider_disconnected", status, ans.ErrorCode)
			}
			if waited := time.Since(start); waited > time.Second {
				t.Errorf("stale provider answered after %v, want at once", waited)
			}

			other := startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-alice2", Version: "1.0.0"}, rs...)
			status, ans = rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 5000})
			if status != http.StatusOK || ans.ProviderID != other.ProviderID() {
				t.Errorf("request by user after a stale entry: status %d via %q, want 200 via %s", status, ans.ProviderID, other.ProviderID())
			}
		})
	}
}

func TestMetricsCountRoutedRequests(t *testing.T) {
	rs := newCluster(t, "redis", 2, nil)
	startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true}, rs...)
	rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "get_positions"})
	rs[0].request(t, map[string]any{"user_id": "alice", "request_type": "get_positions"})

	resp, err := http.Get(rs[1].base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`relay_requests_total{outcome="ok",route="remote",type="get_positions"} 1`,
		`relay_registry_providers 1`,
		`relay_agents_connected 0`,
		`relay_peer_messages_total{direction="in",kind="resp"} 1`,
		`relay_draining 0`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("replica 1 metrics lack %q", want)
		}
	}
}

// TestStaleStateNotReported makes an agent's last agent_state older than
// StateMaxAge: ib-status from the cache, or after the agent fails to answer,
// no longer reports TWS connected from it.
func TestStaleStateNotReported(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.StateMaxAge = 300 * time.Millisecond })
	a := dialRaw(t, rs[0])
	a.auth("key-alice")
	a.send(`{"type":"agent_state","ib_connected":true}`)
	eventually(t, time.Second, func() bool { return rs[0].ibStatus(t, "user_id=alice&source=cache").Connected },
		"fresh cached state never reported connected")

	time.Sleep(400 * time.Millisecond)
	st := rs[0].ibStatus(t, "user_id=alice&source=cache")
	if st.Connected || !strings.Contains(st.Message, "old") {
		t.Errorf("stale cached state: connected %v, message %q; want false and the state's age", st.Connected, st.Message)
	}
	st = rs[0].ibStatus(t, "user_id=alice&timeout_ms=200")
	if st.Connected {
		t.Errorf("silent agent with a stale state reported connected: %q", st.Message)
	}
}
