package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Placements of a caller relative to the agent it calls.
const (
	placementSame  = "same"  // the caller hits the replica that holds the agent's socket
	placementCross = "cross" // the caller hits another replica, which routes over Redis
)

// scenario is one kind of backend call.
type scenario struct {
	name string
	// newCall returns the method, path with query, and body of a call for user.
	newCall func(user string) (method, path string, body []byte)
	// check returns an error when an response with status 200 is not what the
	// scenario expects.
	check func(body []byte) error
	// bodyCap is the expected response size, to size read buffers.
	bodyCap int
}

// Response fragments that the checks look for. The relay encodes its responses
// with encoding/json, which writes no spaces.
var (
	fragAgentSource = []byte(`"source":"agent"`)
	fragConnected   = []byte(`"connected":true`)
	fragSuccess     = []byte(`"success":true`)
)

// scenarioNames lists the load scenarios in the order they run.
var scenarioNames = []string{"status-live", "status-cache", "echo", "chain"}

// newScenarios returns the load scenarios by name.
func newScenarios(o *options) map[string]*scenario {
	// The echo payload is a JSON object of about echoBytes bytes with a marker
	// that the check finds in the response.
	const marker = "relaybench-echo"
	filler := strings.Repeat("x", max(o.echoBytes-len(`{"marker":"`+marker+`","fill":""}`), 0))
	echoPayload := `{"marker":"` + marker + `","fill":"` + filler + `"}`

	return map[string]*scenario{
		"status-live": {
			name: "status-live",
			newCall: func(user string) (string, string, []byte) {
				return http.MethodGet, "/options/relay/ib-status?user_id=" + user + "&timeout_ms=5000", nil
			},
			// An ib-status whose agent did not response still returns 200, from
			// the cache: only provider status source "agent" is a live response.
			check: func(body []byte) error {
				if !bytes.Contains(body, fragAgentSource) {
					return errors.New("ib-status response not from the agent (no \"source\":\"agent\")")
				}
				if !bytes.Contains(body, fragConnected) {
					return errors.New("ib-status response without \"connected\":true")
				}
				return nil
			},
			bodyCap: 4 << 10,
		},
		"status-cache": {
			name: "status-cache",
			newCall: func(user string) (string, string, []byte) {
				return http.MethodGet, "/options/relay/ib-status?user_id=" + user + "&source=cache", nil
			},
			check: func(body []byte) error {
				if !bytes.Contains(body, fragConnected) {
					return errors.New("cached ib-status response without \"connected\":true")
				}
				return nil
			},
			bodyCap: 4 << 10,
		},
		"echo": {
			name: "echo",
			newCall: func(user string) (string, string, []byte) {
				return http.MethodPost, "/options/relay/request",
					[]byte(`{"user_id":"` + user + `","request_type":"echo","timeout_ms":5000,"payload":` + echoPayload + `}`)
			},
			check: func(body []byte) error {
				if !bytes.Contains(body, []byte(marker)) || !bytes.Contains(body, fragSuccess) {
					return fmt.Errorf("echo response without the payload or success true: %.200s", body)
				}
				return nil
			},
			bodyCap: 4 << 10,
		},
		"chain": {
			name: "chain",
			newCall: func(user string) (string, string, []byte) {
				return http.MethodPost, "/options/relay/request",
					[]byte(`{"user_id":"` + user + `","request_type":"fetch_chain","timeout_ms":10000,"payload":{"ticker":"SPY"}}`)
			},
			check: func(body []byte) error {
				if len(body) < o.chainBytes {
					return fmt.Errorf("fetch_chain response of %d bytes, expected at least %d", len(body), o.chainBytes)
				}
				if !bytes.Contains(body[len(body)-min(len(body), 512):], fragSuccess) {
					return errors.New("fetch_chain response without success true")
				}
				return nil
			},
			bodyCap: o.chainBytes + 64<<10,
		},
	}
}

// call is one prepared backend call.
type call struct {
	method, url string
	body        []byte
}

// planCalls returns the calls of a scenario for every user, sent to the
// replica that holds the user's agent (same) or to each other replica in
// turn (cross). Consecutive calls go to consecutive replicas, so callers
// that walk the list spread over the replicas round-robin.
func planCalls(sc *scenario, replicas []*replicaProc, users []string, replicaOf []int, placement string) []call {
	rounds := 1
	if placement == placementCross {
		rounds = len(replicas) - 1
	}
	calls := make([]call, 0, rounds*len(users))
	for k := range rounds {
		for j, user := range users {
			target := replicaOf[j]
			if placement == placementCross {
				target = (replicaOf[j] + 1 + k) % len(replicas)
			}
			method, path, body := sc.newCall(user)
			calls = append(calls, call{method: method, url: replicas[target].base + path, body: body})
		}
	}
	return calls
}

