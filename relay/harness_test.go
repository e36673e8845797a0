package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/store"
)

// testKeys maps the API keys used in tests to their users.
const testKeys = `
key-alice  alice
key-alice2 alice
key-bob    bob
key-carol  carol
`

// replica is one relay server under test with its HTTP listener.
type replica struct {
	srv  *Server
	ts   *httptest.Server
	base string // http://127.0.0.1:port
	ws   string // ws://127.0.0.1:port/ws/data-provider
}

// backends are the store implementations every behaviour test runs against.
var backends = []string{"memory", "redis"}

// redisURL returns the Redis used by tests: REDIS_URL or the local default.
func redisURL() string {
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

// redisClient connects to the test Redis. Without one, the test fails when
// RELAY_REQUIRE_REDIS=1 and is skipped otherwise.
func redisClient(t testing.TB) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(redisURL())
	if err != nil {
		t.Fatalf("REDIS_URL: %v", err)
	}
	c := redis.NewClient(opts)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		c.Close()
		if os.Getenv("RELAY_REQUIRE_REDIS") == "1" {
			t.Fatalf("Redis at %s is required (RELAY_REQUIRE_REDIS=1) but unreachable: %v", redisURL(), err)
		}
		t.Skipf("Redis at %s unreachable, skipping: %v", redisURL(), err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newCluster starts n replicas sharing one store backend. tweak, if not nil,
// changes each replica's configuration before it starts.
func newCluster(t *testing.T, backend string, n int, tweak func(*Config)) []*replica {
	t.Helper()
	switch backend {
	case "memory":
		return newMemoryCluster(t, n, tweak)
	case "redis":
		return newRedisCluster(t, redisClient(t), n, tweak)
	}
	t.Fatalf("unknown backend %q", backend)
	return nil
}

func newMemoryCluster(t *testing.T, n int, tweak func(*Config)) []*replica {
	t.Helper()
	hub := store.NewMemoryHub(0)
	return startReplicas(t, n, tweak, func(id string) store.Store { return hub.Node(id) })
}

// newRedisCluster starts n replicas on client, with a fresh key prefix and
// short beats, so that failures show within a second.
func newRedisCluster(t *testing.T, client redis.UniversalClient, n int, tweak func(*Config)) []*replica {
	t.Helper()
	prefix := "test-" + randomHex(6)
	// Registered before the replicas start, so it runs after they stop:
	// account events and auth failures outlive the replicas by a day.
	t.Cleanup(func() { deleteKeys(client, prefix) })
	metrics := map[string]*store.Metrics{}
	withMetrics := func(c *Config) {
		c.StoreMetrics = metrics[c.Store.ReplicaID()]
		if tweak != nil {
			tweak(c)
		}
	}
	return startReplicas(t, n, withMetrics, func(id string) store.Store {
		metrics[id] = new(store.Metrics)
		st, err := store.NewRedis(store.RedisConfig{
			Client: client, Prefix: prefix, ReplicaID: id,
			BeatInterval: 100 * time.Millisecond, TTL: 600 * time.Millisecond,
			OpTimeout: 500 * time.Millisecond,
			Logger:    testLogger(t),
			Metrics:   metrics[id],
		})
		if err != nil {
			t.Fatal(err)
		}
		return st
	})
}

// deleteKeys removes the keys of prefix, in a bounded number of SCAN rounds.
func deleteKeys(client redis.UniversalClient, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var cursor uint64
	for range 100 {
		keys, next, err := client.Scan(ctx, cursor, prefix+":*", 500).Result()
		if err != nil {
			return
		}
		if len(keys) > 0 {
			client.Del(ctx, keys...)
		}
		if cursor = next; cursor == 0 {
			return
		}
	}
}

func startReplicas(t *testing.T, n int, tweak func(*Config), newStore func(id string) store.Store) []*replica {
	t.Helper()
	keys, err := auth.ParseKeys(strings.NewReader(testKeys))
	if err != nil {
		t.Fatal(err)
	}
	replicas := make([]*replica, n)
	for i := range replicas {
		id := fmt.Sprintf("r%d-%s", i, randomHex(2))
		cfg := Config{Store: newStore(id), Auth: keys, Logger: testLogger(t)}
		if tweak != nil {
			tweak(&cfg)
		}
		srv, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := srv.Start(ctx); err != nil {
			cancel()
			t.Fatalf("start replica %s: %v", id, err)
		}
		cancel()
		ts := httptest.NewServer(srv.Handler())
		replicas[i] = &replica{srv: srv, ts: ts, base: ts.URL, ws: "ws" + strings.TrimPrefix(ts.URL, "http") + "/ws/data-provider"}
		t.Cleanup(func() {
			srv.Close()
			ts.Close()
		})
	}
	return replicas
}

// startAgent runs a simulated agent against url until the test ends and
// waits until it is authenticated and visible in every replica's registry.
func startAgent(t *testing.T, cfg agentsim.Config, replicas ...*replica) *agentsim.Agent {
	t.Helper()
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = 200 * time.Millisecond
	}
	if cfg.ReconnectDelay == 0 {
		cfg.ReconnectDelay = 100 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
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
	// The agent reports boot_complete right after auth: wait until every
	// replica has seen it, so tests start from a booted agent.
	for _, r := range replicas {
		eventually(t, 3*time.Second, func() bool { return r.hasBootedProvider(t, a.ProviderID()) },
			"booted provider %s never appeared in the registry of %s", a.ProviderID(), r.srv.ReplicaID())
	}
	return a
}

// eventually polls cond every 20 ms until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf(format, args...)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *replica) registry(t testing.TB) registryListing {
	t.Helper()
	var out registryListing
	status := r.getJSON(t, "/options/relay/registry", &out)
	if status != http.StatusOK {
		t.Fatalf("registry through %s: status %d", r.srv.ReplicaID(), status)
	}
	return out
}

func (r *replica) hasBootedProvider(t testing.TB, id string) bool {
	for _, p := range r.registry(t).Providers {
		if p.ID == id && p.BootPhase == nil && !p.StateAt.IsZero() {
			return true
		}
	}
	return false
}

func (r *replica) hasProvider(t testing.TB, id string) bool {
	for _, p := range r.registry(t).Providers {
		if p.ID == id {
			return true
		}
	}
	return false
}

// getJSON sends a GET and decodes the JSON answer into out. It returns the status.
func (r *replica) getJSON(t testing.TB, path string, out any) int {
	t.Helper()
	resp, err := http.Get(r.base + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("GET %s: invalid JSON %q: %v", path, body, err)
		}
	}
	return resp.StatusCode
}

