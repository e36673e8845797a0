package relay

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/internal/tcpproxy"
)

// TestSlowAgentCutOff connects an agent that never reads. Requests pile up
// in its queue until it is disconnected: its callers get 502 long before
// their timeout, and another agent on the same replica keeps answering.
func TestSlowAgentCutOff(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) {
		c.SendQueue = 8
		c.WriteTimeout = 500 * time.Millisecond
	})
	r := rs[0]
	slow := dialRaw(t, r)
	slowID := slow.auth("key-alice")
	healthy := startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-bob"}, r)

	// Large payloads fill the socket buffers, so the relay's writes block.
	payload := map[string]any{"pad": strings.Repeat("x", 256<<10)}
	start := time.Now()
	results := make(chan int, 40)
	for range 40 {
		go func() {
			status, _ := r.request(t, map[string]any{"provider_id": slowID, "request_type": "echo", "payload": payload, "timeout_ms": 20000})
			results <- status
		}()
	}
	// Requests sent before the cut-off fail with 502; later ones find no provider.
	for range 40 {
		if status := <-results; status != http.StatusBadGateway && status != http.StatusServiceUnavailable {
			t.Errorf("request to the slow agent: status %d, want 502 or 503", status)
		}
	}
	if waited := time.Since(start); waited > 10*time.Second {
		t.Errorf("slow agent cut off after %v, want well below the 20 s timeout", waited)
	}
	eventually(t, 2*time.Second, func() bool { return !r.hasProvider(t, slowID) }, "slow agent still registered")

	status, ans := r.request(t, map[string]any{"user_id": "bob", "request_type": "echo", "timeout_ms": 2000})
	if status != http.StatusOK || ans.ProviderID != healthy.ProviderID() {
		t.Errorf("healthy agent after the slow one: status %d via %s", status, ans.ProviderID)
	}
	if got := testutil.ToFloat64(r.srv.metrics.disconnects.WithLabelValues("slow_reader")); got != 1 {
		for _, reason := range []string{"agent_closed", "read_failed", "ping_timeout", "restart", "shutdown"} {
			t.Logf("%s: %v", reason, testutil.ToFloat64(r.srv.metrics.disconnects.WithLabelValues(reason)))
		}
		t.Errorf("slow_reader disconnects = %v, want 1", got)
	}
}

// TestLateAndDuplicateAnswersDropped answers a request twice and another
// after its caller timed out: each extra answer is counted and reaches nobody.
func TestLateAndDuplicateAnswersDropped(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			a := dialRaw(t, rs[0])
			id := a.auth("key-alice")
			for _, r := range rs {
				eventually(t, 3*time.Second, func() bool { return r.hasProvider(t, id) }, "provider not listed")
			}

			// Twice answered: the caller gets the first answer.
			done := make(chan requestAnswer, 1)
			go func() {
				_, ans := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 3000})
				done <- ans
			}()
			m := a.read()
			reqID := m["request_id"].(string)
			a.send(`{"type":"response","request_id":"` + reqID + `","success":true,"data":{"n":1},"error":null}`)
			a.send(`{"type":"response","request_id":"` + reqID + `","success":true,"data":{"n":2},"error":null}`)
			if ans := <-done; string(ans.Data) != `{"n":1}` {
				t.Errorf("caller got %s, want the first answer", ans.Data)
			}

			// Late: the caller has timed out before the answer.
			status, _ := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 100})
			if status != http.StatusGatewayTimeout {
				t.Errorf("unanswered request: status %d, want 504", status)
			}
			m = a.read()
			a.send(`{"type":"response","request_id":"` + m["request_id"].(string) + `","success":true,"data":{"late":true},"error":null}`)

			// The next request gets its own answer, not the late one.
			go func() {
				_, ans := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 3000})
				done <- ans
			}()
			m = a.read()
			a.send(`{"type":"response","request_id":"` + m["request_id"].(string) + `","success":true,"data":{"n":3},"error":null}`)
			if ans := <-done; string(ans.Data) != `{"n":3}` {
				t.Errorf("next caller got %s, want its own answer", ans.Data)
			}

			dropped := func() float64 {
				total := 0.0
				for _, r := range rs {
					for _, reason := range []string{"unknown_request", "no_caller", "wrong_provider"} {
						total += testutil.ToFloat64(r.srv.metrics.lateResponses.WithLabelValues(reason))
					}
				}
				return total
			}
			eventually(t, 2*time.Second, func() bool { return dropped() == 2 }, "dropped answers = %v, want 2 (one duplicate, one late)", dropped())
		})
	}
}

