package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

var _ Store = (*Redis)(nil)

// Defaults of RedisConfig, used where a field is zero.
const (
	DefaultPrefix         = "relay"
	DefaultBeatInterval   = time.Second
	DefaultRegistryTTL    = 5 * time.Second
	DefaultResyncInterval = 30 * time.Second
	DefaultOpTimeout      = 2 * time.Second
	DefaultEventTTL       = 24 * time.Hour
)

// busVersion is the version of the registry events that replicas exchange.
// A replica ignores and counts events of another version.
const busVersion = 1

// genField is the hash field that holds a replica's registry generation. It
// cannot clash with a provider id, which the relay builds from hex digits.
const genField = "~gen"

// RedisConfig configures a Redis store. Zero values select the defaults.
type RedisConfig struct {
	// Client is a go-redis client for a single node, Sentinel or Cluster. Required.
	Client redis.UniversalClient
	// Prefix starts every key and channel name. Zero means "relay". Tests and
	// several clusters sharing one Redis use distinct prefixes.
	Prefix string
	// ReplicaID identifies this replica. Required, unique per running process.
	ReplicaID string
	// Addr and Version are shown to operators in the replica list.
	Addr, Version string
	// BeatInterval is how often this replica refreshes its liveness key,
	// flushes provider updates and publishes its beat. Zero means 1 s.
	BeatInterval time.Duration
	// TTL is how long this replica's keys outlive its last beat, and how long
	// other replicas wait for a beat before they treat this one as dead. It
	// must be at least twice BeatInterval. Zero means 5 s.
	TTL time.Duration
	// ResyncInterval is how often the whole registry view is reloaded from
	// Redis, to repair anything a lost pub/sub message left out. Zero means 30 s.
	ResyncInterval time.Duration
	// OpTimeout bounds each Redis call the store makes itself. Zero means 2 s.
	OpTimeout time.Duration
	// MaxAccountEvents is how many account events are kept per user. Zero means 500.
	MaxAccountEvents int
	// AccountEventTTL is how long a user's events outlive the newest. Zero means 24 h.
	AccountEventTTL time.Duration
	// Logger receives connection changes and errors. Nil means slog.Default().
	Logger *slog.Logger
	// Metrics receives counts of store events. Nil means counts are kept but
	// not shared with the caller.
	Metrics *Metrics
}

// Redis is a Store for several replicas that share one Redis deployment.
//
// Each replica writes the providers it holds into one hash with a TTL and
// publishes every change on a shared events channel. Every replica keeps a
// view of all hashes in memory, fed by those events and reloaded when a
// generation number shows that it missed one, so reading the registry costs
// no Redis round trip. Messages to a replica travel over its inbox channel.
type Redis struct {
	cfg     RedisConfig
	client  redis.UniversalClient
	log     *slog.Logger
	metrics *Metrics

	// Static after construction: key and channel names.
	replicasKey, aliveKey, providersKey string
	inboxChannel, eventsChannel         string

	startedAt time.Time
	ops       chan writeOp
	reload    chan string // replica id to reload, "" for all
	// resubscribeCh signals the receive loop to replace the subscription.
	resubscribeCh chan struct{}
	publishQueue  chan *publishRequest
	directPublish atomic.Bool // a Send publishes from its own goroutine
	stop          chan struct{}
	done          sync.WaitGroup
	closeOnce     sync.Once
	pending       atomic.Int64

	mu sync.Mutex
	// Guarded by mu: this replica's providers and the updates not yet flushed.
	local    map[string]Provider
	dirty    map[string]struct{}
	fullSync bool // set when a write failed, so the next beat rewrites everything
	gen      uint64
	// Guarded by mu: the view of the other replicas.
	peers   map[string]*peerView
	users   userIndex // over local and peers
	handler Handler
	health  Health
	// Guarded by mu: when this replica last received its own beat back.
	ownBeatSeen     time.Time
	lastBeatOK      time.Time
	lastResubscribe time.Time
	closed          bool
}

type peerView struct {
	info      Replica
	gen       uint64
	providers map[string]Provider
	lastSeen  time.Time
}

