package main

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// idleStep is the state of the idle replica and of Redis with a number of
// idle agents connected.
type idleStep struct {
	Agents     int     `json:"agents"`
	RSSBytes   int64   `json:"rss_bytes"`
	Heap       float64 `json:"heap_inuse_bytes"`
	Stack      float64 `json:"stack_inuse_bytes"`
	Goroutines float64 `json:"goroutines"`
	// Per idle agent, relative to the replica before any idle agent connected.
	RSSPerAgent        float64 `json:"rss_bytes_per_agent,omitempty"`
	HeapPerAgent       float64 `json:"heap_bytes_per_agent,omitempty"`
	StackPerAgent      float64 `json:"stack_bytes_per_agent,omitempty"`
	GoroutinesPerAgent float64 `json:"goroutines_per_agent,omitempty"`

	RedisCommandsPerSec float64          `json:"redis_commands_per_s"`
	RedisByCommand      map[string]int64 `json:"redis_by_command,omitempty"`
	RedisNetInPerSec    float64          `json:"redis_net_in_bytes_per_s"`
	RedisNetOutPerSec   float64          `json:"redis_net_out_bytes_per_s"`
	// CommandsPerReplicaBeat is RedisCommandsPerSec spread over the replicas
	// and multiplied by the beat interval.
	CommandsPerReplicaBeat float64 `json:"redis_commands_per_replica_beat"`
	// ReplicaCores is the CPU time of all replicas, the idle one included,
	// divided by the window.
	ReplicaCores float64 `json:"replica_cores"`
	RedisCores   float64 `json:"redis_cores"`
	// OtherCores is the CPU that the rest of the machine used in the window.
	OtherCores float64 `json:"other_cores"`
}

// idleResult is the outcome of the idle phase.
type idleResult struct {
	Replica     string           `json:"replica"`  // the replica that holds the idle agents
	Replicas    int              `json:"replicas"` // replicas in the cluster during the phase
	OtherAgents int              `json:"other_agents"`
	BaselineRSS int64            `json:"baseline_rss_bytes"`
	Steps       []idleStep       `json:"steps"`
	Status      []scenarioResult `json:"status"` // live ib-status at the last step
	Error       string           `json:"error,omitempty"`
}

// idleLadder returns the agent counts of the idle phase: the -redis-idle-agents
// counts up to -idle-agents, and -idle-agents itself.
func idleLadder(o *options) []int {
	var ladder []int
	for _, n := range o.redisIdleAgents {
		if n > 0 && n < o.idleAgents {
			ladder = append(ladder, n)
		}
	}
	ladder = append(ladder, o.idleAgents)
	slices.Sort(ladder)
	return slices.Compact(ladder)
}

// runIdle starts one more replica (with -targets, it uses the first target),
// connects idle agents to it step by step, and at each step reads its memory
// and counts the cluster's Redis commands over -idle-window. At the last step
// it measures live ib-status of the idle agents, through their replica and
// through another one.
func (b *bench) runIdle(ctx context.Context) (res idleResult) {
	o, c := b.opts, b.cluster
	idle := c.replicas[0]
	all := c.replicas
	if c.relayBin != "" {
		r, err := c.startReplica(ctx, "idle")
		if err != nil {
			res.Error = err.Error()
			return res
		}
		defer stopChild(r.cmd, r.exited)
		idle = r
		all = append(slices.Clone(c.replicas), r)
	}
	res.Replica, res.Replicas = idle.name, len(all)
	if idle.pid == 0 {
		b.log.Warn("the idle replica's PID is unknown (set -pids): no RSS or CPU figures")
	}
	pids := make([]int, len(all))
	for i, r := range all {
		pids[i] = r.pid
	}

	client := newHTTPClient(4, 10*time.Second)
	others, err := clusterProviders(ctx, client, idle)
	if err != nil {
		res.Error = fmt.Sprintf("read the cluster view: %v", err)
		return res
	}
	res.OtherAgents = others
	if !sleepFor(ctx, o.idleSettle) {
		return res
	}

	base, err := b.idleStep(ctx, idle, pids, 0)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	res.BaselineRSS = base.RSSBytes
	res.Steps = append(res.Steps, base)

	var groups []*agentGroup
	defer func() {
		for _, g := range groups {
			g.stop()
		}
	}()
	connected := 0
	target := []*replicaProc{idle}
	for _, count := range idleLadder(o) {
		specs := make([]agentSpec, 0, count-connected)
		for i := connected; i < count; i++ {
			specs = append(specs, agentSpec{group: groupIdle, index: i, replica: 0, chainBytes: 1})
		}
		b.log.Info("connecting idle agents", "replica", idle.name, "from", connected, "to", count)
		timeout := time.Minute + time.Duration(len(specs))*20*time.Millisecond
		g, err := connectAgents(ctx, target, specs, o.agentHeartbeat, b.agentLog, timeout)
		if err != nil {
			res.Error = err.Error()
			return res
		}
		groups = append(groups, g)
		connected = count
		if err := waitProviders(ctx, all, others+connected, timeout); err != nil {
			res.Error = err.Error()
			return res
		}
		if !sleepFor(ctx, o.idleSettle) {
			return res
		}
		step, err := b.idleStep(ctx, idle, pids, connected)
		if err != nil {
			res.Error = err.Error()
			return res
		}
		step.RSSPerAgent = float64(step.RSSBytes-base.RSSBytes) / float64(connected)
		step.HeapPerAgent = (step.Heap - base.Heap) / float64(connected)
		step.StackPerAgent = (step.Stack - base.Stack) / float64(connected)
		step.GoroutinesPerAgent = (step.Goroutines - base.Goroutines) / float64(connected)
		res.Steps = append(res.Steps, step)
		b.log.Info("idle step done", "agents", connected, "rss_kib_per_agent", round2(step.RSSPerAgent/1024),
			"redis_commands_per_s", round2(step.RedisCommandsPerSec))
	}

	res.Status = b.idleStatus(ctx, idle, connected)
	return res
}

