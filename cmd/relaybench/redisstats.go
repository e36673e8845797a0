package main

import (
	"bufio"
	"context"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// redisCounters are the cumulative counters of one Redis server.
type redisCounters struct {
	calls       map[string]int64 // commands by name, from INFO commandstats
	netInBytes  int64            // total_net_input_bytes
	netOutBytes int64            // total_net_output_bytes
}

// readRedisCounters reads INFO commandstats and INFO stats. The INFO calls
// this tool makes appear in the counts as "info" and are left out of totals.
func readRedisCounters(ctx context.Context, client *redis.Client) (redisCounters, error) {
	text, err := client.Info(ctx, "commandstats", "stats").Result()
	if err != nil {
		return redisCounters{}, err
	}
	return parseRedisInfo(text), nil
}

// parseRedisInfo reads lines such as "cmdstat_publish:calls=12,usec=40,..."
// and "total_net_input_bytes:1234" from INFO output.
func parseRedisInfo(text string) redisCounters {
	c := redisCounters{calls: make(map[string]int64)}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(name, "cmdstat_"):
			for field := range strings.SplitSeq(value, ",") {
				if n, ok := strings.CutPrefix(field, "calls="); ok {
					calls, _ := strconv.ParseInt(n, 10, 64)
					c.calls[strings.TrimPrefix(name, "cmdstat_")] = calls
				}
			}
		case name == "total_net_input_bytes":
			c.netInBytes, _ = strconv.ParseInt(value, 10, 64)
		case name == "total_net_output_bytes":
			c.netOutBytes, _ = strconv.ParseInt(value, 10, 64)
		}
	}
	return c
}

// redisDelta is the Redis traffic between two readings.
type redisDelta struct {
	Commands    int64            `json:"commands"`
	ByCommand   map[string]int64 `json:"by_command"`
	NetInBytes  int64            `json:"net_in_bytes"`
	NetOutBytes int64            `json:"net_out_bytes"`
}

// until returns the traffic from b to a, without this tool's INFO calls.
func (b redisCounters) until(a redisCounters) redisDelta {
	d := redisDelta{ByCommand: make(map[string]int64)}
	for name, calls := range a.calls {
		if name == "info" {
			continue
		}
		if n := calls - b.calls[name]; n > 0 {
			d.ByCommand[name] = n
			d.Commands += n
		}
	}
	d.NetInBytes = a.netInBytes - b.netInBytes
	d.NetOutBytes = a.netOutBytes - b.netOutBytes
	return d
}

// commandList formats ByCommand as "publish=120 hset=3", largest first.
func (d redisDelta) commandList() string {
	names := slices.Collect(maps.Keys(d.ByCommand))
	slices.SortFunc(names, func(x, y string) int {
		if d.ByCommand[x] != d.ByCommand[y] {
			return int(d.ByCommand[y] - d.ByCommand[x])
		}
		return strings.Compare(x, y)
	})
	parts := make([]string, len(names))
	for i, name := range names {
		parts[i] = name + "=" + strconv.FormatInt(d.ByCommand[name], 10)
	}
	return strings.Join(parts, " ")
}