// postJSON sends body as JSON and decodes the answer into out. It returns the status.
func (r *replica) postJSON(t testing.TB, path string, body any, out any) int {
	t.Helper()
	data, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	return r.postRaw(t, path, string(data), out)
}

func (r *replica) postRaw(t testing.TB, path, body string, out any) int {
	t.Helper()
	resp, err := http.Post(r.base+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("POST %s: read body: %v", path, err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("POST %s: invalid JSON %q: %v", path, data, err)
		}
	}
	return resp.StatusCode
}

// requestAnswer is the decoded answer of POST /options/relay/request.
type requestAnswer struct {
	ProviderID string          `json:"provider_id"`
	InstanceID string          `json:"instance_id"`
	Success    bool            `json:"success"`
	Data       json.RawMessage `json:"data"`
	Error      *string         `json:"error"`
	ErrorCode  string          `json:"-"`
	Message    string          `json:"message"`
}

// request sends one request through r and returns the status and answer.
// On failure the error code moves from Error to ErrorCode.
func (r *replica) request(t testing.TB, body map[string]any) (int, requestAnswer) {
	t.Helper()
	var ans requestAnswer
	status := r.postJSON(t, "/options/relay/request", body, &ans)
	if status != http.StatusOK && ans.Error != nil {
		ans.ErrorCode = *ans.Error
		ans.Error = nil
	}
	return status, ans
}

func (r *replica) ibStatus(t testing.TB, query string) ibStatusAnswer {
	t.Helper()
	var out ibStatusAnswer
	if status := r.getJSON(t, "/options/relay/ib-status?"+query, &out); status != http.StatusOK {
		t.Fatalf("ib-status?%s through %s: status %d", query, r.srv.ReplicaID(), status)
	}
	return out
}

// ibStatusAnswer decodes ib-status answers, with fields as the dashboard reads them.
type ibStatusAnswer struct {
	Connected         bool             `json:"connected"`
	AgentConnected    bool             `json:"agent_connected"`
	Source            string           `json:"source"`
	ConnectedProvider *string          `json:"connected_provider"`
	ProviderStatuses  []providerStatus `json:"provider_statuses"`
	Message           string           `json:"message"`
	Providers         []store.Provider `json:"providers"`
	AgentVersion      *string          `json:"agent_version"`
	BootPhase         *store.BootPhase `json:"boot_phase"`
}

// rawAgent is a hand-driven agent connection for protocol tests.
type rawAgent struct {
	t    testing.TB
	conn *websocket.Conn
	mu   sync.Mutex
}

func dialRaw(t testing.TB, r *replica) *rawAgent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, r.ws, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", r.ws, err)
	}
	conn.SetReadLimit(64 << 20)
	t.Cleanup(func() { conn.CloseNow() })
	return &rawAgent{t: t, conn: conn}
}

func (a *rawAgent) send(frame string) {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.conn.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
		a.t.Fatalf("send %.80s: %v", frame, err)
	}
}

// read returns the next frame as a map, or fails the test after 5 s.
func (a *rawAgent) read() map[string]any {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, data, err := a.conn.Read(ctx)
	if err != nil {
		a.t.Fatalf("read: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		a.t.Fatalf("relay sent invalid JSON %q: %v", data, err)
	}
	return m
}

// readErr reads until the connection fails and returns the error.
func (a *rawAgent) readErr(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for {
		if _, _, err := a.conn.Read(ctx); err != nil {
			return err
		}
	}
}

// auth authenticates with key and returns the provider id.
func (a *rawAgent) auth(key string) string {
	a.t.Helper()
	a.send(`{"type": "auth", "api_key": "` + key + `", "version": "1.39.1"}`)
	m := a.read()
	if m["type"] != "auth_response" || m["success"] != true {
		a.t.Fatalf("auth with %s: got %v", key, m)
	}
	id, _ := m["provider_id"].(string)
	if id == "" {
		a.t.Fatalf("auth_response without provider_id: %v", m)
	}
	return id
}
