package e2e

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// TestRequestRouting sends POST /options/relay/request through every replica
// to agents on other replicas, to a silent agent and to users with no agent.
func TestRequestRouting(t *testing.T) {
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b, cc := replicas[0], replicas[1], replicas[2]

	alice := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true})
	dave := c.startAgent("dave", cc.wsURL(), agentsim.Config{TWSConnected: false, Silent: true})
	waitRegistryIDs(t, replicas, alice.ProviderID(), dave.ProviderID())

	t.Run("answer through every replica", func(t *testing.T) {
		for _, r := range replicas {
			payload := map[string]string{"via": r.id}
			var answer agentResponse
			postJSON(t, r.url("/options/relay/request"), relayRequest{RequestType: "echo", Payload: payload, UserID: "alice", TimeoutMS: 5000}, http.StatusOK, &answer)
			checkAnswer(t, "echo through "+r.id, answer, alice.ProviderID(), a.id)
			checkData(t, "echo through "+r.id, answer.Data, `{"via": "`+r.id+`"}`)
		}

		// provider_id selects one exact provider.
		var answer agentResponse
		body := relayRequest{RequestType: "get_open_orders", ProviderID: alice.ProviderID(), UserID: "alice", TimeoutMS: 5000}
		postJSON(t, b.url("/options/relay/request"), body, http.StatusOK, &answer)
		checkAnswer(t, "get_open_orders by provider_id through "+b.id, answer, alice.ProviderID(), a.id)
		checkData(t, "get_open_orders by provider_id through "+b.id, answer.Data, `{"orders": [], "live_order_count": 0, "source": "live_book"}`)
	})

	t.Run("silent agent times out", func(t *testing.T) {
		const timeoutMS = 700
		// Through A the request crosses to C, and through C it stays local.
		for _, r := range []*replica{a, cc} {
			var failure apiError
			res := postJSON(t, r.url("/options/relay/request"), relayRequest{RequestType: "echo", Payload: map[string]int{"n": 1}, UserID: "dave", TimeoutMS: timeoutMS}, http.StatusGatewayTimeout, &failure)
			t.Logf("request to dave's silent agent through %s failed after %v", r.id, res.elapsed.Round(time.Millisecond))
			if failure.Error != "timeout" {
				t.Errorf("through %s: error %q, expected \"timeout\" (message %q)", r.id, failure.Error, failure.Message)
			}
			if failure.Message == "" {
				t.Errorf("through %s: the timeout response has no message", r.id)
			}
			if res.elapsed < timeoutMS*time.Millisecond || res.elapsed > 1500*time.Millisecond {
				t.Errorf("through %s: the timeout response came after %v, expected between %d ms and 1.5 s", r.id, res.elapsed, timeoutMS)
			}
		}
		if received := dave.Stats().RequestsReceived; received != 2 {
			t.Errorf("dave's agent received %d requests, expected 2 (one through %s, one through %s)", received, a.id, cc.id)
		}

		// ib-status for the silent agent names the cause: no response in time.
		got := b.ibStatus(t, "dave", "&timeout_ms=500")
		if got.Connected || !got.AgentConnected {
			t.Errorf("ib-status of dave through %s: connected %v, agent_connected %v, expected false and true", b.id, got.Connected, got.AgentConnected)
		}
		if len(got.ProviderStatuses) != 1 || got.ProviderStatuses[0].Error != "timeout" {
			t.Errorf("ib-status of dave through %s: provider_statuses %+v, expected one with error \"timeout\"", b.id, got.ProviderStatuses)
		}
		if !strings.Contains(got.Message, "did not respond") {
			t.Errorf("ib-status of dave through %s: message %q does not say that the agent did not respond", b.id, got.Message)
		}
	})

	t.Run("no provider", func(t *testing.T) {
		// carol has a key but no agent, and the user "nobody" has no key either.
		for _, user := range []string{"carol", "nobody"} {
			for _, r := range replicas {
				var failure apiError
				postJSON(t, r.url("/options/relay/request"), relayRequest{RequestType: "echo", UserID: user, TimeoutMS: 5000}, http.StatusServiceUnavailable, &failure)
				if failure.Error != "no_provider" {
					t.Errorf("request for %s through %s: error %q, expected \"no_provider\" (message %q)", user, r.id, failure.Error, failure.Message)
				}
				if !strings.Contains(failure.Message, user) {
					t.Errorf("request for %s through %s: message %q does not name the user", user, r.id, failure.Message)
				}
			}
		}
	})

	t.Run("agent disconnects in flight", func(t *testing.T) {
		// A request waiting on an agent that goes away fails with
		// provider_disconnected long before its timeout.
		type outcome struct {
			res httpResult
			err error
		}
		done := make(chan outcome, 1)
		go func() {
			body := relayRequest{RequestType: "sleep", Payload: map[string]int{"ms": 10_000}, UserID: "alice", TimeoutMS: 20_000}
			res, err := doHTTP(http.MethodPost, b.url("/options/relay/request"), body)
			done <- outcome{res, err}
		}()
		received := alice.Stats().RequestsReceived
		waitFor(t, convergeTimeout, "alice's agent to receive the sleep request", func() (bool, string) {
			return alice.Stats().RequestsReceived > received, ""
		})
		alice.stop()

		o := <-done
		if o.err != nil {
			t.Fatal(o.err)
		}
		var failure apiError
		checkAndDecode(t, "sleep through "+b.id+" while alice's agent leaves", o.res, http.StatusBadGateway, &failure)
		if failure.Error != "provider_disconnected" {
			t.Errorf("error %q, expected \"provider_disconnected\" (message %q)", failure.Error, failure.Message)
		}
		if o.res.elapsed > 3*time.Second {
			t.Errorf("provider_disconnected came after %v; it should come soon after the agent leaves, not near the 20 s timeout", o.res.elapsed)
		}
		t.Logf("request in flight failed with %s after %v", failure.Error, o.res.elapsed.Round(time.Millisecond))
	})
}
