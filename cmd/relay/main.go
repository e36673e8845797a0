// Command relay runs one replica of the relay: the agent WebSocket endpoint
// and the backend HTTP API. With REDIS_URL set, replicas sharing one Redis
// form a cluster; without it, the relay runs alone with an in-process registry.
//
// Configuration comes from environment variables; run `relay -help` for the list.
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/relay"
	"github.com/relay-project/relay/store"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Development key and user, accepted only when no key source is configured.
const (
	devKey  = "demo-key"
	devUser = "demo"
)

func main() {
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "Usage: relay\n\nRuns one relay replica, configured by these environment variables:\n\n")
		printSettings()
	}
	flag.Parse()

	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		os.Exit(2)
	}
	logger, err := newLogger(cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		os.Exit(2)
	}
	redis.SetLogger(newRedisLogger(logger, 10*time.Second))
	if err := run(cfg, logger); err != nil {
		logger.Error("relay stopped with an error", "err", err)
		os.Exit(1)
	}
}

func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("RELAY_LOG_LEVEL=%q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("RELAY_LOG_FORMAT=%q: use json or text", format)
}

func run(cfg config, logger *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	replicaID := cfg.ReplicaID
	if replicaID == "" {
		host, _ := os.Hostname()
		replicaID = fmt.Sprintf("%s-%04x", host, time.Now().UnixNano()&0xffff)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	storeMetrics := new(store.Metrics)
	st, err := newStore(cfg, replicaID, storeMetrics, logger)
	if err != nil {
		return err
	}
	validator, err := newValidator(ctx, cfg, logger)
	if err != nil {
		return err
	}

	trusted, _ := parseNetworks(cfg.TrustedProxies) // checked by loadConfig
	srv, err := relay.New(relay.Config{
		Store: st, Auth: validator, APIToken: cfg.APIToken, Logger: logger, Metrics: reg, StoreMetrics: storeMetrics,
		TrustProxyHeaders: cfg.TrustProxyHeaders, TrustedProxies: trusted,
		AuthTimeout: cfg.AuthTimeout, ValidateTimeout: cfg.ValidateTimeout,
		MaxMessageBytes: int64(cfg.MaxMessageBytes), WriteTimeout: cfg.WriteTimeout, SendQueue: cfg.SendQueue,
		PingInterval: cfg.PingInterval, PongTimeout: cfg.PongTimeout,
		RequestTimeout: cfg.RequestTimeout, MaxRequestTimeout: cfg.MaxRequestTimeout, StatusTimeout: cfg.StatusTimeout, StateMaxAge: cfg.StateMaxAge,
		DrainTimeout: cfg.DrainTimeout, MaxBodyBytes: int64(cfg.MaxBodyBytes),
		AuthFailureLimit: cfg.AuthFailureLimit, AuthFailureWindow: cfg.AuthFailureWindow,
	})
	if err != nil {
		return err
	}
	if err := startWithRetry(ctx, srv, logger); err != nil {
		return err
	}

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		_ = srv.Close()
		return fmt.Errorf("listen on %s: %w", cfg.Addr, err)
	}
	httpServer := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn)}
	serveErr := make(chan error, 1)
	go func() { serveErr <- httpServer.Serve(ln) }()
	logger.Info("relay started", "replica", replicaID, "addr", ln.Addr().String(), "version", version, "registry", st.Health().Backend)

	select {
	case err := <-serveErr:
		_ = srv.Close()
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	stop() // a second signal ends the process at once

	logger.Info("stopping: draining requests in flight", "drain_timeout", cfg.DrainTimeout.String())
	drainErr := srv.Drain(context.Background())
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := httpServer.Shutdown(shutdownCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		logger.Warn("HTTP server shutdown incomplete", "err", err)
	}
	logger.Info("relay stopped", "replica", replicaID)
	return drainErr
}

