// Package relay serves the agent WebSocket endpoint and the backend HTTP API,
// and routes requests to whichever replica holds an agent's socket.
package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/store"
)

// Config configures a Server. Zero values of the durations and limits select
// the defaults named in their comments.
type Config struct {
	// Store is the registry and message bus. Required.
	Store store.Store
	// Auth validates agent API keys. Required.
	Auth auth.Validator
	// APIToken, when set, is the bearer token the backend API requires.
	APIToken string
	// Logger receives the server's logs. Nil means slog.Default().
	Logger *slog.Logger
	// Metrics registers the server's metrics. Nil means a new registry,
	// served on /metrics.
	Metrics *prometheus.Registry
	// StoreMetrics, when set, are the store's counters to export.
	StoreMetrics *store.Metrics
	// TrustProxyHeaders makes the server take the client address from
	// X-Forwarded-For, for deployments behind a load balancer that sets it.
	TrustProxyHeaders bool
	// TrustedProxies limits TrustProxyHeaders to proxies in these networks.
	// Empty means loopback, link-local and private addresses.
	TrustedProxies []*net.IPNet

	// AuthTimeout is how long an agent has to send auth after connecting. Zero means 10 s.
	AuthTimeout time.Duration
	// ValidateTimeout bounds one API key validation. Zero means 10 s.
	ValidateTimeout time.Duration
	// MaxMessageBytes is the largest WebSocket message accepted from an agent. Zero means 16 MiB.
	MaxMessageBytes int64
	// WriteTimeout bounds one write to an agent; an agent that does not take
	// a frame within it is disconnected. Zero means 10 s.
	WriteTimeout time.Duration
	// SendQueue is how many frames may wait for an agent's writer; when it is
	// full the agent is disconnected as too slow. Zero means 64.
	SendQueue int
	// PingInterval is how often the relay pings each agent. Zero means 20 s.
	PingInterval time.Duration
	// PongTimeout is how long a ping waits for its pong before the agent is
	// treated as gone. Zero means 10 s.
	PongTimeout time.Duration
	// RequestTimeout is the wait for a response when a request sets no
	// timeout_ms. Zero means 30 s.
	RequestTimeout time.Duration
	// MaxRequestTimeout is the largest timeout_ms accepted. Zero means 10 min.
	MaxRequestTimeout time.Duration
	// StatusTimeout is the ib-status wait when timeout_ms is absent. Zero means 5 s.
	StatusTimeout time.Duration
	// StateMaxAge is how old an agent's last agent_state may be for ib-status
	// to use it, from source=cache or when the agent does not respond. Agents
	// report every 10 s. Zero means 30 s.
	StateMaxAge time.Duration
	// DrainTimeout bounds how long a stopping server waits for requests in
	// flight. Zero means 30 s.
	DrainTimeout time.Duration
	// MaxBodyBytes is the largest backend request body. Zero means 16 MiB.
	MaxBodyBytes int64
	// AuthFailureLimit is how many failed agent authentications one client
	// address may make per AuthFailureWindow before it is rejected without a
	// check. Zero means 20.
	AuthFailureLimit int
	// AuthFailureWindow is the window of AuthFailureLimit. Zero means 1 min.
	AuthFailureWindow time.Duration
}

func (c *Config) setDefaults() error {
	if c.Store == nil {
		return errors.New("relay: Config.Store is required")
	}
	if c.Auth == nil {
		return errors.New("relay: Config.Auth is required")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Metrics == nil {
		c.Metrics = prometheus.NewRegistry()
	}
	setDuration(&c.AuthTimeout, 10*time.Second)
	setDuration(&c.ValidateTimeout, 10*time.Second)
	setDuration(&c.WriteTimeout, 10*time.Second)
	setDuration(&c.PingInterval, 20*time.Second)
	setDuration(&c.PongTimeout, 10*time.Second)
	setDuration(&c.RequestTimeout, 30*time.Second)
	setDuration(&c.MaxRequestTimeout, 10*time.Minute)
	setDuration(&c.StatusTimeout, 5*time.Second)
	setDuration(&c.StateMaxAge, 30*time.Second)
	setDuration(&c.DrainTimeout, 30*time.Second)
	setDuration(&c.AuthFailureWindow, time.Minute)
	if c.MaxMessageBytes <= 0 {
		c.MaxMessageBytes = 16 << 20
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 16 << 20
	}
	if c.SendQueue <= 0 {
		c.SendQueue = 64
	}
	if c.AuthFailureLimit <= 0 {
		c.AuthFailureLimit = 20
	}
	return nil
}

func setDuration(d *time.Duration, def time.Duration) {
	if *d <= 0 {
		*d = def
	}
}

// Server is one relay replica.
type Server struct {
	cfg     Config
	store   store.Store
	id      string
	log     *slog.Logger
	metrics *metrics
	echo    *echo.Echo
	limiter *failureLimiter

	// ctx is the parent of every agent connection's context; cancel ends them all.
	ctx    context.Context
	cancel context.CancelFunc

	draining atomic.Bool
	seq      atomic.Uint64 // request id counter

	mu sync.Mutex
	// Guarded by mu: agents connected to this replica, by provider id.
	agents map[string]*agentConn
	// Guarded by mu: requests started on this replica that wait for a response.
	calls map[string]*call

	conns sync.WaitGroup // agent connection handlers
	// sending counts responses on their way to the replica that waits for
	// them; a draining server waits for them too.
	sending atomic.Int64
}

// New returns a server. Call Start before serving.
func New(cfg Config) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg:     cfg,
		store:   cfg.Store,
		id:      cfg.Store.ReplicaID(),
		log:     cfg.Logger.With("replica", cfg.Store.ReplicaID()),
		ctx:     ctx,
		cancel:  cancel,
		agents:  make(map[string]*agentConn),
		calls:   make(map[string]*call),
		limiter: newFailureLimiter(cfg.AuthFailureLimit, cfg.AuthFailureWindow),
	}
	s.metrics = newMetrics(cfg.Metrics, s)
	s.echo = s.routes()
	return s, nil
}

