package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// startReplicaAt starts a relay process with replica id id on addr, or on a
// free loopback port when addr is empty, and waits until its /readyz returns
// 200. Unlike startReplica, it can reuse the port of a stopped replica, as a
// restarted pod keeps its address. It also takes extra environment entries.
func (c *cluster) startReplicaAt(id, addr string, extraEnv ...string) *replica {
	c.t.Helper()
	r := c.launchAt(id, addr, extraEnv...)
	if err := r.waitReady(readyTimeout); err != nil {
		c.t.Fatalf("replica %s on %s did not become ready: %v\nlog:\n%s", id, r.addr, err, r.logs.tail(logTailBytes))
	}
	return r
}

// launchAt starts the relay process of replica id without waiting for it. It
// passes the settings that launch passes, then extraEnv. An entry of
// extraEnv overrides a setting of the same name, because os/exec keeps the
// last value of a repeated variable. RELAY_KEYS_FILE is set only when
// c.keysFile is not empty. The process is killed when the test ends, and its
// log is printed if the test failed.
func (c *cluster) launchAt(id, addr string, extraEnv ...string) *replica {
	c.t.Helper()
	if addr == "" {
		addr = freeLoopbackAddr(c.t)
	}
	r := &replica{
		id:     id,
		addr:   addr,
		logs:   new(logBuffer),
		exited: make(chan struct{}),
	}
	env := append(inheritedEnv(),
		"RELAY_ADDR="+r.addr,
		"REDIS_URL="+redisURL(),
		"RELAY_REDIS_PREFIX="+c.prefix,
		"RELAY_REPLICA_ID="+id,
		"RELAY_BEAT_INTERVAL="+beatInterval.String(),
		"RELAY_REGISTRY_TTL="+registryTTL.String(),
		"RELAY_DRAIN_TIMEOUT=5s",
		"RELAY_LOG_LEVEL=debug",
		"RELAY_LOG_FORMAT=json",
	)
	if c.keysFile != "" {
		env = append(env, "RELAY_KEYS_FILE="+c.keysFile)
	}
	env = append(env, extraEnv...)

	r.cmd = exec.Command(relayBinary)
	r.cmd.Env = env
	r.cmd.Stdout = r.logs
	r.cmd.Stderr = r.logs
	if err := r.cmd.Start(); err != nil {
		c.t.Fatalf("start replica %s: %v", id, err)
	}
	go func() {
		r.waitErr = r.cmd.Wait()
		close(r.exited)
	}()

	// Cleanups run last-in first-out: the process is killed first, then its
	// log is checked and printed.
	t := c.t
	t.Cleanup(func() {
		if os.Getenv("RELAY_E2E_RACE") == "1" && strings.Contains(r.logs.String(), "WARNING: DATA RACE") {
			t.Errorf("replica %s reported a data race; see its log below", id)
		}
		if t.Failed() {
			t.Logf("replica %s log (%s, last %d KiB):\n%s", id, r.addr, logTailBytes>>10, r.logs.tail(logTailBytes))
		}
	})
	t.Cleanup(func() { r.kill() })
	return r
}

// writeUserKeysFile writes a keys file with one line per entry of keys, which
// maps agent keys to user ids, and returns its path.
func writeUserKeysFile(t *testing.T, keys map[string]string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("# agent keys of the end-to-end tests: KEY USER_ID\n")
	for _, key := range slices.Sorted(maps.Keys(keys)) {
		fmt.Fprintf(&b, "%s %s\n", key, keys[key])
	}
	path := filepath.Join(t.TempDir(), "agent-keys")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatalf("write the keys file: %v", err)
	}
	return path
}

// runAgentWithKey starts a simulated agent of user with key against url and
// does not wait for it to connect. Zero fields of cfg get the tests' short
// intervals. The caller stops the agent, with stop or stopAgents.
func (c *cluster) runAgentWithKey(user, key, url string, cfg agentsim.Config, logLevel slog.Level) *runningAgent {
	cfg.URL = url
	cfg.APIKey = key
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = agentHeartbeat
	}
	if cfg.ReconnectDelay == 0 {
		cfg.ReconnectDelay = agentReconnectDelay
	}
	if cfg.Logger == nil {
		handler := slog.NewTextHandler(c.agentLogs, &slog.HandlerOptions{Level: logLevel})
		cfg.Logger = slog.New(handler).With("agent_user", user)
	}

	ctx, cancel := context.WithCancel(context.Background())
	a := &runningAgent{Agent: agentsim.New(cfg), user: user, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(a.done)
		_ = a.Run(ctx)
	}()
	return a
}

