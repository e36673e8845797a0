package store

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"time"
	"unsafe"

	"github.com/redis/go-redis/v9"
)

// This file keeps the view of the other replicas: it applies their registry
// events, reloads their hashes when an event was missed, and drops replicas
// whose beats stop.

// receiveLoop reads the subscription. It never blocks on the handler, which
// must not block either, so go-redis never drops a message for a slow reader.
// When checkPubSub finds the subscription silent, a new one is opened while
// the old one is still read, and the old one is closed only after the new
// one is confirmed and the old one's buffered messages are handled.
func (s *Redis) receiveLoop(pubsub *redis.PubSub) {
	defer s.done.Done()
	ch := pubsub.ChannelWithSubscriptions(redis.WithChannelSize(4096))
	var next chan *redis.PubSub // set while a replacement is being opened
	replace := func() {
		if next != nil {
			return
		}
		ready := make(chan *redis.PubSub, 1)
		next = ready
		go func() { ready <- s.resubscribe() }()
	}
	for {
		select {
		case <-s.stop:
			_ = pubsub.Close()
			return
		case <-s.resubscribeCh:
			replace()
		case fresh := <-next:
			next = nil
			s.drain(ch)
			_ = pubsub.Close()
			if fresh == nil {
				return
			}
			pubsub, ch = fresh, fresh.ChannelWithSubscriptions(redis.WithChannelSize(4096))
		case m, ok := <-ch:
			if !ok {
				ch = nil // closed under us: wait for the replacement
				replace()
				continue
			}
			s.handleReceived(m)
		}
	}
}

// drain handles the messages already buffered in ch, without waiting.
func (s *Redis) drain(ch <-chan any) {
	for {
		select {
		case m, ok := <-ch:
			if !ok {
				return
			}
			s.handleReceived(m)
		default:
			return
		}
	}
}

func (s *Redis) handleReceived(m any) {
	switch m := m.(type) {
	case *redis.Subscription:
		// go-redis resubscribed after a reconnect: events sent in between
		// are lost, so reload the whole view.
		if m.Kind == "subscribe" && m.Channel == s.eventsChannel {
			s.log.Info("pub/sub subscribed", "channel", m.Channel)
			s.requestReload("")
		}
	case *redis.Message:
		s.dispatch(m)
	}
}

// resubscribe opens a new subscription, retrying every beat interval until
// it succeeds or the store stops (nil).
func (s *Redis) resubscribe() *redis.PubSub {
	for {
		ctx, cancel := s.opContext()
		pubsub := s.client.Subscribe(ctx, s.inboxChannel, s.eventsChannel)
		_, err := pubsub.Receive(ctx)
		cancel()
		if err == nil {
			s.metrics.inc(&s.metrics.Resubscribes)
			s.log.Info("pub/sub subscription replaced")
			s.requestReload("")
			return pubsub
		}
		_ = pubsub.Close()
		s.log.Warn("pub/sub resubscribe failed", "err", err)
		select {
		case <-s.stop:
			return nil
		case <-time.After(s.cfg.BeatInterval):
		}
	}
}

func (s *Redis) dispatch(m *redis.Message) {
	if m.Channel == s.inboxChannel {
		s.mu.Lock()
		h := s.handler
		s.mu.Unlock()
		if h != nil {
			h.HandleMessage(unsafe.Slice(unsafe.StringData(m.Payload), len(m.Payload)))
		}
		return
	}
	var ev registryEvent
	if err := json.Unmarshal([]byte(m.Payload), &ev); err != nil || ev.V != busVersion {
		s.metrics.inc(&s.metrics.UnknownEvents)
		s.log.Debug("ignored registry event of unknown format", "bytes", len(m.Payload), "err", err)
		return
	}
	s.applyEvent(ev)
}