// idleStep reads the idle replica's memory, then counts Redis commands and
// CPU time over -idle-window.
func (b *bench) idleStep(ctx context.Context, idle *replicaProc, pids []int, agents int) (idleStep, error) {
	o, c := b.opts, b.cluster
	s := idleStep{Agents: agents}
	if idle.pid > 0 {
		rss, err := processRSS(idle.pid)
		if err != nil {
			return s, fmt.Errorf("read the RSS of replica %s: %w", idle.name, err)
		}
		s.RSSBytes = rss
	}
	if gm, err := readGoMetrics(ctx, idle); err == nil {
		s.Heap, s.Stack, s.Goroutines = gm.HeapInuseBytes, gm.StackInuseBytes, gm.Goroutines
	} else {
		b.log.Warn("Go metrics of the idle replica not read", "err", err)
	}

	b.waitQuiet(ctx, pids)
	var m measurement
	measure := b.measurer(&m, pids)
	measure(true)
	t0 := time.Now()
	if !sleepFor(ctx, o.idleWindow) {
		return s, ctx.Err()
	}
	measure(false)
	window := time.Since(t0).Seconds()
	if m.ok[0] && m.ok[1] {
		cpu := m.cpu[0].until(m.cpu[1])
		s.ReplicaCores = cpu.Replicas.Seconds() / window
		s.RedisCores = cpu.Redis.Seconds() / window
		s.OtherCores = cpu.Other.Seconds() / window
		if c.redis != nil {
			d := m.redis[0].until(m.redis[1])
			s.RedisCommandsPerSec = float64(d.Commands) / window
			s.RedisByCommand = d.ByCommand
			s.RedisNetInPerSec = float64(d.NetInBytes) / window
			s.RedisNetOutPerSec = float64(d.NetOutBytes) / window
			s.CommandsPerReplicaBeat = s.RedisCommandsPerSec / float64(len(pids)) * o.beatInterval.Seconds()
		}
	}
	return s, nil
}

// idleStatus measures live ib-status of the idle agents with
// -idle-concurrency callers: through the idle replica, and through another.
func (b *bench) idleStatus(ctx context.Context, idle *replicaProc, agents int) []scenarioResult {
	o, c := b.opts, b.cluster
	sc := newScenarios(o)["status-live"]
	users := make([]string, agents)
	replicaOf := make([]int, agents) // all zero: the idle replica is replicas[0] in both placements
	for i := range users {
		users[i] = agentUser(groupIdle, i)
	}
	var other *replicaProc
	for _, r := range c.replicas {
		if r != idle {
			other = r
			break
		}
	}
	client := newHTTPClient(o.idleConcurrency+8, o.requestTimeout)
	defer client.CloseIdleConnections()

	var out []scenarioResult
	for _, placement := range o.placements {
		replicas := []*replicaProc{idle}
		if placement == placementCross {
			if other == nil {
				continue
			}
			replicas = append(replicas, other)
		}
		pids := []int{idle.pid}
		if placement == placementCross {
			pids = append(pids, other.pid)
		}
		_, quiet := b.waitQuiet(ctx, pids)
		var m measurement
		lr := runLoad(ctx, client, loadSpec{
			scenario: sc, calls: planCalls(sc, replicas, users, replicaOf, placement),
			concurrency: o.idleConcurrency, warmup: o.warmup, duration: o.duration,
			maxRequests: o.maxRequests, measure: b.measurer(&m, pids),
		})
		r := b.result(sc, placement, o.idleConcurrency, 1, lr, &m)
		r.Scenario = fmt.Sprintf("status-live with %d idle agents", agents)
		r.Quiet = quiet
		out = append(out, r)
		b.log.Info("idle ib-status done", "placement", placement, "rps", int(r.RPS), "p99_ms", round2(r.P99ms), "errors", r.Errors)
	}
	return out
}

// sleepFor waits for d and reports whether it did before ctx ended.
func sleepFor(ctx context.Context, d time.Duration) bool {
	return sleepUntil(ctx, time.Now().Add(d))
}
