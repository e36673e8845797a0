package e2e

import (
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// TestProviderChoiceAcrossReplicas runs several agents per user on different
// replicas and checks that every replica picks the same provider: the highest
// agent version, then the most recently connected, and for allow_fallback
// another user's provider that reports TWS connected.
func TestProviderChoiceAcrossReplicas(t *testing.T) {
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b, cc := replicas[0], replicas[1], replicas[2]

	// 1.10.0 is newer than 1.9.0 when compared as numbers, older as text.
	aliceOld := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true, Version: "1.9.0"})
	aliceNew := c.startAgent("alice", b.wsURL(), agentsim.Config{TWSConnected: false, Version: "1.10.0"})
	// Equal versions: the agent connected last wins. Connection times come
	// from two processes, so the pause keeps them apart.
	bobFirst := c.startAgent("bob", a.wsURL(), agentsim.Config{TWSConnected: false, Version: "1.39.1"})
	time.Sleep(50 * time.Millisecond)
	bobLast := c.startAgent("bob", cc.wsURL(), agentsim.Config{TWSConnected: false, Version: "1.39.1"})
	waitRegistryIDs(t, replicas, aliceOld.ProviderID(), aliceNew.ProviderID(), bobFirst.ProviderID(), bobLast.ProviderID())

	cases := []struct {
		name         string
		body         relayRequest
		wantProvider *runningAgent
		wantInstance *replica
	}{
		{"highest version", relayRequest{RequestType: "echo", UserID: "alice"}, aliceNew, b},
		{"latest connected on a tie", relayRequest{RequestType: "echo", UserID: "bob"}, bobLast, cc},
		{"fallback prefers TWS connected", relayRequest{RequestType: "echo", UserID: "carol", AllowFallback: true}, aliceOld, a},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, r := range replicas {
				body := tc.body
				body.TimeoutMS = 5000
				body.Payload = map[string]string{"via": r.id}
				var answer agentResponse
				postJSON(t, r.url("/options/relay/request"), body, http.StatusOK, &answer)
				checkAnswer(t, tc.name+" through "+r.id, answer, tc.wantProvider.ProviderID(), tc.wantInstance.id)
				checkData(t, tc.name+" through "+r.id, answer.Data, `{"via": "`+r.id+`"}`)
			}
		})
	}

	t.Run("no fallback for account requests", func(t *testing.T) {
		for _, r := range replicas {
			var failure apiError
			body := relayRequest{RequestType: "get_positions", UserID: "carol", AllowFallback: true, TimeoutMS: 5000}
			postJSON(t, r.url("/options/relay/request"), body, http.StatusServiceUnavailable, &failure)
			if failure.Error != "no_provider" {
				t.Errorf("carol's get_positions with allow_fallback through %s: error %q, expected \"no_provider\" (message %q)", r.id, failure.Error, failure.Message)
			}
		}
	})

	t.Run("ib-status checks every agent of the user", func(t *testing.T) {
		want := []string{aliceOld.ProviderID(), aliceNew.ProviderID()}
		slices.Sort(want)
		for _, r := range replicas {
			got := r.ibStatus(t, "alice", "")
			if !got.Connected || got.ConnectedProvider == nil || *got.ConnectedProvider != aliceOld.ProviderID() {
				t.Errorf("through %s: connected %v, connected_provider %v; expected true and the 1.9.0 agent %s, the only one with TWS connected",
					r.id, got.Connected, deref(got.ConnectedProvider), aliceOld.ProviderID())
			}
			if got.AgentVersion == nil || *got.AgentVersion != "1.10.0" {
				t.Errorf("through %s: agent_version %v, expected \"1.10.0\", the version of the agent that requests go to", r.id, deref(got.AgentVersion))
			}
			var checked []string
			for _, st := range got.ProviderStatuses {
				checked = append(checked, st.ProviderID)
				if st.Source != "agent" {
					t.Errorf("through %s: provider %s status came from %q, expected an answer of the agent", r.id, st.ProviderID, st.Source)
				}
			}
			slices.Sort(checked)
			if !slices.Equal(checked, want) {
				t.Errorf("through %s: provider_statuses of %v, expected both of alice's agents %v", r.id, checked, want)
			}
		}
	})
}