// startWithRetry connects the server to its store, retrying with a capped
// backoff while Redis cannot be reached, until it succeeds or ctx ends. The
// first failure is logged as an error and later ones every tenth attempt.
func startWithRetry(ctx context.Context, srv *relay.Server, logger *slog.Logger) error {
	backoff := 500 * time.Millisecond
	for attempt := 1; ; attempt++ {
		startCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
		err := srv.Start(startCtx)
		cancel()
		if err == nil {
			return nil
		}
		if attempt == 1 || attempt%10 == 0 {
			logger.Error("registry unreachable at start; retrying", "attempt", attempt, "retry_in", backoff.String(), "err", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("connect the registry: %w", err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

func newStore(cfg config, replicaID string, metrics *store.Metrics, logger *slog.Logger) (store.Store, error) {
	if cfg.RedisURL == "" {
		return store.NewMemoryHub(cfg.MaxAccountEvents).Node(replicaID), nil
	}
	client, err := newRedisClient(cfg, replicaID)
	if err != nil {
		return nil, err
	}
	return store.NewRedis(store.RedisConfig{
		Client:           client,
		Prefix:           cfg.RedisPrefix,
		ReplicaID:        replicaID,
		Addr:             cfg.Addr,
		Version:          version,
		BeatInterval:     cfg.BeatInterval,
		TTL:              cfg.RegistryTTL,
		ResyncInterval:   cfg.ResyncInterval,
		OpTimeout:        cfg.RedisTimeout,
		MaxAccountEvents: cfg.MaxAccountEvents,
		Logger:           logger,
		Metrics:          metrics,
	})
}

// newRedisClient builds the Redis client from REDIS_URL. A rediss:// URL
// uses TLS, verified against the system's roots or RELAY_REDIS_CA_FILE.
func newRedisClient(cfg config, replicaID string) (*redis.Client, error) {
	opts, err := redis.ParseURL(cfg.RedisURL)
	if err != nil {
		return nil, fmt.Errorf("REDIS_URL is invalid (expected redis://[user:password@]host:port/db or rediss://...): %w", err)
	}
	opts.DialTimeout = cfg.RedisTimeout
	opts.ReadTimeout = cfg.RedisTimeout
	opts.WriteTimeout = cfg.RedisTimeout
	opts.ClientName = "relay-" + replicaID
	if cfg.RedisCAFile != "" {
		if opts.TLSConfig == nil {
			return nil, errors.New("RELAY_REDIS_CA_FILE is set but REDIS_URL does not use rediss://")
		}
		pem, err := os.ReadFile(cfg.RedisCAFile)
		if err != nil {
			return nil, fmt.Errorf("read RELAY_REDIS_CA_FILE: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("RELAY_REDIS_CA_FILE %s contains no PEM certificate", cfg.RedisCAFile)
		}
		opts.TLSConfig.RootCAs = pool
	}
	return redis.NewClient(opts), nil
}

// newValidator builds the agent key check: the keys file when set, else the
// web app's endpoint, else the development key alone.
func newValidator(ctx context.Context, cfg config, logger *slog.Logger) (auth.Validator, error) {
	switch {
	case cfg.KeysFile != "":
		keys, err := auth.LoadKeysFile(cfg.KeysFile, logger)
		if err != nil {
			return nil, err
		}
		go keys.Watch(ctx, cfg.KeysReload)
		go reloadOnHangup(ctx, keys, logger)
		return keys, nil
	case cfg.APIBaseURL != "":
		return auth.NewHTTPValidator(auth.HTTPConfig{
			BaseURL: cfg.APIBaseURL, Timeout: cfg.ValidateTimeout, CacheTTL: cfg.KeyCacheTTL,
			NegativeTTL: cfg.KeyNegativeTTL, MaxConcurrent: cfg.KeyConcurrency, Logger: logger,
		})
	}
	logger.Warn("no RELAY_KEYS_FILE or API_BASE_URL set: only the development key is accepted; configure a key source before production use",
		"dev_user", devUser)
	return auth.ParseKeys(strings.NewReader(devKey + " " + devUser + "\n"))
}

func reloadOnHangup(ctx context.Context, keys *auth.KeysFile, logger *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if err := keys.Reload(); err == nil {
				logger.Info("agent keys reloaded on SIGHUP", "keys", keys.Len())
			}
		}
	}
}
