package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
)

// machineInfo describes where the benchmark ran.
type machineInfo struct {
	CPUs         int    `json:"cpus"`
	CPUModel     string `json:"cpu_model"`
	GoVersion    string `json:"go_version"`
	RedisVersion string `json:"redis_version,omitempty"`
	Commit       string `json:"commit,omitempty"`
	// ChangedFiles counts files that differ from Commit in the work tree.
	ChangedFiles int `json:"changed_files"`
}

// report is everything one relaybench run measured.
type report struct {
	Machine  machineInfo      `json:"machine"`
	Settings map[string]any   `json:"settings"`
	Summary  []scenarioResult `json:"summary"` // medians over the runs of each configuration
	Runs     []scenarioResult `json:"runs"`
	Large    []largeResult    `json:"large,omitempty"`
	Idle     *idleResult      `json:"idle,omitempty"`
	Targets  []targetCheck    `json:"targets"`
	Notes    []string         `json:"notes,omitempty"`
}

func readMachine(redisVersion string) machineInfo {
	m := machineInfo{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), RedisVersion: redisVersion}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if name, value, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "model name" {
				m.CPUModel = strings.TrimSpace(value)
				break
			}
		}
	}
	if out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("git", "status", "--porcelain").Output(); err == nil {
		for line := range strings.SplitSeq(string(out), "\n") {
			if strings.TrimSpace(line) != "" {
				m.ChangedFiles++
			}
		}
	}
	return m
}

// summarize returns, for each configuration, the median of every figure over its runs.
func summarize(runs []scenarioResult) []scenarioResult {
	var keys []string
	byKey := map[string][]scenarioResult{}
	for _, r := range runs {
		if _, ok := byKey[r.key()]; !ok {
			keys = append(keys, r.key())
		}
		byKey[r.key()] = append(byKey[r.key()], r)
	}
	out := make([]scenarioResult, 0, len(keys))
	for _, k := range keys {
		rs := byKey[k]
		med := func(f func(scenarioResult) float64) float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			return median(v)
		}
		s := rs[0]
		s.Run = 0
		s.ErrorSample, s.RedisByCommand = nil, nil
		s.Requests = int64(med(func(r scenarioResult) float64 { return float64(r.Requests) }))
		s.Errors = 0
		for _, r := range rs {
			s.Errors += r.Errors
			s.ErrorSample = append(s.ErrorSample, r.ErrorSample...)
		}
		s.RPS = med(func(r scenarioResult) float64 { return r.RPS })
		s.P50ms = med(func(r scenarioResult) float64 { return r.P50ms })
		s.P90ms = med(func(r scenarioResult) float64 { return r.P90ms })
		s.P99ms = med(func(r scenarioResult) float64 { return r.P99ms })
		s.MaxMs = med(func(r scenarioResult) float64 { return r.MaxMs })
		s.ReplicaCPUPer1k = med(func(r scenarioResult) float64 { return r.ReplicaCPUPer1k })
		s.RedisCPUPer1k = med(func(r scenarioResult) float64 { return r.RedisCPUPer1k })
		s.SelfCPUPer1k = med(func(r scenarioResult) float64 { return r.SelfCPUPer1k })
		s.ReplicaCores = med(func(r scenarioResult) float64 { return r.ReplicaCores })
		s.OtherCores = med(func(r scenarioResult) float64 { return r.OtherCores })
		for _, r := range rs {
			s.Quiet = s.Quiet && r.Quiet
		}
		s.RedisCommandsPerSec = med(func(r scenarioResult) float64 { return r.RedisCommandsPerSec })
		s.RedisPerRequest = med(func(r scenarioResult) float64 { return r.RedisPerRequest })
		out = append(out, s)
	}
	return out
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func round2(f float64) float64 { return math.Round(f*100) / 100 }

