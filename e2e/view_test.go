package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// chainBytes is the minimum size of alice's fetch_chain response in
// TestClusterView: several MB, as real option chains can be.
const chainBytes = 2_000_000

// TestClusterView connects every agent to replica A and checks that B and C
// list, report and reach them exactly as A does.
func TestClusterView(t *testing.T) {
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b, cc := replicas[0], replicas[1], replicas[2]

	alice := c.startAgent("alice", a.wsURL(), agentsim.Config{
		TWSConnected: true, Accounts: []string{"DU1000001"}, ChainBytes: chainBytes,
	})
	bob := c.startAgent("bob", a.wsURL(), agentsim.Config{
		TWSConnected: false, Version: "1.33.0", Accounts: []string{"DU2000002"},
	})
	took := waitRegistryIDs(t, replicas, alice.ProviderID(), bob.ProviderID())
	t.Logf("registries of A, B and C converged %v after both agents authenticated", took.Round(time.Millisecond))

	t.Run("registry", func(t *testing.T) {
		want := map[string]provider{
			alice.ProviderID(): {UserID: "alice", AgentVersion: agentsim.DefaultVersion, InstanceID: a.id, IBAccounts: []string{"DU1000001"}, IBConnected: ptr(true)},
			bob.ProviderID():   {UserID: "bob", AgentVersion: "1.33.0", InstanceID: a.id, IBAccounts: []string{"DU2000002"}, IBConnected: ptr(false)},
		}
		for _, r := range replicas {
			listing := r.registry(t)
			if listing.ProvidersConnected != 2 {
				t.Errorf("replica %s: providers_connected = %d, expected 2", r.id, listing.ProvidersConnected)
			}
			if len(listing.Providers) != 2 {
				t.Fatalf("replica %s lists %d providers, expected 2: %+v", r.id, len(listing.Providers), listing.Providers)
			}
			for _, got := range listing.Providers {
				checkProvider(t, "registry of "+r.id, got, want)
			}
		}
	})

	t.Run("ib-status", func(t *testing.T) {
		cases := []struct {
			name, user, query string
			want              statusExpectation
		}{
			{"alice live", "alice", "", statusExpectation{
				connected: true, agentConnected: true, message: "IB TWS connected", providerID: alice.ProviderID(),
				user: "alice", instance: a.id, statusSource: "agent", version: agentsim.DefaultVersion,
			}},
			{"alice cache", "alice", "&source=cache", statusExpectation{
				connected: true, agentConnected: true, message: "IB TWS connected", providerID: alice.ProviderID(),
				user: "alice", instance: a.id, statusSource: "heartbeat_cache", version: agentsim.DefaultVersion,
			}},
			{"bob live", "bob", "", statusExpectation{
				connected: false, agentConnected: true, message: "IB TWS not connected", providerID: bob.ProviderID(),
				user: "bob", instance: a.id, statusSource: "agent", version: "1.33.0",
			}},
			{"bob cache", "bob", "&source=cache", statusExpectation{
				connected: false, agentConnected: true, message: "IB TWS not connected", providerID: bob.ProviderID(),
				user: "bob", instance: a.id, statusSource: "heartbeat_cache", version: "1.33.0",
			}},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				for _, r := range replicas {
					got := r.ibStatus(t, tc.user, tc.query)
					checkStatus(t, "through "+r.id, got, tc.want)
				}
			})
		}
	})

	t.Run("user isolation", func(t *testing.T) {
		for _, r := range replicas {
			got := r.ibStatus(t, "bob", "")
			for _, p := range got.Providers {
				if p.UserID != "bob" {
					t.Errorf("through %s: bob's ib-status lists provider %s of user %q", r.id, p.ID, p.UserID)
				}
			}
			for _, st := range got.ProviderStatuses {
				if st.UserID != "bob" || st.ProviderID != bob.ProviderID() {
					t.Errorf("through %s: bob's ib-status checked provider %s of user %q", r.id, st.ProviderID, st.UserID)
				}
			}

			// get_positions is an account request: bob's comes from bob's agent.
			var answer agentResponse
			postJSON(t, r.url("/options/relay/request"), relayRequest{RequestType: "get_positions", UserID: "bob", TimeoutMS: 5000}, http.StatusOK, &answer)
			if answer.ProviderID != bob.ProviderID() {
				t.Errorf("through %s: bob's get_positions answered by provider %s, expected bob's %s", r.id, answer.ProviderID, bob.ProviderID())
			}
			checkData(t, "bob's get_positions through "+r.id, answer.Data, `{"positions": [], "accounts": ["DU2000002"]}`)
		}

		// Without user_id, the operator's view lists every provider.
		all := b.ibStatus(t, "", "&source=cache")
		if got := providerIDs(all.Providers); !slices.Equal(got, providerIDs([]provider{{ID: alice.ProviderID()}, {ID: bob.ProviderID()}})) {
			t.Errorf("ib-status without user_id through %s lists %v, expected alice's and bob's providers", b.id, got)
		}
	})

	t.Run("generic requests", func(t *testing.T) {
		payload := map[string]any{"text": "héllo \"relay\"", "n": 42, "nested": map[string]any{"list": []any{1, 2.5, nil, true}}}
		payloadJSON, _ := json.Marshal(payload)
		for _, r := range []*replica{b, cc} {
			var echo agentResponse
			postJSON(t, r.url("/options/relay/request"), relayRequest{RequestType: "echo", Payload: payload, UserID: "alice", TimeoutMS: 5000}, http.StatusOK, &echo)
			checkAnswer(t, "echo through "+r.id, echo, alice.ProviderID(), a.id)
			checkData(t, "echo through "+r.id, echo.Data, string(payloadJSON))

			var positions agentResponse
			postJSON(t, r.url("/options/relay/request"), relayRequest{RequestType: "get_positions", UserID: "alice", TimeoutMS: 5000}, http.StatusOK, &positions)
			checkAnswer(t, "get_positions through "+r.id, positions, alice.ProviderID(), a.id)
			checkData(t, "get_positions through "+r.id, positions.Data, `{"positions": [], "accounts": ["DU1000001"]}`)
		}
	})

	t.Run("requests in flight", func(t *testing.T) {
		// Three sleeps sent at once through three replicas take about 300 ms
		// in flight together, and 600 ms if the agent got them one at a time.
		sleeps := []struct {
			via *replica
			ms  int
		}{{a, 300}, {b, 100}, {cc, 200}}
		type outcome struct {
			res httpResult
			err error
		}
		outcomes := make([]outcome, len(sleeps))
		start := time.Now()
		var wg sync.WaitGroup
		for i, s := range sleeps {
			wg.Go(func() {
				body := relayRequest{RequestType: "sleep", Payload: map[string]int{"ms": s.ms}, UserID: "alice", TimeoutMS: 5000}
				res, err := doHTTP(http.MethodPost, s.via.url("/options/relay/request"), body)
				outcomes[i] = outcome{res, err}
			})
		}
		wg.Wait()
		total := time.Since(start)

		for i, s := range sleeps {
			o := outcomes[i]
			label := fmt.Sprintf("sleep %d ms through %s", s.ms, s.via.id)
			if o.err != nil {
				t.Errorf("%s: %v", label, o.err)
				continue
			}
			var answer agentResponse
			checkAndDecode(t, label, o.res, http.StatusOK, &answer)
			checkAnswer(t, label, answer, alice.ProviderID(), a.id)
			checkData(t, label, answer.Data, fmt.Sprintf(`{"slept_ms": %d}`, s.ms))
			if o.res.elapsed < time.Duration(s.ms)*time.Millisecond {
				t.Errorf("%s answered after %v, before the agent's sleep ended", label, o.res.elapsed)
			}
			t.Logf("%s answered after %v", label, o.res.elapsed.Round(time.Millisecond))
		}
		if total >= 600*time.Millisecond {
			t.Errorf("the three sleeps (300, 100 and 200 ms) took %v together; 600 ms or more means the agent got them one at a time", total)
		}

		// Many echoes in flight at once, each with its own payload, through
		// the three replicas in turn: each caller must get its own payload.
		const echoes = 30
		echoOutcomes := make([]outcome, echoes)
		for i := range echoes {
			wg.Go(func() {
				body := relayRequest{RequestType: "echo", Payload: map[string]int{"caller": i}, UserID: "alice", TimeoutMS: 5000}
				res, err := doHTTP(http.MethodPost, replicas[i%3].url("/options/relay/request"), body)
				echoOutcomes[i] = outcome{res, err}
			})
		}
		wg.Wait()
		for i, o := range echoOutcomes {
			label := fmt.Sprintf("echo of caller %d through %s", i, replicas[i%3].id)
			if o.err != nil {
				t.Errorf("%s: %v", label, o.err)
				continue
			}
			var answer agentResponse
			checkAndDecode(t, label, o.res, http.StatusOK, &answer)
			checkData(t, label, answer.Data, `{"caller": `+strconv.Itoa(i)+`}`)
		}
	})

	t.Run("large response", func(t *testing.T) {
		body := relayRequest{RequestType: "fetch_chain", Payload: map[string]string{"ticker": "SPY"}, UserID: "alice", TimeoutMS: 20000}
		res := postJSON(t, cc.url("/options/relay/request"), body, http.StatusOK, nil)
		t.Logf("fetch_chain through %s: %d bytes in %v", cc.id, len(res.body), res.elapsed.Round(time.Millisecond))
		if !json.Valid(res.body) {
			t.Fatalf("fetch_chain response through %s is not valid JSON (%d bytes, ends with %q)", cc.id, len(res.body), res.body[max(0, len(res.body)-100):])
		}
		if len(res.body) < chainBytes {
			t.Errorf("fetch_chain response through %s has %d bytes, expected at least %d", cc.id, len(res.body), chainBytes)
		}

		var answer struct {
			agentResponse
			Data struct {
				Ticker string            `json:"ticker"`
				Calls  []json.RawMessage `json:"calls"`
				Puts   []json.RawMessage `json:"puts"`
			} `json:"data"`
		}
		if err := json.Unmarshal(res.body, &answer); err != nil {
			t.Fatalf("fetch_chain response through %s: %v", cc.id, err)
		}
		checkAnswer(t, "fetch_chain through "+cc.id, answer.agentResponse, alice.ProviderID(), a.id)
		if answer.Data.Ticker != "SPY" {
			t.Errorf("fetch_chain through %s: data.ticker = %q, expected SPY", cc.id, answer.Data.Ticker)
		}
		if len(answer.Data.Calls) == 0 || len(answer.Data.Puts) == 0 {
			t.Errorf("fetch_chain through %s: %d calls and %d puts, expected some of each", cc.id, len(answer.Data.Calls), len(answer.Data.Puts))
		}
	})

	t.Run("account events", func(t *testing.T) {
		before := float64(time.Now().UnixMicro()) / 1e6
		fields := map[string]any{"order_id": 17, "symbol": "SPY", "account": "DU1000001"}
		if err := alice.SendAccountEvent("order_filled", fields); err != nil {
			t.Fatalf("alice's agent could not send an account_event: %v", err)
		}

		var events []map[string]any
		waitFor(t, convergeTimeout, "alice's account event through "+b.id, func() (bool, string) {
			events = accountEvents(t, b, "alice", "")
			return len(events) > 0, fmt.Sprintf("%d events", len(events))
		})
		after := float64(time.Now().UnixMicro()) / 1e6

		if len(events) != 1 {
			t.Fatalf("through %s alice has %d account events, expected 1: %v", b.id, len(events), events)
		}
		ev := events[0]
		for key, want := range map[string]any{"type": "account_event", "event": "order_filled", "order_id": 17.0, "symbol": "SPY", "account": "DU1000001"} {
			if ev[key] != want {
				t.Errorf("through %s: account event field %q = %#v, expected %#v", b.id, key, ev[key], want)
			}
		}
		receivedAt, ok := ev["received_at"].(float64)
		if !ok {
			t.Fatalf("through %s: account event has no numeric received_at: %v", b.id, ev)
		}
		if receivedAt < before-1 || receivedAt > after+1 {
			t.Errorf("through %s: received_at = %.6f, expected between %.6f and %.6f (the send and the read)", b.id, receivedAt, before, after)
		}

		if through := accountEvents(t, cc, "alice", ""); !reflect.DeepEqual(through, events) {
			t.Errorf("alice's account events differ: through %s %v, through %s %v", b.id, events, cc.id, through)
		}
		since := strconv.FormatFloat(receivedAt, 'f', 6, 64)
		if newer := accountEvents(t, cc, "alice", since); len(newer) != 0 {
			t.Errorf("through %s with since=%s: %d events, expected none newer than the only one", cc.id, since, len(newer))
		}
		if bobs := accountEvents(t, b, "bob", ""); len(bobs) != 0 {
			t.Errorf("through %s bob has %d account events, expected none (alice's must not leak): %v", b.id, len(bobs), bobs)
		}
	})

	// Last, because it disconnects alice.
	t.Run("agent disconnect", func(t *testing.T) {
		goneID := alice.ProviderID()
		alice.stop()
		took := waitFor(t, convergeTimeout, "alice's provider to leave every registry", func() (bool, string) {
			for _, r := range replicas {
				if p := findProvider(r.registry(t).Providers, goneID); p != nil {
					return false, fmt.Sprintf("replica %s still lists %s", r.id, goneID)
				}
			}
			return true, ""
		})
		t.Logf("alice's provider left the registries of A, B and C %v after her agent closed its socket", took.Round(time.Millisecond))

		for _, r := range replicas {
			got := r.ibStatus(t, "alice", "")
			if got.AgentConnected || got.Connected || got.Message != "No IB data provider connected" {
				t.Errorf("through %s after alice's agent left: agent_connected %v, connected %v, message %q; expected false, false, %q",
					r.id, got.AgentConnected, got.Connected, got.Message, "No IB data provider connected")
			}
		}
		if listing := b.registry(t); listing.ProvidersConnected != 1 || findProvider(listing.Providers, bob.ProviderID()) == nil {
			t.Errorf("registry of %s after alice left: %d providers %v, expected bob's %s alone", b.id, listing.ProvidersConnected, providerIDs(listing.Providers), bob.ProviderID())
		}
	})
}