type writeOp struct {
	up     *Provider // register
	downID string    // unregister
	result chan error
}

// registryEvent is published on the events channel.
type registryEvent struct {
	V          int        `json:"v"`
	Op         string     `json:"op"` // "up", "down", "beat", "reset", "bye"
	ReplicaID  string     `json:"replica_id"`
	Gen        uint64     `json:"gen"`
	Provider   *Provider  `json:"provider,omitempty"`
	ProviderID string     `json:"provider_id,omitempty"`
	Replica    *Replica   `json:"replica,omitempty"`
	Updates    []Provider `json:"updates,omitempty"`
}

// NewRedis returns a Redis store. Call Start before use.
func NewRedis(cfg RedisConfig) (*Redis, error) {
	if cfg.Client == nil {
		return nil, errors.New("store: RedisConfig.Client is required")
	}
	if cfg.ReplicaID == "" {
		return nil, errors.New("store: RedisConfig.ReplicaID is required")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.BeatInterval <= 0 {
		cfg.BeatInterval = DefaultBeatInterval
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultRegistryTTL
	}
	if cfg.TTL < 2*cfg.BeatInterval {
		return nil, fmt.Errorf("store: registry TTL %v must be at least twice the beat interval %v", cfg.TTL, cfg.BeatInterval)
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = DefaultResyncInterval
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = DefaultOpTimeout
	}
	if cfg.MaxAccountEvents <= 0 {
		cfg.MaxAccountEvents = DefaultMaxAccountEvents
	}
	if cfg.AccountEventTTL <= 0 {
		cfg.AccountEventTTL = DefaultEventTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = new(Metrics)
	}
	p, id := cfg.Prefix, cfg.ReplicaID
	// Keys of one replica share the hash tag {id}, so they stay in one slot
	// of a Redis Cluster and can be written in one transaction.
	s := &Redis{
		cfg:           cfg,
		client:        cfg.Client,
		log:           cfg.Logger.With("component", "store", "replica", id),
		metrics:       cfg.Metrics,
		replicasKey:   p + ":replicas",
		aliveKey:      p + ":{" + id + "}:alive",
		providersKey:  p + ":{" + id + "}:providers",
		inboxChannel:  InboxChannel(p, id),
		eventsChannel: p + ":events",
		startedAt:     time.Now().UTC(),
		ops:           make(chan writeOp, 1024),
		reload:        make(chan string, 64),
		resubscribeCh: make(chan struct{}, 1),
		publishQueue:  make(chan *publishRequest, 4096),
		stop:          make(chan struct{}),
		local:         make(map[string]Provider),
		dirty:         make(map[string]struct{}),
		peers:         make(map[string]*peerView),
		users:         make(userIndex),
		health:        Health{Backend: "redis", Since: time.Now().UTC()},
		// Generations start at the start time, so that a process restarted
		// under the same replica id writes newer generations than the
		// crashed one, whose entries the other replicas then replace.
		// NOTE: this assumes the clock does not step back between the two.
		gen: uint64(time.Now().UnixNano()),
	}
	return s, nil
}

// InboxChannel returns the name of the channel a replica receives messages on.
func InboxChannel(prefix, replicaID string) string {
	return prefix + ":{" + replicaID + "}:inbox"
}

func (s *Redis) providersKeyOf(id string) string { return s.cfg.Prefix + ":{" + id + "}:providers" }
func (s *Redis) aliveKeyOf(id string) string     { return s.cfg.Prefix + ":{" + id + "}:alive" }
func (s *Redis) eventsKey(userID string) string {
	return s.cfg.Prefix + ":{u:" + userID + "}:account_events"
}

// ReplicaID returns the identity of this replica.
func (s *Redis) ReplicaID() string { return s.cfg.ReplicaID }

// Start subscribes to this replica's inbox and the events channel, writes the
// first beat, loads the registry view and starts the background loops.
func (s *Redis) Start(ctx context.Context, h Handler) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.handler = h
	s.mu.Unlock()

	pubsub := s.client.Subscribe(ctx, s.inboxChannel, s.eventsChannel)
	// Receive waits for the subscription confirmation, so no message sent
	// after Start returns can be missed.
	if _, err := pubsub.Receive(ctx); err != nil {
		_ = pubsub.Close()
		return fmt.Errorf("store: subscribe to %s: %w", s.inboxChannel, err)
	}
	// The first beat rewrites this replica's hash whole: a process that
	// crashed under the same replica id within the TTL left entries that no
	// socket backs any more.
	s.markFullSync()
	if err := s.beat(ctx); err != nil {
		_ = pubsub.Close()
		return fmt.Errorf("store: first registry write: %w", err)
	}
	if err := s.reloadPeers(ctx, ""); err != nil {
		_ = pubsub.Close()
		return fmt.Errorf("store: load registry: %w", err)
	}
	s.mu.Lock()
	s.health.PubSubOK = true
	s.ownBeatSeen = time.Now()
	s.mu.Unlock()

	s.done.Add(3 + publishers)
	go s.receiveLoop(pubsub)
	go s.writeLoop()
	go s.reloadLoop()
	for range publishers {
		go s.publishLoop()
	}
	s.log.Info("registry started", "prefix", s.cfg.Prefix, "ttl", s.cfg.TTL, "beat_interval", s.cfg.BeatInterval)
	return nil
}