// writeJSON writes the report as indented JSON.
func (r *report) writeJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// writeText writes the report as tables.
func (r *report) writeText(w io.Writer) {
	m := r.Machine
	fmt.Fprintf(w, "machine: %d CPUs, %s, %s, Redis %s, commit %s (%d changed files)\n",
		m.CPUs, m.CPUModel, m.GoVersion, orDash(m.RedisVersion), orDash(m.Commit), m.ChangedFiles)
	fmt.Fprintf(w, "settings: %s\n\n", settingsLine(r.Settings))

	if len(r.Summary) > 0 {
		runs := 0
		for _, x := range r.Runs {
			runs = max(runs, x.Run)
		}
		fmt.Fprintf(w, "Load scenarios (median of %d run(s); latency in ms; CPU in ms per 1,000 requests)\n", runs)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "scenario\tplacement\tcallers\treq/s\tp50\tp90\tp99\tmax\terrors\treplica CPU\tredis CPU\tbench CPU\treplica cores\tother cores\tredis cmd/s\tcmd/req\t")
		for _, s := range r.Summary {
			quiet := ""
			if !s.Quiet {
				quiet = " !"
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%d\t%.0f\t%.0f\t%.0f\t%.2f\t%.2f%s\t%.0f\t%.2f\t\n",
				s.Scenario, s.Placement, s.Concurrency, s.RPS, s.P50ms, s.P90ms, s.P99ms, s.MaxMs, s.Errors,
				s.ReplicaCPUPer1k, s.RedisCPUPer1k, s.SelfCPUPer1k, s.ReplicaCores, s.OtherCores, quiet, s.RedisCommandsPerSec, s.RedisPerRequest)
		}
		tw.Flush()
		for _, s := range r.Summary {
			for _, e := range s.ErrorSample {
				fmt.Fprintf(w, "  error in %s: %s\n", s.key(), e)
			}
		}
		fmt.Fprintln(w, "  \"!\": other programs still used more than -quiet-cores when a run of this line started.")
		fmt.Fprintln(w)
	}

	if len(r.Large) > 0 {
		fmt.Fprintln(w, "Large responses sent at once")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "variant\tresponse bytes\twhole/calls\twall ms\tmax ms\tquiet")
		for _, l := range r.Large {
			fmt.Fprintf(tw, "%s\t%d\t%d/%d\t%.0f\t%.0f\t%v\n", l.Variant, l.ResponseSize, l.Whole, l.Calls, l.WallMs, l.MaxMs, l.Quiet)
		}
		tw.Flush()
		for _, l := range r.Large {
			for _, f := range l.Failures {
				fmt.Fprintf(w, "  failure in %q: %s\n", l.Variant, f)
			}
		}
		fmt.Fprintln(w)
	}

	if r.Idle != nil {
		writeIdle(w, r.Idle)
	}

	fmt.Fprintln(w, "Targets")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, t := range r.Targets {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", t.verdict(), t.Target, t.Measured)
	}
	tw.Flush()
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
}

func writeIdle(w io.Writer, idle *idleResult) {
	fmt.Fprintf(w, "Idle agents on replica %s (%d replicas; %d other agents in the cluster; baseline RSS %.1f MiB)\n",
		idle.Replica, idle.Replicas, idle.OtherAgents, float64(idle.BaselineRSS)/(1<<20))
	if idle.Error != "" {
		fmt.Fprintf(w, "  idle phase failed: %s\n", idle.Error)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "agents\tRSS MiB\tRSS KiB/agent\theap KiB/agent\tstack KiB/agent\tgoroutines/agent\tredis cmd/s\tcmd/replica/beat\tredis in KiB/s\tredis out KiB/s\treplica cores\tother cores\t")
	for _, s := range idle.Steps {
		fmt.Fprintf(tw, "%d\t%.1f\t%.2f\t%.2f\t%.2f\t%.2f\t%.1f\t%.2f\t%.1f\t%.1f\t%.3f\t%.2f\t\n",
			s.Agents, float64(s.RSSBytes)/(1<<20), s.RSSPerAgent/1024, s.HeapPerAgent/1024, s.StackPerAgent/1024, s.GoroutinesPerAgent,
			s.RedisCommandsPerSec, s.CommandsPerReplicaBeat, s.RedisNetInPerSec/1024, s.RedisNetOutPerSec/1024, s.ReplicaCores, s.OtherCores)
	}
	tw.Flush()
	for _, s := range idle.Steps {
		if len(s.RedisByCommand) > 0 {
			fmt.Fprintf(w, "  commands with %d idle agents: %s\n", s.Agents, redisDelta{ByCommand: s.RedisByCommand}.commandList())
		}
	}
	for _, s := range idle.Status {
		fmt.Fprintf(w, "  %s, %s, %d callers: %.0f req/s, p50 %.2f ms, p99 %.2f ms, max %.2f ms, %d errors, %.2f other cores\n",
			s.Scenario, s.Placement, s.Concurrency, s.RPS, s.P50ms, s.P99ms, s.MaxMs, s.Errors, s.OtherCores)
	}
	fmt.Fprintln(w)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func settingsLine(settings map[string]any) string {
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%v", k, settings[k])
	}
	return strings.Join(parts, " ")
}
