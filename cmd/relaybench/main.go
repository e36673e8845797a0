// Command relaybench measures a relay cluster. It reports the throughput and
// latency of the backend API, routed within one replica and across replicas
// over Redis, and the CPU time per request. It also measures memory per
// connected agent, Redis commands while idle and under load, and large
// responses in flight at once.
//
// With no flags it builds cmd/relay, starts a private redis-server and three
// replicas on loopback ports, connects 30 simulated agents spread evenly over
// the replicas, runs every scenario and prints tables:
//
//	go run ./cmd/relaybench
//	go run ./cmd/relaybench -repeat 3 -idle-agents 10000 -json > bench.json
//
// With -targets it measures replicas that are already running instead; they
// must load the keys that -write-keys writes. Every load runs for a fixed
// time and a bounded number of requests, and -timeout bounds the whole run.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// options are the parsed command-line flags.
type options struct {
	replicas    int
	targets     []string
	pids        []int
	redisURL    string
	redisServer string
	relayBin    string
	relayEnv    []string

	agents         int
	agentHeartbeat time.Duration
	beatInterval   time.Duration
	resyncInterval time.Duration
	scenarios      []string
	placements     []string
	concurrency    []int
	duration       time.Duration
	warmup         time.Duration
	repeat         int
	maxRequests    int64
	requestTimeout time.Duration
	echoBytes      int
	chainBytes     int

	largeCount int
	largeBytes int

	idleAgents      int
	redisIdleAgents []int
	idleWindow      time.Duration
	idleSettle      time.Duration
	idleConcurrency int

	quietWait  time.Duration
	quietCores float64

	timeout   time.Duration
	jsonOut   bool
	jsonFile  string
	workdir   string
	writeKeys string
}

// phaseNames are the -scenarios values besides the load scenarios.
var phaseNames = []string{"large", "idle"}