// loadSpec is one measured run: calls sent by a fixed number of callers.
type loadSpec struct {
	scenario    *scenario
	calls       []call
	concurrency int
	warmup      time.Duration
	duration    time.Duration
	maxRequests int64 // bound on requests sent in the whole run, warm-up included
	// measure is called at the start and at the end of the measured window.
	measure func(start bool)
}

// loadRun is the outcome of one measured run.
type loadRun struct {
	Completed   int64           // requests that ended inside the measured window
	Errors      int64           // requests started in the window that failed
	ErrorSample []string        // up to three distinct error messages
	Window      time.Duration   // length of the measured window
	Latencies   []time.Duration // of successful requests started in the window, sorted
}

// maxErrorSamples bounds the distinct error messages kept per run.
const maxErrorSamples = 3

// runLoad sends calls with spec.concurrency callers for spec.warmup and then
// spec.duration. Caller w sends calls w, w+C, w+2C, ... of the list, each
// waiting for the response before the next. Only the window after the warm-up
// is measured.
func runLoad(ctx context.Context, client *http.Client, spec loadSpec) loadRun {
	start := time.Now()
	windowStart := start.Add(spec.warmup)
	windowEnd := windowStart.Add(spec.duration)
	runCtx, cancel := context.WithDeadline(ctx, windowEnd)
	defer cancel()

	var (
		sent      atomic.Int64
		completed atomic.Int64
		errCount  atomic.Int64
		mu        sync.Mutex
		samples   []string
		all       [][]time.Duration
		wg        sync.WaitGroup
	)
	recordError := func(err error) {
		errCount.Add(1)
		msg := err.Error()
		mu.Lock()
		if len(samples) < maxErrorSamples && !slices.Contains(samples, msg) {
			samples = append(samples, msg)
		}
		mu.Unlock()
	}

	measured := make(chan struct{})
	go func() {
		defer close(measured)
		if !sleepUntil(runCtx, windowStart) {
			return
		}
		spec.measure(true)
		<-runCtx.Done()
		spec.measure(false)
	}()

	for w := range spec.concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.NewBuffer(make([]byte, 0, spec.scenario.bodyCap))
			var lat []time.Duration
			for i := w; ; i += spec.concurrency {
				if runCtx.Err() != nil || sent.Add(1) > spec.maxRequests {
					break
				}
				c := spec.calls[i%len(spec.calls)]
				t0 := time.Now()
				err := doCall(ctx, client, c, buf, spec.scenario.check)
				t1 := time.Now()
				if !t1.Before(windowStart) && !t1.After(windowEnd) {
					completed.Add(1)
				}
				if t0.Before(windowStart) {
					continue
				}
				if err != nil {
					recordError(err)
					continue
				}
				lat = append(lat, t1.Sub(t0))
			}
			mu.Lock()
			all = append(all, lat)
			mu.Unlock()
		}()
	}
	wg.Wait()
	cancel()
	<-measured

	var latencies []time.Duration
	for _, l := range all {
		latencies = append(latencies, l...)
	}
	slices.Sort(latencies)
	window := spec.duration
	if now := time.Now(); now.Before(windowEnd) {
		window = max(now.Sub(windowStart), 0) // stopped early: by ctx or maxRequests
	}
	return loadRun{Completed: completed.Load(), Errors: errCount.Load(), ErrorSample: samples, Window: window, Latencies: latencies}
}

// doCall sends one call and checks its response, read into buf.
func doCall(ctx context.Context, client *http.Client, c call, buf *bytes.Buffer, check func([]byte) error) error {
	var body io.Reader
	if c.body != nil {
		body = bytes.NewReader(c.body)
	}
	req, err := http.NewRequestWithContext(ctx, c.method, c.url, body)
	if err != nil {
		return err
	}
	if c.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		// Drop the method and URL, so that equal causes give equal messages.
		if cause := errors.Unwrap(err); cause != nil {
			return cause
		}
		return err
	}
	buf.Reset()
	_, err = buf.ReadFrom(resp.Body)
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %.200s", resp.StatusCode, buf.Bytes())
	}
	return check(buf.Bytes())
}

// sleepUntil waits until t and reports whether it did before ctx ended.
func sleepUntil(ctx context.Context, t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// percentile returns the q-quantile (0 < q <= 1) of sorted latencies by the
// nearest-rank method, or 0 when there are none.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}

// newHTTPClient returns a keep-alive client that keeps up to maxConns idle
// connections per replica, so that no caller dials during a run.
func newHTTPClient(maxConns int, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			MaxIdleConns:        0, // no limit across hosts
			MaxIdleConnsPerHost: maxConns,
			IdleConnTimeout:     2 * time.Minute,
			DisableCompression:  true,
			ForceAttemptHTTP2:   false,
		},
	}
}
