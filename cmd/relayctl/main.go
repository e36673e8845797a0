// Command relayctl is the operator's tool for a running relay cluster.
//
// Usage:
//
//	relayctl doctor -url http://relay:8000 -user alice
//
// doctor explains "the agent is connected but the dashboard says
// disconnected" in one command. It calls the relay's backend API several
// times, so that behind a round-robin load balancer it reaches several
// replicas, compares their responses and prints a short report and one verdict
// line with the cause and the fix. The exit status is 0 for the verdict ok,
// 1 for any other verdict and 2 for invalid arguments.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Exit statuses.
const (
	exitOK      = 0
	exitProblem = 1
	exitUsage   = 2
)

// tokenEnv is read when -token is not set. It keeps the token out of the
// process list and matches the relay's own variable.
const tokenEnv = "RELAY_API_TOKEN"

// agentHeartbeatInterval is how often the production agent sends heartbeat
// and agent_state. A provider that has sent neither for three intervals is
// stale.
const agentHeartbeatInterval = 10 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usageText = `Usage: relayctl <command> [flags]

Commands:
  doctor   diagnose why a user's agent shows as disconnected; run
           "relayctl doctor -h" for its flags
`

// run executes one relayctl command and returns the process exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	switch args[0] {
	case "doctor":
		return runDoctor(ctx, args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return exitOK
	default:
		fmt.Fprintf(stderr, "relayctl: unknown command %q\n\n%s", args[0], usageText)
		return exitUsage
	}
}

// doctorOptions are the parsed flags of the doctor command.
type doctorOptions struct {
	baseURL    *url.URL
	userID     string
	token      string
	timeout    time.Duration
	samples    int
	staleAfter time.Duration
	json       bool
}

// maxSamples bounds -samples, so that a typing error cannot start thousands
// of calls against a production relay.
const maxSamples = 100

func parseDoctorFlags(args []string, stderr io.Writer) (doctorOptions, error) {
	fs := flag.NewFlagSet("relayctl doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	rawURL := fs.String("url", "http://127.0.0.1:8000", "base URL of the relay or of its load balancer (http or https)")
	user := fs.String("user", "", "user id whose agent to diagnose; empty checks only the cluster")
	token := fs.String("token", "", "bearer token of the relay's backend API; empty means the "+tokenEnv+" environment variable")
	timeout := fs.Duration("timeout", 5*time.Second, "maximum time of one HTTP call; the live ib-status call gives the agent 3/4 of it to respond")
	samples := fs.Int("samples", 6, fmt.Sprintf("rounds of registry and cluster calls, 1 to %d; more rounds reach more replicas behind a load balancer", maxSamples))
	staleAfter := fs.Duration("stale-after", 3*agentHeartbeatInterval, "heartbeat age after which a provider counts as stale (three agent heartbeat intervals)")
	jsonOut := fs.Bool("json", false, "print the report as one JSON object")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage: relayctl doctor [flags]\n\nDiagnoses a relay cluster and, with -user, one user's agent. Exit status:\n0 for the verdict ok, 1 for a problem, 2 for invalid arguments.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return doctorOptions{}, err
	}

	fail := func(format string, a ...any) (doctorOptions, error) {
		err := fmt.Errorf(format, a...)
		fmt.Fprintf(stderr, "relayctl doctor: %v\n", err)
		return doctorOptions{}, err
	}
	if fs.NArg() > 0 {
		return fail("unexpected argument %q: every option is a flag, such as -user %s", fs.Arg(0), fs.Arg(0))
	}
	base, err := url.Parse(*rawURL)
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return fail("invalid -url %q: it must be an http:// or https:// URL with a host, such as http://relay:8000", *rawURL)
	}
	if *timeout <= 0 {
		return fail("invalid -timeout %v: it must be positive, such as 5s", *timeout)
	}
	if *samples < 1 || *samples > maxSamples {
		return fail("invalid -samples %d: it must be between 1 and %d", *samples, maxSamples)
	}
	if *staleAfter <= 0 {
		return fail("invalid -stale-after %v: it must be positive, such as 30s", *staleAfter)
	}
	if *token == "" {
		*token = os.Getenv(tokenEnv)
	}
	return doctorOptions{
		baseURL: base, userID: *user, token: *token, timeout: *timeout,
		samples: *samples, staleAfter: *staleAfter, json: *jsonOut,
	}, nil
}

// runDoctor collects observations, diagnoses them and prints the report. It
// returns the exit status.
func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	opts, err := parseDoctorFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		return exitUsage
	}

	obs := collect(ctx, opts)
	rep := buildReport(obs, diagnose(obs))
	if opts.json {
		err = writeJSON(stdout, rep)
	} else {
		err = writeText(stdout, rep)
	}
	if err != nil {
		fmt.Fprintf(stderr, "relayctl doctor: write report: %v\n", err)
		return exitProblem
	}
	if rep.Verdict.Code != verdictOK {
		return exitProblem
	}
	return exitOK
}
