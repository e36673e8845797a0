package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/relay-project/relay/agentsim"
)

// TestSIGTERMMovesAgents stops a replica with SIGTERM, as a rolling restart
// does. Its agents, which dial through a round-robin proxy, must get close
// status 1012, leave the other replicas' registries at once and reconnect
// to the other replicas.
func TestSIGTERMMovesAgents(t *testing.T) {
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b, cc := replicas[0], replicas[1], replicas[2]

	// The proxy sends every agent to A first, then spreads new connections
	// over the three replicas, A included, as a load balancer that has not
	// noticed the restart yet would.
	proxy := startProxy(t, a.addr)
	alice := c.startAgent("alice", proxy.wsURL(), agentsim.Config{TWSConnected: true})
	bob := c.startAgent("bob", proxy.wsURL(), agentsim.Config{TWSConnected: false})
	oldIDs := []string{alice.ProviderID(), bob.ProviderID()}
	waitRegistryIDs(t, replicas, oldIDs...)
	for _, p := range b.registry(t).Providers {
		if p.InstanceID != a.id {
			t.Fatalf("provider %s of %s is on %s, expected %s before the restart", p.ID, p.UserID, p.InstanceID, a.id)
		}
	}
	proxy.setBackends(a.addr, b.addr, cc.addr)

	stopped := time.Now()
	a.signal(t, syscall.SIGTERM)
	survivors := []*replica{b, cc}
	removal := waitFor(t, 2*time.Second, "A's providers to leave the registries of B and C", func() (bool, string) {
		for _, r := range survivors {
			for _, id := range oldIDs {
				if findProvider(r.registry(t).Providers, id) != nil {
					return false, fmt.Sprintf("replica %s still lists %s", r.id, id)
				}
			}
		}
		return true, ""
	})
	t.Logf("A's providers left the registries of B and C %v after SIGTERM (registry TTL %v)", removal.Round(time.Millisecond), registryTTL)
	if removal >= time.Second {
		t.Errorf("A's providers left the other registries %v after SIGTERM; a stopped replica must remove them at once, expected under 1 s", removal)
	}

	for _, agent := range []*runningAgent{alice, bob} {
		waitFor(t, 3*time.Second, agent.user+"'s agent to see its connection to A closed", func() (bool, string) {
			code := agent.Stats().LastCloseCode
			return code != -1, fmt.Sprintf("last close code %d", code)
		})
		if code := agent.Stats().LastCloseCode; code != websocket.StatusServiceRestart {
			t.Errorf("%s's agent got close status %d (%v), expected 1012 (service restart)", agent.user, int(code), code)
		}
	}

	if !a.waitExit(10 * time.Second) {
		t.Fatalf("replica A did not exit within 10 s of SIGTERM")
	}
	if a.waitErr != nil {
		t.Errorf("replica A exited with %v after SIGTERM, expected status 0", a.waitErr)
	}
	t.Logf("replica A exited %v after SIGTERM", time.Since(stopped).Round(time.Millisecond))

	// The agents reconnect through the proxy to B or C, with new provider ids.
	var newIDs []string
	waitFor(t, 5*time.Second, "alice's and bob's agents to reconnect to B or C", func() (bool, string) {
		newIDs = nil
		for _, agent := range []*runningAgent{alice, bob} {
			id := agent.ProviderID()
			if !agent.Connected() || slices.Contains(oldIDs, id) {
				return false, fmt.Sprintf("%s's agent: connected %v, provider id %s", agent.user, agent.Connected(), id)
			}
			newIDs = append(newIDs, id)
		}
		return true, ""
	})
	t.Logf("both agents reconnected to B or C %v after SIGTERM", time.Since(stopped).Round(time.Millisecond))
	waitRegistryIDs(t, survivors, newIDs...)
	for _, r := range survivors {
		listing := r.registry(t)
		if listing.ProvidersConnected != 2 {
			t.Errorf("registry of %s after the restart: providers_connected %d, expected 2", r.id, listing.ProvidersConnected)
		}
		for _, p := range listing.Providers {
			if p.InstanceID != b.id && p.InstanceID != cc.id {
				t.Errorf("registry of %s: provider %s of %s is on %q, expected %s or %s", r.id, p.ID, p.UserID, p.InstanceID, b.id, cc.id)
			}
		}
	}
	for _, r := range survivors {
		got := r.ibStatus(t, "alice", "")
		if !got.Connected || got.Message != "IB TWS connected" {
			t.Errorf("ib-status of alice through %s after the restart: connected %v, message %q; expected true, %q", r.id, got.Connected, got.Message, "IB TWS connected")
		}
	}
}

