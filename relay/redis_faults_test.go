package relay

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/internal/redistest"
	"github.com/relay-project/relay/internal/tcpproxy"
	"github.com/relay-project/relay/store"
)

// proxiedRedis returns a client of the test Redis that goes through a proxy
// the test can cut or stall.
func proxiedRedis(t *testing.T) (*redis.Client, *tcpproxy.Proxy) {
	t.Helper()
	direct := redisClient(t)
	proxy := tcpproxy.New(t, direct.Options().Addr)
	opts := *direct.Options()
	opts.Addr = proxy.Addr
	opts.DialTimeout = 300 * time.Millisecond
	opts.ReadTimeout = 300 * time.Millisecond
	opts.WriteTimeout = 300 * time.Millisecond
	opts.MaxRetries = 0
	client := redis.NewClient(&opts)
	t.Cleanup(func() { client.Close() })
	return client, proxy
}

func (r *replica) readyz(t *testing.T) (int, store.Health) {
	t.Helper()
	var body struct {
		Store store.Health `json:"store"`
	}
	status := r.getJSON(t, "/readyz", &body)
	return status, body.Store
}

// TestRedisUnreachable cuts Redis off from every replica: agents stay
// connected, requests to agents on the same replica still work, the rest get
// 503 registry_unavailable at once, readiness reports it without failing,
// and everything recovers by itself.
func TestRedisUnreachable(t *testing.T) {
	outage := 30 * time.Second
	if testing.Short() {
		outage = 3 * time.Second
	}
	client, proxy := proxiedRedis(t)
	rs := newRedisCluster(t, client, 2, nil)
	alice := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true}, rs...)
	bob := startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-bob", TWSConnected: true}, rs...)

	proxy.Cut()
	for _, r := range rs {
		eventually(t, 3*time.Second, func() bool {
			_, h := r.readyz(t)
			return !h.RegistryOK
		}, "readyz of %s never reported the registry down", r.srv.ReplicaID())
	}
	start := time.Now()
	for time.Since(start) < outage {
		status, h := rs[1].readyz(t)
		if status != http.StatusOK || h.RegistryOK {
			t.Fatalf("readyz during the outage: status %d, registry_ok %v; want 200 and false", status, h.RegistryOK)
		}
		callStart := time.Now()
		status, ans := rs[0].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 2000})
		if status != http.StatusOK || ans.ProviderID != alice.ProviderID() {
			t.Fatalf("same-replica request during the outage: status %d %q", status, ans.ErrorCode)
		}
		status, ans = rs[0].request(t, map[string]any{"user_id": "bob", "request_type": "echo", "timeout_ms": 2000})
		if status != http.StatusServiceUnavailable || ans.ErrorCode != "registry_unavailable" {
			t.Fatalf("cross-replica request during the outage: status %d %q, want 503 registry_unavailable", status, ans.ErrorCode)
		}
		if took := time.Since(callStart); took > time.Second {
			t.Fatalf("requests during the outage took %v, want an answer at once", took)
		}
		var reg map[string]any
		if status := rs[1].getJSON(t, "/options/relay/registry", &reg); status != http.StatusServiceUnavailable {
			t.Fatalf("registry during the outage: status %d, want 503", status)
		}
		if !alice.Connected() || !bob.Connected() {
			t.Fatal("an agent was disconnected during the Redis outage")
		}
		time.Sleep(250 * time.Millisecond)
	}
	metrics := scrape(t, rs[0])
	if !strings.Contains(metrics, "relay_registry_healthy 0") {
		t.Error("metrics do not report the registry down")
	}

	proxy.Restore()
	for _, r := range rs {
		eventually(t, 5*time.Second, func() bool {
			_, h := r.readyz(t)
			return h.OK()
		}, "%s never reported the store healthy again", r.srv.ReplicaID())
	}
	eventually(t, 5*time.Second, func() bool {
		status, _ := rs[0].request(t, map[string]any{"user_id": "bob", "request_type": "echo", "timeout_ms": 2000})
		return status == http.StatusOK
	}, "cross-replica requests never recovered")
	if s := alice.Stats(); s.Connects != 1 {
		t.Errorf("alice connected %d times, want 1: the outage dropped her", s.Connects)
	}
}

