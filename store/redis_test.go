package store_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/internal/redistest"
	"github.com/relay-project/relay/store"
)

func TestRedisStore(t *testing.T) {
	options := sharedRedis(t)
	testStore(t, func(t *testing.T, n int) []store.Store {
		prefix := uniquePrefix()
		deleteKeysOnCleanup(t, options, prefix)
		stores := make([]store.Store, n)
		for i := range n {
			s, _ := newRedisStore(t, options, store.RedisConfig{
				Prefix:           prefix,
				ReplicaID:        fmt.Sprintf("redis%d-%s", i, randomHex(4)),
				BeatInterval:     testBeatInterval,
				TTL:              testTTL,
				MaxAccountEvents: testMaxAccountEvents,
			})
			stores[i] = s
		}
		return stores
	})
}

func TestNewRedisRejectsInvalidConfig(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	tests := map[string]struct {
		cfg     store.RedisConfig
		wantErr string
	}{
		"missing client":     {store.RedisConfig{ReplicaID: "r1"}, "Client is required"},
		"missing replica id": {store.RedisConfig{Client: client}, "ReplicaID is required"},
		"TTL below two beats": {
			store.RedisConfig{Client: client, ReplicaID: "r1", BeatInterval: time.Second, TTL: 1500 * time.Millisecond},
			"at least twice the beat interval",
		},
		"default TTL below two beats": {
			store.RedisConfig{Client: client, ReplicaID: "r1", BeatInterval: 3 * time.Second},
			"at least twice the beat interval",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s, err := store.NewRedis(tc.cfg)
			if err == nil {
				t.Fatalf("NewRedis returned a store, want an error containing %q", tc.wantErr)
			}
			if s != nil {
				t.Errorf("NewRedis returned a store along with error %v", err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("NewRedis error %q does not contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestRedisStartFailsWithoutRedis(t *testing.T) {
	// Nothing listens on this port once freeLoopbackPort has closed it.
	addr := fmt.Sprintf("127.0.0.1:%d", freeLoopbackPort(t))
	options := func() *redis.Options { return &redis.Options{Addr: addr, MaxRetries: -1} }
	s, _ := newRedisStore(t, options, store.RedisConfig{ReplicaID: "r-" + randomHex(4), Prefix: uniquePrefix()})

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err := s.Start(ctx, &recordingHandler{})
	if err == nil {
		t.Fatal("Start succeeded with no Redis listening")
	}
	if elapsed := time.Since(start); elapsed > 4*time.Second {
		t.Errorf("Start took %v to fail with no Redis listening", elapsed)
	}
}

// privateCluster is a set of Redis stores on a redis-server that the test owns.
type privateCluster struct {
	t      *testing.T
	srv    *redistest.Server
	admin  *redis.Client // for the test's own reads and writes
	prefix string
}

func newPrivateCluster(t *testing.T) *privateCluster {
	srv := startPrivateRedis(t)
	return &privateCluster{t: t, srv: srv, admin: srv.Client(nil), prefix: uniquePrefix()}
}

// options returns client options for the private server, with go-redis
// defaults otherwise.
func (c *privateCluster) options() *redis.Options {
	return &redis.Options{Addr: c.srv.Addr()}
}

// start starts a store named name-<random> with cfg, filling in the client,
// prefix and replica id.
func (c *privateCluster) start(name string, cfg store.RedisConfig) (*store.Redis, *recordingHandler, *redis.Client) {
	c.t.Helper()
	cfg.Prefix = c.prefix
	cfg.ReplicaID = name + "-" + randomHex(4)
	h := &recordingHandler{}
	s, client := startRedisStore(c.t, c.options, cfg, h)
	return s, h, client
}

// publishEvent publishes payload on the registry events channel.
func (c *privateCluster) publishEvent(payload string) {
	c.t.Helper()
	if err := c.admin.Publish(testContext(c.t), c.prefix+":events", payload).Err(); err != nil {
		c.t.Fatalf("publish registry event: %v", err)
	}
}

// storedProviders returns the providers that Redis stores for replicaID.
func (c *privateCluster) storedProviders(replicaID string) (map[string]store.Provider, error) {
	hash, err := c.admin.HGetAll(testContext(c.t), providersKey(c.prefix, replicaID)).Result()
	if err != nil {
		return nil, err
	}
	out := make(map[string]store.Provider, len(hash))
	for field, data := range hash {
		if strings.HasPrefix(field, "~") {
			continue
		}
		var p store.Provider
		if err := json.Unmarshal([]byte(data), &p); err != nil {
			return nil, fmt.Errorf("field %s of %s: %v", field, providersKey(c.prefix, replicaID), err)
		}
		out[field] = p
	}
	return out, nil
}

// checkStored checks that Redis stores exactly the providers want for their
// replica, with every field intact.
func (c *privateCluster) checkStored(replicaID string, want ...store.Provider) error {
	got, err := c.storedProviders(replicaID)
	if err != nil {
		return err
	}
	if len(got) != len(want) {
		return fmt.Errorf("%s contains %d providers, want %d", providersKey(c.prefix, replicaID), len(got), len(want))
	}
	for _, w := range want {
		p, ok := got[w.ID]
		if !ok {
			return fmt.Errorf("%s has no field %s", providersKey(c.prefix, replicaID), w.ID)
		}
		w.InstanceID = replicaID
		if err := compareProviders(p, w); err != nil {
			return fmt.Errorf("field %s: %v", w.ID, err)
		}
	}
	return nil
}

// waitForIDs waits until s lists exactly the providers ids.
func waitForIDs(t *testing.T, timeout time.Duration, s store.Store, ids ...string) {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("providers listed by %s", s.ReplicaID()), func() error {
		ps, err := s.Providers(testContext(t))
		if err != nil {
			return err
		}
		return compareIDs(ps, ids)
	})
}

// checkNoReplicaDown fails the test if any handler received HandleReplicaDown.
func checkNoReplicaDown(t *testing.T, handlers map[string]*recordingHandler) {
	t.Helper()
	for id, h := range handlers {
		if downs := h.allDowns(); len(downs) != 0 {
			t.Errorf("%s received HandleReplicaDown for %v, want none", id, downs)
		}
	}
}

func TestRedisRestartRestoresProviders(t *testing.T) {
	const beat = 200 * time.Millisecond
	// restoreMargin is the time after the first beat that follows the restart
	// for go-redis to reconnect and the rewrite to run.
	const restoreMargin = time.Second
	c := newPrivateCluster(t)
	cfg := store.RedisConfig{BeatInterval: beat, TTL: 10 * beat}
	a, aHandler, _ := c.start("a", cfg)
	b, bHandler, _ := c.start("b", cfg)

	a1 := sampleProvider(randomHex(8), "user-1")
	a2 := sampleProvider(randomHex(8), "user-2")
	b1 := sampleProvider(randomHex(8), "user-3")
	for _, reg := range []struct {
		s *store.Redis
		p store.Provider
	}{{a, a1}, {a, a2}, {b, b1}} {
		if err := reg.s.Register(testContext(t), reg.p); err != nil {
			t.Fatalf("Register %s on %s: %v", reg.p.ID, reg.s.ReplicaID(), err)
		}
	}
	allIDs := []string{a1.ID, a2.ID, b1.ID}
	waitForIDs(t, propagationTimeout, a, allIDs...)
	waitForIDs(t, propagationTimeout, b, allIDs...)

	// Reloads that the start-up requested finish first. A reload in flight
	// across the restart is the case of TestRedisMissingAliveKeyKeepsLivePeer.
	time.Sleep(2 * beat)

	// The marker key shows that the restart lost the data.
	marker := c.prefix + ":restart-marker"
	if err := c.admin.Set(testContext(t), marker, "1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	c.srv.Stop()
	c.srv.Restart()
	restarted := time.Now()
	if n, err := c.admin.Exists(testContext(t), marker).Result(); err != nil || n != 0 {
		t.Fatalf("marker key after the restart: exists=%d (error %v), want 0 because the data is lost", n, err)
	}

	waitFor(t, beat+restoreMargin, "providers of a back in Redis", func() error {
		return c.checkStored(a.ReplicaID(), a1, a2)
	})
	waitFor(t, beat+restoreMargin, "providers of b back in Redis", func() error {
		return c.checkStored(b.ReplicaID(), b1)
	})
	t.Logf("both hashes restored %v after the restart", time.Since(restarted).Round(time.Millisecond))
	for _, id := range []string{a.ReplicaID(), b.ReplicaID()} {
		if n, err := c.admin.Exists(testContext(t), aliveKey(c.prefix, id)).Result(); err != nil || n != 1 {
			t.Errorf("liveness key of %s: exists=%d (error %v), want 1", id, n, err)
		}
		if ok, err := c.admin.SIsMember(testContext(t), c.prefix+":replicas", id).Result(); err != nil || !ok {
			t.Errorf("%s in %s:replicas: %v (error %v), want true", id, c.prefix, ok, err)
		}
	}

	waitForIDs(t, propagationTimeout, a, allIDs...)
	waitForIDs(t, propagationTimeout, b, allIDs...)
	for _, s := range []*store.Redis{a, b} {
		waitFor(t, propagationTimeout, "health of "+s.ReplicaID(), func() error {
			if h := s.Health(); !h.OK() {
				return fmt.Errorf("Health = %+v", h)
			}
			return nil
		})
	}
	// The outage was shorter than the TTL, so no replica may be reported down.
	checkNoReplicaDown(t, map[string]*recordingHandler{a.ReplicaID(): aHandler, b.ReplicaID(): bHandler})
}

func TestRedisCrashedReplicaExpires(t *testing.T) {
	const (
		beat   = 100 * time.Millisecond
		ttl    = 500 * time.Millisecond
		resync = time.Second
		// margin absorbs scheduling delays of a loaded machine and the race detector.
		margin = 700 * time.Millisecond
	)
	c := newPrivateCluster(t)
	cfg := store.RedisConfig{BeatInterval: beat, TTL: ttl, ResyncInterval: resync}
	crashed, _, crashedClient := c.start("crashed", cfg)
	b, bHandler, _ := c.start("b", cfg)
	d, dHandler, _ := c.start("d", cfg)

	p := sampleProvider(randomHex(8), "user-1")
	if err := crashed.Register(testContext(t), p); err != nil {
		t.Fatalf("Register: %v", err)
	}
	waitForIDs(t, propagationTimeout, b, p.ID)
	waitForIDs(t, propagationTimeout, d, p.ID)

	// Closing its client stops every write of the crashed store without the
	// clean removal that Close does, like a killed process.
	if err := crashedClient.Close(); err != nil {
		t.Fatalf("close client of the crashed store: %v", err)
	}
	crashedAt := time.Now()
	crashedID := crashed.ReplicaID()

	// The others drop it at the first beat after the TTL has passed.
	for _, s := range []*store.Redis{b, d} {
		waitFor(t, ttl+beat+margin, "crashed replica dropped by "+s.ReplicaID(), func() error {
			ps, err := s.Providers(testContext(t))
			if err != nil {
				return err
			}
			if err := compareIDs(ps, nil); err != nil {
				return err
			}
			if _, err := findReplica(testContext(t), s, crashedID); err == nil {
				return fmt.Errorf("Replicas still lists %s", crashedID)
			}
			return nil
		})
	}
	t.Logf("crashed replica dropped from both views %v after the crash", time.Since(crashedAt).Round(time.Millisecond))
	for id, h := range map[string]*recordingHandler{b.ReplicaID(): bHandler, d.ReplicaID(): dHandler} {
		waitFor(t, propagationTimeout, "HandleReplicaDown on "+id, func() error {
			if h.downCount(crashedID) == 0 {
				return fmt.Errorf("HandleReplicaDown(%s) not called", crashedID)
			}
			return nil
		})
	}

	waitFor(t, ttl+margin-time.Since(crashedAt), "keys of the crashed replica expired", func() error {
		n, err := c.admin.Exists(testContext(t), aliveKey(c.prefix, crashedID), providersKey(c.prefix, crashedID)).Result()
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("%d of its 2 keys still exist", n)
		}
		return nil
	})
	// A full reload removes dead replicas from the replica index.
	waitFor(t, resync+margin, "crashed replica removed from the replica index", func() error {
		ok, err := c.admin.SIsMember(testContext(t), c.prefix+":replicas", crashedID).Result()
		if err != nil {
			return err
		}
		if ok {
			return fmt.Errorf("%s:replicas still contains %s", c.prefix, crashedID)
		}
		return nil
	})

	for id, h := range map[string]*recordingHandler{b.ReplicaID(): bHandler, d.ReplicaID(): dHandler} {
		if n := h.downCount(crashedID); n != 1 {
			t.Errorf("%s: HandleReplicaDown(%s) called %d times, want 1", id, crashedID, n)
		}
		if downs := h.allDowns(); len(downs) != 1 {
			t.Errorf("%s received HandleReplicaDown for %v, want only %s", id, downs, crashedID)
		}
	}
}

func TestRedisOutageHealth(t *testing.T) {
	const (
		beat      = 200 * time.Millisecond
		opTimeout = 500 * time.Millisecond
	)
	c := newPrivateCluster(t)
	// The TTL outlasts the outage by far, so no replica is due to be dropped,
	// even when the calls during the outage wait for failing beats.
	cfg := store.RedisConfig{BeatInterval: beat, TTL: 100 * beat, OpTimeout: opTimeout}
	a, aHandler, _ := c.start("a", cfg)
	b, bHandler, _ := c.start("b", cfg)
	before := sampleProvider(randomHex(8), "user-1")
	if err := a.Register(testContext(t), before); err != nil {
		t.Fatalf("Register: %v", err)
	}
	waitForIDs(t, propagationTimeout, b, before.ID)

	c.srv.Stop()
	for _, s := range []*store.Redis{a, b} {
		waitFor(t, beat+opTimeout+time.Second, "RegistryOK false on "+s.ReplicaID(), func() error {
			if h := s.Health(); h.RegistryOK {
				return fmt.Errorf("Health = %+v", h)
			}
			return nil
		})
		h := s.Health()
		if h.OK() {
			t.Errorf("%s: Health().OK() is true during the outage", s.ReplicaID())
		}
		if h.LastError == "" {
			t.Errorf("%s: Health().LastError is empty during the outage", s.ReplicaID())
		}
		if h.Backend != "redis" {
			t.Errorf("%s: Health().Backend = %q, want redis", s.ReplicaID(), h.Backend)
		}
		if _, err := s.Providers(testContext(t)); !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s: Providers during the outage: error %v, want ErrUnavailable", s.ReplicaID(), err)
		}
		if _, err := s.Replicas(testContext(t)); !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s: Replicas during the outage: error %v, want ErrUnavailable", s.ReplicaID(), err)
		}
	}

	during := sampleProvider(randomHex(8), "user-2")
	if err := a.Register(testContext(t), during); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Register during the outage: error %v, want ErrUnavailable", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := a.Send(ctx, b.ReplicaID(), []byte("{}")); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Send during the outage: error %v, want ErrUnavailable", err)
	}
	ev := store.AccountEvent{Message: json.RawMessage(`{"type":"account_event"}`), ReceivedAt: 1}
	if err := a.AppendAccountEvent(ctx, "user-1", ev); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("AppendAccountEvent during the outage: error %v, want ErrUnavailable", err)
	}
	if _, err := a.AccountEvents(ctx, "user-1", 0); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("AccountEvents during the outage: error %v, want ErrUnavailable", err)
	}

	c.srv.Restart()
	restarted := time.Now()
	for _, s := range []*store.Redis{a, b} {
		waitFor(t, propagationTimeout, "health recovered on "+s.ReplicaID(), func() error {
			if h := s.Health(); !h.OK() || h.LastError != "" {
				return fmt.Errorf("Health = %+v", h)
			}
			return nil
		})
	}
	t.Logf("health recovered %v after the restart", time.Since(restarted).Round(time.Millisecond))

	// The provider registered while Redis was down stayed registered locally
	// and reaches Redis and the other replica once Redis is back.
	waitForIDs(t, propagationTimeout, b, before.ID, during.ID)
	waitForIDs(t, propagationTimeout, a, before.ID, during.ID)
	if err := c.checkStored(a.ReplicaID(), before, during); err != nil {
		t.Error(err)
	}
	checkNoReplicaDown(t, map[string]*recordingHandler{a.ReplicaID(): aHandler, b.ReplicaID(): bHandler})
}