// TestSIGTERMDrainsRequests stops a replica with SIGTERM while a request to
// its agent is in flight: the replica must turn away new agents and report
// not ready, let the request finish, and only then close the agent.
func TestSIGTERMDrainsRequests(t *testing.T) {
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b")
	a, b := replicas[0], replicas[1]

	alice := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true})
	waitRegistryIDs(t, replicas, alice.ProviderID())

	const sleepMS = 1500
	type outcome struct {
		res httpResult
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		body := relayRequest{RequestType: "sleep", Payload: map[string]int{"ms": sleepMS}, UserID: "alice", TimeoutMS: 10_000}
		res, err := doHTTP(http.MethodPost, b.url("/options/relay/request"), body)
		done <- outcome{res, err}
	}()
	waitFor(t, convergeTimeout, "alice's agent to receive the sleep request", func() (bool, string) {
		return alice.Stats().RequestsReceived > 0, ""
	})

	stopped := time.Now()
	a.signal(t, syscall.SIGTERM)

	// While draining, A fails /readyz and turns away new agents.
	waitFor(t, time.Second, "A's /readyz to fail while draining", func() (bool, string) {
		res, err := doHTTP(http.MethodGet, a.url("/readyz"), nil)
		if err != nil {
			return false, err.Error()
		}
		return res.status == http.StatusServiceUnavailable, fmt.Sprintf("status %d: %s", res.status, truncate(res.body, 300))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	conn, resp, err := websocket.Dial(ctx, a.wsURL(), nil)
	cancel()
	if err == nil {
		conn.CloseNow()
		t.Errorf("a new agent connection to draining replica A was accepted, expected it to be turned away")
	} else if resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("a new agent connection to draining replica A failed with %v, expected HTTP 503", err)
	}
	if alice.Stats().LastCloseCode != -1 {
		t.Errorf("alice's agent was closed (status %d) while its request was still in flight", alice.Stats().LastCloseCode)
	}

	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	var answer agentResponse
	checkAndDecode(t, "sleep through "+b.id+" during A's drain", o.res, http.StatusOK, &answer)
	checkAnswer(t, "sleep through "+b.id+" during A's drain", answer, alice.ProviderID(), a.id)
	checkData(t, "sleep through "+b.id+" during A's drain", answer.Data, fmt.Sprintf(`{"slept_ms": %d}`, sleepMS))
	answered := time.Since(stopped)
	t.Logf("the request in flight was answered %v after SIGTERM", answered.Round(time.Millisecond))

	goneID := alice.ProviderID()
	removal := waitFor(t, 2*time.Second, "alice's provider to leave B's registry", func() (bool, string) {
		return findProvider(b.registry(t).Providers, goneID) == nil, "still listed"
	})
	t.Logf("alice's provider left B's registry %v after the answer", removal.Round(time.Millisecond))
	if removal >= time.Second {
		t.Errorf("alice's provider left B's registry %v after the drain ended, expected under 1 s", removal)
	}
	waitFor(t, 3*time.Second, "alice's agent to see its connection closed", func() (bool, string) {
		return alice.Stats().LastCloseCode != -1, ""
	})
	if code := alice.Stats().LastCloseCode; code != websocket.StatusServiceRestart {
		t.Errorf("alice's agent got close status %d (%v), expected 1012 (service restart)", int(code), code)
	}
	if !a.waitExit(10 * time.Second) {
		t.Fatalf("replica A did not exit within 10 s of SIGTERM")
	}
	if a.waitErr != nil {
		t.Errorf("replica A exited with %v after SIGTERM, expected status 0", a.waitErr)
	}
}

