// Package agentsim simulates the agent that traders run next to Interactive
// Brokers TWS. An Agent dials the relay's agent WebSocket, authenticates with
// an API key, reports its boot phases, accounts, heartbeats and state, and
// responds to requests. Its frames are those of the production Python agent
// (version 1.39.1), down to the JSON separators and float formatting.
//
// Besides the production request types (ib_status, get_positions,
// get_open_orders, fetch_chain), an Agent responds to two request types that
// exist only in the simulator, for tests of the relay:
//   - "echo" returns the request's payload as the response data, unchanged.
//   - "sleep" with payload {"ms": N} returns {"slept_ms": N} after N
//     milliseconds, so that responses to requests in flight can arrive out of
//     order.
//
// Any other request type gets the production agent's response: success
// false, data null and the error "Unknown request type: X".
package agentsim

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// Defaults for the zero values of Config.
const (
	DefaultVersion           = "1.39.1"
	DefaultHeartbeatInterval = 10 * time.Second
	DefaultPingInterval      = 30 * time.Second
	DefaultReconnectDelay    = 5 * time.Second
	DefaultChainBytes        = 200_000
)

// ErrNotConnected is returned by the send methods while the agent has no
// authenticated connection.
var ErrNotConnected = errors.New("agentsim: agent is not connected")

// errAlreadyRunning is returned by a second concurrent call of Run.
var errAlreadyRunning = errors.New("agentsim: Run is already running for this agent")

// Config configures an Agent. The zero value of each field selects the
// documented default.
type Config struct {
	// URL is the relay's agent endpoint, such as ws://127.0.0.1:8000/ws/data-provider.
	URL string

	// APIKey is sent in the auth message. It is never logged.
	APIKey string

	// Version is the agent version sent in the auth message. Empty means
	// DefaultVersion unless OmitVersion is set.
	Version string

	// OmitVersion sends an auth message without a version field, as old
	// agents do.
	OmitVersion bool

	// TWSConnected is the initial TWS state that ib_status responses and
	// agent_state messages report. SetTWSConnected changes it later.
	TWSConnected bool

	// Accounts are the IB accounts sent in ib_accounts and get_positions.
	// Empty means one paper account, "DU" and 7 digits derived from APIKey,
	// so that each key has its own stable account.
	Accounts []string

	// HeartbeatInterval is the time between two heartbeat and agent_state
	// pairs. Zero means DefaultHeartbeatInterval.
	HeartbeatInterval time.Duration

	// PingInterval is the time between two WebSocket pings. Zero means
	// DefaultPingInterval.
	PingInterval time.Duration

	// ReconnectDelay is the wait before dialing again after a failed dial, a
	// failed authentication or a closed connection. Zero means
	// DefaultReconnectDelay.
	ReconnectDelay time.Duration

	// ResponseDelay is the wait between receiving a request and responding
	// to it. Each request waits on its own, so requests in flight get their
	// responses independently and in any order. SetResponseDelay changes it later.
	ResponseDelay time.Duration

	// Silent makes the agent receive requests without ever responding.
	// SetSilent changes it later.
	Silent bool

	// ChainBytes is the approximate size in bytes of the data object of a
	// fetch_chain response. The data is at least this large. Zero means
	// DefaultChainBytes.
	ChainBytes int

	// Compression is the permessage-deflate mode offered to the relay. The
	// zero value offers none. The asyncio client of Python's websockets
	// library, which the production agent uses, offers permessage-deflate
	// by default, so set it to test a relay that accepts compression.
	Compression websocket.CompressionMode

	// Logger receives the agent's logs. Nil means slog.Default().
	Logger *slog.Logger
}

// Stats counts what an Agent has done since New.
type Stats struct {
	Dials            int64 // connection attempts, successful or not
	Connects         int64 // successful authentications
	AuthFailures     int64 // auth_response messages with success false, or no auth_response
	RequestsReceived int64
	RequestsAnswered int64

	// LastCloseCode is the close status received on the last connection that
	// ended: the relay's close frame code, websocket.StatusAbnormalClosure
	// (1006) when the connection ended without one, or -1 before any
	// connection has ended.
	LastCloseCode websocket.StatusCode
}