// TestPubSubStallRepaired stalls the subscription connections while Redis
// keeps answering everything else: each replica finds its own beats missing,
// reports it, and replaces the subscription.
func TestPubSubStallRepaired(t *testing.T) {
	client, proxy := proxiedRedis(t)
	rs := newRedisCluster(t, client, 2, nil)
	startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true}, rs...)

	if n := proxy.StallSubscribers(); n < 2 {
		t.Fatalf("stalled %d subscriptions, want one per replica", n)
	}
	// The stall shows in readyz only until the subscription is replaced,
	// a few beats later, so poll it often.
	sawStall := map[string]bool{}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && len(sawStall) < len(rs) {
		for _, r := range rs {
			if _, h := r.readyz(t); !h.PubSubOK {
				sawStall[r.srv.ReplicaID()] = true
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, r := range rs {
		if !sawStall[r.srv.ReplicaID()] {
			t.Errorf("%s never reported pubsub_ok false in readyz", r.srv.ReplicaID())
		}
		eventually(t, 5*time.Second, func() bool {
			m := scrape(t, r)
			return r.srv.store.Health().PubSubOK && strings.Contains(m, "relay_pubsub_stalls_total 1") &&
				!strings.Contains(m, "relay_pubsub_resubscribes_total 0")
		}, "%s never replaced its subscription", r.srv.ReplicaID())
	}
	status, _ := rs[1].request(t, map[string]any{"user_id": "alice", "request_type": "echo", "timeout_ms": 2000})
	if status != http.StatusOK {
		t.Errorf("cross-replica request after the repair: status %d", status)
	}
}

// TestRedisRestartLosesData restarts a private Redis without persistence:
// every replica writes its providers back within about one beat, and no
// agent is dropped.
func TestRedisRestartLosesData(t *testing.T) {
	srv := redistest.Start(t)
	opts, _ := redis.ParseURL(srv.URL())
	client := redis.NewClient(opts)
	t.Cleanup(func() { client.Close() })
	rs := newRedisCluster(t, client, 2, nil)
	alice := startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice"}, rs...)
	bob := startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-bob"}, rs...)

	srv.Restart()
	restarted := time.Now()
	eventually(t, 3*time.Second, func() bool {
		ctx := context.Background()
		keys, _ := client.Keys(ctx, "*:providers").Result()
		found := 0
		for _, k := range keys {
			fields, _ := client.HKeys(ctx, k).Result()
			for _, f := range fields {
				if f == alice.ProviderID() || f == bob.ProviderID() {
					found++
				}
			}
		}
		return found == 2
	}, "providers were not written back to the restarted Redis")
	t.Logf("providers back in Redis %v after the restart (beat interval 100ms)", time.Since(restarted).Round(time.Millisecond))
	if took := time.Since(restarted); took > time.Second {
		t.Errorf("providers restored after %v, want within a few beats", took)
	}
	for _, r := range rs {
		if reg := r.registry(t); reg.ProvidersConnected != 2 {
			t.Errorf("%s lists %d providers after the restart, want 2", r.srv.ReplicaID(), reg.ProvidersConnected)
		}
	}
	if alice.Stats().Connects != 1 || bob.Stats().Connects != 1 {
		t.Error("an agent reconnected: the Redis restart dropped it")
	}
}

// TestRedisPassword runs the store against a redis-server that requires a
// password: the right one works, a wrong one fails at start with an error
// that says why.
func TestRedisPassword(t *testing.T) {
	srv := redistest.Start(t, "--requirepass", "s3cret")
	good, _ := redis.ParseURL("redis://:s3cret@" + srv.Addr() + "/0")
	client := redis.NewClient(good)
	t.Cleanup(func() { client.Close() })
	rs := newRedisCluster(t, client, 2, nil)
	startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice"}, rs...)

	bad, _ := redis.ParseURL("redis://:wrong@" + srv.Addr() + "/0")
	badClient := redis.NewClient(bad)
	t.Cleanup(func() { badClient.Close() })
	st, err := store.NewRedis(store.RedisConfig{Client: badClient, ReplicaID: "bad", Prefix: "test-" + randomHex(4)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err = st.Start(ctx, nil)
	if err == nil || !strings.Contains(strings.ToUpper(err.Error()), "WRONGPASS") {
		t.Errorf("start with a wrong password: %v, want a WRONGPASS error", err)
	}
}

func scrape(t *testing.T, r *replica) string {
	t.Helper()
	resp, err := http.Get(r.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return sb.String()
}