// TestSIGKILLExpiresProviders kills a replica with SIGKILL, which leaves it
// no chance to clean up. Its providers must leave the other replicas'
// registries within the registry TTL plus a margin. A request waiting on
// one of its agents must fail with provider_disconnected.
func TestSIGKILLExpiresProviders(t *testing.T) {
	// margin covers the beat interval, during which the silence is not yet
	// noticed, and scheduling delays.
	const margin = time.Second

	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b, cc := replicas[0], replicas[1], replicas[2]

	alice := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true})
	bob := c.startAgent("bob", a.wsURL(), agentsim.Config{TWSConnected: false})
	ids := []string{alice.ProviderID(), bob.ProviderID()}
	waitRegistryIDs(t, replicas, ids...)

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
	waitFor(t, convergeTimeout, "alice's agent to receive the sleep request", func() (bool, string) {
		return alice.Stats().RequestsReceived > 0, ""
	})

	killed := time.Now()
	a.signal(t, syscall.SIGKILL)
	survivors := []*replica{b, cc}
	removal := waitFor(t, registryTTL+margin+2*time.Second, "A's providers to leave the registries of B and C", func() (bool, string) {
		for _, r := range survivors {
			for _, id := range ids {
				if findProvider(r.registry(t).Providers, id) != nil {
					return false, fmt.Sprintf("replica %s still lists %s", r.id, id)
				}
			}
		}
		return true, ""
	})
	t.Logf("A's providers left the registries of B and C %v after SIGKILL (registry TTL %v, beat interval %v)",
		removal.Round(time.Millisecond), registryTTL, beatInterval)
	if removal > registryTTL+margin {
		t.Errorf("A's providers left the other registries %v after SIGKILL, expected within the registry TTL %v plus %v", removal, registryTTL, margin)
	}

	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	failedAfter := time.Since(killed)
	var failure apiError
	checkAndDecode(t, "sleep through "+b.id+" while A is killed", o.res, http.StatusBadGateway, &failure)
	if failure.Error != "provider_disconnected" {
		t.Errorf("request in flight to A's agent: error %q, expected \"provider_disconnected\" (message %q)", failure.Error, failure.Message)
	}
	t.Logf("the request in flight failed with %s %v after SIGKILL", failure.Error, failedAfter.Round(time.Millisecond))
	if failedAfter > registryTTL+margin {
		t.Errorf("the request in flight failed %v after SIGKILL, expected within the registry TTL %v plus %v, not near its 20 s timeout", failedAfter, registryTTL, margin)
	}

	for _, r := range survivors {
		got := r.ibStatus(t, "alice", "")
		if got.AgentConnected || got.Message != "No IB data provider connected" {
			t.Errorf("ib-status of alice through %s after A died: agent_connected %v, message %q; expected false, %q",
				r.id, got.AgentConnected, got.Message, "No IB data provider connected")
		}
		if listing := r.registry(t); listing.ProvidersConnected != 0 {
			t.Errorf("registry of %s after A died: providers_connected %d, expected 0: %v", r.id, listing.ProvidersConnected, providerIDs(listing.Providers))
		}
	}
}

