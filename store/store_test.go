package store_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/relay-project/relay/store"
)

// Timing of the Redis clusters in the conformance suite. The suite uses them
// too, to bound how long a change may take to reach another replica.
const (
	testBeatInterval = 100 * time.Millisecond
	testTTL          = 500 * time.Millisecond
)

// testMaxAccountEvents is the per-user event limit that every cluster given to
// testStore is configured with.
const testMaxAccountEvents = 200

// propagationTimeout bounds how long a registration or removal may take to
// reach every replica. It is far above the expected time (one pub/sub hop) so
// that a loaded machine does not fail the suite.
const propagationTimeout = 5 * time.Second

func TestMemoryStore(t *testing.T) {
	testStore(t, newMemoryCluster)
}

// newMemoryCluster returns n unstarted nodes of one MemoryHub.
func newMemoryCluster(t *testing.T, n int) []store.Store {
	hub := store.NewMemoryHub(testMaxAccountEvents)
	stores := make([]store.Store, n)
	for i := range n {
		node := hub.Node(fmt.Sprintf("mem%d-%s", i, randomHex(4)))
		t.Cleanup(func() { _ = node.Close(context.Background()) })
		stores[i] = node
	}
	return stores
}

// testStore runs the behaviour every Store implementation shares. newCluster
// returns n stores of one cluster, not yet started, whose account event limit
// is testMaxAccountEvents, and closes them when the test ends.
func testStore(t *testing.T, newCluster func(t *testing.T, n int) []store.Store) {
	t.Run("RegisterVisibleEverywhere", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 3)
		holder := stores[0]
		p := sampleProvider(randomHex(8), "user-1")
		p.InstanceID = "forged-instance"
		if err := holder.Register(testContext(t), p); err != nil {
			t.Fatalf("Register: %v", err)
		}

		want := p
		want.InstanceID = holder.ReplicaID()
		got, err := findProvider(testContext(t), holder, p.ID)
		if err != nil {
			t.Fatalf("holder right after Register: %v", err)
		}
		if err := compareProviders(got, want); err != nil {
			t.Errorf("holder right after Register: %v", err)
		}
		for i, s := range stores {
			waitFor(t, propagationTimeout, fmt.Sprintf("provider visible on node %d", i), func() error {
				got, err := findProvider(testContext(t), s, p.ID)
				if err != nil {
					return err
				}
				return compareProviders(got, want)
			})
		}
	})

	t.Run("UpdateVisibleWithinBeats", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 2)
		holder, reader := stores[0], stores[1]
		p := sampleProvider(randomHex(8), "user-1")
		if err := holder.Register(testContext(t), p); err != nil {
			t.Fatalf("Register: %v", err)
		}
		waitForProvider(t, reader, p.ID)

		updated := p
		updated.InstanceID = holder.ReplicaID()
		updated.LastHeartbeat = p.LastHeartbeat.Add(time.Minute)
		updated.ExecutionActive = true
		updated.ExecutionLinesHeld = 3
		updated.AvailableScanLines = 12
		updated.BootPhase = nil
		updated.StateAt = p.LastHeartbeat.Add(time.Minute)
		holder.Update(updated)

		waitFor(t, 10*testBeatInterval, "update visible on the other node", func() error {
			got, err := findProvider(testContext(t), reader, p.ID)
			if err != nil {
				return err
			}
			return compareProviders(got, updated)
		})
		got, err := findProvider(testContext(t), holder, p.ID)
		if err != nil {
			t.Fatalf("holder after Update: %v", err)
		}
		if err := compareProviders(got, updated); err != nil {
			t.Errorf("holder after Update: %v", err)
		}
	})

	t.Run("UpdateOfUnknownProviderIgnored", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 2)
		unknown := sampleProvider(randomHex(8), "user-1")
		stores[0].Update(unknown)

		// Several beats carry any pending update to the other replicas.
		time.Sleep(5 * testBeatInterval)
		for i, s := range stores {
			ps, err := s.Providers(testContext(t))
			if err != nil {
				t.Fatalf("node %d: Providers: %v", i, err)
			}
			if len(ps) != 0 {
				t.Errorf("node %d lists %d providers after an Update of an unregistered one, want 0: %+v", i, len(ps), ps)
			}
		}
	})

	t.Run("UnregisterRemovesEverywhere", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 3)
		holder := stores[1]
		kept := sampleProvider(randomHex(8), "user-1")
		removed := sampleProvider(randomHex(8), "user-2")
		for _, p := range []store.Provider{kept, removed} {
			if err := holder.Register(testContext(t), p); err != nil {
				t.Fatalf("Register %s: %v", p.ID, err)
			}
		}
		for _, s := range stores {
			waitForProvider(t, s, removed.ID)
		}

		if err := holder.Unregister(testContext(t), removed.ID); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
		if _, err := findProvider(testContext(t), holder, removed.ID); err == nil {
			t.Errorf("holder still lists %s right after Unregister", removed.ID)
		}
		for i, s := range stores {
			waitFor(t, propagationTimeout, fmt.Sprintf("provider removed on node %d", i), func() error {
				ps, err := s.Providers(testContext(t))
				if err != nil {
					return err
				}
				return compareIDs(ps, []string{kept.ID})
			})
		}
		if err := holder.Unregister(testContext(t), removed.ID); err != nil {
			t.Errorf("second Unregister of %s: %v, want nil", removed.ID, err)
		}
	})

	t.Run("UserProvidersFiltersByUser", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 3)
		mine0 := sampleProvider(randomHex(8), "user-mine")
		mine1 := sampleProvider(randomHex(8), "user-mine")
		other := sampleProvider(randomHex(8), "user-other")
		for _, reg := range []struct {
			s store.Store
			p store.Provider
		}{{stores[0], mine0}, {stores[1], mine1}, {stores[1], other}} {
			if err := reg.s.Register(testContext(t), reg.p); err != nil {
				t.Fatalf("Register %s on %s: %v", reg.p.ID, reg.s.ReplicaID(), err)
			}
		}
		for i, s := range stores {
			waitFor(t, propagationTimeout, fmt.Sprintf("providers of user-mine on node %d", i), func() error {
				ps, err := s.UserProviders(testContext(t), "user-mine")
				if err != nil {
					return err
				}
				return compareIDs(ps, []string{mine0.ID, mine1.ID})
			})
			ps, err := s.UserProviders(testContext(t), "user-nobody")
			if err != nil {
				t.Fatalf("node %d: UserProviders of a user with no provider: %v", i, err)
			}
			if len(ps) != 0 {
				t.Errorf("node %d: UserProviders of a user with no provider returned %d providers", i, len(ps))
			}
		}
	})

	t.Run("ReplicasListsEveryNode", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 3)
		if err := stores[2].Register(testContext(t), sampleProvider(randomHex(8), "user-1")); err != nil {
			t.Fatalf("Register: %v", err)
		}
		if err := stores[2].Register(testContext(t), sampleProvider(randomHex(8), "user-1")); err != nil {
			t.Fatalf("Register: %v", err)
		}
		want := map[string]int{stores[0].ReplicaID(): 0, stores[1].ReplicaID(): 0, stores[2].ReplicaID(): 2}
		for i, s := range stores {
			waitFor(t, propagationTimeout, fmt.Sprintf("replica list on node %d", i), func() error {
				rs, err := s.Replicas(testContext(t))
				if err != nil {
					return err
				}
				got := make(map[string]int, len(rs))
				for _, r := range rs {
					got[r.ID] = r.Providers
				}
				if !reflect.DeepEqual(got, want) {
					return fmt.Errorf("providers by replica = %v, want %v", got, want)
				}
				return nil
			})
		}
	})

	t.Run("SetPendingVisibleInReplicas", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 2)
		stores[0].SetPending(7)
		for i, s := range stores {
			waitFor(t, 10*testBeatInterval, fmt.Sprintf("pending count on node %d", i), func() error {
				r, err := findReplica(testContext(t), s, stores[0].ReplicaID())
				if err != nil {
					return err
				}
				if r.Pending != 7 {
					return fmt.Errorf("replica %s has Pending %d, want 7", r.ID, r.Pending)
				}
				return nil
			})
		}
		r, err := findReplica(testContext(t), stores[0], stores[1].ReplicaID())
		if err != nil {
			t.Fatal(err)
		}
		if r.Pending != 0 {
			t.Errorf("replica %s that never called SetPending has Pending %d, want 0", r.ID, r.Pending)
		}
	})

	t.Run("SendDeliversIntact", func(t *testing.T) {
		stores, handlers := startCluster(t, newCluster, 3)
		small := []byte(`{"type":"request","id":"r1"}`)
		large := make([]byte, 2<<20)
		if _, err := rand.Read(large); err != nil {
			t.Fatal(err)
		}
		for _, msg := range [][]byte{small, large} {
			if err := stores[0].Send(testContext(t), stores[1].ReplicaID(), msg); err != nil {
				t.Fatalf("Send of %d bytes: %v", len(msg), err)
			}
		}

		waitFor(t, propagationTimeout, "both messages delivered", func() error {
			if n := len(handlers[1].messages()); n < 2 {
				return fmt.Errorf("target received %d messages, want 2", n)
			}
			return nil
		})
		got := handlers[1].messages()
		if len(got) != 2 {
			t.Fatalf("target received %d messages, want 2", len(got))
		}
		for i, want := range [][]byte{small, large} {
			if !slices.ContainsFunc(got, func(m []byte) bool { return bytes.Equal(m, want) }) {
				t.Errorf("message %d (%d bytes) was not delivered intact, received sizes are %d and %d", i, len(want), len(got[0]), len(got[1]))
			}
		}
		for _, i := range []int{0, 2} {
			if n := len(handlers[i].messages()); n != 0 {
				t.Errorf("node %d received %d messages sent to node 1, want 0", i, n)
			}
		}
	})

	t.Run("SendToUnknownReplica", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 1)
		err := stores[0].Send(testContext(t), "no-such-replica-"+randomHex(4), []byte("{}"))
		if !errors.Is(err, store.ErrReplicaGone) {
			t.Errorf("Send to an unknown replica: error %v, want ErrReplicaGone", err)
		}
	})

	t.Run("CloseRemovesReplica", func(t *testing.T) {
		stores, handlers := startCluster(t, newCluster, 3)
		closing := stores[1]
		closingID := closing.ReplicaID()
		p := sampleProvider(randomHex(8), "user-1")
		if err := closing.Register(testContext(t), p); err != nil {
			t.Fatalf("Register: %v", err)
		}
		for _, s := range stores {
			waitForProvider(t, s, p.ID)
		}

		if err := closing.Close(testContext(t)); err != nil {
			t.Fatalf("Close: %v", err)
		}
		// Close notifies the other replicas at once, so they drop the replica
		// sooner than the TTL after which a silent replica is dropped.
		for _, i := range []int{0, 2} {
			s, h := stores[i], handlers[i]
			waitFor(t, testTTL/2, fmt.Sprintf("closed replica gone on node %d", i), func() error {
				ps, err := s.Providers(testContext(t))
				if err != nil {
					return err
				}
				if err := compareIDs(ps, nil); err != nil {
					return err
				}
				if _, err := findReplica(testContext(t), s, closingID); err == nil {
					return fmt.Errorf("Replicas still lists %s", closingID)
				}
				if h.downCount(closingID) == 0 {
					return fmt.Errorf("HandleReplicaDown(%s) not called", closingID)
				}
				return nil
			})
		}
		if err := stores[0].Send(testContext(t), closingID, []byte("{}")); !errors.Is(err, store.ErrReplicaGone) {
			t.Errorf("Send to the closed replica: error %v, want ErrReplicaGone", err)
		}
		if err := closing.Close(testContext(t)); err != nil {
			t.Errorf("second Close: %v, want nil", err)
		}
		if err := closing.Register(testContext(t), sampleProvider(randomHex(8), "user-1")); !errors.Is(err, store.ErrClosed) {
			t.Errorf("Register after Close: error %v, want ErrClosed", err)
		}

		// A late duplicate notification would arrive within a few beats.
		time.Sleep(5 * testBeatInterval)
		for _, i := range []int{0, 2} {
			if n := handlers[i].downCount(closingID); n != 1 {
				t.Errorf("node %d: HandleReplicaDown(%s) called %d times, want 1", i, closingID, n)
			}
		}
	})

	t.Run("StartAfterCloseFails", func(t *testing.T) {
		stores, handlers := startCluster(t, newCluster, 2)
		closing := stores[1]
		if err := closing.Close(testContext(t)); err != nil {
			t.Fatalf("Close: %v", err)
		}
		waitFor(t, propagationTimeout, "closed replica reported down", func() error {
			if handlers[0].downCount(closing.ReplicaID()) == 0 {
				return fmt.Errorf("HandleReplicaDown(%s) not called", closing.ReplicaID())
			}
			return nil
		})

		err := closing.Start(testContext(t), &recordingHandler{})
		if !errors.Is(err, store.ErrClosed) {
			t.Errorf("Start after Close: error %v, want ErrClosed", err)
		}
		// A closed replica must not rejoin the cluster.
		time.Sleep(5 * testBeatInterval)
		if _, err := findReplica(testContext(t), stores[0], closing.ReplicaID()); err == nil {
			t.Errorf("closed replica %s is listed by Replicas again after Start", closing.ReplicaID())
		}
	})

	t.Run("AccountEventsKeepNewest", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 2)
		writer, reader := stores[0], stores[1]
		const appended = 250
		user := "user-" + randomHex(4)
		for i := range appended {
			msg := []byte(fmt.Sprintf(`{"type":"account_event","seq":%d}`, i))
			ev := store.AccountEvent{Message: msg, ReceivedAt: 1000 + float64(i)}
			if err := writer.AppendAccountEvent(testContext(t), user, ev); err != nil {
				t.Fatalf("AppendAccountEvent %d: %v", i, err)
			}
			// The store must have copied the message.
			clear(msg)
		}

		all, err := reader.AccountEvents(testContext(t), user, 0)
		if err != nil {
			t.Fatalf("AccountEvents: %v", err)
		}
		if err := checkEventSeqs(all, appended-testMaxAccountEvents, appended); err != nil {
			t.Errorf("all events: %v", err)
		}

		newer, err := reader.AccountEvents(testContext(t), user, 1200)
		if err != nil {
			t.Fatalf("AccountEvents since 1200: %v", err)
		}
		if err := checkEventSeqs(newer, 201, appended); err != nil {
			t.Errorf("events since 1200 (exclusive): %v", err)
		}

		fraction, err := reader.AccountEvents(testContext(t), user, 1247.5)
		if err != nil {
			t.Fatalf("AccountEvents since 1247.5: %v", err)
		}
		if err := checkEventSeqs(fraction, 248, appended); err != nil {
			t.Errorf("events since 1247.5: %v", err)
		}

		none, err := reader.AccountEvents(testContext(t), user, 5000)
		if err != nil {
			t.Fatalf("AccountEvents since 5000: %v", err)
		}
		if len(none) != 0 {
			t.Errorf("events since 5000: got %d, want 0", len(none))
		}

		other, err := reader.AccountEvents(testContext(t), "other-"+user, 0)
		if err != nil {
			t.Fatalf("AccountEvents of another user: %v", err)
		}
		if len(other) != 0 {
			t.Errorf("another user has %d events, want 0", len(other))
		}
	})

	t.Run("AuthFailuresKeepNewest", func(t *testing.T) {
		stores, _ := startCluster(t, newCluster, 3)
		const recorded = store.MaxAuthFailures + 10
		start := time.Date(2025, 3, 14, 9, 0, 0, 0, time.UTC)
		for i := range recorded {
			writer := stores[i%2]
			f := store.AuthFailure{
				At:             start.Add(time.Duration(i) * time.Second),
				ReplicaID:      writer.ReplicaID(),
				IP:             "192.0.2.7",
				KeyFingerprint: fmt.Sprintf("%012x", i),
				Reason:         "unknown_key",
			}
			if err := writer.RecordAuthFailure(testContext(t), f); err != nil {
				t.Fatalf("RecordAuthFailure %d: %v", i, err)
			}
		}

		got, err := stores[2].AuthFailures(testContext(t))
		if err != nil {
			t.Fatalf("AuthFailures: %v", err)
		}
		if len(got) != store.MaxAuthFailures {
			t.Fatalf("AuthFailures returned %d failures, want %d", len(got), store.MaxAuthFailures)
		}
		for j, f := range got {
			i := recorded - 1 - j
			if want := fmt.Sprintf("%012x", i); f.KeyFingerprint != want {
				t.Fatalf("failure %d has fingerprint %s, want %s (newest first)", j, f.KeyFingerprint, want)
			}
			if want := stores[i%2].ReplicaID(); f.ReplicaID != want {
				t.Errorf("failure %d: ReplicaID %s, want %s", j, f.ReplicaID, want)
			}
			if want := start.Add(time.Duration(i) * time.Second); !f.At.Equal(want) {
				t.Errorf("failure %d: At %v, want %v", j, f.At, want)
			}
		}
	})
}