// Agent is one simulated agent. Its methods are safe for concurrent use.
type Agent struct {
	// Static after New.
	cfg     Config
	log     *slog.Logger
	version string // "" when OmitVersion is set

	// Runtime settings, changed by the Set methods and read by the
	// connection goroutines.
	twsConnected  atomic.Bool
	silent        atomic.Bool
	responseDelay atomic.Int64 // time.Duration
	// lastTWSConnect is the Unix time in microseconds at which TWS was last
	// reported connected, or 0 if never.
	lastTWSConnect atomic.Int64

	running atomic.Bool

	// Counters behind Stats.
	dials            atomic.Int64
	connects         atomic.Int64
	authFailures     atomic.Int64
	requestsReceived atomic.Int64
	requestsAnswered atomic.Int64
	lastCloseCode    atomic.Int64

	mu sync.Mutex
	// conn is the authenticated connection, nil while there is none.
	conn *connection // guarded by mu
	// connectedCh is closed while conn is not nil, and replaced by an open
	// channel when conn ends.
	connectedCh chan struct{} // guarded by mu
	providerID  string        // guarded by mu
}

// New returns an Agent for cfg with defaults filled in. It does not connect:
// call Run.
func New(cfg Config) *Agent {
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = DefaultPingInterval
	}
	if cfg.ReconnectDelay <= 0 {
		cfg.ReconnectDelay = DefaultReconnectDelay
	}
	if cfg.ChainBytes <= 0 {
		cfg.ChainBytes = DefaultChainBytes
	}
	// Copy Accounts, so that later changes to the caller's slice cannot race
	// with the connection goroutines.
	cfg.Accounts = slices.Clone(cfg.Accounts)
	if len(cfg.Accounts) == 0 {
		cfg.Accounts = []string{defaultAccount(cfg.APIKey)}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}

	a := &Agent{
		cfg:         cfg,
		log:         cfg.Logger,
		connectedCh: make(chan struct{}),
	}
	if !cfg.OmitVersion {
		a.version = cfg.Version
		if a.version == "" {
			a.version = DefaultVersion
		}
	}
	a.SetTWSConnected(cfg.TWSConnected)
	a.silent.Store(cfg.Silent)
	a.responseDelay.Store(int64(cfg.ResponseDelay))
	a.lastCloseCode.Store(-1)
	return a
}

// defaultAccount derives a paper trading account id such as "DU1234567"
// from the API key, so that agents with different keys report different
// accounts.
func defaultAccount(apiKey string) string {
	h := fnv.New32a()
	h.Write([]byte(apiKey))
	return fmt.Sprintf("DU%07d", h.Sum32()%10_000_000)
}

// Run connects to the relay, authenticates and serves the connection, and
// dials again ReconnectDelay after every failed dial, failed authentication
// or closed connection. It blocks until ctx is done, closes the connection
// with status 1000 and returns ctx.Err(). Only one Run may be active per
// Agent at a time: another call returns an error at once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return errAlreadyRunning
	}
	defer a.running.Store(false)

	failures := 0
	for {
		authenticated, err := a.runConnection(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if authenticated {
			failures = 0
		}
		if err != nil {
			failures++
			a.logFailure(failures, err)
		}

		timer := time.NewTimer(a.cfg.ReconnectDelay)
		select {
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-timer.C:
		}
	}
}

// logFailure logs the first of a run of consecutive connection failures and
// every tenth one after it at warning level, and the others at debug level,
// so that a relay that is down for long does not flood the log.
func (a *Agent) logFailure(failures int, err error) {
	level := slog.LevelDebug
	if failures == 1 || failures%10 == 0 {
		level = slog.LevelWarn
	}
	a.log.Log(context.Background(), level, "agent connection failed, reconnecting",
		"error", err, "consecutive_failures", failures, "reconnect_delay", a.cfg.ReconnectDelay)
}