func (o *options) selected(name string) bool { return slices.Contains(o.scenarios, name) }

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("relaybench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var targets, pids, relayEnv, scenarios, placements, concurrency, redisIdle string
	fs.IntVar(&o.replicas, "replicas", 3, "number of relay replicas to start")
	fs.StringVar(&targets, "targets", "", "comma-separated base URLs (http://host:port) of running replicas to measure instead of starting any")
	fs.StringVar(&pids, "pids", "", "with -targets: comma-separated PIDs of the targets, in the same order, for RSS and CPU figures")
	fs.StringVar(&o.redisURL, "redis", "", "URL of a running Redis (redis://host:port/db); empty starts a private redis-server")
	fs.StringVar(&o.redisServer, "redis-server", "redis-server", "redis-server binary for the private Redis")
	fs.StringVar(&o.relayBin, "relay-bin", "", "prebuilt relay binary; empty builds ./cmd/relay")
	fs.StringVar(&relayEnv, "relay-env", "", "extra environment of the started replicas, as comma-separated NAME=VALUE pairs")

	fs.IntVar(&o.agents, "agents", 30, "simulated agents of the load scenarios, spread evenly over the replicas")
	fs.DurationVar(&o.agentHeartbeat, "agent-heartbeat", 10*time.Second, "heartbeat interval of the simulated agents")
	fs.DurationVar(&o.beatInterval, "beat", time.Second, "RELAY_BEAT_INTERVAL of the started replicas")
	fs.DurationVar(&o.resyncInterval, "resync", 30*time.Second, "RELAY_RESYNC_INTERVAL of the started replicas")
	fs.StringVar(&scenarios, "scenarios", "all", "comma-separated phases to run: "+strings.Join(append(slices.Clone(scenarioNames), phaseNames...), ", ")+", or all")
	fs.StringVar(&placements, "placements", "same,cross", "comma-separated placements: same (caller hits the agent's replica), cross (caller hits another replica)")
	fs.StringVar(&concurrency, "concurrency", "1,16,64", "comma-separated numbers of concurrent callers")
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "measured time of each scenario run")
	fs.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured time before each scenario run")
	fs.IntVar(&o.repeat, "repeat", 1, "runs of each scenario configuration; the summary gives medians")
	fs.Int64Var(&o.maxRequests, "max-requests", 2_000_000, "most requests one scenario run sends, warm-up included")
	fs.DurationVar(&o.requestTimeout, "request-timeout", 15*time.Second, "HTTP client timeout of one backend call")
	fs.IntVar(&o.echoBytes, "echo-bytes", 200, "approximate size in bytes of the echo payload")
	fs.IntVar(&o.chainBytes, "chain-bytes", 1<<20, "minimum size in bytes of the fetch_chain responses of the load agents")

	fs.IntVar(&o.largeCount, "large-count", 16, "large responses sent at once by the large check")
	fs.IntVar(&o.largeBytes, "large-bytes", 4<<20, "size in bytes of each large response")

	fs.IntVar(&o.idleAgents, "idle-agents", 1000, "idle agents connected to one replica for the memory per agent figure")
	fs.StringVar(&redisIdle, "redis-idle-agents", "100,1000,10000", "comma-separated idle agent counts at which Redis commands are counted; counts above -idle-agents are skipped")
	fs.DurationVar(&o.idleWindow, "idle-window", 10*time.Second, "time over which idle Redis commands and CPU are counted at each step")
	fs.DurationVar(&o.idleSettle, "idle-settle", 3*time.Second, "wait after connecting idle agents before reading memory")
	fs.IntVar(&o.idleConcurrency, "idle-concurrency", 16, "callers of the live ib-status run with the idle agents")

	fs.DurationVar(&o.quietWait, "quiet-wait", 30*time.Second, "before each run, wait at most this long for other programs to use less than -quiet-cores; 0 does not wait")
	fs.Float64Var(&o.quietCores, "quiet-cores", 0.1, "CPU, in cores, that other programs may use when a run starts")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Minute, "limit of the whole run")
	fs.BoolVar(&o.jsonOut, "json", false, "print the report as JSON instead of tables")
	fs.StringVar(&o.jsonFile, "json-file", "", "also write the report as JSON to this file")
	fs.StringVar(&o.workdir, "workdir", "", "directory for the relay binary, keys file and logs; empty means a new temporary directory, removed unless the run fails")
	fs.StringVar(&o.writeKeys, "write-keys", "", "write the agents' keys file to this path, for replicas given with -targets, and exit")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: relaybench [flags]\n\nMeasures a relay cluster that it starts on loopback ports, or running replicas given with -targets.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}

	var err error
	o.targets = splitList(targets)
	o.relayEnv = splitList(relayEnv)
	o.placements = splitList(placements)
	if o.pids, err = parseInts("-pids", pids); err != nil {
		return nil, err
	}
	if o.concurrency, err = parseInts("-concurrency", concurrency); err != nil {
		return nil, err
	}
	if o.redisIdleAgents, err = parseInts("-redis-idle-agents", redisIdle); err != nil {
		return nil, err
	}
	o.scenarios = splitList(scenarios)
	if slices.Contains(o.scenarios, "all") {
		o.scenarios = append(slices.Clone(scenarioNames), phaseNames...)
	}
	return o, o.validate()
}

