package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// Start and stop limits of the child processes.
const (
	readyTimeout = 30 * time.Second // a replica or redis-server must respond within this after start
	stopTimeout  = 10 * time.Second // after SIGTERM, wait this long before SIGKILL
	// replicaDrainTimeout is RELAY_DRAIN_TIMEOUT of the replicas this tool
	// starts, so that stopping them takes seconds, not the default 30 s.
	replicaDrainTimeout = "2s"
)

// replicaProc is one relay replica: a child process this tool started, or a
// running one named with -targets.
type replicaProc struct {
	name    string // "r0", "r1", ..., or "idle"
	id      string // RELAY_REPLICA_ID; empty for -targets
	base    string // http://127.0.0.1:PORT
	ws      string // ws://127.0.0.1:PORT/ws/data-provider
	pid     int    // 0 when unknown
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the child process has exited
}

// cluster holds the replicas and the Redis under test.
type cluster struct {
	opts     *options
	log      *slog.Logger
	workdir  string
	relayBin string
	keysPath string
	prefix   string // RELAY_REDIS_PREFIX of the replicas this tool starts

	redisURL  string
	redis     *redis.Client // nil when no Redis is known (-targets without -redis)
	redisPID  int           // PID of the private redis-server, 0 otherwise
	redisCmd  *exec.Cmd
	redisDone chan struct{}

	replicas []*replicaProc // the replicas that the load goes to
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// startChild starts a child process with its output in logPath. The child
// gets SIGKILL if this process dies first.
//
// NOTE: Pdeathsig fires when the OS thread that started the child exits,
// not only the process. The Go runtime does not end threads of goroutines
// that are not locked to one, so in practice it fires only when this process dies.
func startChild(bin string, args, env []string, logPath string) (*exec.Cmd, chan struct{}, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		logFile.Close()
		close(exited)
	}()
	return cmd, exited, nil
}

// stopChild sends SIGTERM to the child, by its PID, and SIGKILL if it has not
// exited within stopTimeout.
func stopChild(cmd *exec.Cmd, exited chan struct{}) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	select {
	case <-exited:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(stopTimeout):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// startRedis starts a private redis-server without persistence on a free
// loopback port, so that INFO commandstats counts only the relay's traffic.
func (c *cluster) startRedis(ctx context.Context) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	args := []string{
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", c.workdir,
	}
	cmd, exited, err := startChild(c.opts.redisServer, args, os.Environ(), filepath.Join(c.workdir, "redis.log"))
	if err != nil {
		return fmt.Errorf("%w (set -redis-server to the redis-server binary, or -redis to use a running Redis)", err)
	}
	c.redisCmd, c.redisDone, c.redisPID = cmd, exited, cmd.Process.Pid
	c.redisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	c.redis = redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
	deadline := time.Now().Add(readyTimeout)
	for {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		err := c.redis.Ping(pctx).Err()
		cancel()
		if err == nil {
			c.log.Info("private redis-server started", "url", c.redisURL, "pid", c.redisPID)
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("redis-server exited at start; see %s", filepath.Join(c.workdir, "redis.log"))
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("redis-server on port %d did not respond to PING within %v: %v", port, readyTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// connectRedis connects to the Redis named with -redis.
func (c *cluster) connectRedis(ctx context.Context, url string) error {
	opts, err := redis.ParseURL(url)
	if err != nil {
		return fmt.Errorf("-redis %q is invalid (expected redis://host:port/db): %w", url, err)
	}
	c.redisURL = url
	c.redis = redis.NewClient(opts)
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.redis.Ping(pctx).Err(); err != nil {
		return fmt.Errorf("Redis at %s did not respond to PING: %w", url, err)
	}
	return nil
}

// buildRelay builds cmd/relay into the work directory, unless -relay-bin names a binary.
func (c *cluster) buildRelay(ctx context.Context) error {
	if c.opts.relayBin != "" {
		c.relayBin = c.opts.relayBin
		return nil
	}
	c.relayBin = filepath.Join(c.workdir, "relay")
	c.log.Info("building cmd/relay", "output", c.relayBin)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", c.relayBin, "github.com/relay-project/relay/cmd/relay")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build ./cmd/relay failed (run relaybench from the relay module, or set -relay-bin): %w", err)
	}
	return nil
}

// replicaEnv returns the environment of a replica: this process's own,
// without relay settings, plus the benchmark's.
func (c *cluster) replicaEnv(addr, id string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "RELAY_") || name == "REDIS_URL" || name == "API_BASE_URL" {
			continue
		}
		env = append(env, kv)
	}
	env = append(env,
		"RELAY_ADDR="+addr,
		"REDIS_URL="+c.redisURL,
		"RELAY_REDIS_PREFIX="+c.prefix,
		"RELAY_REPLICA_ID="+id,
		"RELAY_KEYS_FILE="+c.keysPath,
		"RELAY_LOG_LEVEL=warn",
		"RELAY_LOG_FORMAT=text",
		"RELAY_DRAIN_TIMEOUT="+replicaDrainTimeout,
		"RELAY_BEAT_INTERVAL="+c.opts.beatInterval.String(),
		"RELAY_RESYNC_INTERVAL="+c.opts.resyncInterval.String(),
	)
	return append(env, c.opts.relayEnv...)
}

