// Command agentsim runs simulated trading agents against a relay, for demos,
// manual tests and load tests. Each agent dials the relay's agent WebSocket,
// authenticates, sends heartbeats and state, and responds to requests as the
// production agent does (see package agentsim).
//
// Usage:
//
//	agentsim -key 'user%d' -n 500 -url ws://127.0.0.1:8000/ws/data-provider
//
// The key may also come from the AGENTSIM_API_KEY environment variable, which
// keeps it out of the process list. It stops on SIGINT or SIGTERM, or after
// -duration, closing every socket with status 1000.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// keyEnv is the environment variable read when -key is not set.
const keyEnv = "AGENTSIM_API_KEY"

// Timing of the progress logs. Tests shorten them.
var (
	// pollInterval is how often the agents' connection states are checked
	// for the "all agents connected" line.
	pollInterval = 250 * time.Millisecond
	// summaryInterval is the time between two summary lines.
	summaryInterval = 10 * time.Second
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal, a second one ends the process at once instead
	// of waiting for the close handshakes.
	context.AfterFunc(ctx, stop)

	err := run(ctx, os.Args[1:], os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "agentsim:", err)
		os.Exit(1)
	}
}

// errUsage marks invalid command-line arguments, already reported with the
// usage text.
var errUsage = errors.New("invalid arguments")

// options are the parsed command-line flags.
type options struct {
	url         string
	keyTemplate string
	agents      int
	version     string
	omitVersion bool
	tws         bool
	delay       time.Duration
	silent      bool
	chainBytes  int
	heartbeat   time.Duration
	ping        time.Duration
	reconnect   time.Duration
	ramp        time.Duration
	duration    time.Duration
	logLevel    slog.Level
}

// rampFlag is the -ramp value: a duration, or "auto" for no ramp up to 50
// agents and 2 ms per agent above.
type rampFlag struct {
	auto bool
	d    time.Duration
}

func (r *rampFlag) String() string {
	if r.auto {
		return "auto"
	}
	return r.d.String()
}

func (r *rampFlag) Set(s string) error {
	if s == "auto" {
		r.auto = true
		return nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	if d < 0 {
		return fmt.Errorf("negative duration %s", s)
	}
	r.auto, r.d = false, d
	return nil
}

// rampFor returns the time over which n connects are spread.
func (r rampFlag) rampFor(n int) time.Duration {
	if !r.auto {
		return r.d
	}
	if n <= 50 {
		return 0
	}
	return time.Duration(n) * 2 * time.Millisecond
}

// parseFlags parses args, writing usage and errors to output, and checks
// the values.
func parseFlags(args []string, output io.Writer) (options, error) {
	var opts options
	ramp := rampFlag{auto: true}
	logLevel := "info"

	fs := flag.NewFlagSet("agentsim", flag.ContinueOnError)
	fs.SetOutput(output)
	fs.StringVar(&opts.url, "url", "ws://127.0.0.1:8000/ws/data-provider", "relay agent endpoint (ws:// or wss://)")
	fs.StringVar(&opts.keyTemplate, "key", "", "API key; %d is replaced by the agent's index 0..n-1, so 'user%d' gives each agent its own key (default $"+keyEnv+")")
	fs.IntVar(&opts.agents, "n", 1, "number of agents")
	fs.StringVar(&opts.version, "version", agentsim.DefaultVersion, "agent version sent in the auth message")
	fs.BoolVar(&opts.omitVersion, "omit-version", false, "send the auth message without a version field, as old agents do")
	fs.BoolVar(&opts.tws, "tws", true, "report TWS as connected in ib_status responses and agent_state messages")
	fs.DurationVar(&opts.delay, "delay", 0, "wait before responding to each request")
	fs.BoolVar(&opts.silent, "silent", false, "receive requests but never respond")
	fs.IntVar(&opts.chainBytes, "chain-bytes", agentsim.DefaultChainBytes, "approximate size in bytes of a fetch_chain response's data")
	fs.DurationVar(&opts.heartbeat, "heartbeat", agentsim.DefaultHeartbeatInterval, "interval between heartbeat and agent_state messages")
	fs.DurationVar(&opts.ping, "ping", agentsim.DefaultPingInterval, "interval between WebSocket pings")
	fs.DurationVar(&opts.reconnect, "reconnect", agentsim.DefaultReconnectDelay, "wait before reconnecting after a failed or closed connection")
	fs.Var(&ramp, "ramp", "spread the agents' first connects over this duration; auto means none up to 50 agents and 2 ms per agent above")
	fs.DurationVar(&opts.duration, "duration", 0, "stop after this long; 0 runs until SIGINT or SIGTERM")
	fs.StringVar(&logLevel, "log-level", logLevel, "minimum log level: debug, info, warn or error")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return opts, err
		}
		return opts, errUsage
	}
	if fs.NArg() > 0 {
		return opts, usageError(fs, "unexpected argument %q", fs.Arg(0))
	}

	if opts.keyTemplate == "" {
		opts.keyTemplate = os.Getenv(keyEnv)
	}
	if opts.keyTemplate == "" {
		return opts, usageError(fs, "missing API key: set -key or %s", keyEnv)
	}
	if u, err := url.Parse(opts.url); err != nil || (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" {
		return opts, usageError(fs, "invalid -url %q: want ws://host:port/path or wss://host:port/path", opts.url)
	}
	if opts.agents < 1 {
		return opts, usageError(fs, "invalid -n %d: want at least 1", opts.agents)
	}
	if opts.chainBytes < 1 {
		return opts, usageError(fs, "invalid -chain-bytes %d: want at least 1", opts.chainBytes)
	}
	for name, d := range map[string]time.Duration{"-heartbeat": opts.heartbeat, "-ping": opts.ping, "-reconnect": opts.reconnect} {
		if d <= 0 {
			return opts, usageError(fs, "invalid %s %s: want a positive duration", name, d)
		}
	}
	if opts.delay < 0 || opts.duration < 0 {
		return opts, usageError(fs, "invalid -delay or -duration: want a duration of 0 or more")
	}
	if err := opts.logLevel.UnmarshalText([]byte(logLevel)); err != nil {
		return opts, usageError(fs, "invalid -log-level %q: want debug, info, warn or error", logLevel)
	}
	opts.ramp = ramp.rampFor(opts.agents)
	return opts, nil
}

