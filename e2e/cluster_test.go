// Package e2e runs relay replicas as real processes that share one Redis,
// connects simulated agents to them, and checks the cluster from the outside:
// the agent WebSocket and the backend HTTP API.
//
// The tests need Redis at REDIS_URL (default redis://127.0.0.1:6379/0). They
// are skipped when it is unreachable, unless RELAY_REQUIRE_REDIS=1 is set.
// Each test uses a key prefix of its own and deletes its keys at the end.
// With RELAY_E2E_RACE=1 the relay binary is built with -race, and a test
// fails when a replica reports a data race.
package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/agentsim"
)

// Timing of every cluster the tests start. The registry TTL must be at least
// twice the beat interval.
const (
	beatInterval = 200 * time.Millisecond
	registryTTL  = time.Second

	agentHeartbeat      = 500 * time.Millisecond
	agentReconnectDelay = 200 * time.Millisecond

	// readyTimeout bounds the start of one replica, from exec to a 200 from /readyz.
	readyTimeout = 10 * time.Second
	// convergeTimeout bounds the wait for a change on one replica to show on the others.
	convergeTimeout = 3 * time.Second
	// pollInterval is the pause between two checks of a condition that is awaited.
	pollInterval = 20 * time.Millisecond

	// logTailBytes is how much of each replica's log a failed test prints.
	logTailBytes = 64 << 10
)

// Agent keys of the keys file that every cluster loads, by user.
var agentKeys = map[string]string{
	"alice": "key-alice",
	"bob":   "key-bob",
	"carol": "key-carol",
	"dave":  "key-dave",
}

// relayBinary is the path of the relay binary that TestMain builds.
var relayBinary string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

// runTests builds the relay binary into a temporary directory, runs the
// tests and removes the directory.
func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "relay-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: create the build directory:", err)
		return 1
	}
	defer os.RemoveAll(dir)

	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	relayBinary = filepath.Join(dir, "relay")
	args := []string{"build", "-o", relayBinary}
	if os.Getenv("RELAY_E2E_RACE") == "1" {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/relay")
	build := exec.Command("go", args...)
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go %s in %s failed: %v\n%s", strings.Join(args, " "), root, err, out)
		return 1
	}
	return m.Run()
}

// moduleRoot returns the directory of the go.mod that contains this package.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD failed: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("go env GOMOD found no go.mod: run the tests inside the relay module")
	}
	return filepath.Dir(gomod), nil
}

// redisURL returns REDIS_URL, or the local default when it is unset.
func redisURL() string {
	if v := os.Getenv("REDIS_URL"); v != "" {
		return v
	}
	return "redis://127.0.0.1:6379/0"
}

// requireRedis returns a client of the test Redis. It skips the test when
// Redis is unreachable, or fails it when RELAY_REQUIRE_REDIS=1.
func requireRedis(t *testing.T) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(redisURL())
	if err != nil {
		t.Fatalf("REDIS_URL is invalid (expected redis://host:port/db): %v", err)
	}
	opts.DialTimeout = time.Second
	client := redis.NewClient(opts)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := client.Ping(ctx).Err(); err != nil {
		client.Close()
		// The address, not the URL, because the URL may contain a password.
		msg := fmt.Sprintf("Redis at %s is unreachable (%v): start Redis 7 there or set REDIS_URL", opts.Addr, err)
		if os.Getenv("RELAY_REQUIRE_REDIS") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg + "; set RELAY_REQUIRE_REDIS=1 to fail instead of skipping")
	}
	t.Cleanup(func() { client.Close() })
	return client
}

// cluster is a set of relay replicas that share one Redis key prefix.
type cluster struct {
	t        *testing.T
	redis    *redis.Client
	prefix   string
	keysFile string

	// agentLogs collects the logs of every agent of the test.
	agentLogs *logBuffer
}

// newCluster prepares a cluster with no replica yet. It deletes the
// cluster's Redis keys when the test ends, after its replicas have stopped.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	c := &cluster{
		t:         t,
		redis:     requireRedis(t),
		prefix:    "e2e-" + randomHex(6),
		keysFile:  writeKeysFile(t),
		agentLogs: new(logBuffer),
	}
	// Cleanups run last-in first-out, so this one runs after every replica
	// and agent that the test starts later has stopped.
	t.Cleanup(func() {
		c.deleteKeys()
		if t.Failed() {
			t.Logf("agent logs (last %d KiB):\n%s", logTailBytes>>10, c.agentLogs.tail(logTailBytes))
		}
	})
	t.Logf("Redis key prefix %s", c.prefix)
	return c
}

