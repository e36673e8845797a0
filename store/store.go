// Package store holds the relay's cluster-wide state: the registry of connected
// agents ("providers"), the message bus between replicas, and the per-user
// account event log. Two implementations share the Store interface: Redis, for
// several replicas, and memory, for a single replica with no Redis.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"time"
)

// Errors returned by every implementation.
var (
	// ErrUnavailable means the shared state could not be reached (Redis down,
	// pub/sub not subscribed). Callers answer registry_unavailable.
	ErrUnavailable = errors.New("store: registry unavailable")
	// ErrReplicaGone means no replica listens on the target inbox.
	ErrReplicaGone = errors.New("store: target replica is gone")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("store: closed")
)

// Provider is one connected agent as the registry stores it. JSON field names
// are those of the backend API's registry listing.
type Provider struct {
	ID                  string     `json:"id"`
	UserID              string     `json:"user_id"`
	AgentVersion        string     `json:"agent_version"`
	IBAccounts          []string   `json:"ib_accounts"`
	ConnectedAt         time.Time  `json:"connected_at"`
	LastHeartbeat       time.Time  `json:"last_heartbeat"`
	IsActive            bool       `json:"is_active"`
	IBConnected         *bool      `json:"ib_connected"`
	ExecutionActive     bool       `json:"execution_active"`
	ExecutionLinesHeld  int        `json:"execution_lines_held"`
	AvailableScanLines  int        `json:"available_scan_lines"`
	AcceptExternalScans bool       `json:"accept_external_scans"`
	InstanceID          string     `json:"instance_id"`
	BootPhase           *BootPhase `json:"boot_phase,omitempty"`
	// StateAt is when the last agent_state arrived; zero if none has.
	StateAt time.Time `json:"state_at,omitzero"`
}

// BootPhase is the start-up phase an agent reported last, until boot_complete.
type BootPhase struct {
	Phase  string `json:"phase"`
	Detail string `json:"detail"`
}

// Replica describes one live relay process.
type Replica struct {
	ID        string    `json:"id"`
	Addr      string    `json:"addr,omitempty"`
	Version   string    `json:"version,omitempty"`
	StartedAt time.Time `json:"started_at"`
	// LastSeen is when this replica last heard from it (its beat).
	LastSeen  time.Time `json:"last_seen"`
	Providers int       `json:"providers"`
	Pending   int       `json:"pending_requests"`
}

// AccountEvent is one account_event message as an agent sent it, with the
// time the relay received it in seconds since the Unix epoch.
type AccountEvent struct {
	Message    json.RawMessage
	ReceivedAt float64
}

// AuthFailure is a failed agent authentication, kept for operators. The key
// appears only as its fingerprint.
type AuthFailure struct {
	At             time.Time `json:"at"`
	ReplicaID      string    `json:"replica_id"`
	IP             string    `json:"ip"`
	KeyFingerprint string    `json:"key_fingerprint"`
	Reason         string    `json:"reason"`
}

// MaxAuthFailures is how many recent authentication failures a store keeps.
const MaxAuthFailures = 50

// Health is the state of a store's connection to the shared state.
type Health struct {
	Backend string `json:"backend"` // "memory" or "redis"
	// RegistryOK is false while the last write or read of shared state failed.
	RegistryOK bool `json:"registry_ok"`
	// PubSubOK is false while the inbox subscription is down or failed its probe.
	PubSubOK  bool      `json:"pubsub_ok"`
	LastError string    `json:"last_error,omitempty"`
	Since     time.Time `json:"since"`
}

// OK reports whether both the registry and pub/sub work.
func (h Health) OK() bool { return h.RegistryOK && h.PubSubOK }

// Handler receives what a store delivers to its replica. Its methods are
// called from the store's delivery goroutine and must not block.
type Handler interface {
	// HandleMessage receives one message sent to this replica's inbox.
	// The store does not keep msg after the call returns.
	HandleMessage(msg []byte)
	// HandleReplicaDown is called once when another replica is found dead or
	// stopped, so that requests waiting on it can fail at once.
	HandleReplicaDown(replicaID string)
}

// Store is one replica's view of the cluster. Methods are safe for concurrent use.
type Store interface {
	// ReplicaID returns the identity of this replica.
	ReplicaID() string

	// Start begins delivering messages to h and keeping this replica's
	// registration alive. It returns once the inbox is subscribed and the
	// registry view is loaded, or with an error.
	Start(ctx context.Context, h Handler) error

	// Register adds a provider held by this replica. When it returns nil the
	// provider is in the shared registry, and other replicas see it as soon
	// as their subscriptions deliver the event, normally within milliseconds.
	Register(ctx context.Context, p Provider) error
	// Update replaces the state of a provider held by this replica. It does not
	// wait: updates reach the other replicas within the flush interval.
	Update(p Provider)
	// Unregister removes a provider held by this replica at once.
	Unregister(ctx context.Context, id string) error

	// Providers returns every provider of every live replica, in no order.
	// It returns ErrUnavailable while shared state cannot be trusted.
	Providers(ctx context.Context) ([]Provider, error)
	// UserProviders returns the providers of one user, like Providers.
	UserProviders(ctx context.Context, userID string) ([]Provider, error)
	// Replicas returns the live replicas, this one included.
	Replicas(ctx context.Context) ([]Replica, error)

	// Send delivers msg to the inbox of replica id. It returns ErrReplicaGone
	// when no replica of that id listens.
	Send(ctx context.Context, replicaID string, msg []byte) error

	// AppendAccountEvent stores an event for a user, keeping the newest ones.
	AppendAccountEvent(ctx context.Context, userID string, ev AccountEvent) error
	// AccountEvents returns a user's events newer than since, oldest first.
	AccountEvents(ctx context.Context, userID string, since float64) ([]AccountEvent, error)

	// RecordAuthFailure keeps a failed authentication, dropping the oldest
	// beyond MaxAuthFailures.
	RecordAuthFailure(ctx context.Context, f AuthFailure) error
	// AuthFailures returns the recent authentication failures of every
	// replica, newest first.
	AuthFailures(ctx context.Context) ([]AuthFailure, error)

	// SetPending records how many requests this replica has in flight, for
	// the cluster-wide pending_requests count.
	SetPending(n int)

	// Health reports the connection to the shared state.
	Health() Health

	// Close removes this replica and its providers from the registry and
	// stops delivery. It is idempotent.
	Close(ctx context.Context) error
}