// Start connects the server to its store. It must be called once, before
// the handler serves agents.
func (s *Server) Start(ctx context.Context) error {
	if err := s.store.Start(ctx, s); err != nil {
		return err
	}
	go s.sweepLoop()
	go s.pingLoop()
	return nil
}

// Handler returns the HTTP handler for agents, the backend API and operators.
func (s *Server) Handler() http.Handler { return s.echo }

// ReplicaID returns this replica's identity.
func (s *Server) ReplicaID() string { return s.id }

func (s *Server) routes() *echo.Echo {
	e := echo.New()
	e.HideBanner = true
	e.HidePort = true
	e.HTTPErrorHandler = s.handleHTTPError
	e.Use(s.nameReplica)
	if s.cfg.TrustProxyHeaders {
		var opts []echo.TrustOption
		if len(s.cfg.TrustedProxies) > 0 {
			opts = append(opts, echo.TrustLoopback(false), echo.TrustLinkLocal(false), echo.TrustPrivateNet(false))
			for _, n := range s.cfg.TrustedProxies {
				opts = append(opts, echo.TrustIPRange(n))
			}
		}
		e.IPExtractor = echo.ExtractIPFromXFFHeader(opts...)
	} else {
		e.IPExtractor = echo.ExtractIPDirect()
	}

	e.GET("/healthz", s.handleHealthz)
	e.GET("/readyz", s.handleReadyz)
	e.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(s.cfg.Metrics, promhttp.HandlerOpts{})))
	e.GET("/ws/data-provider", s.handleAgent)
	s.registerUI(e)

	api := e.Group("", s.requireToken, s.limitBody)
	api.GET("/ws/provider-status", s.handleRegistry)
	api.GET("/options/relay/registry", s.handleRegistry)
	api.GET("/options/relay/ib-status", s.handleIBStatus)
	api.POST("/options/relay/request", s.handleRequest)
	api.GET("/options/relay/account-events", s.handleAccountEvents)
	api.GET("/options/relay/cluster", s.handleCluster)
	return e
}

// nameReplica sets X-Relay-Replica on every answer, so an operator behind a
// load balancer can tell which replica answered.
func (s *Server) nameReplica(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		c.Response().Header().Set("X-Relay-Replica", s.id)
		return next(c)
	}
}

// Drain stops the server as a rolling restart needs. Readiness fails and new
// agents are turned away, and requests in flight get up to DrainTimeout to
// finish. Then agents are closed with status 1012 (service restart) and the
// replica leaves the registry. The HTTP server is the caller's to shut down
// after Drain returns.
func (s *Server) Drain(ctx context.Context) error {
	if s.draining.Swap(true) {
		return nil
	}
	s.metrics.draining.Set(1)
	s.log.Info("draining", "agents", s.agentCount(), "in_flight", s.inFlight())

	ctx, cancel := context.WithTimeout(ctx, s.cfg.DrainTimeout)
	defer cancel()
	if !s.waitIdle(ctx) {
		s.log.Warn("drain timeout passed with requests in flight", "in_flight", s.inFlight())
	}
	s.closeAgents(closeRestart)
	return s.Close()
}

// waitIdle waits until no request is in flight, or returns false when ctx ends first.
func (s *Server) waitIdle(ctx context.Context) bool {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for s.inFlight() > 0 {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
	return true
}

// Close disconnects every agent and leaves the registry. It is idempotent.
func (s *Server) Close() error {
	s.closeAgents(closeShutdown)
	s.cancel()
	s.conns.Wait()
	// Closed agents fail their requests in flight: let those failures, and
	// answers still on their way, reach the waiting replicas before the
	// store closes.
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WriteTimeout)
	defer cancel()
	for s.sending.Load() > 0 && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.store.Close(ctx)
}

// closeAgents closes every agent at once. Each close waits for the agent's
// close frame for up to 5 s (coder/websocket's handshake limit), so closing
// them one batch after another would make a drain with many dead
// connections outlast its grace period.
func (s *Server) closeAgents(reason closeReason) {
	var wg sync.WaitGroup
	for _, a := range s.agentList() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.close(reason)
		}()
	}
	wg.Wait()
}

// agentList returns the agents connected to this replica, taken under the
// lock so that callers can act on them without holding it.
func (s *Server) agentList() []*agentConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	agents := make([]*agentConn, 0, len(s.agents))
	for _, a := range s.agents {
		agents = append(agents, a)
	}
	return agents
}

func (s *Server) agentCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.agents)
}

// inFlight counts requests started here, requests that local agents have
// not responded to yet, and responses not yet sent to the replica that waits.
func (s *Server) inFlight() int {
	s.mu.Lock()
	n := len(s.calls) + int(s.sending.Load())
	s.mu.Unlock()
	now := time.Now()
	for _, a := range s.agentList() {
		n += a.waitingCount(now)
	}
	return n
}

// newID returns n random bytes in hex.
func newID(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("relay: crypto/rand failed: %v", err))
	}
	return hex.EncodeToString(b)
}