func (s *Redis) opContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), s.cfg.OpTimeout)
}

// Register adds a provider held by this replica and publishes it. The
// provider stays registered locally even when Redis fails, and is written
// again by the next successful beat.
func (s *Redis) Register(ctx context.Context, p Provider) error {
	p.InstanceID = s.cfg.ReplicaID
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.putLocalLocked(p)
	s.mu.Unlock()
	return s.submit(ctx, writeOp{up: &p})
}

// Update records a provider's new state for the next beat.
func (s *Redis) Update(p Provider) {
	p.InstanceID = s.cfg.ReplicaID
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.local[p.ID]; !ok {
		return
	}
	s.putLocalLocked(p)
	s.dirty[p.ID] = struct{}{}
}

// Unregister removes a provider held by this replica and publishes it.
func (s *Redis) Unregister(ctx context.Context, id string) error {
	s.mu.Lock()
	if _, ok := s.local[id]; !ok {
		s.mu.Unlock()
		return nil
	}
	s.deleteLocalLocked(id)
	delete(s.dirty, id)
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil
	}
	return s.submit(ctx, writeOp{downID: id})
}

// submit hands a write to the write loop, which applies writes in order, and
// waits for its result.
func (s *Redis) submit(ctx context.Context, op writeOp) error {
	op.result = make(chan error, 1)
	select {
	case s.ops <- op:
	case <-ctx.Done():
		s.markFullSync()
		return ctx.Err()
	case <-s.stop:
		return ErrClosed
	}
	select {
	case err := <-op.result:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Redis) markFullSync() {
	s.mu.Lock()
	s.fullSync = true
	s.mu.Unlock()
}

// writeLoop owns every write of this replica's registry state, so that the
// events it publishes arrive at the other replicas in generation order.
func (s *Redis) writeLoop() {
	defer s.done.Done()
	beat := time.NewTicker(s.cfg.BeatInterval)
	defer beat.Stop()
	resync := time.NewTicker(s.cfg.ResyncInterval)
	defer resync.Stop()
	for {
		// Writes go before a due beat, so that beats failing against an
		// unreachable Redis delay a write by at most one OpTimeout.
		select {
		case op := <-s.ops:
			s.writeBatch(s.drainOps(op))
			continue
		default:
		}
		select {
		case <-s.stop:
			return
		case op := <-s.ops:
			s.writeBatch(s.drainOps(op))
		case <-beat.C:
			ctx, cancel := s.opContext()
			if err := s.beat(ctx); err != nil {
				s.setRegistryError(err)
			}
			cancel()
			// Pub/sub health first: checkPeers trusts silence from other
			// replicas only while this replica hears its own beats.
			s.checkPubSub()
			s.checkPeers()
		case <-resync.C:
			s.requestReload("")
		}
	}
}

// writeBatch applies registrations and removals in one pipeline.
func (s *Redis) writeBatch(batch []writeOp) {
	ctx, cancel := s.opContext()
	defer cancel()
	pipe := s.client.Pipeline()
	s.mu.Lock()
	for _, op := range batch {
		s.gen++
		ev := registryEvent{V: busVersion, ReplicaID: s.cfg.ReplicaID, Gen: s.gen}
		if op.up != nil {
			data, _ := json.Marshal(op.up)
			pipe.HSet(ctx, s.providersKey, op.up.ID, data, genField, s.gen)
			ev.Op, ev.Provider = "up", op.up
		} else {
			pipe.HDel(ctx, s.providersKey, op.downID)
			pipe.HSet(ctx, s.providersKey, genField, s.gen)
			ev.Op, ev.ProviderID = "down", op.downID
		}
		msg, _ := json.Marshal(ev)
		pipe.Publish(ctx, s.eventsChannel, msg)
	}
	s.mu.Unlock()
	pipe.PExpire(ctx, s.providersKey, s.cfg.TTL)
	_, err := pipe.Exec(ctx)
	if err != nil {
		s.markFullSync()
		s.setRegistryError(err)
		err = fmt.Errorf("%w: %v", ErrUnavailable, err)
	} else {
		s.setRegistryOK()
	}
	for _, op := range batch {
		op.result <- err
	}
}

// beat refreshes this replica's liveness key, flushes provider updates and
// publishes them. When Redis has lost this replica's hash (a restart without
// persistence, an eviction) or an earlier write failed, it rewrites the hash
// whole in one transaction.
func (s *Redis) beat(ctx context.Context) error {
	s.mu.Lock()
	full := s.fullSync
	info := s.replicaInfoLocked()
	updates := make([]Provider, 0, len(s.dirty))
	for id := range s.dirty {
		updates = append(updates, s.local[id])
	}
	clear(s.dirty)
	s.fullSync = false
	gen := s.gen
	s.mu.Unlock()

	infoJSON, _ := json.Marshal(info)
	pipe := s.client.Pipeline()
	pipe.Set(ctx, s.aliveKey, infoJSON, s.cfg.TTL)
	pipe.SAdd(ctx, s.replicasKey, s.cfg.ReplicaID)
	exists := pipe.PExpire(ctx, s.providersKey, s.cfg.TTL)
	if _, err := pipe.Exec(ctx); err != nil {
		s.requeue(updates)
		return err
	}
	if !exists.Val() || full {
		if err := s.rewrite(ctx); err != nil {
			return err
		}
		s.mu.Lock()
		gen = s.gen
		s.mu.Unlock()
		updates = updates[:0] // the rewrite carried them
	}

	pipe = s.client.Pipeline()
	if len(updates) > 0 {
		args := make([]any, 0, 2*len(updates))
		for _, p := range updates {
			data, _ := json.Marshal(p)
			args = append(args, p.ID, data)
		}
		pipe.HSet(ctx, s.providersKey, args...)
	}
	ev, _ := json.Marshal(registryEvent{V: busVersion, Op: "beat", ReplicaID: s.cfg.ReplicaID, Gen: gen, Replica: &info, Updates: updates})
	pipe.Publish(ctx, s.eventsChannel, ev)
	if _, err := pipe.Exec(ctx); err != nil {
		s.requeue(updates)
		return err
	}
	s.mu.Lock()
	s.lastBeatOK = time.Now()
	s.mu.Unlock()
	s.setRegistryOK()
	return nil
}

// rewrite replaces this replica's hash with every provider it holds and tells
// the other replicas to reload it.
func (s *Redis) rewrite(ctx context.Context) error {
	s.mu.Lock()
	s.gen++
	gen := s.gen
	args := make([]any, 0, 2*len(s.local)+2)
	args = append(args, genField, gen)
	for id, p := range s.local {
		data, _ := json.Marshal(p)
		args = append(args, id, data)
	}
	n := len(s.local)
	s.mu.Unlock()

	ev, _ := json.Marshal(registryEvent{V: busVersion, Op: "reset", ReplicaID: s.cfg.ReplicaID, Gen: gen})
	tx := s.client.TxPipeline()
	tx.Del(ctx, s.providersKey)
	tx.HSet(ctx, s.providersKey, args...)
	tx.PExpire(ctx, s.providersKey, s.cfg.TTL)
	if _, err := tx.Exec(ctx); err != nil {
		s.markFullSync()
		return err
	}
	if err := s.client.Publish(ctx, s.eventsChannel, ev).Err(); err != nil {
		return err
	}
	s.metrics.inc(&s.metrics.Rewrites)
	s.log.Info("registry rewritten", "providers", n, "gen", gen)
	return nil
}

// requeue marks updates that failed to flush as dirty again.
func (s *Redis) requeue(updates []Provider) {
	s.mu.Lock()
	for _, p := range updates {
		if _, ok := s.local[p.ID]; ok {
			s.dirty[p.ID] = struct{}{}
		}
	}
	s.mu.Unlock()
}

func (s *Redis) replicaInfoLocked() Replica {
	return Replica{
		ID:        s.cfg.ReplicaID,
		Addr:      s.cfg.Addr,
		Version:   s.cfg.Version,
		StartedAt: s.startedAt,
		LastSeen:  time.Now().UTC(),
		Providers: len(s.local),
		Pending:   int(s.pending.Load()),
	}
}

func (s *Redis) setRegistryError(err error) {
	s.metrics.inc(&s.metrics.RedisErrors)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.health.RegistryOK || s.health.LastError == "" {
		s.log.Error("registry write failed", "err", err)
		s.health.Since = time.Now().UTC()
	}
	s.health.RegistryOK = false
	s.health.LastError = err.Error()
}

func (s *Redis) setRegistryOK() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.health.RegistryOK {
		if s.health.LastError != "" {
			s.log.Info("registry writes work again")
		}
		s.health.RegistryOK = true
		s.health.LastError = ""
		s.health.Since = time.Now().UTC()
	}
}