// startCluster builds a cluster with newCluster and starts every store with a
// recording handler of its own.
func startCluster(t *testing.T, newCluster func(t *testing.T, n int) []store.Store, n int) ([]store.Store, []*recordingHandler) {
	t.Helper()
	stores := newCluster(t, n)
	handlers := make([]*recordingHandler, n)
	for i, s := range stores {
		handlers[i] = &recordingHandler{}
		if err := s.Start(testContext(t), handlers[i]); err != nil {
			t.Fatalf("Start of node %d: %v", i, err)
		}
	}
	return stores, handlers
}

// recordingHandler records what a store delivers to its replica.
type recordingHandler struct {
	mu       sync.Mutex
	received [][]byte
	downs    []string
}

func (h *recordingHandler) HandleMessage(msg []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.received = append(h.received, bytes.Clone(msg))
}

func (h *recordingHandler) HandleReplicaDown(replicaID string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.downs = append(h.downs, replicaID)
}

func (h *recordingHandler) messages() [][]byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.received)
}

func (h *recordingHandler) downCount(replicaID string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, id := range h.downs {
		if id == replicaID {
			n++
		}
	}
	return n
}

func (h *recordingHandler) allDowns() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.downs)
}

// waitFor calls check every 10 ms until it returns nil, and fails the test with
// the last error of check when timeout passes first.
func waitFor(t testing.TB, timeout time.Duration, what string, check func() error) {
	t.Helper()
	if err := poll(timeout, check); err != nil {
		t.Fatalf("%s: still failing after %v: %v", what, timeout, err)
	}
}

