package store_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/internal/redistest"
	"github.com/relay-project/relay/store"
)

// Tests that need Redis use the server at REDIS_URL, or at defaultRedisURL
// when it is unset. Each test writes only keys under a prefix of its own,
// because other packages' tests share that server. Tests that stop Redis start
// a private redis-server instead.
const defaultRedisURL = "redis://127.0.0.1:6379/0"

var (
	sharedRedisOnce sync.Once
	sharedRedisOpts *redis.Options
	sharedRedisErr  error
)

// sharedRedis returns a function that makes client options for the shared
// Redis. It skips the test when that Redis cannot be reached, or fails it when
// RELAY_REQUIRE_REDIS=1.
func sharedRedis(t testing.TB) func() *redis.Options {
	t.Helper()
	sharedRedisOnce.Do(func() {
		url := os.Getenv("REDIS_URL")
		if url == "" {
			url = defaultRedisURL
		}
		opts, err := redis.ParseURL(url)
		if err != nil {
			// The URL may contain a password, so the message leaves it out.
			sharedRedisErr = fmt.Errorf("invalid REDIS_URL: %v", err)
			return
		}
		client := redis.NewClient(opts)
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if err := client.Ping(ctx).Err(); err != nil {
			sharedRedisErr = fmt.Errorf("Redis at %s is unreachable: %v", opts.Addr, err)
			return
		}
		sharedRedisOpts = opts
	})
	if sharedRedisErr != nil {
		requireRedis(t, sharedRedisErr.Error())
	}
	return func() *redis.Options {
		opts := *sharedRedisOpts
		return &opts
	}
}

// requireRedis skips the test for a missing Redis, or fails it when the
// environment sets RELAY_REQUIRE_REDIS=1, as CI does.
func requireRedis(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("RELAY_REQUIRE_REDIS") == "1" {
		t.Fatalf("%s (RELAY_REQUIRE_REDIS=1 makes this a failure)", reason)
	}
	t.Skipf("%s; set REDIS_URL to a running Redis to run this test, or RELAY_REQUIRE_REDIS=1 to fail instead of skipping", reason)
}

// uniquePrefix returns a key prefix that no other test uses.
func uniquePrefix() string {
	return "test-" + randomHex(8)
}

// startRedisStore builds a store with a client of its own and starts it with
// h. The store and the client are closed when the test ends, store first.
func startRedisStore(t testing.TB, options func() *redis.Options, cfg store.RedisConfig, h store.Handler) (*store.Redis, *redis.Client) {
	t.Helper()
	s, client := newRedisStore(t, options, cfg)
	if err := s.Start(testContext(t), h); err != nil {
		t.Fatalf("Start of %s: %v", cfg.ReplicaID, err)
	}
	return s, client
}

// newRedisStore builds an unstarted store with a client of its own. The store
// and the client are closed when the test ends, store first.
func newRedisStore(t testing.TB, options func() *redis.Options, cfg store.RedisConfig) (*store.Redis, *redis.Client) {
	t.Helper()
	client := redis.NewClient(options())
	cfg.Client = client
	if cfg.Logger == nil {
		// Benchmarks print their output even when they pass, so they log
		// only warnings and errors.
		level := slog.LevelDebug
		if _, ok := t.(*testing.B); ok {
			level = slog.LevelWarn
		}
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: level}))
	}
	s, err := store.NewRedis(cfg)
	if err != nil {
		_ = client.Close()
		t.Fatalf("NewRedis: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		// Close fails for a store whose client the test closed or whose Redis
		// it stopped, which is expected.
		_ = s.Close(ctx)
		_ = client.Close()
	})
	return s, client
}

// deleteKeysOnCleanup deletes every key under prefix when the test ends, after
// the stores that the test creates later have closed.
func deleteKeysOnCleanup(t testing.TB, options func() *redis.Options, prefix string) {
	t.Cleanup(func() {
		client := redis.NewClient(options())
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		iter := client.Scan(ctx, 0, prefix+":*", 1000).Iterator()
		for iter.Next(ctx) {
			client.Del(ctx, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Logf("deleting test keys under %s: %v", prefix, err)
		}
	})
}

// startPrivateRedis starts a redis-server that only this test uses, without
// persistence, and stops it when the test ends. It skips the test when
// redis-server is not on PATH, or fails it when RELAY_REQUIRE_REDIS=1.
func startPrivateRedis(t testing.TB) *redistest.Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		requireRedis(t, "redis-server is not on PATH")
	}
	return redistest.Start(t)
}

// freeLoopbackPort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// providersKey and aliveKey return the names of a replica's keys as the Redis
// store writes them.
func providersKey(prefix, replicaID string) string { return prefix + ":{" + replicaID + "}:providers" }
func aliveKey(prefix, replicaID string) string     { return prefix + ":{" + replicaID + "}:alive" }

func TestMain(m *testing.M) {
	// go-redis logs each connection that it fails to dial, hundreds of lines
	// during the tests that stop Redis. The stores report their connection state through slog to
	// the output of each test instead.
	redis.SetLogger(discardLogger{})
	os.Exit(m.Run())
}

type discardLogger struct{}

func (discardLogger) Printf(context.Context, string, ...any) {}
