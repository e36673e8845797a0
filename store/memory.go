package store

import (
	"context"
	"slices"
	"sync"
	"time"
)

var _ Store = (*Memory)(nil)

// DefaultMaxAccountEvents is how many account events are kept per user when a
// store's configuration leaves it at zero.
const DefaultMaxAccountEvents = 500

// MemoryHub is shared state for replicas that live in one process. A single
// relay uses a hub with one node; tests use several nodes to exercise the
// same cluster behaviour as Redis without a server.
type MemoryHub struct {
	maxEvents int

	mu           sync.Mutex
	nodes        map[string]*Memory
	events       map[string][]AccountEvent // by user id, oldest first
	authFailures []AuthFailure             // newest first
}

// NewMemoryHub returns an empty hub that keeps up to maxEvents account events
// per user. Zero means DefaultMaxAccountEvents.
func NewMemoryHub(maxEvents int) *MemoryHub {
	if maxEvents <= 0 {
		maxEvents = DefaultMaxAccountEvents
	}
	return &MemoryHub{maxEvents: maxEvents, nodes: make(map[string]*Memory), events: make(map[string][]AccountEvent)}
}

// NewMemory returns the store of a single replica with an in-process registry.
func NewMemory(replicaID string) *Memory {
	return NewMemoryHub(0).Node(replicaID)
}

// Node returns a store for one replica of the hub. It joins the cluster when
// started.
func (h *MemoryHub) Node(replicaID string) *Memory {
	return &Memory{hub: h, id: replicaID, startedAt: time.Now().UTC(), providers: make(map[string]Provider)}
}

// Memory is a Store whose shared state is a MemoryHub.
type Memory struct {
	hub       *MemoryHub
	id        string
	startedAt time.Time

	mu        sync.Mutex
	handler   Handler
	providers map[string]Provider
	pending   int
	closed    bool
}

// ReplicaID returns the identity of this replica.
func (m *Memory) ReplicaID() string { return m.id }

// Start joins the hub and begins delivering messages to h.
func (m *Memory) Start(_ context.Context, h Handler) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	m.handler = h
	m.mu.Unlock()

	m.hub.mu.Lock()
	m.hub.nodes[m.id] = m
	m.hub.mu.Unlock()
	return nil
}

// Register adds a provider held by this replica.
func (m *Memory) Register(_ context.Context, p Provider) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	p.InstanceID = m.id
	m.providers[p.ID] = p
	return nil
}

// Update replaces the state of a provider held by this replica.
func (m *Memory) Update(p Provider) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.providers[p.ID]; ok {
		p.InstanceID = m.id
		m.providers[p.ID] = p
	}
}

// Unregister removes a provider held by this replica.
func (m *Memory) Unregister(_ context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.providers, id)
	return nil
}

// Providers returns the providers of every node in the hub.
func (m *Memory) Providers(context.Context) ([]Provider, error) {
	return m.collect(func(Provider) bool { return true }), nil
}

// UserProviders returns the providers of one user in every node of the hub.
func (m *Memory) UserProviders(_ context.Context, userID string) ([]Provider, error) {
	return m.collect(func(p Provider) bool { return p.UserID == userID }), nil
}

func (m *Memory) collect(keep func(Provider) bool) []Provider {
	var out []Provider
	for _, n := range m.hub.liveNodes() {
		n.mu.Lock()
		for _, p := range n.providers {
			if keep(p) {
				out = append(out, p)
			}
		}
		n.mu.Unlock()
	}
	return out
}

// Replicas returns the started, unclosed nodes of the hub.
func (m *Memory) Replicas(context.Context) ([]Replica, error) {
	now := time.Now().UTC()
	var out []Replica
	for _, n := range m.hub.liveNodes() {
		n.mu.Lock()
		out = append(out, Replica{ID: n.id, StartedAt: n.startedAt, LastSeen: now, Providers: len(n.providers), Pending: n.pending})
		n.mu.Unlock()
	}
	return out, nil
}

// Send hands msg to the handler of replica id in the calling goroutine.
func (m *Memory) Send(_ context.Context, replicaID string, msg []byte) error {
	m.hub.mu.Lock()
	target := m.hub.nodes[replicaID]
	m.hub.mu.Unlock()
	if target == nil {
		return ErrReplicaGone
	}
	target.mu.Lock()
	h := target.handler
	target.mu.Unlock()
	if h == nil {
		return ErrReplicaGone
	}
	h.HandleMessage(msg)
	return nil
}

// AppendAccountEvent stores an event, keeping the hub's maximum per user.
func (m *Memory) AppendAccountEvent(_ context.Context, userID string, ev AccountEvent) error {
	ev.Message = slices.Clone(ev.Message)
	m.hub.mu.Lock()
	defer m.hub.mu.Unlock()
	evs := append(m.hub.events[userID], ev)
	if len(evs) > m.hub.maxEvents {
		evs = slices.Clone(evs[len(evs)-m.hub.maxEvents:])
	}
	m.hub.events[userID] = evs
	return nil
}

// AccountEvents returns a user's events newer than since, oldest first.
func (m *Memory) AccountEvents(_ context.Context, userID string, since float64) ([]AccountEvent, error) {
	m.hub.mu.Lock()
	defer m.hub.mu.Unlock()
	var out []AccountEvent
	for _, ev := range m.hub.events[userID] {
		if ev.ReceivedAt > since {
			out = append(out, ev)
		}
	}
	return out, nil
}

// RecordAuthFailure keeps a failed authentication in the hub.
func (m *Memory) RecordAuthFailure(_ context.Context, f AuthFailure) error {
	m.hub.mu.Lock()
	defer m.hub.mu.Unlock()
	m.hub.authFailures = slices.Insert(m.hub.authFailures, 0, f)
	if len(m.hub.authFailures) > MaxAuthFailures {
		m.hub.authFailures = m.hub.authFailures[:MaxAuthFailures]
	}
	return nil
}

// AuthFailures returns the hub's recent authentication failures, newest first.
func (m *Memory) AuthFailures(context.Context) ([]AuthFailure, error) {
	m.hub.mu.Lock()
	defer m.hub.mu.Unlock()
	return slices.Clone(m.hub.authFailures), nil
}

// SetPending records how many requests this replica has in flight.
func (m *Memory) SetPending(n int) {
	m.mu.Lock()
	m.pending = n
	m.mu.Unlock()
}

// Health always reports a working in-process registry.
func (m *Memory) Health() Health {
	return Health{Backend: "memory", RegistryOK: true, PubSubOK: true, Since: m.startedAt}
}

// Close leaves the hub, drops this replica's providers and tells the other
// nodes that this replica is down.
func (m *Memory) Close(context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.providers = make(map[string]Provider)
	m.handler = nil
	m.mu.Unlock()

	m.hub.mu.Lock()
	delete(m.hub.nodes, m.id)
	m.hub.mu.Unlock()
	for _, n := range m.hub.liveNodes() {
		n.mu.Lock()
		h := n.handler
		n.mu.Unlock()
		if h != nil {
			h.HandleReplicaDown(m.id)
		}
	}
	return nil
}

func (h *MemoryHub) liveNodes() []*Memory {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*Memory, 0, len(h.nodes))
	for _, n := range h.nodes {
		out = append(out, n)
	}
	return out
}