// viewUsableLocked reports whether the view can be served: Redis takes
// writes, and pub/sub has not been silent for longer than the TTL. A shorter
// silence is served from the view while the subscription is replaced.
func (s *Redis) viewUsableLocked() bool {
	if !s.health.RegistryOK {
		return false
	}
	return s.health.PubSubOK || time.Since(s.health.Since) < s.cfg.TTL
}

// Providers returns every provider in the view, this replica's included.
func (s *Redis) Providers(context.Context) ([]Provider, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.viewUsableLocked() {
		return nil, ErrUnavailable
	}
	n := len(s.local)
	for _, peer := range s.peers {
		n += len(peer.providers)
	}
	out := make([]Provider, 0, n)
	for _, p := range s.local {
		out = append(out, p)
	}
	for _, peer := range s.peers {
		for _, p := range peer.providers {
			out = append(out, p)
		}
	}
	return out, nil
}

// UserProviders returns one user's providers from the view, found through
// the index by user.
func (s *Redis) UserProviders(_ context.Context, userID string) ([]Provider, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.viewUsableLocked() {
		return nil, ErrUnavailable
	}
	ids := s.users[userID]
	out := make([]Provider, 0, len(ids))
	for id, replica := range ids {
		if replica == s.cfg.ReplicaID {
			if p, ok := s.local[id]; ok {
				out = append(out, p)
			}
			continue
		}
		if peer := s.peers[replica]; peer != nil {
			if p, ok := peer.providers[id]; ok {
				out = append(out, p)
			}
		}
	}
	return out, nil
}