// poll calls check every 10 ms until it returns nil, and returns the last
// error of check when timeout passes first.
func poll(timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitForProvider waits until s lists the provider id.
func waitForProvider(t testing.TB, s store.Store, id string) {
	t.Helper()
	waitFor(t, propagationTimeout, fmt.Sprintf("provider %s visible on %s", id, s.ReplicaID()), func() error {
		_, err := findProvider(context.Background(), s, id)
		return err
	})
}

// testContext returns a context that ends with the test, bounded to 10 s so a
// hung store call fails the test instead of stalling the package.
func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func findProvider(ctx context.Context, s store.Store, id string) (store.Provider, error) {
	ps, err := s.Providers(ctx)
	if err != nil {
		return store.Provider{}, fmt.Errorf("Providers on %s: %w", s.ReplicaID(), err)
	}
	for _, p := range ps {
		if p.ID == id {
			return p, nil
		}
	}
	return store.Provider{}, fmt.Errorf("%s does not list provider %s among %d providers", s.ReplicaID(), id, len(ps))
}

func findReplica(ctx context.Context, s store.Store, id string) (store.Replica, error) {
	rs, err := s.Replicas(ctx)
	if err != nil {
		return store.Replica{}, fmt.Errorf("Replicas on %s: %w", s.ReplicaID(), err)
	}
	for _, r := range rs {
		if r.ID == id {
			return r, nil
		}
	}
	return store.Replica{}, fmt.Errorf("%s does not list replica %s among %d replicas", s.ReplicaID(), id, len(rs))
}

// compareProviders compares the JSON encodings, which is what the backend API
// serves, so that time zones and monotonic clock readings do not matter.
func compareProviders(got, want store.Provider) error {
	gotJSON, err := json.Marshal(got)
	if err != nil {
		return err
	}
	wantJSON, err := json.Marshal(want)
	if err != nil {
		return err
	}
	if !bytes.Equal(gotJSON, wantJSON) {
		return fmt.Errorf("provider differs:\n got %s\nwant %s", gotJSON, wantJSON)
	}
	return nil
}

// compareIDs checks that ps contains exactly the providers ids, in any order.
func compareIDs(ps []store.Provider, ids []string) error {
	got := make([]string, 0, len(ps))
	for _, p := range ps {
		got = append(got, p.ID)
	}
	slices.Sort(got)
	want := slices.Sorted(slices.Values(ids))
	if !slices.Equal(got, want) {
		return fmt.Errorf("provider ids = %v, want %v", got, want)
	}
	return nil
}

// checkEventSeqs checks that evs are the events of sequence numbers from
// first up to but excluding end, oldest first, as AccountEventsKeepNewest
// appended them.
func checkEventSeqs(evs []store.AccountEvent, first, end int) error {
	if len(evs) != end-first {
		return fmt.Errorf("got %d events, want %d (seq %d to %d)", len(evs), end-first, first, end-1)
	}
	for i, ev := range evs {
		seq := first + i
		var body struct {
			Type string `json:"type"`
			Seq  int    `json:"seq"`
		}
		if err := json.Unmarshal(ev.Message, &body); err != nil {
			return fmt.Errorf("event %d: invalid JSON %q: %v", i, ev.Message, err)
		}
		if body.Seq != seq || body.Type != "account_event" {
			return fmt.Errorf("event %d is %s, want seq %d", i, ev.Message, seq)
		}
		if want := 1000 + float64(seq); ev.ReceivedAt != want {
			return fmt.Errorf("event %d: ReceivedAt %v, want %v", i, ev.ReceivedAt, want)
		}
	}
	return nil
}

// sampleProvider returns a provider with every field set, so that a field lost
// in transit shows up in compareProviders.
func sampleProvider(id, userID string) store.Provider {
	ibConnected := true
	connectedAt := time.Date(2025, 3, 14, 9, 26, 53, 589_000_000, time.UTC)
	return store.Provider{
		ID:                  id,
		UserID:              userID,
		AgentVersion:        "1.39.1",
		IBAccounts:          []string{"U1234567", "DU7654321"},
		ConnectedAt:         connectedAt,
		LastHeartbeat:       connectedAt.Add(5 * time.Second),
		IsActive:            true,
		IBConnected:         &ibConnected,
		AvailableScanLines:  40,
		AcceptExternalScans: true,
		BootPhase:           &store.BootPhase{Phase: "connecting_ib", Detail: "port 4002"},
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