func (o *options) validate() error {
	known := append(slices.Clone(scenarioNames), phaseNames...)
	for _, s := range o.scenarios {
		if !slices.Contains(known, s) {
			return fmt.Errorf("-scenarios: unknown %q; use %s or all", s, strings.Join(known, ", "))
		}
	}
	for _, p := range o.placements {
		if p != placementSame && p != placementCross {
			return fmt.Errorf("-placements: unknown %q; use same, cross or both", p)
		}
	}
	for _, kv := range o.relayEnv {
		if !strings.Contains(kv, "=") {
			return fmt.Errorf("-relay-env: %q is not NAME=VALUE", kv)
		}
	}
	switch {
	case len(o.targets) == 0 && o.replicas < 1:
		return errors.New("-replicas must be at least 1")
	case len(o.pids) > 0 && len(o.pids) != len(o.targets):
		return fmt.Errorf("-pids has %d entries but -targets has %d; give one PID per target", len(o.pids), len(o.targets))
	case o.agents < 1:
		return errors.New("-agents must be at least 1")
	case len(o.concurrency) == 0 || slices.Min(o.concurrency) < 1:
		return errors.New("-concurrency needs one or more numbers of at least 1")
	case o.duration <= 0 || o.warmup < 0:
		return errors.New("-duration must be positive and -warmup not negative")
	case o.repeat < 1:
		return errors.New("-repeat must be at least 1")
	case o.maxRequests < 1:
		return errors.New("-max-requests must be at least 1")
	case o.largeCount < 1 || o.largeBytes < 1:
		return errors.New("-large-count and -large-bytes must be at least 1")
	case o.idleAgents < 1 || o.idleConcurrency < 1:
		return errors.New("-idle-agents and -idle-concurrency must be at least 1")
	case o.idleWindow <= 0:
		return errors.New("-idle-window must be positive")
	case o.idleAgents+o.agents+o.largeCount > 18_000:
		// Each agent holds one socket in this process, and RLIMIT_NOFILE is
		// often 20,000 or less.
		return fmt.Errorf("%d agents in all is too many for one process; lower -idle-agents", o.idleAgents+o.agents+o.largeCount)
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

func parseInts(flagName, s string) ([]int, error) {
	var out []int
	for _, part := range splitList(s) {
		n, err := strconv.Atoi(part)
		if err != nil {
			return nil, fmt.Errorf("%s: %q is not a whole number", flagName, part)
		}
		out = append(out, n)
	}
	return out, nil
}

// bench is one benchmark run.
type bench struct {
	opts     *options
	log      *slog.Logger
	agentLog *slog.Logger // warnings of the simulated agents, into a file
	cluster  *cluster
}

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "relaybench:", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(o, logger); err != nil {
		logger.Error("relaybench failed", "err", err)
		os.Exit(1)
	}
}

// keyCounts returns how many keys of each agent group the keys file needs.
func keyCounts(o *options) map[string]int {
	return map[string]int{groupMain: o.agents, groupLarge: o.largeCount, groupIdle: o.idleAgents}
}

func run(o *options, logger *slog.Logger) (err error) {
	if o.writeKeys != "" {
		if err := writeKeysFile(o.writeKeys, keyCounts(o)); err != nil {
			return err
		}
		logger.Info("keys file written", "path", o.writeKeys)
		return nil
	}

	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	workdir := o.workdir
	if workdir == "" {
		if workdir, err = os.MkdirTemp("", "relaybench-"); err != nil {
			return err
		}
		defer func() {
			if err == nil {
				os.RemoveAll(workdir)
			} else {
				logger.Info("logs kept", "workdir", workdir)
			}
		}()
	} else if err := os.MkdirAll(workdir, 0o755); err != nil {
		return err
	}
	agentLogFile, err := os.Create(filepath.Join(workdir, "agents.log"))
	if err != nil {
		return err
	}
	defer agentLogFile.Close()

	b := &bench{
		opts:     o,
		log:      logger,
		agentLog: slog.New(slog.NewTextHandler(agentLogFile, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	c := &cluster{opts: o, log: logger, workdir: workdir, prefix: "relaybench-" + randomHex(4)}
	b.cluster = c
	defer c.stop()

	if err := b.startCluster(ctx); err != nil {
		return err
	}
	r := &report{Settings: b.settings()}
	r.Machine = readMachine(c.redisVersion(ctx))

	if err := b.runPhases(ctx, r); err != nil {
		return err
	}
	if ctx.Err() != nil {
		r.Notes = append(r.Notes, "the run stopped early: "+context.Cause(ctx).Error())
	}
	r.Summary = summarize(r.Runs)
	r.Targets = checkTargets(r, o.beatInterval, o.resyncInterval)
	if o.jsonFile != "" {
		if err := writeJSONFile(o.jsonFile, r); err != nil {
			return err
		}
	}
	if o.jsonOut {
		return r.writeJSON(os.Stdout)
	}
	r.writeText(os.Stdout)
	return nil
}

func writeJSONFile(path string, r *report) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := r.writeJSON(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// startCluster starts Redis and the replicas, or connects to running ones.
func (b *bench) startCluster(ctx context.Context) error {
	o, c := b.opts, b.cluster
	switch {
	case o.redisURL != "":
		if err := c.connectRedis(ctx, o.redisURL); err != nil {
			return err
		}
	case len(o.targets) == 0:
		if err := c.startRedis(ctx); err != nil {
			return err
		}
	}
	if len(o.targets) > 0 {
		return c.useTargets(ctx)
	}
	c.keysPath = filepath.Join(c.workdir, "keys.txt")
	if err := writeKeysFile(c.keysPath, keyCounts(o)); err != nil {
		return err
	}
	if err := c.buildRelay(ctx); err != nil {
		return err
	}
	for i := range o.replicas {
		r, err := c.startReplica(ctx, fmt.Sprintf("r%d", i))
		if err != nil {
			return err
		}
		c.replicas = append(c.replicas, r)
	}
	return nil
}

// runPhases runs the load scenarios, the large check and the idle phase.
func (b *bench) runPhases(ctx context.Context, r *report) error {
	o, c := b.opts, b.cluster
	n := len(c.replicas)
	loadSelected := slices.ContainsFunc(scenarioNames, o.selected)
	if loadSelected {
		agents, err := connectAgents(ctx, c.replicas, spreadSpecs(groupMain, o.agents, n, o.chainBytes), o.agentHeartbeat, b.agentLog, 2*time.Minute)
		if err != nil {
			return err
		}
		defer agents.stop()
		if err := waitProviders(ctx, c.replicas, o.agents, time.Minute); err != nil {
			return err
		}
		b.log.Info("agents connected", "agents", o.agents, "replicas", n)
		r.Runs = b.runScenarios(ctx, agents)
	}
	if n < 2 && slices.Contains(o.placements, placementCross) {
		r.Notes = append(r.Notes, "cross-replica placements need at least 2 replicas and were skipped")
	}

	if o.selected("large") && ctx.Err() == nil {
		before, err := clusterProviders(ctx, newHTTPClient(2, 5*time.Second), c.replicas[0])
		if err != nil {
			return err
		}
		large, err := connectAgents(ctx, c.replicas, spreadSpecs(groupLarge, o.largeCount, n, o.largeBytes), o.agentHeartbeat, b.agentLog, 2*time.Minute)
		if err != nil {
			return err
		}
		if err := waitProviders(ctx, c.replicas, before+o.largeCount, time.Minute); err != nil {
			large.stop()
			return err
		}
		r.Large = b.runLarge(ctx, large)
		large.stop()
	}

	if o.selected("idle") && ctx.Err() == nil {
		if c.relayBin == "" && len(o.pids) == 0 {
			r.Notes = append(r.Notes, "with -targets and no -pids, the idle phase has no RSS or CPU figures")
		}
		idle := b.runIdle(ctx)
		r.Idle = &idle
		if idle.Error != "" {
			b.log.Error("idle phase failed", "err", idle.Error)
		}
	}
	if c.redis == nil {
		r.Notes = append(r.Notes, "no Redis given (-redis): no Redis command counts")
	} else if c.redisPID == 0 {
		r.Notes = append(r.Notes, "Redis command counts and Redis CPU include any other traffic of the shared Redis given with -redis")
	}
	return nil
}

// settings returns the options that shape the figures, for the report.
func (b *bench) settings() map[string]any {
	o, c := b.opts, b.cluster
	redisKind := "private redis-server"
	if o.redisURL != "" {
		redisKind = o.redisURL
	}
	replicas := strconv.Itoa(len(c.replicas)) + " started"
	if len(o.targets) > 0 {
		replicas = strings.Join(o.targets, " ")
	}
	return map[string]any{
		"replicas":        replicas,
		"redis":           redisKind,
		"agents":          o.agents,
		"agent_heartbeat": o.agentHeartbeat.String(),
		"beat":            o.beatInterval.String(),
		"resync":          o.resyncInterval.String(),
		"duration":        o.duration.String(),
		"warmup":          o.warmup.String(),
		"repeat":          o.repeat,
		"concurrency":     o.concurrency,
		"echo_bytes":      o.echoBytes,
		"chain_bytes":     o.chainBytes,
		"large":           fmt.Sprintf("%dx%d", o.largeCount, o.largeBytes),
		"idle_agents":     o.idleAgents,
		"idle_window":     o.idleWindow.String(),
	}
}