// deleteKeys removes every key of the cluster's prefix, with a bounded
// number of SCAN rounds.
func (c *cluster) deleteKeys() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var cursor uint64
	for range 1000 {
		keys, next, err := c.redis.Scan(ctx, cursor, c.prefix+":*", 500).Result()
		if err != nil {
			c.t.Logf("Redis keys of prefix %s not deleted: SCAN failed: %v", c.prefix, err)
			return
		}
		if len(keys) > 0 {
			if err := c.redis.Del(ctx, keys...).Err(); err != nil {
				c.t.Logf("Redis keys of prefix %s not deleted: DEL failed: %v", c.prefix, err)
				return
			}
		}
		cursor = next
		if cursor == 0 {
			return
		}
	}
}

// writeKeysFile writes the agent keys into a keys file and returns its path.
func writeKeysFile(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("# agent keys of the end-to-end tests: KEY USER_ID\n")
	for _, user := range slices.Sorted(maps.Keys(agentKeys)) {
		fmt.Fprintf(&b, "%s %s\n", agentKeys[user], user)
	}
	path := filepath.Join(t.TempDir(), "agent-keys")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatalf("write the keys file: %v", err)
	}
	return path
}

// startReplicas starts one replica per id, in order, and waits until each is ready.
func (c *cluster) startReplicas(ids ...string) []*replica {
	c.t.Helper()
	out := make([]*replica, len(ids))
	for i, id := range ids {
		out[i] = c.startReplica(id)
	}
	return out
}

// startReplica starts a relay process with replica id id on a free loopback
// port and waits until its /readyz returns 200. The process is killed when
// the test ends, and its log is printed if the test failed.
func (c *cluster) startReplica(id string) *replica {
	c.t.Helper()
	// Another process can take the free port between the check and the
	// relay's listen: try a few ports.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		r := c.launch(id)
		err := r.waitReady(readyTimeout)
		if err == nil {
			return r
		}
		if attempt < attempts && strings.Contains(r.logs.String(), "address already in use") {
			c.t.Logf("replica %s: port %s was taken, trying another one", id, r.addr)
			continue
		}
		c.t.Fatalf("replica %s did not become ready: %v\nlog:\n%s", id, err, r.logs.tail(logTailBytes))
	}
}

// launch starts the relay process of replica id on a free loopback port
// without waiting for it; launchAt has the details.
func (c *cluster) launch(id string) *replica {
	c.t.Helper()
	return c.launchAt(id, "")
}

// inheritedEnv returns the test's environment without the relay's own
// settings, so that a developer's shell cannot change the replicas.
func inheritedEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "RELAY_") || name == "REDIS_URL" || name == "API_BASE_URL" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// freeLoopbackAddr returns a loopback address with a port that was free a
// moment ago.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// replica is one relay process.
type replica struct {
	id   string
	addr string // host:port of the agent endpoint and the HTTP API
	cmd  *exec.Cmd
	logs *logBuffer

	// exited is closed when the process has exited, and waitErr is then the
	// result of cmd.Wait.
	exited  chan struct{}
	waitErr error
}

func (r *replica) url(path string) string { return "http://" + r.addr + path }

func (r *replica) wsURL() string { return "ws://" + r.addr + "/ws/data-provider" }

// waitReady polls /readyz until it returns 200, the process exits or timeout passes.
func (r *replica) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		select {
		case <-r.exited:
			return fmt.Errorf("the process exited: %v", r.waitErr)
		default:
		}
		resp, err := client.Get(r.url("/readyz"))
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(pollInterval)
	}
	return fmt.Errorf("/readyz did not return 200 within %v", timeout)
}

// signal sends sig to the process.
func (r *replica) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := r.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("send %v to replica %s: %v", sig, r.id, err)
	}
}

// waitExit waits up to timeout for the process to exit and reports whether it did.
func (r *replica) waitExit(timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-r.exited:
		return true
	case <-timer.C:
		return false
	}
}

