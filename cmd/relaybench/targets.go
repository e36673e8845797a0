package main

import (
	"fmt"
	"strings"
	"time"
)

// targetCheck compares one measured figure with the relay's performance target.
type targetCheck struct {
	Target   string `json:"target"`
	Measured string `json:"measured"`
	// Pass is nil when the figure was not measured in this run.
	Pass *bool `json:"pass"`
}

func (t targetCheck) verdict() string {
	switch {
	case t.Pass == nil:
		return "NOT RUN"
	case *t.Pass:
		return "MET"
	default:
		return "MISSED"
	}
}

func checked(target, measured string, pass bool) targetCheck {
	return targetCheck{Target: target, Measured: measured, Pass: &pass}
}

func notRun(target, reason string) targetCheck {
	return targetCheck{Target: target, Measured: reason}
}

// Targets of the relay, from its performance requirements.
const (
	targetRPS16      = 16_000 // routed live ib-status, 3 replicas, 16 callers
	targetRPS64      = 24_000 // the same at 64 callers
	targetP99At16ms  = 3.0    // p99 of the same at 16 callers
	targetCrossP50ms = 0.5    // cross-replica p50 minus same-replica p50, 1 caller
	targetCrossP99ms = 1.0    // the same for p99
	targetIdleRSSKiB = 20.0   // RSS per idle agent with 10,000 on one replica
	targetIdleP99ms  = 5.0    // ib-status p99 with those 10,000 idle agents
	targetIdleAgents = 10_000
)

// idleCommandLimit returns the maximum Redis commands per second that idle
// replicas send, as store.Redis writes them. Per beat a replica sends SET,
// SADD, PEXPIRE, PUBLISH, and an HSET when a provider changed. Per resync it
// sends SMEMBERS, and a GET and an HGETALL for each other replica.
func idleCommandLimit(replicas int, beat, resync time.Duration) float64 {
	perBeat := 5.0
	perResync := float64(1 + 2*(replicas-1))
	return float64(replicas) * (perBeat/beat.Seconds() + perResync/resync.Seconds())
}

// checkTargets compares the report's figures with the targets.
func checkTargets(r *report, beat, resync time.Duration) []targetCheck {
	find := func(scenario, placement string, c int) *scenarioResult {
		for i := range r.Summary {
			s := &r.Summary[i]
			if s.Scenario == scenario && s.Placement == placement && s.Concurrency == c {
				return s
			}
		}
		return nil
	}
	var out []targetCheck

	for _, t := range []struct {
		callers int
		rps     float64
	}{{16, targetRPS16}, {64, targetRPS64}} {
		name := fmt.Sprintf("live ib-status, cross-replica, %d callers: >= %.0f req/s", t.callers, t.rps)
		if s := find("status-live", placementCross, t.callers); s != nil {
			out = append(out, checked(name, fmt.Sprintf("%.0f req/s (%.0f%% of target; same-replica %s)",
				s.RPS, 100*s.RPS/t.rps, rpsOf(find("status-live", placementSame, t.callers))), s.RPS >= t.rps && s.Errors == 0))
		} else {
			out = append(out, notRun(name, "scenario status-live cross not run at this concurrency"))
		}
	}

	name := fmt.Sprintf("live ib-status, cross-replica, 16 callers: p99 < %.0f ms", targetP99At16ms)
	if s := find("status-live", placementCross, 16); s != nil {
		out = append(out, checked(name, fmt.Sprintf("p99 %.2f ms", s.P99ms), s.P99ms < targetP99At16ms))
	} else {
		out = append(out, notRun(name, "not run"))
	}

	for _, sc := range []string{"status-live", "echo"} {
		name := fmt.Sprintf("%s, 1 caller: cross-replica adds < %.1f ms p50 and < %.0f ms p99", sc, targetCrossP50ms, targetCrossP99ms)
		same, cross := find(sc, placementSame, 1), find(sc, placementCross, 1)
		if same == nil || cross == nil {
			out = append(out, notRun(name, "same and cross at 1 caller not both run"))
			continue
		}
		d50, d99 := cross.P50ms-same.P50ms, cross.P99ms-same.P99ms
		out = append(out, checked(name, fmt.Sprintf("adds %.3f ms p50 (%.3f -> %.3f), %.3f ms p99 (%.3f -> %.3f)",
			d50, same.P50ms, cross.P50ms, d99, same.P99ms, cross.P99ms), d50 < targetCrossP50ms && d99 < targetCrossP99ms))
	}

	out = append(out, idleTargets(r.Idle, beat, resync)...)

	name = "sixteen 4 MB responses in flight at once across replicas all arrive whole"
	if len(r.Large) == 0 {
		out = append(out, notRun(name, "large check not run"))
	} else {
		var parts []string
		pass := true
		for _, l := range r.Large {
			parts = append(parts, fmt.Sprintf("%s: %d/%d of %d bytes", l.Variant, l.Whole, l.Calls, l.ResponseSize))
			pass = pass && l.Whole == l.Calls && l.Calls >= 16 && l.ResponseSize >= 4<<20
		}
		out = append(out, checked(name, strings.Join(parts, "; "), pass))
	}
	return out
}