// statusExpectation is the expected ib-status response for a user with one provider.
type statusExpectation struct {
	connected, agentConnected bool
	message                   string
	providerID                string
	user, instance            string
	statusSource              string // of the one provider status
	version                   string
}

// checkStatus compares an ib-status response for a user with one provider to want.
func checkStatus(t *testing.T, label string, got ibStatusResponse, want statusExpectation) {
	t.Helper()
	if got.Connected != want.connected {
		t.Errorf("%s: connected = %v, expected %v (message %q)", label, got.Connected, want.connected, got.Message)
	}
	if got.AgentConnected != want.agentConnected {
		t.Errorf("%s: agent_connected = %v, expected %v", label, got.AgentConnected, want.agentConnected)
	}
	if got.Message != want.message {
		t.Errorf("%s: message = %q, expected %q", label, got.Message, want.message)
	}
	if got.Source != "relay" {
		t.Errorf("%s: source = %q, expected \"relay\"", label, got.Source)
	}

	switch {
	case want.connected && (got.ConnectedProvider == nil || *got.ConnectedProvider != want.providerID):
		t.Errorf("%s: connected_provider = %v, expected %q", label, deref(got.ConnectedProvider), want.providerID)
	case !want.connected && got.ConnectedProvider != nil:
		t.Errorf("%s: connected_provider = %q, expected null", label, *got.ConnectedProvider)
	}
	if got.AgentVersion == nil || *got.AgentVersion != want.version {
		t.Errorf("%s: agent_version = %v, expected %q", label, deref(got.AgentVersion), want.version)
	}
	if ids := providerIDs(got.Providers); !slices.Equal(ids, []string{want.providerID}) {
		t.Errorf("%s: providers %v, expected [%s]", label, ids, want.providerID)
	}

	if len(got.ProviderStatuses) != 1 {
		t.Fatalf("%s: %d provider_statuses, expected 1: %+v", label, len(got.ProviderStatuses), got.ProviderStatuses)
	}
	st := got.ProviderStatuses[0]
	wantStatus := providerStatus{ProviderID: want.providerID, UserID: want.user, InstanceID: want.instance, Connected: want.connected, Source: want.statusSource}
	if st != wantStatus {
		t.Errorf("%s: provider status %+v, expected %+v", label, st, wantStatus)
	}
}