// kill ends the process with SIGKILL, unless it has exited, and waits for it.
func (r *replica) kill() {
	select {
	case <-r.exited:
		return
	default:
	}
	_ = r.cmd.Process.Kill()
	r.waitExit(5 * time.Second)
}

// logBuffer is an io.Writer that keeps everything written to it. It is safe
// for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// tail returns the last n bytes written.
func (b *logBuffer) tail(n int) string {
	s := b.String()
	if len(s) > n {
		return "[...]\n" + s[len(s)-n:]
	}
	return s
}

// runningAgent is a simulated agent whose Run loop is active.
type runningAgent struct {
	*agentsim.Agent
	user   string
	cancel context.CancelFunc
	done   chan struct{}
}

// startAgent runs a simulated agent for user against url and waits until it
// is authenticated. Zero fields of cfg get the tests' short intervals, and
// URL and APIKey are set here. The agent stops when the test ends.
func (c *cluster) startAgent(user, url string, cfg agentsim.Config) *runningAgent {
	c.t.Helper()
	a := c.runAgent(user, url, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.WaitConnected(ctx); err != nil {
		c.t.Fatalf("agent of %s did not connect to %s within 5 s (stats %+v)", user, url, a.Stats())
	}
	return a
}

// runAgent starts a simulated agent for user without waiting for it to connect.
func (c *cluster) runAgent(user, url string, cfg agentsim.Config) *runningAgent {
	c.t.Helper()
	key, ok := agentKeys[user]
	if !ok {
		c.t.Fatalf("no agent key for user %q in the keys file", user)
	}
	cfg.URL = url
	cfg.APIKey = key
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = agentHeartbeat
	}
	if cfg.ReconnectDelay == 0 {
		cfg.ReconnectDelay = agentReconnectDelay
	}
	if cfg.Logger == nil {
		handler := slog.NewTextHandler(c.agentLogs, &slog.HandlerOptions{Level: slog.LevelDebug})
		cfg.Logger = slog.New(handler).With("agent_user", user)
	}

	ctx, cancel := context.WithCancel(context.Background())
	a := &runningAgent{Agent: agentsim.New(cfg), user: user, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(a.done)
		_ = a.Run(ctx)
	}()
	c.t.Cleanup(a.stop)
	return a
}

// stop ends the agent's Run loop, which closes its socket with status 1000,
// and waits up to 10 s for it to return.
func (a *runningAgent) stop() {
	a.cancel()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	select {
	case <-a.done:
	case <-timer.C:
	}
}

// waitFor polls check until it returns true or timeout passes, and returns
// the time it took. On timeout it fails the test with the condition and the
// detail of the last check.
func waitFor(t *testing.T, timeout time.Duration, condition string, check func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		ok, detail := check()
		if ok {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s. Last check: %s", timeout, condition, detail)
		}
		time.Sleep(pollInterval)
	}
}

// httpClient is the backend's HTTP client. Its timeout is above every
// timeout_ms that the tests send.
var httpClient = &http.Client{Timeout: 30 * time.Second}

// httpResult is one HTTP exchange with a replica.
type httpResult struct {
	status  int
	header  http.Header
	body    []byte
	elapsed time.Duration
}