func TestRedisRegisterFailsFastDuringOutage(t *testing.T) {
	const (
		beat      = 100 * time.Millisecond
		opTimeout = 500 * time.Millisecond
		attempts  = 5
	)
	c := newPrivateCluster(t)
	a, _, _ := c.start("a", store.RedisConfig{BeatInterval: beat, TTL: 100 * beat, OpTimeout: opTimeout})
	c.srv.Stop()
	waitFor(t, beat+opTimeout+time.Second, "RegistryOK false", func() error {
		if h := a.Health(); h.RegistryOK {
			return fmt.Errorf("Health = %+v", h)
		}
		return nil
	})

	// A registration may wait for the beat in progress and then for its own
	// write, each bounded by OpTimeout, so that the relay can return
	// registry_unavailable quickly. The caller's context sets no tighter bound.
	limit := 2*opTimeout + 300*time.Millisecond
	for i := range attempts {
		start := time.Now()
		err := a.Register(testContext(t), sampleProvider(randomHex(8), "user-1"))
		elapsed := time.Since(start)
		if !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("Register %d during the outage: error %v, want ErrUnavailable", i, err)
		}
		if elapsed > limit {
			t.Errorf("Register %d during the outage took %v, want at most %v", i, elapsed.Round(time.Millisecond), limit)
		}
	}
}