// checkProvider compares a listed provider to the entry of want with its id.
func checkProvider(t *testing.T, label string, got provider, want map[string]provider) {
	t.Helper()
	w, ok := want[got.ID]
	if !ok {
		t.Errorf("%s: unexpected provider %+v", label, got)
		return
	}
	if got.UserID != w.UserID || got.AgentVersion != w.AgentVersion || got.InstanceID != w.InstanceID {
		t.Errorf("%s: provider %s has user_id %q, agent_version %q, instance_id %q; expected %q, %q, %q",
			label, got.ID, got.UserID, got.AgentVersion, got.InstanceID, w.UserID, w.AgentVersion, w.InstanceID)
	}
	if !slices.Equal(got.IBAccounts, w.IBAccounts) {
		t.Errorf("%s: provider %s has ib_accounts %v, expected %v", label, got.ID, got.IBAccounts, w.IBAccounts)
	}
	if got.IBConnected == nil || *got.IBConnected != *w.IBConnected {
		t.Errorf("%s: provider %s has ib_connected %v, expected %v", label, got.ID, deref(got.IBConnected), *w.IBConnected)
	}
	if !got.IsActive {
		t.Errorf("%s: provider %s has is_active false, expected true", label, got.ID)
	}
	for name, value := range map[string]string{"connected_at": got.ConnectedAt, "last_heartbeat": got.LastHeartbeat} {
		if _, err := time.Parse(time.RFC3339Nano, value); err != nil {
			t.Errorf("%s: provider %s has %s %q, expected an ISO 8601 time: %v", label, got.ID, name, value, err)
		}
	}
}