// startReplica starts one relay process and waits until /readyz returns 200.
func (c *cluster) startReplica(ctx context.Context, name string) (*replicaProc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	r := &replicaProc{
		name:    name,
		id:      "bench-" + name + "-" + randomHex(3),
		base:    "http://" + addr,
		ws:      "ws://" + addr + "/ws/data-provider",
		logPath: filepath.Join(c.workdir, "relay-"+name+".log"),
	}
	r.cmd, r.exited, err = startChild(c.relayBin, nil, c.replicaEnv(addr, r.id), r.logPath)
	if err != nil {
		return nil, err
	}
	r.pid = r.cmd.Process.Pid
	if err := waitReady(ctx, r); err != nil {
		stopChild(r.cmd, r.exited)
		return nil, err
	}
	c.log.Info("replica started", "name", name, "id", r.id, "addr", addr, "pid", r.pid)
	return r, nil
}

func waitReady(ctx context.Context, r *replicaProc) error {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(readyTimeout)
	for {
		resp, err := client.Get(r.base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		if r.exited != nil {
			select {
			case <-r.exited:
				return fmt.Errorf("replica %s exited at start; see %s", r.name, r.logPath)
			default:
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("replica %s at %s not ready within %v: %v", r.name, r.base, readyTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// useTargets takes running replicas from -targets, with PIDs from -pids when given.
func (c *cluster) useTargets(ctx context.Context) error {
	for i, base := range c.opts.targets {
		base = strings.TrimRight(base, "/")
		if !strings.HasPrefix(base, "http://") {
			return fmt.Errorf("-targets entry %q must start with http://", base)
		}
		r := &replicaProc{name: fmt.Sprintf("t%d", i), base: base, ws: "ws" + strings.TrimPrefix(base, "http") + "/ws/data-provider"}
		if i < len(c.opts.pids) {
			r.pid = c.opts.pids[i]
		}
		if err := waitReady(ctx, r); err != nil {
			return err
		}
		c.replicas = append(c.replicas, r)
	}
	return nil
}

// stop stops every child process this tool started, replicas first. When the
// Redis is shared, it also deletes the keys left under this run's prefix.
func (c *cluster) stop() {
	for _, r := range c.replicas {
		stopChild(r.cmd, r.exited)
	}
	if c.redisCmd != nil {
		if c.redis != nil {
			c.redis.Close()
		}
		stopChild(c.redisCmd, c.redisDone)
		return
	}
	if c.redis != nil && c.relayBin != "" {
		c.deleteKeys()
		c.redis.Close()
	}
}

// deleteKeys removes keys under this run's prefix from a shared Redis, with
// SCAN and DEL, never FLUSHALL. Replicas delete their own keys on a clean
// stop, so this catches what a killed replica left.
func (c *cluster) deleteKeys() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	iter := c.redis.Scan(ctx, 0, c.prefix+":*", 500).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		c.log.Warn("keys of this run not listed in the shared Redis", "prefix", c.prefix, "err", err)
		return
	}
	if len(keys) > 0 {
		if err := c.redis.Del(ctx, keys...).Err(); err != nil {
			c.log.Warn("keys of this run not deleted from the shared Redis", "prefix", c.prefix, "err", err)
		}
	}
}

// replicaPIDs returns the PID of each load replica, 0 where unknown.
func (c *cluster) replicaPIDs() []int {
	pids := make([]int, len(c.replicas))
	for i, r := range c.replicas {
		pids[i] = r.pid
	}
	return pids
}

// redisVersion returns redis_version from INFO server, or "" when unknown.
func (c *cluster) redisVersion(ctx context.Context) string {
	if c.redis == nil {
		return ""
	}
	text, err := c.redis.Info(ctx, "server").Result()
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			return v
		}
	}
	return ""
}

// clusterProviders returns how many providers replica r counts in the whole
// cluster, from GET /options/relay/cluster.
func clusterProviders(ctx context.Context, client *http.Client, r *replicaProc) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.base+"/options/relay/cluster", nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET %s/options/relay/cluster: status %d", r.base, resp.StatusCode)
	}
	var view struct {
		Providers int `json:"providers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&view); err != nil {
		return 0, fmt.Errorf("GET %s/options/relay/cluster: %w", r.base, err)
	}
	return view.Providers, nil
}

// waitProviders waits until every replica in replicas counts at least want
// providers in the cluster.
func waitProviders(ctx context.Context, replicas []*replicaProc, want int, timeout time.Duration) error {
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(timeout)
	for _, r := range replicas {
		for {
			n, err := clusterProviders(ctx, client, r)
			if err == nil && n >= want {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				if err == nil {
					err = fmt.Errorf("it sees %d", n)
				}
				return fmt.Errorf("replica %s did not see %d providers within %v: %w", r.name, want, timeout, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

// goMetrics are values from a replica's /metrics page.
type goMetrics struct {
	HeapInuseBytes  float64 `json:"heap_inuse_bytes"`
	StackInuseBytes float64 `json:"stack_inuse_bytes"`
	Goroutines      float64 `json:"goroutines"`
}

// readGoMetrics reads go_memstats_heap_inuse_bytes,
// go_memstats_stack_inuse_bytes and go_goroutines from a replica's
// Prometheus metrics.
func readGoMetrics(ctx context.Context, r *replicaProc) (goMetrics, error) {
	var m goMetrics
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.base+"/metrics", nil)
	if err != nil {
		return m, err
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return m, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return m, err
	}

	found := 0
	for line := range strings.SplitSeq(string(body), "\n") {
		name, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			continue
		}
		switch name {
		case "go_memstats_heap_inuse_bytes":
			m.HeapInuseBytes, found = v, found+1
		case "go_memstats_stack_inuse_bytes":
			m.StackInuseBytes, found = v, found+1
		case "go_goroutines":
			m.Goroutines, found = v, found+1
		}
	}

	if found < 3 {
		return m, errors.New("go_memstats_heap_inuse_bytes, go_memstats_stack_inuse_bytes or go_goroutines missing from /metrics")
	}
	return m, nil
}
