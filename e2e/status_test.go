package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// TestIBStatusAcceptance is the dashboard's view of a cluster: alice's agent
// with TWS connected on A, bob's with TWS not connected on B, no agent for
// carol. 300 ib-status calls spread over the three replicas must each
// return the right status.
func TestIBStatusAcceptance(t *testing.T) {
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b := replicas[0], replicas[1]

	alice := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true})
	bob := c.startAgent("bob", b.wsURL(), agentsim.Config{TWSConnected: false})
	waitRegistryIDs(t, replicas, alice.ProviderID(), bob.ProviderID())

	const calls = 300
	const noAgentMessage = "No IB data provider connected"
	users := []string{"alice", "bob", "carol"}

	// outcomes counts responses by user, replica and outcome: "ok" or "failed".
	outcomes := map[string]map[string]map[string]int{}
	var failures []string
	start := time.Now()
	for i := range calls {
		// Users rotate with every call and replicas with every third, so each
		// user is asked through each replica about as often.
		user := users[i%len(users)]
		r := replicas[(i/len(users))%len(replicas)]

		res, err := doHTTP(http.MethodGet, r.url("/options/relay/ib-status?user_id="+user), nil)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		var answer ibStatusResponse
		problem := ""
		if res.status != http.StatusOK {
			problem = fmt.Sprintf("status %d: %s", res.status, truncate(res.body, 300))
		} else {
			checkAndDecode(t, fmt.Sprintf("call %d", i), res, http.StatusOK, &answer)
			problem = acceptanceProblem(user, answer, alice.ProviderID(), bob.ProviderID(), noAgentMessage)
		}

		if outcomes[user] == nil {
			outcomes[user] = map[string]map[string]int{}
		}
		if outcomes[user][r.id] == nil {
			outcomes[user][r.id] = map[string]int{}
		}
		if problem == "" {
			outcomes[user][r.id]["ok"]++
			continue
		}
		outcomes[user][r.id]["failed"]++
		failures = append(failures, fmt.Sprintf("call %d (%s through %s, %v): %s", i, user, r.id, res.elapsed.Round(time.Millisecond), problem))
	}
	elapsed := time.Since(start)

	t.Logf("%d ib-status calls in %v (%v per call on average)", calls, elapsed.Round(time.Millisecond), (elapsed / calls).Round(10*time.Microsecond))
	for _, user := range users {
		var parts []string
		total := 0
		for _, r := range replicas {
			counts := outcomes[user][r.id]
			parts = append(parts, fmt.Sprintf("%s %d ok, %d failed", r.id, counts["ok"], counts["failed"]))
			total += counts["ok"] + counts["failed"]
		}
		t.Logf("%s: %d calls: %s", user, total, strings.Join(parts, "; "))
	}
	if len(failures) > 0 {
		firstFailures := failures[:min(len(failures), 20)]
		t.Errorf("%d of %d ib-status calls returned a wrong status. The first %d:\n%s", len(failures), calls, len(firstFailures), strings.Join(firstFailures, "\n"))
	}
}

// acceptanceProblem returns what is wrong with the ib-status response for user,
// or "" when it is right.
func acceptanceProblem(user string, got ibStatusResponse, aliceID, bobID, noAgentMessage string) string {
	switch user {
	case "alice":
		switch {
		case !got.Connected || !got.AgentConnected:
			return fmt.Sprintf("connected %v, agent_connected %v, expected true and true (message %q)", got.Connected, got.AgentConnected, got.Message)
		case got.ConnectedProvider == nil || *got.ConnectedProvider != aliceID:
			return fmt.Sprintf("connected_provider %v, expected %s", deref(got.ConnectedProvider), aliceID)
		case got.Message != "IB TWS connected":
			return fmt.Sprintf("message %q, expected %q", got.Message, "IB TWS connected")
		case len(got.ProviderStatuses) != 1 || got.ProviderStatuses[0].Source != "agent":
			return fmt.Sprintf("provider_statuses %+v, expected one answered by the agent", got.ProviderStatuses)
		}
	case "bob":
		switch {
		case got.Connected || !got.AgentConnected:
			return fmt.Sprintf("connected %v, agent_connected %v, expected false and true (message %q)", got.Connected, got.AgentConnected, got.Message)
		case got.Message == "" || got.Message == noAgentMessage:
			return fmt.Sprintf("message %q does not name the cause: the agent is connected but TWS is not", got.Message)
		case got.Message != "IB TWS not connected":
			return fmt.Sprintf("message %q, expected the agent's own %q", got.Message, "IB TWS not connected")
		case len(got.Providers) != 1 || got.Providers[0].ID != bobID:
			return fmt.Sprintf("providers %v, expected bob's %s alone", providerIDs(got.Providers), bobID)
		case len(got.ProviderStatuses) != 1 || got.ProviderStatuses[0].Source != "agent":
			return fmt.Sprintf("provider_statuses %+v, expected one answered by the agent", got.ProviderStatuses)
		}
	case "carol":
		switch {
		case got.Connected || got.AgentConnected:
			return fmt.Sprintf("connected %v, agent_connected %v, expected false and false", got.Connected, got.AgentConnected)
		case got.Message != noAgentMessage:
			return fmt.Sprintf("message %q, expected %q", got.Message, noAgentMessage)
		case len(got.Providers) != 0 || len(got.ProviderStatuses) != 0:
			return fmt.Sprintf("providers %v and %d provider_statuses, expected none", providerIDs(got.Providers), len(got.ProviderStatuses))
		}
	}
	return ""
}