// doHTTP sends a request with body encoded as JSON when it is not nil, and
// reads the whole response. It is safe to call from any goroutine.
func doHTTP(method, url string, body any) (httpResult, error) {
	var reader io.Reader
	if body != nil {
		encoded, err := json.Marshal(body)
		if err != nil {
			return httpResult{}, fmt.Errorf("encode the body of %s %s: %w", method, url, err)
		}
		reader = bytes.NewReader(encoded)
	}
	req, err := http.NewRequest(method, url, reader)
	if err != nil {
		return httpResult{}, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}

	start := time.Now()
	resp, err := httpClient.Do(req)
	if err != nil {
		return httpResult{}, fmt.Errorf("%s %s failed: %w", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return httpResult{}, fmt.Errorf("%s %s: read the response: %w", method, url, err)
	}
	return httpResult{status: resp.StatusCode, header: resp.Header, body: data, elapsed: time.Since(start)}, nil
}

// getJSON sends a GET, fails the test unless the status is wantStatus, and
// decodes the response into out.
func getJSON(t *testing.T, url string, wantStatus int, out any) httpResult {
	t.Helper()
	res, err := doHTTP(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkAndDecode(t, "GET "+url, res, wantStatus, out)
	return res
}

// postJSON sends a POST with body as JSON, fails the test unless the status
// is wantStatus, and decodes the response into out.
func postJSON(t *testing.T, url string, body any, wantStatus int, out any) httpResult {
	t.Helper()
	res, err := doHTTP(http.MethodPost, url, body)
	if err != nil {
		t.Fatal(err)
	}
	checkAndDecode(t, "POST "+url, res, wantStatus, out)
	return res
}

func checkAndDecode(t *testing.T, label string, res httpResult, wantStatus int, out any) {
	t.Helper()
	if res.status != wantStatus {
		t.Fatalf("%s: status %d, expected %d; body: %s", label, res.status, wantStatus, truncate(res.body, 2000))
	}
	if out == nil {
		return
	}
	if err := json.Unmarshal(res.body, out); err != nil {
		t.Fatalf("%s: response is not the expected JSON: %v; body: %s", label, err, truncate(res.body, 2000))
	}
}

// truncate returns at most n bytes of b as a string, marked when cut.
func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return fmt.Sprintf("%s[... %d more bytes]", b[:n], len(b)-n)
}

// Response bodies of the backend API, with the fields that the tests read.
type (
	registryListing struct {
		ProvidersConnected int        `json:"providers_connected"`
		Providers          []provider `json:"providers"`
		PendingRequests    int        `json:"pending_requests"`
	}

	provider struct {
		ID            string     `json:"id"`
		UserID        string     `json:"user_id"`
		AgentVersion  string     `json:"agent_version"`
		InstanceID    string     `json:"instance_id"`
		IBAccounts    []string   `json:"ib_accounts"`
		IBConnected   *bool      `json:"ib_connected"`
		IsActive      bool       `json:"is_active"`
		ConnectedAt   string     `json:"connected_at"`
		LastHeartbeat string     `json:"last_heartbeat"`
		BootPhase     *bootPhase `json:"boot_phase"`
	}

	bootPhase struct {
		Phase  string `json:"phase"`
		Detail string `json:"detail"`
	}

	ibStatusResponse struct {
		Connected         bool             `json:"connected"`
		AgentConnected    bool             `json:"agent_connected"`
		Source            string           `json:"source"`
		ConnectedProvider *string          `json:"connected_provider"`
		ProviderStatuses  []providerStatus `json:"provider_statuses"`
		Message           string           `json:"message"`
		Providers         []provider       `json:"providers"`
		AgentVersion      *string          `json:"agent_version"`
		BootPhase         *bootPhase       `json:"boot_phase"`
	}

	providerStatus struct {
		ProviderID string `json:"provider_id"`
		UserID     string `json:"user_id"`
		InstanceID string `json:"instance_id"`
		Connected  bool   `json:"connected"`
		Source     string `json:"source"`
		Error      string `json:"error"`
	}

	agentResponse struct {
		ProviderID string          `json:"provider_id"`
		InstanceID string          `json:"instance_id"`
		Success    bool            `json:"success"`
		Data       json.RawMessage `json:"data"`
		Error      *string         `json:"error"`
	}

	apiError struct {
		Error   string `json:"error"`
		Message string `json:"message"`
	}
)

// relayRequest is the body of POST /options/relay/request.
type relayRequest struct {
	RequestType string `json:"request_type"`
	Payload     any    `json:"payload,omitempty"`
	UserID      string `json:"user_id,omitempty"`
	TimeoutMS   int    `json:"timeout_ms,omitempty"`
	ProviderID  string `json:"provider_id,omitempty"`

	AllowFallback bool `json:"allow_fallback,omitempty"`
}

// registry returns the replica's GET /options/relay/registry response.
func (r *replica) registry(t *testing.T) registryListing {
	t.Helper()
	var listing registryListing
	getJSON(t, r.url("/options/relay/registry"), http.StatusOK, &listing)
	return listing
}

// ibStatus returns the replica's GET /options/relay/ib-status response for
// user, with the extra query (such as "&source=cache") appended.
func (r *replica) ibStatus(t *testing.T, user, extraQuery string) ibStatusResponse {
	t.Helper()
	var answer ibStatusResponse
	getJSON(t, r.url("/options/relay/ib-status?user_id="+user+extraQuery), http.StatusOK, &answer)
	return answer
}

// providerIDs returns the ids of the listed providers, sorted.
func providerIDs(list []provider) []string {
	ids := make([]string, len(list))
	for i, p := range list {
		ids[i] = p.ID
	}
	slices.Sort(ids)
	return ids
}

// findProvider returns the listed provider with id, or nil.
func findProvider(list []provider, id string) *provider {
	for i := range list {
		if list[i].ID == id {
			return &list[i]
		}
	}
	return nil
}

// waitRegistryIDs waits until the registry of every replica lists exactly
// the providers ids and each of them has reported its TWS state and ended
// its start-up, and returns the time it took.
func waitRegistryIDs(t *testing.T, replicas []*replica, ids ...string) time.Duration {
	t.Helper()
	want := slices.Sorted(slices.Values(ids))
	return waitFor(t, convergeTimeout, fmt.Sprintf("every replica to list providers %v with a TWS state", want), func() (bool, string) {
		for _, r := range replicas {
			listing := r.registry(t)
			got := providerIDs(listing.Providers)
			if !slices.Equal(got, want) {
				return false, fmt.Sprintf("replica %s lists %v", r.id, got)
			}
			for _, p := range listing.Providers {
				if p.IBConnected == nil || p.BootPhase != nil {
					return false, fmt.Sprintf("replica %s: provider %s has ib_connected %v and boot_phase %+v", r.id, p.ID, p.IBConnected, p.BootPhase)
				}
			}
		}
		return true, ""
	})
}

// randomHex returns n random bytes in hex.
func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return hex.EncodeToString(b)
}

