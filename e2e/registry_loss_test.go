package e2e

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// TestRegistryDataLoss deletes every Redis key of the cluster, as a Redis
// restart without persistence does. Each replica must write its providers
// back within about one beat interval, no replica may drop another's
// providers from its view meanwhile, and no agent may be disconnected.
//
// Only the keys of this test's prefix are deleted, because the Redis is shared.
func TestRegistryDataLoss(t *testing.T) {
	// margin covers scheduling delays and the polling interval.
	const margin = 300 * time.Millisecond

	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	a, b, cc := replicas[0], replicas[1], replicas[2]

	alice := c.startAgent("alice", a.wsURL(), agentsim.Config{TWSConnected: true})
	bob := c.startAgent("bob", b.wsURL(), agentsim.Config{TWSConnected: false})
	owners := map[string]*replica{alice.ProviderID(): a, bob.ProviderID(): b}
	waitRegistryIDs(t, replicas, alice.ProviderID(), bob.ProviderID())

	lost := time.Now()
	c.deleteKeys()

	// Watch the registries from the deletion until well past the TTL: both
	// providers must stay listed by every replica throughout.
	var gaps []string
	restored := time.Duration(0)
	for time.Since(lost) < 2*registryTTL {
		for _, r := range replicas {
			listing := r.registry(t)
			for id := range owners {
				if findProvider(listing.Providers, id) == nil {
					gaps = append(gaps, fmt.Sprintf("%v after the deletion, replica %s did not list %s", time.Since(lost).Round(time.Millisecond), r.id, id))
				}
			}
		}
		if restored == 0 && c.providersInRedis(t, owners, replicas) {
			restored = time.Since(lost)
		}
		time.Sleep(pollInterval)
	}

	if restored == 0 {
		t.Errorf("the replicas did not write their registry keys back within %v of the deletion", 2*registryTTL)
	} else {
		t.Logf("the replicas wrote their registry keys back %v after the deletion (beat interval %v)", restored.Round(time.Millisecond), beatInterval)
		if restored > beatInterval+margin {
			t.Errorf("the replicas wrote their registry keys back %v after the deletion, expected within one beat interval %v plus %v", restored, beatInterval, margin)
		}
	}
	if len(gaps) > 0 {
		t.Errorf("%d registry reads missed a provider while Redis was being refilled; the first ones:\n%s", len(gaps), strings.Join(gaps[:min(len(gaps), 10)], "\n"))
	}

	for _, agent := range []*runningAgent{alice, bob} {
		if st := agent.Stats(); st.Connects != 1 || st.LastCloseCode != -1 {
			t.Errorf("%s's agent connected %d times and last closed with %d; expected one connection that never closed", agent.user, st.Connects, st.LastCloseCode)
		}
	}

	// A replica started now loads the registry from Redis alone, so it shows
	// what the others wrote back.
	d := c.startReplica("relay-d")
	waitRegistryIDs(t, []*replica{d}, alice.ProviderID(), bob.ProviderID())

	var answer agentResponse
	postJSON(t, cc.url("/options/relay/request"), relayRequest{RequestType: "echo", Payload: map[string]int{"n": 1}, UserID: "alice", TimeoutMS: 5000}, http.StatusOK, &answer)
	checkAnswer(t, "echo through "+cc.id+" after the deletion", answer, alice.ProviderID(), a.id)
}

// providersInRedis reports whether every replica's liveness key exists and
// each provider is in its owner's hash.
//
// NOTE: the key names PREFIX:{REPLICA}:alive and PREFIX:{REPLICA}:providers
// are the Redis store's internal layout, not part of the relay's interface.
// Update them here when the store changes its layout.
func (c *cluster) providersInRedis(t *testing.T, owners map[string]*replica, replicas []*replica) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, r := range replicas {
		n, err := c.redis.Exists(ctx, c.prefix+":{"+r.id+"}:alive").Result()
		if err != nil {
			t.Fatalf("Redis EXISTS failed: %v", err)
		}
		if n == 0 {
			return false
		}
	}
	for id, owner := range owners {
		ok, err := c.redis.HExists(ctx, c.prefix+":{"+owner.id+"}:providers", id).Result()
		if err != nil {
			t.Fatalf("Redis HEXISTS failed: %v", err)
		}
		if !ok {
			return false
		}
	}
	return true
}