func usageError(fs *flag.FlagSet, format string, args ...any) error {
	fmt.Fprintf(fs.Output(), "agentsim: "+format+"\n", args...)
	fs.Usage()
	return errUsage
}

// agentKey returns the API key of the agent with the given index.
func agentKey(template string, index int) string {
	return strings.ReplaceAll(template, "%d", strconv.Itoa(index))
}

// run starts the agents, logs progress to logOutput, and stops them when ctx
// is done or -duration has passed.
func run(ctx context.Context, args []string, logOutput io.Writer) error {
	opts, err := parseFlags(args, logOutput)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(logOutput, &slog.HandlerOptions{Level: opts.logLevel}))

	if opts.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.duration)
		defer cancel()
	}

	agents := make([]*agentsim.Agent, opts.agents)
	for i := range agents {
		agents[i] = agentsim.New(agentsim.Config{
			URL:               opts.url,
			APIKey:            agentKey(opts.keyTemplate, i),
			Version:           opts.version,
			OmitVersion:       opts.omitVersion,
			TWSConnected:      opts.tws,
			HeartbeatInterval: opts.heartbeat,
			PingInterval:      opts.ping,
			ReconnectDelay:    opts.reconnect,
			ResponseDelay:     opts.delay,
			Silent:            opts.silent,
			ChainBytes:        opts.chainBytes,
			Logger:            logger.With("agent", i),
		})
	}

	logger.Info("agentsim starting", "url", opts.url, "agents", opts.agents,
		"version", opts.version, "tws_connected", opts.tws, "ramp", opts.ramp)
	start := time.Now()

	var wg sync.WaitGroup
	wg.Go(func() { startAgents(ctx, agents, opts.ramp, &wg) })
	report(ctx, logger, agents, start)
	wg.Wait()

	logSummary(logger, "agentsim stopped", agents)
	return nil
}

// startAgents starts Run for each agent in its own goroutine, tracked by wg,
// spreading the starts evenly over ramp. It stops starting agents when ctx
// is done.
func startAgents(ctx context.Context, agents []*agentsim.Agent, ramp time.Duration, wg *sync.WaitGroup) {
	gap := ramp / time.Duration(len(agents))
	var timer *time.Timer
	for i, agent := range agents {
		if i > 0 && gap > 0 {
			if timer == nil {
				timer = time.NewTimer(gap)
				defer timer.Stop()
			} else {
				timer.Reset(gap)
			}
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		}
		if ctx.Err() != nil {
			return
		}
		wg.Go(func() { agent.Run(ctx) })
	}
}

// report logs "all agents connected" each time every agent has become
// connected, and a summary every summaryInterval, until ctx is done.
func report(ctx context.Context, logger *slog.Logger, agents []*agentsim.Agent, start time.Time) {
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	summary := time.NewTicker(summaryInterval)
	defer summary.Stop()

	allConnected := false
	for {
		select {
		case <-ctx.Done():
			return

		case <-poll.C:
			connected := countConnected(agents)
			switch {
			case connected == len(agents) && !allConnected:
				allConnected = true
				logger.Info("all agents connected", "agents", len(agents),
					"elapsed", time.Since(start).Round(time.Millisecond))
			case connected < len(agents):
				allConnected = false
			}

		case <-summary.C:
			logSummary(logger, "agentsim summary", agents)
		}
	}
}

func countConnected(agents []*agentsim.Agent) int {
	n := 0
	for _, a := range agents {
		if a.Connected() {
			n++
		}
	}
	return n
}

// logSummary logs the agents' connection count and summed counters.
func logSummary(logger *slog.Logger, msg string, agents []*agentsim.Agent) {
	var total agentsim.Stats
	for _, a := range agents {
		s := a.Stats()
		total.Connects += s.Connects
		total.AuthFailures += s.AuthFailures
		total.RequestsReceived += s.RequestsReceived
		total.RequestsAnswered += s.RequestsAnswered
	}
	logger.Info(msg,
		"connected", countConnected(agents),
		"agents", len(agents),
		"connects", total.Connects,
		"auth_failures", total.AuthFailures,
		"requests_received", total.RequestsReceived,
		"requests_answered", total.RequestsAnswered)
}
