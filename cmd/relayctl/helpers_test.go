package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/relay"
	"github.com/relay-project/relay/store"
)

// testKeys maps the agent API keys of the tests to their users.
const testKeys = "key-alice alice\nkey-bob bob\n"

// Registry timing of Redis-backed test replicas: a replica whose Redis
// fails turns unhealthy within a few beats. A store reports a pub/sub stall
// after three beats without its own beat, so beats of 100 ms can report
// false stalls when the race detector slows the test process down.
const (
	testBeatInterval = 250 * time.Millisecond
	testRegistryTTL  = 1500 * time.Millisecond
)

func TestMain(m *testing.M) {
	// go-redis logs every failed dial, many lines per second while the split
	// test's private Redis is stopped. The relay's stores report their
	// connection state in their own logs.
	redis.SetLogger(silentRedisLogger{})
	os.Exit(m.Run())
}

type silentRedisLogger struct{}

func (silentRedisLogger) Printf(context.Context, string, ...any) {}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func discardLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// testRelay is one relay replica served on a loopback port.
type testRelay struct {
	srv   *relay.Server
	store store.Store
	url   string // http://127.0.0.1:port
	ws    string // ws://127.0.0.1:port/ws/data-provider
}

// startRelay starts a replica on st and stops it when the test ends. tweak,
// if not nil, changes the configuration before the server starts.
func startRelay(t *testing.T, st store.Store, tweak func(*relay.Config)) *testRelay {
	t.Helper()
	keys, err := auth.ParseKeys(strings.NewReader(testKeys))
	if err != nil {
		t.Fatal(err)
	}
	cfg := relay.Config{Store: st, Auth: keys, Logger: discardLogger()}
	if tweak != nil {
		tweak(&cfg)
	}
	srv, err := relay.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Start(ctx); err != nil {
		t.Fatalf("start replica %s: %v", st.ReplicaID(), err)
	}
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		srv.Close()
		ts.Close()
	})
	return &testRelay{srv: srv, store: st, url: ts.URL, ws: "ws" + strings.TrimPrefix(ts.URL, "http") + "/ws/data-provider"}
}

func startMemoryRelay(t *testing.T, tweak func(*relay.Config)) *testRelay {
	t.Helper()
	return startRelay(t, store.NewMemory("mem-"+randomHex(3)), tweak)
}

// requireRedis skips the test for a missing Redis, or fails it when
// RELAY_REQUIRE_REDIS=1, as CI sets it.
func requireRedis(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("RELAY_REQUIRE_REDIS") == "1" {
		t.Fatalf("%s (RELAY_REQUIRE_REDIS=1 makes this a failure)", reason)
	}
	t.Skipf("%s; set REDIS_URL to a running Redis to run this test", reason)
}

// sharedRedis connects to the Redis at REDIS_URL, or at 127.0.0.1:6379.
// Other tests share it, so each test uses a key prefix of its own and
// deletes its keys at the end.
func sharedRedis(t *testing.T, prefix string) *redis.Client {
	t.Helper()
	raw := os.Getenv("REDIS_URL")
	if raw == "" {
		raw = "redis://127.0.0.1:6379/0"
	}
	opts, err := redis.ParseURL(raw)
	if err != nil {
		t.Fatalf("invalid REDIS_URL: %v", err)
	}
	client := redis.NewClient(opts)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := client.Ping(ctx).Err(); err != nil {
		client.Close()
		requireRedis(t, fmt.Sprintf("Redis at %s is unreachable: %v", opts.Addr, err))
	}
	t.Cleanup(func() {
		deleteKeys(client, prefix)
		client.Close()
	})
	return client
}

// deleteKeys removes every key under prefix, in bounded batches.
func deleteKeys(client *redis.Client, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	iter := client.Scan(ctx, 0, prefix+":*", 500).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if len(keys) > 0 {
		client.Del(ctx, keys...)
	}
}

// privateRedis is a redis-server process of one test, on a free loopback port.
type privateRedis struct {
	client   *redis.Client
	cmd      *exec.Cmd
	stopOnce sync.Once
}

// startPrivateRedis starts redis-server without persistence and stops it
// by its PID when the test ends, unless the test stopped it before.
func startPrivateRedis(t *testing.T) *privateRedis {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		requireRedis(t, "redis-server is not on PATH")
	}
	port := freePort(t)
	cmd := exec.Command(path, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no")
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	r := &privateRedis{cmd: cmd, client: redis.NewClient(&redis.Options{
		Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), DialTimeout: 500 * time.Millisecond,
	})}
	t.Cleanup(func() {
		r.client.Close()
		r.stop()
	})

	waitFor(t, 5*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		return r.client.Ping(ctx).Err() == nil
	}, "redis-server on port %d did not respond to PING", port)
	return r
}