// checkAnswer checks which provider responded to a request and that it reports success.
func checkAnswer(t *testing.T, label string, got agentResponse, providerID, instance string) {
	t.Helper()
	if got.ProviderID != providerID || got.InstanceID != instance {
		t.Errorf("%s: answered by provider %q on %q, expected %q on %q", label, got.ProviderID, got.InstanceID, providerID, instance)
	}
	if !got.Success || got.Error != nil {
		t.Errorf("%s: success %v, error %v; expected success true and error null", label, got.Success, deref(got.Error))
	}
}

// checkData compares JSON data with the expected JSON text, ignoring layout.
func checkData(t *testing.T, label string, data json.RawMessage, want string) {
	t.Helper()
	var gotValue, wantValue any
	if err := json.Unmarshal(data, &gotValue); err != nil {
		t.Errorf("%s: data is not valid JSON: %v: %s", label, err, truncate(data, 500))
		return
	}
	if err := json.Unmarshal([]byte(want), &wantValue); err != nil {
		t.Fatalf("%s: expected data %s is not valid JSON: %v", label, want, err)
	}
	if !reflect.DeepEqual(gotValue, wantValue) {
		t.Errorf("%s: data %s, expected %s", label, truncate(data, 500), want)
	}
}

// accountEvents returns the replica's account events of user, newer than
// since when it is not empty.
func accountEvents(t *testing.T, r *replica, user, since string) []map[string]any {
	t.Helper()
	url := r.url("/options/relay/account-events?user_id=" + user)
	if since != "" {
		url += "&since=" + since
	}
	var answer struct {
		Events []map[string]any `json:"events"`
	}
	getJSON(t, url, http.StatusOK, &answer)
	return answer.Events
}

func ptr[T any](v T) *T { return &v }

// deref returns *p, or nil when p is nil, for messages.
func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}