// Replicas returns this replica and the live replicas in the view.
func (s *Redis) Replicas(context.Context) ([]Replica, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.viewUsableLocked() {
		return nil, ErrUnavailable
	}
	out := []Replica{s.replicaInfoLocked()}
	for _, peer := range s.peers {
		info := peer.info
		info.ID = peer.info.ID
		info.LastSeen = peer.lastSeen.UTC()
		info.Providers = len(peer.providers)
		out = append(out, info)
	}
	return out, nil
}

// publishers is how many goroutines send inbox messages. Several keep one
// multi-megabyte response from holding up every small message behind it.
const publishers = 4

// maxPublishBatch bounds how many queued messages one pipeline carries.
const maxPublishBatch = 256

// publishRequest is one inbox message waiting for a publisher.
type publishRequest struct {
	channel string
	msg     []byte
	done    chan error // buffered 1
}

// Send publishes msg on the inbox of replica id. Publishing to a channel
// with no subscriber returns ErrReplicaGone. Messages queued at the same
// time go to Redis in one pipeline, which under load saves a round trip
// and a system call per message.
//
// TODO: in Redis Cluster, PUBLISH counts only the subscribers of the node
// that received it; sharded pub/sub (SPUBLISH) would keep this check exact.
func (s *Redis) Send(ctx context.Context, replicaID string, msg []byte) error {
	channel := InboxChannel(s.cfg.Prefix, replicaID)
	// With nothing queued and no other direct publish running, there is no
	// batch to join: publishing from this goroutine saves the hand-off.
	if len(s.publishQueue) == 0 && s.directPublish.CompareAndSwap(false, true) {
		defer s.directPublish.Store(false)
		n, err := s.client.Publish(ctx, channel, msg).Result()
		return s.publishResult(n, err)
	}
	req := &publishRequest{channel: channel, msg: msg, done: make(chan error, 1)}
	select {
	case s.publishQueue <- req:
	case <-ctx.Done():
		return fmt.Errorf("%w: publish: %v", ErrUnavailable, ctx.Err())
	case <-s.stop:
		return ErrClosed
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: publish: %v", ErrUnavailable, ctx.Err())
	}
}