// stop kills the redis-server process and waits for it to exit.
func (r *privateRedis) stop() {
	r.stopOnce.Do(func() {
		r.cmd.Process.Kill()
		r.cmd.Wait()
	})
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// closedURL returns an http URL of a loopback port where nothing listens.
func closedURL(t *testing.T) string {
	t.Helper()
	return "http://127.0.0.1:" + strconv.Itoa(freePort(t))
}

func newRedisStore(t *testing.T, client *redis.Client, prefix, id string) *store.Redis {
	t.Helper()
	st, err := store.NewRedis(store.RedisConfig{
		Client: client, Prefix: prefix, ReplicaID: id,
		BeatInterval: testBeatInterval, TTL: testRegistryTTL, Logger: discardLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// roundRobin serves an HTTP reverse proxy that sends each request to the
// next of targets in turn, as a load balancer without sticky sessions does.
func roundRobin(t *testing.T, targets ...string) string {
	t.Helper()
	var proxies []*httputil.ReverseProxy
	for _, target := range targets {
		u, err := url.Parse(target)
		if err != nil {
			t.Fatal(err)
		}
		p := httputil.NewSingleHostReverseProxy(u)
		p.ErrorHandler = func(w http.ResponseWriter, _ *http.Request, _ error) {
			http.Error(w, "502 Bad Gateway: upstream unreachable", http.StatusBadGateway)
		}
		proxies = append(proxies, p)
	}
	var next atomic.Uint64
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := next.Add(1) - 1
		proxies[i%uint64(len(proxies))].ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	return ts.URL
}

// startAgent runs a simulated agent until the test ends and waits until it
// is authenticated.
func startAgent(t *testing.T, cfg agentsim.Config) *agentsim.Agent {
	t.Helper()
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = 200 * time.Millisecond
	}
	if cfg.ReconnectDelay == 0 {
		cfg.ReconnectDelay = 100 * time.Millisecond
	}
	cfg.Logger = discardLogger()
	a := agentsim.New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	if err := a.WaitConnected(wctx); err != nil {
		t.Fatalf("agent with key %s did not connect: %v", cfg.APIKey, err)
	}
	return a
}

// startHungAgent connects an agent by hand that authenticates, sends one
// agent_state with TWS connected, and then sends nothing: no heartbeat and
// no response. It keeps reading, so WebSocket pings still get their pongs,
// as with an agent whose request handling hangs. It returns the provider id.
func startHungAgent(t *testing.T, wsURL, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, wsURL, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", wsURL, err)
	}
	conn.SetReadLimit(1 << 20)

	write := func(frame string) {
		if err := conn.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
			t.Fatalf("send %s: %v", frame, err)
		}
	}
	write(`{"type": "auth", "api_key": "` + key + `", "version": "1.39.1"}`)
	_, data, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("read auth_response: %v", err)
	}
	var resp struct {
		Success    bool   `json:"success"`
		ProviderID string `json:"provider_id"`
	}
	if err := json.Unmarshal(data, &resp); err != nil || !resp.Success || resp.ProviderID == "" {
		t.Fatalf("auth with %s failed: %s", key, data)
	}
	write(`{"type": "agent_state", "ib_connected": true}`)

	readCtx, stopReading := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, _, err := conn.Read(readCtx); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		stopReading()
		conn.CloseNow()
		<-done
	})
	return resp.ProviderID
}

// waitFor polls cond every 20 ms until it holds, or fails the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf(format, args...)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runDoctorJSON runs "relayctl doctor -json" with args and decodes the report.
func runDoctorJSON(t *testing.T, args ...string) (int, report) {
	t.Helper()
	code, out, errOut := runDoctorText(t, append([]string{"-json"}, args...)...)
	var rep report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("doctor %v: output is not a JSON report: %v\nstdout: %s\nstderr: %s", args, err, out, errOut)
	}
	return code, rep
}

// runDoctorText runs "relayctl doctor" with args and returns the exit
// status, stdout and stderr.
func runDoctorText(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code := run(ctx, append([]string{"doctor"}, args...), &stdout, &stderr)
	if testing.Verbose() {
		t.Logf("relayctl doctor %s\n%s%s", strings.Join(args, " "), stdout.String(), stderr.String())
	}
	return code, stdout.String(), stderr.String()
}

// checkVerdict fails the test unless the report's verdict has code want
// and its message contains each of parts.
func checkVerdict(t *testing.T, code int, rep report, want string, parts ...string) {
	t.Helper()
	if rep.Verdict.Code != want {
		t.Fatalf("verdict %s (%s), want %s", rep.Verdict.Code, rep.Verdict.Message, want)
	}
	wantExit := exitProblem
	if want == verdictOK {
		wantExit = exitOK
	}
	if code != wantExit {
		t.Errorf("exit status %d, want %d", code, wantExit)
	}
	for _, part := range parts {
		if !strings.Contains(rep.Verdict.Message, part) {
			t.Errorf("verdict message %q does not contain %q", rep.Verdict.Message, part)
		}
	}
}