// applyEvent updates the view of another replica. An event whose generation
// does not follow the view's means an event was missed: the replica's hash is
// reloaded.
func (s *Redis) applyEvent(ev registryEvent) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if ev.ReplicaID == s.cfg.ReplicaID {
		if ev.Op == "beat" {
			s.ownBeatSeen = now
		}
		return
	}
	peer := s.peers[ev.ReplicaID]
	if ev.Op == "bye" {
		if peer != nil {
			s.setPeerLocked(ev.ReplicaID, nil)
			s.replicaDownLocked(ev.ReplicaID)
		}
		return
	}
	if peer == nil {
		peer = &peerView{info: Replica{ID: ev.ReplicaID}, providers: make(map[string]Provider)}
		s.setPeerLocked(ev.ReplicaID, peer)
		s.requestReloadLocked(ev.ReplicaID)
	}
	peer.lastSeen = now
	switch ev.Op {
	case "up", "down":
		if ev.Gen <= peer.gen {
			return
		}
		if ev.Gen != peer.gen+1 {
			s.requestReloadLocked(ev.ReplicaID)
		}
		peer.gen = ev.Gen
		if ev.Op == "up" && ev.Provider != nil {
			s.putPeerProviderLocked(ev.ReplicaID, peer, *ev.Provider)
		} else {
			s.deletePeerProviderLocked(peer, ev.ProviderID)
		}
	case "beat":
		if ev.Replica != nil {
			peer.info = *ev.Replica
		}
		// Updates never create a provider: one that is gone stays gone even
		// if its last update arrives after its removal.
		for _, p := range ev.Updates {
			if _, ok := peer.providers[p.ID]; ok {
				s.putPeerProviderLocked(ev.ReplicaID, peer, p)
			}
		}
		if ev.Gen != peer.gen {
			s.requestReloadLocked(ev.ReplicaID)
		}
	case "reset":
		s.requestReloadLocked(ev.ReplicaID)
	}
}

func (s *Redis) requestReload(id string) {
	s.mu.Lock()
	s.requestReloadLocked(id)
	s.mu.Unlock()
}

func (s *Redis) requestReloadLocked(id string) {
	select {
	case s.reload <- id:
	default:
		// The queue is full: a reload of everything covers this one.
		select {
		case s.reload <- "":
		default:
		}
	}
}

func (s *Redis) reloadLoop() {
	defer s.done.Done()
	for {
		select {
		case <-s.stop:
			return
		case id := <-s.reload:
			ids := map[string]struct{}{id: {}}
		drain:
			for {
				select {
				case more := <-s.reload:
					ids[more] = struct{}{}
				default:
					break drain
				}
			}
			if _, all := ids[""]; all {
				ids = map[string]struct{}{"": {}}
			}
			for id := range ids {
				ctx, cancel := s.opContext()
				if err := s.reloadPeers(ctx, id); err != nil {
					s.setRegistryError(err)
				}
				cancel()
			}
		}
	}
}

