package main

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// scenarioResult is one measured run of one scenario, placement and concurrency.
type scenarioResult struct {
	Scenario    string   `json:"scenario"`
	Placement   string   `json:"placement"`
	Concurrency int      `json:"concurrency"`
	Run         int      `json:"run"`
	Requests    int64    `json:"requests"`
	Errors      int64    `json:"errors"`
	ErrorSample []string `json:"error_sample,omitempty"`
	WindowSec   float64  `json:"window_s"`
	RPS         float64  `json:"requests_per_s"`
	P50ms       float64  `json:"p50_ms"`
	P90ms       float64  `json:"p90_ms"`
	P99ms       float64  `json:"p99_ms"`
	MaxMs       float64  `json:"max_ms"`

	// CPU milliseconds per 1,000 requests completed in the window: of all
	// load replicas together, of the private redis-server, and of this
	// process (HTTP client and simulated agents). Zero where unmeasured.
	ReplicaCPUPer1k float64 `json:"replica_cpu_ms_per_1k"`
	RedisCPUPer1k   float64 `json:"redis_cpu_ms_per_1k"`
	SelfCPUPer1k    float64 `json:"bench_cpu_ms_per_1k"`
	// ReplicaCores is the CPU time of the load replicas divided by the
	// window: how many cores they kept busy.
	ReplicaCores float64 `json:"replica_cores"`
	// OtherCores is the CPU that the rest of the machine used during the
	// window, in cores: other programs and unattributed kernel work.
	OtherCores float64 `json:"other_cores"`
	// Quiet is false when other programs still used more than -quiet-cores
	// when the run started, after waiting -quiet-wait.
	Quiet bool `json:"quiet"`

	RedisCommandsPerSec float64          `json:"redis_commands_per_s"`
	RedisPerRequest     float64          `json:"redis_commands_per_request"`
	RedisByCommand      map[string]int64 `json:"redis_by_command,omitempty"`
}

// key identifies the scenario, placement and concurrency of a result.
func (r scenarioResult) key() string {
	return fmt.Sprintf("%s/%s/c%d", r.Scenario, r.Placement, r.Concurrency)
}

// measurement is the CPU and Redis state at the start and the end of a window.
type measurement struct {
	cpu   [2]cpuSnapshot
	redis [2]redisCounters
	ok    [2]bool
}

// measurer returns a measure function for loadSpec that snapshots into m the
// CPU time of the replicas with the given PIDs and the Redis counters.
func (b *bench) measurer(m *measurement, pids []int) func(start bool) {
	return func(start bool) {
		i := 1
		if start {
			i = 0
		}
		m.cpu[i] = readCPU(pids, b.cluster.redisPID)
		if b.cluster.redis != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			counters, err := readRedisCounters(ctx, b.cluster.redis)
			cancel()
			if err != nil {
				b.log.Warn("Redis INFO failed; this run has no Redis counts", "err", err)
				return
			}
			m.redis[i] = counters
		}
		m.ok[i] = true
	}
}

// result turns a load run and its measurement into a scenarioResult.
func (b *bench) result(sc *scenario, placement string, concurrency, run int, lr loadRun, m *measurement) scenarioResult {
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	r := scenarioResult{
		Scenario: sc.name, Placement: placement, Concurrency: concurrency, Run: run,
		Requests: lr.Completed, Errors: lr.Errors, ErrorSample: lr.ErrorSample,
		WindowSec: lr.Window.Seconds(),
		P50ms:     ms(percentile(lr.Latencies, 0.50)),
		P90ms:     ms(percentile(lr.Latencies, 0.90)),
		P99ms:     ms(percentile(lr.Latencies, 0.99)),
	}
	if n := len(lr.Latencies); n > 0 {
		r.MaxMs = ms(lr.Latencies[n-1])
	}
	if lr.Window > 0 {
		r.RPS = float64(lr.Completed) / lr.Window.Seconds()
	}
	if !m.ok[0] || !m.ok[1] {
		return r
	}
	cpu := m.cpu[0].until(m.cpu[1])
	if lr.Completed > 0 {
		per1k := func(d time.Duration) float64 { return ms(d) / float64(lr.Completed) * 1000 }
		r.ReplicaCPUPer1k = per1k(cpu.Replicas)
		r.RedisCPUPer1k = per1k(cpu.Redis)
		r.SelfCPUPer1k = per1k(cpu.Self)
	}
	if lr.Window > 0 {
		r.ReplicaCores = cpu.Replicas.Seconds() / lr.Window.Seconds()
		r.OtherCores = cpu.Other.Seconds() / lr.Window.Seconds()
	}
	if b.cluster.redis != nil {
		d := m.redis[0].until(m.redis[1])
		if lr.Window > 0 {
			r.RedisCommandsPerSec = float64(d.Commands) / lr.Window.Seconds()
		}
		if lr.Completed > 0 {
			r.RedisPerRequest = float64(d.Commands) / float64(lr.Completed)
		}
		r.RedisByCommand = d.ByCommand
	}
	return r
}

// runScenarios runs every selected load scenario, placement and concurrency,
// opts.repeat times, the repeats outermost so that slow drift spreads over
// every configuration.
func (b *bench) runScenarios(ctx context.Context, agents *agentGroup) []scenarioResult {
	o := b.opts
	scenarios := newScenarios(o)
	users, replicaOf := agents.users(), agents.replicaOf()
	client := newHTTPClient(slices.Max(o.concurrency)+8, o.requestTimeout)
	defer client.CloseIdleConnections()

	var results []scenarioResult
	for run := 1; run <= o.repeat; run++ {
		for _, name := range scenarioNames {
			if !o.selected(name) {
				continue
			}
			sc := scenarios[name]
			for _, placement := range o.placements {
				if placement == placementCross && len(b.cluster.replicas) < 2 {
					continue
				}
				calls := planCalls(sc, b.cluster.replicas, users, replicaOf, placement)
				for _, c := range o.concurrency {
					if ctx.Err() != nil {
						return results
					}
					_, quiet := b.waitQuiet(ctx, b.cluster.replicaPIDs())
					var m measurement
					lr := runLoad(ctx, client, loadSpec{
						scenario: sc, calls: calls, concurrency: c,
						warmup: o.warmup, duration: o.duration, maxRequests: o.maxRequests,
						measure: b.measurer(&m, b.cluster.replicaPIDs()),
					})
					r := b.result(sc, placement, c, run, lr, &m)
					r.Quiet = quiet
					results = append(results, r)
					b.log.Info("scenario done", "run", run, "scenario", r.key(), "rps", int(r.RPS),
						"p50_ms", round2(r.P50ms), "p99_ms", round2(r.P99ms), "errors", r.Errors, "other_cores", round2(r.OtherCores))
					for _, e := range r.ErrorSample {
						b.log.Warn("scenario error", "scenario", r.key(), "error", e)
					}
				}
			}
		}
	}
	return results
}