// publishLoop sends queued inbox messages, each batch in one pipeline.
func (s *Redis) publishLoop() {
	defer s.done.Done()
	for {
		var first *publishRequest
		select {
		case <-s.stop:
			return
		case first = <-s.publishQueue:
		}
		batch := []*publishRequest{first}
	drain:
		for len(batch) < maxPublishBatch {
			select {
			case req := <-s.publishQueue:
				batch = append(batch, req)
			default:
				break drain
			}
		}
		s.publishBatch(batch)
	}
}

func (s *Redis) publishBatch(batch []*publishRequest) {
	ctx, cancel := s.opContext()
	defer cancel()
	pipe := s.client.Pipeline()
	cmds := make([]*redis.IntCmd, len(batch))
	for i, req := range batch {
		cmds[i] = pipe.Publish(ctx, req.channel, req.msg)
	}
	_, _ = pipe.Exec(ctx) // each command carries its own error
	for i, req := range batch {
		req.done <- s.publishResult(cmds[i].Result())
	}
}

// publishResult maps the result of one PUBLISH to Send's errors.
func (s *Redis) publishResult(receivers int64, err error) error {
	switch {
	case err != nil:
		s.metrics.inc(&s.metrics.RedisErrors)
		return fmt.Errorf("%w: publish: %v", ErrUnavailable, err)
	case receivers == 0:
		return ErrReplicaGone
	}
	return nil
}

type storedEvent struct {
	ReceivedAt float64         `json:"received_at"`
	Message    json.RawMessage `json:"message"`
}

// AppendAccountEvent appends to the user's list, trims it and renews its TTL.
func (s *Redis) AppendAccountEvent(ctx context.Context, userID string, ev AccountEvent) error {
	data, err := json.Marshal(storedEvent{ReceivedAt: ev.ReceivedAt, Message: ev.Message})
	if err != nil {
		return fmt.Errorf("store: encode account event: %w", err)
	}
	key := s.eventsKey(userID)
	pipe := s.client.Pipeline()
	pipe.RPush(ctx, key, data)
	pipe.LTrim(ctx, key, int64(-s.cfg.MaxAccountEvents), -1)
	pipe.PExpire(ctx, key, s.cfg.AccountEventTTL)
	if _, err := pipe.Exec(ctx); err != nil {
		s.metrics.inc(&s.metrics.RedisErrors)
		return fmt.Errorf("%w: append account event: %v", ErrUnavailable, err)
	}
	return nil
}