// stopAgents stops every agent at once and waits up to timeout for all of
// them. It returns how many had not stopped by then.
func stopAgents(agents []*runningAgent, timeout time.Duration) int {
	for _, a := range agents {
		a.cancel()
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for i, a := range agents {
		select {
		case <-a.done:
		case <-deadline.C:
			return len(agents) - i
		}
	}
	return 0
}

// keyEndpoint emulates the web app's POST /api/ma-options/validate-agent-key.
// It responds to every call after delay, from a fixed map of keys to user
// ids, and records each call.
type keyEndpoint struct {
	server *httptest.Server
	delay  time.Duration
	users  map[string]string // agent key to user id; read-only

	mu          sync.Mutex
	calls       []validationCall // guarded by mu
	inFlight    int              // guarded by mu
	maxInFlight int              // guarded by mu
	unexpected  []string         // guarded by mu: requests that are not a valid call, described
}

// validationCall is one call to a keyEndpoint.
type validationCall struct {
	key        string
	start, end time.Time
	// abandoned is set when the caller went away before the response, as
	// the relay's HTTP client does when the key check times out.
	abandoned bool
}

// keyEndpointStats summarizes the calls to a keyEndpoint.
type keyEndpointStats struct {
	calls      int
	abandoned  int
	keysCalled int
	// maxInFlight counts every call in flight at once, as the endpoint
	// observed them. The server notices an abandoned call only some time
	// after the caller closed the connection and released its slot, so
	// abandoned calls can add to this count.
	maxInFlight int
	// maxCompletedInFlight counts only calls that got their response.
	maxCompletedInFlight int
	// callsAfterValid counts calls for keys that had already been confirmed
	// valid by an earlier call's response, which a working cache prevents.
	callsAfterValid int
	unexpected      []string
}

// startKeyEndpoint starts a keyEndpoint on a loopback port. It stops when the
// test ends.
func startKeyEndpoint(t *testing.T, delay time.Duration, users map[string]string) *keyEndpoint {
	t.Helper()
	e := &keyEndpoint{delay: delay, users: users}
	e.server = httptest.NewServer(http.HandlerFunc(e.serveHTTP))
	t.Cleanup(e.server.Close)
	return e
}

// baseURL is the value of API_BASE_URL that points the relay at the endpoint.
func (e *keyEndpoint) baseURL() string { return e.server.URL }

func (e *keyEndpoint) serveHTTP(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/api/ma-options/validate-agent-key" {
		e.recordUnexpected(fmt.Sprintf("%s %s", req.Method, req.URL.Path))
		http.NotFound(w, req)
		return
	}
	var body struct {
		Key string `json:"key"`
	}
	data, err := io.ReadAll(io.LimitReader(req.Body, 64<<10))
	if err != nil || json.Unmarshal(data, &body) != nil {
		e.recordUnexpected("a body that is not {\"key\": ...}")
		http.Error(w, `{"error": "invalid body"}`, http.StatusBadRequest)
		return
	}

	call := validationCall{key: body.Key, start: time.Now()}
	e.mu.Lock()
	e.inFlight++
	e.maxInFlight = max(e.maxInFlight, e.inFlight)
	e.mu.Unlock()
	defer func() {
		call.end = time.Now()
		e.mu.Lock()
		e.inFlight--
		e.calls = append(e.calls, call)
		e.mu.Unlock()
	}()

	select {
	case <-time.After(e.delay):
	case <-req.Context().Done():
		call.abandoned = true
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if user, ok := e.users[body.Key]; ok {
		fmt.Fprintf(w, `{"valid": true, "userId": %q}`, user)
		return
	}
	io.WriteString(w, `{"valid": false}`)
}

func (e *keyEndpoint) recordUnexpected(description string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.unexpected) < 20 {
		e.unexpected = append(e.unexpected, description)
	}
}