// reloadPeers reads the hashes of replica only, or of every replica when
// only is empty, and replaces their view.
func (s *Redis) reloadPeers(ctx context.Context, only string) error {
	ids := []string{only}
	if only == "" {
		var err error
		if ids, err = s.client.SMembers(ctx, s.replicasKey).Result(); err != nil {
			return err
		}
	}
	type result struct {
		alive *redis.StringCmd
		hash  *redis.MapStringStringCmd
	}
	results := make(map[string]result, len(ids))
	pipe := s.client.Pipeline()
	for _, id := range ids {
		if id == s.cfg.ReplicaID {
			continue
		}
		results[id] = result{alive: pipe.Get(ctx, s.aliveKeyOf(id)), hash: pipe.HGetAll(ctx, s.providersKeyOf(id))}
	}
	if len(results) == 0 {
		return nil
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return err
	}
	s.metrics.inc(&s.metrics.Reloads)

	var gone []string
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, r := range results {
		infoJSON, err := r.alive.Bytes()
		if err != nil {
			// No liveness key: the replica is dead or stopped, unless Redis
			// lost the key (a restart without persistence, an eviction) while
			// the replica still beats. checkPeers judges those by the TTL.
			if peer, ok := s.peers[id]; ok && (!s.health.PubSubOK || peer.lastSeen.After(now.Add(-s.cfg.TTL))) {
				continue
			}
			gone = append(gone, id)
			if _, ok := s.peers[id]; ok {
				s.setPeerLocked(id, nil)
				s.replicaDownLocked(id)
			}
			continue
		}
		hash := r.hash.Val()
		gen, _ := strconv.ParseUint(hash[genField], 10, 64)
		peer := s.peers[id]
		if peer != nil && peer.gen > gen {
			continue // events newer than this read were applied meanwhile
		}
		view := &peerView{gen: gen, providers: make(map[string]Provider, len(hash)), lastSeen: now}
		if err := json.Unmarshal(infoJSON, &view.info); err != nil {
			view.info = Replica{ID: id}
		}
		if peer != nil && peer.lastSeen.After(now.Add(-s.cfg.TTL)) {
			view.lastSeen = peer.lastSeen
		}
		for field, data := range hash {
			if field == genField {
				continue
			}
			var p Provider
			if err := json.Unmarshal([]byte(data), &p); err != nil {
				s.metrics.inc(&s.metrics.UnknownEvents)
				continue
			}
			p.ID = field // the hash field is the provider id
			view.providers[field] = p
		}
		s.setPeerLocked(id, view)
	}
	if len(gone) > 0 && only == "" {
		// Clean the replica index of dead replicas, in the background of this reload.
		args := make([]any, len(gone))
		for i, id := range gone {
			args[i] = id
		}
		go func() {
			ctx, cancel := s.opContext()
			defer cancel()
			s.client.SRem(ctx, s.replicasKey, args...)
		}()
	}
	return nil
}

// checkPeers drops replicas whose beat has not arrived within the TTL.
func (s *Redis) checkPeers() {
	deadline := time.Now().Add(-s.cfg.TTL)
	s.mu.Lock()
	defer s.mu.Unlock()
	// While this replica cannot hear its own beats, silence from the others
	// proves nothing about them.
	if !s.health.PubSubOK {
		return
	}
	for id, peer := range s.peers {
		if peer.lastSeen.Before(deadline) {
			s.setPeerLocked(id, nil)
			s.log.Warn("replica missed its beats, dropped from the registry view", "peer", id, "last_seen", peer.lastSeen)
			s.replicaDownLocked(id)
		}
	}
}

// checkPubSub marks pub/sub broken when this replica's own beats, published
// successfully, have not come back through its subscription for three beat
// intervals, and asks the receive loop to replace the subscription, again
// every three intervals while the silence lasts.
func (s *Redis) checkPubSub() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastBeatOK.IsZero() {
		return
	}
	now := time.Now()
	silent := now.Sub(s.ownBeatSeen) > 3*s.cfg.BeatInterval
	switch {
	case silent && s.health.PubSubOK:
		s.health.PubSubOK = false
		s.health.Since = now.UTC()
		s.metrics.inc(&s.metrics.PubSubStalls)
		s.log.Warn("pub/sub stopped delivering this replica's own beats; resubscribing")
		s.requestResubscribeLocked(now)
	case silent && now.Sub(s.lastResubscribe) > 3*s.cfg.BeatInterval:
		s.requestResubscribeLocked(now)
	case !silent && !s.health.PubSubOK:
		s.health.PubSubOK = true
		s.health.Since = now.UTC()
		// Peers could not be heard either: each gets a full TTL to beat again.
		for _, peer := range s.peers {
			peer.lastSeen = now
		}
		s.log.Info("pub/sub delivering again")
		s.requestReloadLocked("")
	}
}

func (s *Redis) requestResubscribeLocked(now time.Time) {
	s.lastResubscribe = now
	select {
	case s.resubscribeCh <- struct{}{}:
	default:
	}
}

// replicaDownLocked tells the handler, outside the lock, that a replica is gone.
func (s *Redis) replicaDownLocked(id string) {
	h := s.handler
	if h != nil {
		go h.HandleReplicaDown(id)
	}
}
