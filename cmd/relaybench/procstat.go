package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicksPerSecond is USER_HZ, the unit of utime and stime in
// /proc/PID/stat. Linux fixes it at 100 on every architecture Go supports,
// so it is not read with sysconf(_SC_CLK_TCK), which Go does not expose.
const clockTicksPerSecond = 100

// processCPU returns the user plus system CPU time that process pid and all
// its threads have used, from /proc/PID/stat.
func processCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(data)
}

// parseStatCPU reads utime and stime, fields 14 and 15 of /proc/PID/stat.
// The command name in field 2 may contain spaces and parentheses, so fields
// are counted from the last ')'.
func parseStatCPU(data []byte) (time.Duration, error) {
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return 0, fmt.Errorf("invalid /proc/PID/stat: no ')' after the command name")
	}
	fields := strings.Fields(string(data[end+1:]))
	// fields[0] is field 3 (state), so utime (14) is fields[11] and stime (15) fields[12].
	if len(fields) < 13 {
		return 0, fmt.Errorf("invalid /proc/PID/stat: %d fields after the command name, expected at least 13", len(fields))
	}
	utime, err := strconv.ParseUint(fields[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid utime %q in /proc/PID/stat: %w", fields[11], err)
	}
	stime, err := strconv.ParseUint(fields[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid stime %q in /proc/PID/stat: %w", fields[12], err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicksPerSecond, nil
}

// processRSS returns the resident set size of process pid in bytes, from
// the VmRSS line of /proc/PID/status.
func processRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return parseVmRSS(f)
}

func parseVmRSS(f io.Reader) (int64, error) {
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "VmRSS:") {
			continue
		}
		fields := strings.Fields(strings.TrimPrefix(line, "VmRSS:"))
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("invalid VmRSS line %q", line)
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("invalid VmRSS line %q: %w", line, err)
		}
		return kb * 1024, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no VmRSS line in /proc/PID/status")
}

// machineCPU returns the CPU time that all CPUs of the machine have spent
// busy (every state but idle and iowait), from the first line of /proc/stat.
func machineCPU() (time.Duration, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	return parseMachineBusy(data)
}

// parseMachineBusy reads the "cpu" line of /proc/stat: user, nice, system,
// idle, iowait, irq, softirq, steal, in clock ticks. Guest time is already
// part of user time, so it is not added.
func parseMachineBusy(data []byte) (time.Duration, error) {
	line, _, _ := bytes.Cut(data, []byte("\n"))
	fields := strings.Fields(string(line))
	if len(fields) < 9 || fields[0] != "cpu" {
		return 0, fmt.Errorf("invalid first line of /proc/stat: %q", line)
	}
	var busy uint64
	for i, f := range fields[1:9] {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("invalid field %d of /proc/stat: %q", i+2, f)
		}
		if i != 3 && i != 4 { // idle and iowait
			busy += n
		}
	}
	return time.Duration(busy) * time.Second / clockTicksPerSecond, nil
}

// cpuSnapshot is the CPU time used so far by each measured process and by
// the whole machine.
type cpuSnapshot struct {
	replicas []time.Duration // by replica, 0 where the PID is unknown
	redis    time.Duration   // 0 without a private redis-server
	self     time.Duration   // this process: HTTP client and simulated agents
	machine  time.Duration   // busy time of all CPUs
}

// cpuDelta is the CPU time used between two snapshots.
type cpuDelta struct {
	Replicas time.Duration
	Redis    time.Duration
	Self     time.Duration
	// Other is the machine's busy time not charged to the processes above:
	// other programs, and kernel work such as softirq that no process pays for.
	Other time.Duration
}

func (b cpuSnapshot) until(a cpuSnapshot) cpuDelta {
	var d cpuDelta
	for i := range a.replicas {
		if i < len(b.replicas) {
			d.Replicas += a.replicas[i] - b.replicas[i]
		}
	}
	d.Redis = a.redis - b.redis
	d.Self = a.self - b.self
	d.Other = max(a.machine-b.machine-d.Replicas-d.Redis-d.Self, 0)
	return d
}

// readCPU takes a snapshot of the CPU time of the given processes. A PID of
// 0 or a process that is gone reads as zero.
func readCPU(replicaPIDs []int, redisPID int) cpuSnapshot {
	s := cpuSnapshot{replicas: make([]time.Duration, len(replicaPIDs))}
	for i, pid := range replicaPIDs {
		if pid > 0 {
			s.replicas[i], _ = processCPU(pid)
		}
	}
	if redisPID > 0 {
		s.redis, _ = processCPU(redisPID)
	}
	s.self, _ = processCPU(os.Getpid())
	s.machine, _ = machineCPU()
	return s
}