// stats summarizes the calls that have ended.
func (e *keyEndpoint) stats() keyEndpointStats {
	e.mu.Lock()
	calls := slices.Clone(e.calls)
	s := keyEndpointStats{calls: len(calls), maxInFlight: e.maxInFlight, unexpected: slices.Clone(e.unexpected)}
	e.mu.Unlock()

	slices.SortFunc(calls, func(a, b validationCall) int { return a.start.Compare(b.start) })
	validUntil := make(map[string]time.Time) // key to the end of its earliest valid response
	type edge struct {
		at    time.Time
		delta int
	}
	var edges []edge
	for _, c := range calls {
		if c.abandoned {
			s.abandoned++
		} else {
			edges = append(edges, edge{c.start, +1}, edge{c.end, -1})
		}
		if confirmed, ok := validUntil[c.key]; ok && c.start.After(confirmed) {
			s.callsAfterValid++
		}
		if _, known := e.users[c.key]; known && !c.abandoned {
			if confirmed, ok := validUntil[c.key]; !ok || c.end.Before(confirmed) {
				validUntil[c.key] = c.end
			}
		}
	}
	keys := make(map[string]bool, len(calls))
	for _, c := range calls {
		keys[c.key] = true
	}
	s.keysCalled = len(keys)

	// Sweep the completed calls' intervals, ends before starts at the same
	// instant, to find the maximum overlap.
	slices.SortFunc(edges, func(a, b edge) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return a.delta - b.delta
	})
	inFlight := 0
	for _, ed := range edges {
		inFlight += ed.delta
		s.maxCompletedInFlight = max(s.maxCompletedInFlight, inFlight)
	}
	return s
}

// healthProbeEnv is the environment variable that makes the test binary run
// as a latency probe process, in TestHealthProbeProcess.
const healthProbeEnv = "E2E_HEALTH_PROBE"

// healthProbe measures the response times of GET requests from a process of
// its own, the test binary run as TestHealthProbeProcess. A probe inside the
// test process would also measure the test's own scheduling delays while
// 2,000 simulated agents reconnect in it. Under -race on a 2-core machine,
// such a probe measured a /healthz p99 of 450 to 650 ms, and this one about
// 25 ms. A load balancer's health checker is a separate process too.
//
// NOTE: the probe process runs TestMain too, which builds the relay binary
// again, from the build cache, before the probe starts.
type healthProbe struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	output *logBuffer // the probe process's output other than samples
	ready  chan struct{}
	done   chan struct{} // closed when the probe's output ends

	mu      sync.Mutex
	samples []healthSample // guarded by mu
}

// healthSample is one request of a healthProbe.
type healthSample struct {
	sent    time.Time
	elapsed time.Duration
	failure string // empty for a 200 response
}

// startHealthProbe starts the probe process and waits until it is ready to
// take a URL. When the test ends, its stdin is closed, which stops it, and
// it is killed if it has not exited 10 s later.
func startHealthProbe(t *testing.T) *healthProbe {
	t.Helper()
	p := &healthProbe{output: new(logBuffer), ready: make(chan struct{}), done: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], "-test.run=^TestHealthProbeProcess$", "-test.count=1", "-test.timeout=5m")
	p.cmd.Env = append(os.Environ(), healthProbeEnv+"=1")
	p.cmd.Stderr = p.output
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("health probe: %v", err)
	}
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatalf("health probe: %v", err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start the health probe process: %v", err)
	}
	t.Cleanup(func() {
		p.stdin.Close()
		timer := time.AfterFunc(10*time.Second, func() { _ = p.cmd.Process.Kill() })
		defer timer.Stop()
		_ = p.cmd.Wait()
	})
	go p.readOutput(stdout)

	select {
	case <-p.ready:
	case <-p.done:
		t.Fatalf("the health probe process ended before it was ready; output:\n%s", p.output.tail(logTailBytes))
	case <-time.After(60 * time.Second):
		t.Fatalf("the health probe process was not ready within 60 s; output:\n%s", p.output.tail(logTailBytes))
	}
	return p
}