// tcpProxy is a round-robin TCP load balancer without sticky sessions or
// health checks, like the one in front of the replicas in production. Each
// connection goes to the next backend that accepts a TCP connection.
type tcpProxy struct {
	ln net.Listener

	mu       sync.Mutex
	backends []string // guarded by mu
	next     int      // guarded by mu: index of the next backend to try
	conns    map[net.Conn]struct{}
	closed   bool

	wg sync.WaitGroup
}

// startProxy listens on a loopback port and forwards to backends. It stops
// when the test ends.
func startProxy(t *testing.T, backends ...string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy: listen: %v", err)
	}
	p := &tcpProxy{ln: ln, backends: backends, conns: make(map[net.Conn]struct{})}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *tcpProxy) wsURL() string { return "ws://" + p.ln.Addr().String() + "/ws/data-provider" }

// setBackends replaces the backends of new connections.
func (p *tcpProxy) setBackends(addrs ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backends = addrs
	p.next = 0
}

func (p *tcpProxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.forward(client)
		}()
	}
}

// forward connects client to the next backend that accepts and copies bytes
// both ways until either side closes, then closes both.
func (p *tcpProxy) forward(client net.Conn) {
	backend, err := p.dialNext()
	if err != nil {
		client.Close()
		return
	}
	if !p.track(client, backend) {
		client.Close()
		backend.Close()
		return
	}
	defer p.untrack(client, backend)

	copied := make(chan struct{}, 2)
	go func() {
		io.Copy(backend, client)
		copied <- struct{}{}
	}()
	go func() {
		io.Copy(client, backend)
		copied <- struct{}{}
	}()
	<-copied
	client.Close()
	backend.Close()
	<-copied
}

// dialNext tries each backend once, starting after the last one used.
func (p *tcpProxy) dialNext() (net.Conn, error) {
	p.mu.Lock()
	backends := slices.Clone(p.backends)
	start := p.next
	p.next++
	p.mu.Unlock()

	var lastErr error = errors.New("proxy: no backend configured")
	for i := range backends {
		addr := backends[(start+i)%len(backends)]
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			return conn, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func (p *tcpProxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	for _, c := range conns {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *tcpProxy) untrack(conns ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range conns {
		delete(p.conns, c)
	}
}

// close stops accepting, closes every forwarded connection and waits for
// the forwarding goroutines.
func (p *tcpProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