// AccountEvents returns a user's events newer than since, oldest first.
func (s *Redis) AccountEvents(ctx context.Context, userID string, since float64) ([]AccountEvent, error) {
	items, err := s.client.LRange(ctx, s.eventsKey(userID), 0, -1).Result()
	if err != nil {
		s.metrics.inc(&s.metrics.RedisErrors)
		return nil, fmt.Errorf("%w: read account events: %v", ErrUnavailable, err)
	}
	out := make([]AccountEvent, 0, len(items))
	for _, item := range items {
		var ev storedEvent
		if err := json.Unmarshal([]byte(item), &ev); err != nil {
			continue
		}
		if ev.ReceivedAt > since {
			out = append(out, AccountEvent{Message: ev.Message, ReceivedAt: ev.ReceivedAt})
		}
	}
	return out, nil
}

// authFailuresKey is a list of recent authentication failures, newest first.
func (s *Redis) authFailuresKey() string { return s.cfg.Prefix + ":auth_failures" }

// RecordAuthFailure pushes a failure onto the shared list and trims it.
func (s *Redis) RecordAuthFailure(ctx context.Context, f AuthFailure) error {
	data, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("store: encode auth failure: %w", err)
	}
	pipe := s.client.Pipeline()
	pipe.LPush(ctx, s.authFailuresKey(), data)
	pipe.LTrim(ctx, s.authFailuresKey(), 0, MaxAuthFailures-1)
	pipe.PExpire(ctx, s.authFailuresKey(), s.cfg.AccountEventTTL)
	if _, err := pipe.Exec(ctx); err != nil {
		s.metrics.inc(&s.metrics.RedisErrors)
		return fmt.Errorf("%w: record auth failure: %v", ErrUnavailable, err)
	}
	return nil
}

// AuthFailures returns the recent authentication failures of every replica, newest first.
func (s *Redis) AuthFailures(ctx context.Context) ([]AuthFailure, error) {
	items, err := s.client.LRange(ctx, s.authFailuresKey(), 0, -1).Result()
	if err != nil {
		s.metrics.inc(&s.metrics.RedisErrors)
		return nil, fmt.Errorf("%w: read auth failures: %v", ErrUnavailable, err)
	}
	out := make([]AuthFailure, 0, len(items))
	for _, item := range items {
		var f AuthFailure
		if json.Unmarshal([]byte(item), &f) == nil {
			out = append(out, f)
		}
	}
	return out, nil
}

// SetPending records how many requests this replica has in flight.
func (s *Redis) SetPending(n int) { s.pending.Store(int64(n)) }

// Health reports the state of Redis writes and of the subscription.
func (s *Redis) Health() Health {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.health
}

// Close stops the loops, then deletes this replica's keys and tells the other
// replicas at once, so its providers leave their views without waiting for
// the TTL.
func (s *Redis) Close(ctx context.Context) error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		close(s.stop)
		s.done.Wait()

		ev, _ := json.Marshal(registryEvent{V: busVersion, Op: "bye", ReplicaID: s.cfg.ReplicaID})
		pipe := s.client.TxPipeline()
		pipe.Del(ctx, s.aliveKey, s.providersKey)
		pipe.SRem(ctx, s.replicasKey, s.cfg.ReplicaID)
		pipe.Publish(ctx, s.eventsChannel, ev)
		if _, e := pipe.Exec(ctx); e != nil {
			err = fmt.Errorf("store: remove replica from registry: %w", e)
		}
		s.log.Info("registry stopped")
	})
	return err
}

// drainOps returns op with the writes queued behind it, up to 512.
func (s *Redis) drainOps(op writeOp) []writeOp {
	batch := []writeOp{op}
	for len(batch) < 512 {
		select {
		case more := <-s.ops:
			batch = append(batch, more)
		default:
			return batch
		}
	}
	return batch
}