// readOutput parses the probe's lines "health-probe ready" and
// "health-probe sample UNIX_NANOS ELAPSED_NANOS OUTCOME", and keeps the
// other lines in p.output.
func (p *healthProbe) readOutput(stdout io.Reader) {
	defer close(p.done)
	lines := bufio.NewScanner(stdout)
	for lines.Scan() {
		line := lines.Text()
		if line == "health-probe ready" {
			close(p.ready)
			continue
		}
		var sentNanos, elapsedNanos int64
		var outcome string
		if n, _ := fmt.Sscanf(line, "health-probe sample %d %d %s", &sentNanos, &elapsedNanos, &outcome); n == 3 {
			sample := healthSample{sent: time.Unix(0, sentNanos), elapsed: time.Duration(elapsedNanos)}
			if outcome != "ok" {
				sample.failure = outcome
			}
			p.mu.Lock()
			p.samples = append(p.samples, sample)
			p.mu.Unlock()
			continue
		}
		fmt.Fprintln(p.output, line)
	}
}

// begin makes the probe send GET url every interval, one request at a time.
func (p *healthProbe) begin(t *testing.T, url string, interval time.Duration) {
	t.Helper()
	if _, err := fmt.Fprintf(p.stdin, "%s %d\n", url, interval.Nanoseconds()); err != nil {
		t.Fatalf("health probe: send the URL: %v", err)
	}
}

// window returns the sorted response times of the requests sent between
// from and to, and the failed ones among them, described.
func (p *healthProbe) window(from, to time.Time) ([]time.Duration, []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var latencies []time.Duration
	var failures []string
	for _, s := range p.samples {
		if s.sent.Before(from) || s.sent.After(to) {
			continue
		}
		latencies = append(latencies, s.elapsed)
		if s.failure != "" {
			failures = append(failures, s.failure)
		}
	}
	slices.Sort(latencies)
	return latencies, failures
}

// TestHealthProbeProcess is the body of the health probe process that
// startHealthProbe runs, and is skipped in a normal test run. It reads
// "URL INTERVAL" from stdin, with INTERVAL in nanoseconds. Then it sends
// GET URL every INTERVAL and prints one line per request, until stdin is
// closed or maxSamples requests were sent.
func TestHealthProbeProcess(t *testing.T) {
	if os.Getenv(healthProbeEnv) != "1" {
		t.Skip("runs only as the health probe process of other tests")
	}
	const maxSamples = 6000 // 5 min at 20 Hz

	input := bufio.NewScanner(os.Stdin)
	fmt.Println("health-probe ready")
	if !input.Scan() {
		return
	}
	var url string
	var intervalNanos int64
	if _, err := fmt.Sscanf(input.Text(), "%s %d", &url, &intervalNanos); err != nil || intervalNanos <= 0 {
		t.Fatalf("invalid probe request %q, expected \"URL INTERVAL_NANOSECONDS\" (error %v)", input.Text(), err)
	}
	stop := make(chan struct{})
	go func() {
		for input.Scan() {
		}
		close(stop)
	}()

	client := &http.Client{Timeout: 5 * time.Second}
	ticker := time.NewTicker(time.Duration(intervalNanos))
	defer ticker.Stop()
	for range maxSamples {
		sent := time.Now()
		resp, err := client.Get(url)
		elapsed := time.Since(sent)
		outcome := "ok"
		switch {
		case err != nil:
			outcome = "error:" + strings.ReplaceAll(err.Error(), " ", "_")
		case resp.StatusCode != http.StatusOK:
			outcome = fmt.Sprintf("status_%d", resp.StatusCode)
		}
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		fmt.Printf("health-probe sample %d %d %s\n", sent.UnixNano(), elapsed.Nanoseconds(), outcome)

		select {
		case <-stop:
			return
		case <-ticker.C:
		}
	}
}

// percentile returns the nearest-rank q-th percentile (0 < q <= 100) of
// sorted, or 0 when it is empty.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(float64(len(sorted))*q/100)) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}