// TestSIGTERMDeliversLargeAnswer stops a replica with SIGTERM while its agent
// is about to send a large response to a caller on another replica. The
// agent responds during the drain, so the caller must get the response, not 502.
//
// Whether the response is lost depends on timing, so the test runs several
// rounds, each with a new replica, and stops at the first lost response.
func TestSIGTERMDeliversLargeAnswer(t *testing.T) {
	const (
		rounds = 4
		// responseBytes is close to the relay's default 16 MiB message limit,
		// because a larger response takes longer to pass on through Redis.
		responseBytes = 15_500_000
		responseDelay = 300 * time.Millisecond
	)

	c := newCluster(t)
	b := c.startReplica("relay-b")
	for round := 1; round <= rounds; round++ {
		a := c.startReplica(fmt.Sprintf("relay-a%d", round))
		alice := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true, ChainBytes: responseBytes})
		waitRegistryIDs(t, []*replica{a, b}, alice.ProviderID())
		if round == 1 {
			// The simulator builds a chain once per process and size, which
			// takes seconds under -race. Build it now, so that the agent
			// responds well within the drain timeout.
			body := relayRequest{RequestType: "fetch_chain", Payload: map[string]string{"ticker": "SPY"}, UserID: "alice", TimeoutMS: 30_000}
			postJSON(t, a.url("/options/relay/request"), body, http.StatusOK, nil)
		}
		alice.SetResponseDelay(responseDelay)
		received := alice.Stats().RequestsReceived
		answeredBefore := alice.Stats().RequestsAnswered

		type outcome struct {
			res httpResult
			err error
		}
		done := make(chan outcome, 1)
		go func() {
			body := relayRequest{RequestType: "fetch_chain", Payload: map[string]string{"ticker": "SPY"}, UserID: "alice", TimeoutMS: 20_000}
			res, err := doHTTP(http.MethodPost, b.url("/options/relay/request"), body)
			done <- outcome{res, err}
		}()
		waitFor(t, convergeTimeout, "alice's agent to receive fetch_chain", func() (bool, string) {
			return alice.Stats().RequestsReceived > received, ""
		})
		a.signal(t, syscall.SIGTERM)

		o := <-done
		if o.err != nil {
			t.Fatal(o.err)
		}
		answered := alice.Stats().RequestsAnswered > answeredBefore
		switch {
		case o.res.status != http.StatusOK && answered:
			// A response that reaches B after B failed the call is counted as dropped.
			time.Sleep(500 * time.Millisecond)
			t.Fatalf("round %d: SIGTERM reached %s while fetch_chain was in flight, and the agent sent its answer during the drain, "+
				"but the caller on %s got status %d after %v instead of the answer: %s\ndropped answers on %s:\n%s",
				round, a.id, b.id, o.res.status, o.res.elapsed.Round(time.Millisecond), truncate(bytes.TrimSpace(o.res.body), 300),
				b.id, metricLines(t, b, "relay_dropped_responses_total"))
		case o.res.status != http.StatusOK:
			t.Fatalf("round %d: the caller on %s got status %d after %v, and the agent had not sent its answer, so the drain ended first: %s",
				round, b.id, o.res.status, o.res.elapsed.Round(time.Millisecond), truncate(o.res.body, 300))
		}
		if !json.Valid(o.res.body) || len(o.res.body) < responseBytes {
			t.Fatalf("round %d: the answer through %s has %d bytes (valid JSON: %v), expected at least %d",
				round, b.id, len(o.res.body), json.Valid(o.res.body), responseBytes)
		}
		t.Logf("round %d: the %d-byte answer arrived through %s %v after the request", round, len(o.res.body), b.id, o.res.elapsed.Round(time.Millisecond))

		if !a.waitExit(10 * time.Second) {
			t.Fatalf("round %d: replica %s did not exit within 10 s of SIGTERM", round, a.id)
		}
		alice.stop()
	}
}

// metricLines returns the lines of the replica's /metrics that start with
// name, or a note when there are none.
func metricLines(t *testing.T, r *replica, name string) string {
	t.Helper()
	res, err := doHTTP(http.MethodGet, r.url("/metrics"), nil)
	if err != nil {
		return err.Error()
	}
	var lines []string
	for line := range strings.SplitSeq(string(res.body), "\n") {
		if strings.HasPrefix(line, name) {
			lines = append(lines, line)
		}
	}
	if len(lines) == 0 {
		return "(no " + name + " samples)"
	}
	return strings.Join(lines, "\n")
}