func TestRedisLongOutageKeepsPeers(t *testing.T) {
	const (
		beat = 200 * time.Millisecond
		ttl  = time.Second
	)
	c := newPrivateCluster(t)
	cfg := store.RedisConfig{BeatInterval: beat, TTL: ttl, OpTimeout: 500 * time.Millisecond}
	a, aHandler, _ := c.start("a", cfg)
	b, bHandler, _ := c.start("b", cfg)
	pa := sampleProvider(randomHex(8), "user-1")
	pb := sampleProvider(randomHex(8), "user-2")
	if err := a.Register(testContext(t), pa); err != nil {
		t.Fatalf("Register on a: %v", err)
	}
	if err := b.Register(testContext(t), pb); err != nil {
		t.Fatalf("Register on b: %v", err)
	}
	waitForIDs(t, propagationTimeout, a, pa.ID, pb.ID)
	waitForIDs(t, propagationTimeout, b, pa.ID, pb.ID)

	// An outage of several TTLs: both replicas keep running, but neither can
	// hear the other, nor its own beats.
	c.srv.Stop()
	outageEnd := time.Now().Add(3 * ttl)
	for _, s := range []*store.Redis{a, b} {
		err := poll(time.Until(outageEnd), func() error {
			if h := s.Health(); h.PubSubOK {
				return fmt.Errorf("Health = %+v", h)
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: PubSubOK stayed true while its subscription was down: %v", s.ReplicaID(), err)
		}
	}
	time.Sleep(time.Until(outageEnd))
	c.srv.Restart()

	waitForIDs(t, propagationTimeout, a, pa.ID, pb.ID)
	waitForIDs(t, propagationTimeout, b, pa.ID, pb.ID)
	for _, s := range []*store.Redis{a, b} {
		err := poll(propagationTimeout, func() error {
			if h := s.Health(); !h.OK() {
				return fmt.Errorf("Health = %+v", h)
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: health did not recover: %v", s.ReplicaID(), err)
		}
	}
	// Both replicas stayed alive, so neither handler may receive
	// HandleReplicaDown, because a Redis outage is no evidence that a replica died.
	checkNoReplicaDown(t, map[string]*recordingHandler{a.ReplicaID(): aHandler, b.ReplicaID(): bHandler})
}

func TestRedisMissingAliveKeyKeepsLivePeer(t *testing.T) {
	// After Redis loses its data, or evicts keys that have a TTL, the liveness
	// key of a live replica is missing until its next beat. A reload in that
	// window must not take for dead a replica whose beats arrive within the TTL.
	const beat = 2 * time.Second
	c := newPrivateCluster(t)
	var aMetrics store.Metrics
	a, aHandler, _ := c.start("a", store.RedisConfig{BeatInterval: beat, TTL: 3 * beat, ResyncInterval: 100 * time.Millisecond, Metrics: &aMetrics})
	b, _, _ := c.start("b", store.RedisConfig{BeatInterval: beat, TTL: 3 * beat})
	p := sampleProvider(randomHex(8), "user-1")
	if err := b.Register(testContext(t), p); err != nil {
		t.Fatalf("Register: %v", err)
	}
	waitForIDs(t, propagationTimeout, a, p.ID)

	// Deleting the key right after a beat of b leaves a whole beat interval
	// before b writes it again.
	waitForBeat(t, c, b.ReplicaID(), 2*beat)
	if err := c.admin.Del(testContext(t), aliveKey(c.prefix, b.ReplicaID())).Err(); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	// The first reload counted after the deletion may have read Redis before
	// it, the second has not. A reload that drops b stops the count, because
	// it also removes b from the replica index.
	reloads := aMetrics.Reloads.Load()
	waitFor(t, beat/2, "a full reload on a after the deletion", func() error {
		if _, err := findProvider(testContext(t), a, p.ID); err != nil {
			return nil
		}
		if n := aMetrics.Reloads.Load(); n < reloads+2 {
			return fmt.Errorf("Reloads = %d, want at least %d", n, reloads+2)
		}
		return nil
	})
	// HandleReplicaDown runs in a goroutine of its own.
	time.Sleep(50 * time.Millisecond)
	if elapsed := time.Since(deleted); elapsed >= beat {
		t.Fatalf("the checks came %v after the deletion, when b may have beaten again; the machine is too slow for this test", elapsed)
	}

	if _, err := findProvider(testContext(t), a, p.ID); err != nil {
		t.Errorf("a dropped b, which beat within the TTL: %v", err)
	}
	if n := aHandler.downCount(b.ReplicaID()); n != 0 {
		t.Errorf("a called HandleReplicaDown(%s) %d times for a replica that beat within the TTL, want 0", b.ReplicaID(), n)
	}
}

// waitForBeat waits until replicaID publishes its next beat event.
func waitForBeat(t *testing.T, c *privateCluster, replicaID string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	sub := c.admin.Subscribe(ctx, c.prefix+":events")
	defer sub.Close()
	for {
		msg, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("no beat of %s within %v: %v", replicaID, timeout, err)
		}
		var ev struct {
			Op        string `json:"op"`
			ReplicaID string `json:"replica_id"`
		}
		if json.Unmarshal([]byte(msg.Payload), &ev) == nil && ev.Op == "beat" && ev.ReplicaID == replicaID {
			return
		}
	}
}

func TestRedisUnknownEventsIgnored(t *testing.T) {
	c := newPrivateCluster(t)
	var aMetrics, bMetrics store.Metrics
	a, aHandler, _ := c.start("a", store.RedisConfig{BeatInterval: 100 * time.Millisecond, TTL: time.Second, Metrics: &aMetrics})
	b, bHandler, _ := c.start("b", store.RedisConfig{BeatInterval: 100 * time.Millisecond, TTL: time.Second, Metrics: &bMetrics})
	pa := sampleProvider(randomHex(8), "user-1")
	if err := a.Register(testContext(t), pa); err != nil {
		t.Fatalf("Register: %v", err)
	}
	waitForIDs(t, propagationTimeout, b, pa.ID)

	// Events of another version would change the view of b if they were
	// applied, and the other payloads do not parse as events.
	ghost := sampleProvider("ghost-"+randomHex(4), "user-9")
	ghost.InstanceID = "ghost"
	ghostJSON, err := json.Marshal(ghost)
	if err != nil {
		t.Fatal(err)
	}
	payloads := []string{
		fmt.Sprintf(`{"v":99,"op":"up","replica_id":"ghost","gen":1,"provider":%s}`, ghostJSON),
		fmt.Sprintf(`{"v":99,"op":"up","replica_id":%q,"gen":2,"provider":%s}`, a.ReplicaID(), ghostJSON),
		fmt.Sprintf(`{"v":99,"op":"down","replica_id":%q,"gen":1000,"provider_id":%q}`, a.ReplicaID(), pa.ID),
		fmt.Sprintf(`{"v":99,"op":"bye","replica_id":%q}`, a.ReplicaID()),
		fmt.Sprintf(`{"op":"bye","replica_id":%q}`, a.ReplicaID()),
		fmt.Sprintf(`{"v":"1","op":"bye","replica_id":%q}`, a.ReplicaID()),
		fmt.Sprintf(`{"v":1,"op":"bye","replica_id":%q,"gen":-1}`, a.ReplicaID()),
		`not json`,
		``,
		`null`,
		`[1,2,3]`,
		`{"v":1,"op":"up"`,
	}
	for _, payload := range payloads {
		c.publishEvent(payload)
	}

	for name, m := range map[string]*store.Metrics{"a": &aMetrics, "b": &bMetrics} {
		waitFor(t, propagationTimeout, "UnknownEvents on "+name, func() error {
			if n := m.UnknownEvents.Load(); n != int64(len(payloads)) {
				return fmt.Errorf("UnknownEvents = %d, want %d", n, len(payloads))
			}
			return nil
		})
	}

	// The store still works and its view is unchanged: a new provider arrives
	// after the ignored events, so they were all read by then.
	next := sampleProvider(randomHex(8), "user-2")
	if err := a.Register(testContext(t), next); err != nil {
		t.Fatalf("Register after the ignored events: %v", err)
	}
	waitForIDs(t, propagationTimeout, b, pa.ID, next.ID)
	if _, err := findReplica(testContext(t), b, a.ReplicaID()); err != nil {
		t.Error(err)
	}
	if _, err := findReplica(testContext(t), b, "ghost"); err == nil {
		t.Error("b lists replica ghost, which only ignored events named")
	}
	for _, s := range []*store.Redis{a, b} {
		if h := s.Health(); !h.OK() {
			t.Errorf("%s: Health = %+v after ignored events", s.ReplicaID(), h)
		}
	}
	checkNoReplicaDown(t, map[string]*recordingHandler{a.ReplicaID(): aHandler, b.ReplicaID(): bHandler})
}

func TestRedisMissedEventRepairedByReload(t *testing.T) {
	// The beat interval is longer than the test, so only the event that the
	// test publishes can make b reload the view of a, and neither the periodic
	// beat of a nor the resync can.
	cfg := store.RedisConfig{BeatInterval: 10 * time.Second, TTL: 30 * time.Second, ResyncInterval: time.Minute}
	const repairTimeout = time.Second

	t.Run("UpGenerationGap", func(t *testing.T) {
		c := newPrivateCluster(t)
		var bMetrics store.Metrics
		a, _, _ := c.start("a", cfg)
		bCfg := cfg
		bCfg.Metrics = &bMetrics
		b, _, _ := c.start("b", bCfg)
		p1 := sampleProvider(randomHex(8), "user-1")
		if err := a.Register(testContext(t), p1); err != nil {
			t.Fatalf("Register: %v", err)
		}
		waitForIDs(t, propagationTimeout, b, p1.ID)
		reloads := bMetrics.Reloads.Load()

		// As if a registered p2 and then p3, and the event of p2 never
		// reached b.
		gen := storedGeneration(t, c, a.ReplicaID())
		p2 := sampleProvider(randomHex(8), "user-2")
		p3 := sampleProvider(randomHex(8), "user-3")
		p2.InstanceID, p3.InstanceID = a.ReplicaID(), a.ReplicaID()
		writeHash(t, c, a.ReplicaID(), map[string]any{p2.ID: mustJSON(t, p2), p3.ID: mustJSON(t, p3), "~gen": gen + 2})
		c.publishEvent(fmt.Sprintf(`{"v":1,"op":"up","replica_id":%q,"gen":%d,"provider":%s}`, a.ReplicaID(), gen+2, mustJSON(t, p3)))

		waitForIDs(t, repairTimeout, b, p1.ID, p2.ID, p3.ID)
		if n := bMetrics.Reloads.Load(); n <= reloads {
			t.Errorf("Reloads on b = %d, want more than %d", n, reloads)
		}
	})

	t.Run("BeatGenerationGap", func(t *testing.T) {
		c := newPrivateCluster(t)
		var bMetrics store.Metrics
		a, _, _ := c.start("a", cfg)
		bCfg := cfg
		bCfg.Metrics = &bMetrics
		b, _, _ := c.start("b", bCfg)
		p1 := sampleProvider(randomHex(8), "user-1")
		p2 := sampleProvider(randomHex(8), "user-2")
		for _, p := range []store.Provider{p1, p2} {
			if err := a.Register(testContext(t), p); err != nil {
				t.Fatalf("Register: %v", err)
			}
		}
		waitForIDs(t, propagationTimeout, b, p1.ID, p2.ID)
		reloads := bMetrics.Reloads.Load()

		// As if a removed p1 and the event never reached b. The next beat of
		// a carries the generation of that removal.
		gen := storedGeneration(t, c, a.ReplicaID())
		key := providersKey(c.prefix, a.ReplicaID())
		if err := c.admin.HDel(testContext(t), key, p1.ID).Err(); err != nil {
			t.Fatal(err)
		}
		writeHash(t, c, a.ReplicaID(), map[string]any{"~gen": gen + 1})
		c.publishEvent(fmt.Sprintf(`{"v":1,"op":"beat","replica_id":%q,"gen":%d,"replica":{"id":%q,"started_at":"2025-01-01T00:00:00Z","last_seen":"2025-01-01T00:00:00Z","providers":1,"pending_requests":0}}`, a.ReplicaID(), gen+1, a.ReplicaID()))

		waitForIDs(t, repairTimeout, b, p2.ID)
		if n := bMetrics.Reloads.Load(); n <= reloads {
			t.Errorf("Reloads on b = %d, want more than %d", n, reloads)
		}
	})
}

// writeHash sets fields of the providers hash of replicaID directly in Redis.
func writeHash(t *testing.T, c *privateCluster, replicaID string, fields map[string]any) {
	t.Helper()
	if err := c.admin.HSet(testContext(t), providersKey(c.prefix, replicaID), fields).Err(); err != nil {
		t.Fatalf("HSET %s: %v", providersKey(c.prefix, replicaID), err)
	}
}

// storedGeneration returns the registry generation that Redis stores for replicaID.
func storedGeneration(t *testing.T, c *privateCluster, replicaID string) uint64 {
	t.Helper()
	gen, err := c.admin.HGet(testContext(t), providersKey(c.prefix, replicaID), "~gen").Uint64()
	if err != nil {
		t.Fatalf("read generation of %s: %v", replicaID, err)
	}
	return gen
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestRedisRestartUnderSameIDDropsOldEntries crashes a replica and starts a
// new process under the same replica id well within the TTL: the crashed
// process's providers leave every view at the new one's first beat, not
// when the TTL would have let them expire.
func TestRedisRestartUnderSameIDDropsOldEntries(t *testing.T) {
	const ttl = 5 * time.Second
	c := newPrivateCluster(t)
	cfg := store.RedisConfig{BeatInterval: 100 * time.Millisecond, TTL: ttl}
	crashed, _, crashedClient := c.start("same", cfg)
	other, _, _ := c.start("other", cfg)

	p := sampleProvider(randomHex(8), "user-1")
	if err := crashed.Register(testContext(t), p); err != nil {
		t.Fatalf("Register: %v", err)
	}
	waitForIDs(t, propagationTimeout, other, p.ID)
	if err := crashedClient.Close(); err != nil {
		t.Fatalf("close client of the crashed store: %v", err)
	}

	restartCfg := cfg
	restartCfg.Prefix = c.prefix
	restartCfg.ReplicaID = crashed.ReplicaID()
	restarted, _ := startRedisStore(t, c.options, restartCfg, &recordingHandler{})
	start := time.Now()
	waitForIDs(t, ttl/2, other)
	waitForIDs(t, ttl/2, restarted)
	t.Logf("old providers gone from the other view %v after the restart (TTL %v)", time.Since(start).Round(time.Millisecond), ttl)
}

// TestRedisUserIndexMatchesView registers, moves and removes providers of a
// few users on three replicas, with a reload and a replica leaving in
// between, and checks on every replica that the index by user matches a
// scan of the view.
func TestRedisUserIndexMatchesView(t *testing.T) {
	c := newPrivateCluster(t)
	cfg := store.RedisConfig{BeatInterval: 100 * time.Millisecond, TTL: 500 * time.Millisecond}
	a, _, _ := c.start("a", cfg)
	b, _, _ := c.start("b", cfg)
	leaving, _, leavingClient := c.start("leaving", cfg)
	nodes := []*store.Redis{a, b, leaving}

	var registered []store.Provider
	for i := range 12 {
		p := sampleProvider(randomHex(8), fmt.Sprintf("user-%d", i%4))
		if err := nodes[i%3].Register(testContext(t), p); err != nil {
			t.Fatalf("Register: %v", err)
		}
		registered = append(registered, p)
	}
	for i, p := range registered[:4] {
		if err := nodes[i%3].Unregister(testContext(t), p.ID); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
	}
	// A crash of the third replica: the others drop its view after the TTL.
	leavingClient.Close()

	check := func() error {
		for _, n := range []*store.Redis{a, b} {
			if err := n.CheckUserIndex(); err != nil {
				return fmt.Errorf("%s: %w", n.ReplicaID(), err)
			}
			ps, err := n.UserProviders(testContext(t), "user-1")
			if err != nil {
				return err
			}
			all, _ := n.Providers(testContext(t))
			want := 0
			for _, p := range all {
				if p.UserID == "user-1" {
					want++
				}
			}
			if len(ps) != want {
				return fmt.Errorf("%s: UserProviders found %d of user-1, the view has %d", n.ReplicaID(), len(ps), want)
			}
		}
		return nil
	}
	waitFor(t, 3*time.Second, "index matches the view after the crash", func() error {
		if err := check(); err != nil {
			return err
		}
		all, _ := a.Providers(testContext(t))
		if len(all) != 5 {
			return fmt.Errorf("a lists %d providers, want the 5 left on a and b", len(all))
		}
		return nil
	})
}