func idleTargets(idle *idleResult, beat, resync time.Duration) []targetCheck {
	rssName := fmt.Sprintf("%d idle agents on one replica: < %.0f KiB RSS each", targetIdleAgents, targetIdleRSSKiB)
	p99Name := fmt.Sprintf("ib-status with %d idle agents on one replica: p99 < %.0f ms", targetIdleAgents, targetIdleP99ms)
	growthName := "idle Redis commands/s do not grow with the number of agents"
	if idle == nil || len(idle.Steps) < 2 {
		return []targetCheck{notRun(rssName, "idle phase not run"), notRun(p99Name, "idle phase not run"), notRun(growthName, "idle phase not run")}
	}
	var out []targetCheck
	top := idle.Steps[len(idle.Steps)-1]
	if top.Agents >= targetIdleAgents && top.RSSBytes > 0 {
		kib := top.RSSPerAgent / 1024
		out = append(out, checked(rssName, fmt.Sprintf("%.2f KiB per agent (heap %.2f KiB, %.1f goroutines)", kib, top.HeapPerAgent/1024, top.GoroutinesPerAgent), kib < targetIdleRSSKiB))
	} else {
		out = append(out, notRun(rssName, fmt.Sprintf("measured %.2f KiB per agent at %d agents only; run -idle-agents %d", top.RSSPerAgent/1024, top.Agents, targetIdleAgents)))
	}

	if top.Agents >= targetIdleAgents && len(idle.Status) > 0 {
		var parts []string
		pass := true
		for _, s := range idle.Status {
			parts = append(parts, fmt.Sprintf("%s p99 %.2f ms, %d errors", s.Placement, s.P99ms, s.Errors))
			pass = pass && s.P99ms < targetIdleP99ms && s.Errors == 0
		}
		out = append(out, checked(p99Name, strings.Join(parts, "; "), pass))
	} else {
		out = append(out, notRun(p99Name, fmt.Sprintf("ib-status measured with %d idle agents only", top.Agents)))
	}

	// Each replica sends a fixed set of commands per beat and per resync,
	// whatever number of agents it holds, so the count has an upper bound.
	limit := idleCommandLimit(idle.Replicas, beat, resync)
	var parts []string
	pass := true
	for _, s := range idle.Steps {
		parts = append(parts, fmt.Sprintf("%.1f/s with %d", s.RedisCommandsPerSec, s.Agents))
		pass = pass && s.RedisCommandsPerSec <= limit
	}
	out = append(out, checked(growthName, fmt.Sprintf("%s idle agents; bound %.1f/s for %d replicas; bytes in %.0f -> %.0f KiB/s",
		strings.Join(parts, ", "), limit, idle.Replicas, idle.Steps[0].RedisNetInPerSec/1024, top.RedisNetInPerSec/1024), pass))
	return out
}

func rpsOf(s *scenarioResult) string {
	if s == nil {
		return "not run"
	}
	return fmt.Sprintf("%.0f req/s", s.RPS)
}