// TestDuplicateAgentReconnect models an agent that reconnects to another
// replica before its old socket is noticed dead: requests go to the new
// connection, and the old replica's late clean-up leaves it registered.
func TestDuplicateAgentReconnect(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, nil)
			old := dialRaw(t, rs[0])
			oldID := old.auth("key-alice")
			time.Sleep(10 * time.Millisecond) // distinct connected_at
			fresh := startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-alice"}, rs...)

			for _, r := range rs {
				status, ans := r.request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 2000})
				if status != http.StatusOK || ans.ProviderID != fresh.ProviderID() {
					t.Errorf("%s: request went to %q (status %d), want the new connection %s", r.srv.ReplicaID(), ans.ProviderID, status, fresh.ProviderID())
				}
			}

			old.conn.CloseNow()
			for _, r := range rs {
				eventually(t, 3*time.Second, func() bool { return !r.hasProvider(t, oldID) }, "%s still lists the old connection", r.srv.ReplicaID())
				if !r.hasProvider(t, fresh.ProviderID()) {
					t.Errorf("%s lost the new registration after the old socket's clean-up", r.srv.ReplicaID())
				}
			}
		})
	}
}

// TestUnknownPeerMessagesIgnored publishes messages of another protocol
// version, and garbage, on a replica's inbox: they are counted, and the
// replica keeps routing.
func TestUnknownPeerMessagesIgnored(t *testing.T) {
	client := redisClient(t)
	rs := newCluster(t, "redis", 2, nil)
	startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice"}, rs...)

	st := rs[1].srv.store
	for _, msg := range []string{
		`{"v":2,"k":"resp","id":"x","p":"y"}` + "\n{}",
		`{"v":1,"k":"teleport","id":"x","p":"y"}` + "\n",
		"not a header",
		"",
		`{"v":1,"k":"resp","id":"r0-nope","p":"y","ok":true}` + "\n{\"n\":1}",
	} {
		if err := st.Send(context.Background(), rs[0].srv.ReplicaID(), []byte(msg)); err != nil {
			t.Fatalf("publish: %v", err)
		}
	}
	// A registry event of a future version on the events channel is ignored too.
	var prefix string
	for _, ch := range client.PubSubChannels(context.Background(), "test-*:events").Val() {
		prefix = strings.TrimSuffix(ch, ":events")
	}
	if prefix != "" {
		client.Publish(context.Background(), prefix+":events", `{"v":9,"op":"up","replica_id":"zz"}`)
	}

	eventually(t, 2*time.Second, func() bool {
		return testutil.ToFloat64(rs[0].srv.metrics.peerMessages.WithLabelValues("in", "unknown")) >= 3
	}, "unknown peer messages not counted")
	status, _ := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 2000})
	if status != http.StatusOK {
		t.Errorf("routing after unknown messages: status %d", status)
	}
}

// TestHalfOpenAgentDetected stops an agent's traffic without a close: the
// relay's ping finds it within PingInterval + PongTimeout, and a request in
// flight fails then, before its own timeout.
func TestHalfOpenAgentDetected(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) {
		c.PingInterval = 300 * time.Millisecond
		c.PongTimeout = 300 * time.Millisecond
	})
	r := rs[0]
	proxy := tcpproxy.New(t, strings.TrimPrefix(r.base, "http://"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws://"+proxy.Addr+"/ws/data-provider", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	a := &rawAgent{t: t, conn: conn}
	go func() {
		// Keep reading so pings are answered until the freeze.
		a.readErr(30 * time.Second)
	}()
	a.send(`{"type":"auth","api_key":"key-alice"}`)
	eventually(t, 2*time.Second, func() bool { return len(r.registry(t).Providers) == 1 }, "agent not registered")

	proxy.Freeze()
	start := time.Now()
	status, _ := r.request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 10000})
	waited := time.Since(start)
	if status != http.StatusBadGateway {
		t.Errorf("request to a half-open agent: status %d, want 502", status)
	}
	if bound := 300*time.Millisecond + 300*time.Millisecond + 500*time.Millisecond; waited > bound {
		t.Errorf("half-open agent found after %v, want within %v", waited, bound)
	}
	eventually(t, time.Second, func() bool { return len(r.registry(t).Providers) == 0 }, "half-open agent still registered")
}

// TestDrainIgnoresTimedOutRequests times a request out against a silent
// agent, then drains: the timed-out request no longer counts as in flight,
// so the drain does not wait for DrainTimeout.
func TestDrainIgnoresTimedOutRequests(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.DrainTimeout = 10 * time.Second })
	startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", Silent: true}, rs...)
	if status, _ := rs[0].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 100}); status != http.StatusGatewayTimeout {
		t.Fatalf("silent agent: status %d, want 504", status)
	}
	start := time.Now()
	if err := rs[0].srv.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("drain took %v with nothing in flight, want well below the 10 s drain timeout", took)
	}
}