// SetTWSConnected sets the TWS state that ib_status responses and agent_state
// messages report. While connected, the agent sends an agent_state message
// with the new state at once.
func (a *Agent) SetTWSConnected(connected bool) {
	if connected {
		a.lastTWSConnect.Store(time.Now().UnixMicro())
	}
	a.twsConnected.Store(connected)

	c := a.currentConnection()
	if c == nil {
		return
	}
	if err := c.send(context.Background(), agentStateFrame(connected)); err != nil {
		c.log.Debug("agent_state after a TWS state change not sent", "error", err)
	}
}

// SetSilent sets whether the agent leaves requests without a response.
// Turning it on also drops the responses to requests still waiting for
// ResponseDelay.
func (a *Agent) SetSilent(silent bool) {
	a.silent.Store(silent)
}

// SetResponseDelay sets the wait before responding to requests received from
// now on.
func (a *Agent) SetResponseDelay(d time.Duration) {
	a.responseDelay.Store(int64(d))
}

// ProviderID returns the provider_id of the last successful auth_response,
// or "" before the first one.
func (a *Agent) ProviderID() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.providerID
}

// Connected reports whether the agent is authenticated and its socket open.
func (a *Agent) Connected() bool {
	return a.currentConnection() != nil
}

// WaitConnected blocks until the agent is authenticated or ctx is done, and
// returns ctx.Err() in the second case.
func (a *Agent) WaitConnected(ctx context.Context) error {
	a.mu.Lock()
	ch := a.connectedCh
	a.mu.Unlock()

	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stats returns the agent's counters.
func (a *Agent) Stats() Stats {
	return Stats{
		Dials:            a.dials.Load(),
		Connects:         a.connects.Load(),
		AuthFailures:     a.authFailures.Load(),
		RequestsReceived: a.requestsReceived.Load(),
		RequestsAnswered: a.requestsAnswered.Load(),
		LastCloseCode:    websocket.StatusCode(a.lastCloseCode.Load()),
	}
}

// Disconnect closes the current connection with status 1000, as an agent
// whose user stops it does. Run dials again after ReconnectDelay. Disconnect
// blocks until the close handshake ends, at most about 10 s, and does nothing
// while the agent is not connected.
func (a *Agent) Disconnect() {
	c := a.currentConnection()
	if c == nil {
		return
	}
	c.close(websocket.StatusNormalClosure)
}

// SendAccountEvent sends {"type": "account_event", "event": event} followed
// by fields in key order. fields must not contain "type" or "event".
func (a *Agent) SendAccountEvent(event string, fields map[string]any) error {
	if _, ok := fields["type"]; ok {
		return errors.New(`agentsim: account event fields must not contain "type"`)
	}
	if _, ok := fields["event"]; ok {
		return errors.New(`agentsim: account event fields must not contain "event"; pass it as the event argument`)
	}

	msg := object{{"type", "account_event"}, {"event", event}}
	msg = append(msg, sortedObject(fields)...)
	frame, err := marshalPython(msg)
	if err != nil {
		return fmt.Errorf("agentsim: encode account_event %q: %w", event, err)
	}
	return a.SendRaw(context.Background(), frame)
}

// SendRaw sends frame as one text message on the current connection, as it
// is, for protocol tests. It returns ErrNotConnected while there is no
// authenticated connection.
func (a *Agent) SendRaw(ctx context.Context, frame []byte) error {
	c := a.currentConnection()
	if c == nil {
		return ErrNotConnected
	}
	return c.send(ctx, frame)
}

func (a *Agent) currentConnection() *connection {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.conn
}

// setConnection publishes c as the authenticated connection and wakes
// WaitConnected callers.
func (a *Agent) setConnection(c *connection, providerID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.conn = c
	a.providerID = providerID
	close(a.connectedCh)
}

// clearConnection withdraws c if it is still the authenticated connection.
func (a *Agent) clearConnection(c *connection) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conn != c {
		return
	}
	a.conn = nil
	a.connectedCh = make(chan struct{})
}
