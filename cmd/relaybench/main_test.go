package main

import (
	"strings"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	// The command name contains a space and a parenthesis, as it may.
	stat := "4242 (relay (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 120 0 0 20 0 9 0 100 0 0"
	got, err := parseStatCPU([]byte(stat))
	if err != nil {
		t.Fatal(err)
	}
	if want := 3700 * time.Millisecond; got != want {
		t.Errorf("parseStatCPU = %v, want %v (370 ticks)", got, want)
	}
}

func TestParseStatCPUInvalid(t *testing.T) {
	if _, err := parseStatCPU([]byte("4242 relay S 1")); err == nil {
		t.Error("parseStatCPU accepted a line without ')'")
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\trelay\nVmPeak:\t  900 kB\nVmRSS:\t   14700 kB\nThreads:\t9\n"
	got, err := parseVmRSS(strings.NewReader(status))
	if err != nil {
		t.Fatal(err)
	}
	if got != 14700*1024 {
		t.Errorf("parseVmRSS = %d, want %d", got, 14700*1024)
	}
}

func TestParseMachineBusy(t *testing.T) {
	stat := "cpu  100 10 50 1000 5 1 4 2 0 0\ncpu0 50 5 25 500 2 0 2 1 0 0\n"
	got, err := parseMachineBusy([]byte(stat))
	if err != nil {
		t.Fatal(err)
	}
	// user+nice+system+irq+softirq+steal = 167 ticks; idle and iowait left out.
	if want := 1670 * time.Millisecond; got != want {
		t.Errorf("parseMachineBusy = %v, want %v", got, want)
	}
}

func TestRedisDeltaLeavesOutInfo(t *testing.T) {
	before := parseRedisInfo("# Commandstats\r\ncmdstat_publish:calls=10,usec=50,usec_per_call=5.00\r\ncmdstat_info:calls=3,usec=9\r\n# Stats\r\ntotal_net_input_bytes:1000\r\ntotal_net_output_bytes:2000\r\n")
	after := parseRedisInfo("# Commandstats\r\ncmdstat_publish:calls=25,usec=90,usec_per_call=5.00\r\ncmdstat_set:calls=4,usec=8\r\ncmdstat_info:calls=9,usec=20\r\n# Stats\r\ntotal_net_input_bytes:1500\r\ntotal_net_output_bytes:2600\r\n")
	d := before.until(after)
	if d.Commands != 19 {
		t.Errorf("commands = %d, want 19 (15 publish + 4 set, info left out)", d.Commands)
	}
	if d.ByCommand["publish"] != 15 || d.ByCommand["set"] != 4 {
		t.Errorf("by command = %v, want publish 15 and set 4", d.ByCommand)
	}
	if _, ok := d.ByCommand["info"]; ok {
		t.Error("INFO calls counted")
	}
	if d.NetInBytes != 500 || d.NetOutBytes != 600 {
		t.Errorf("net bytes = %d in, %d out, want 500 and 600", d.NetInBytes, d.NetOutBytes)
	}
	if got := d.commandList(); got != "publish=15 set=4" {
		t.Errorf("commandList = %q", got)
	}
}

func TestPercentile(t *testing.T) {
	var sorted []time.Duration
	for i := 1; i <= 100; i++ {
		sorted = append(sorted, time.Duration(i)*time.Millisecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 50 * time.Millisecond}, {0.9, 90 * time.Millisecond}, {0.99, 99 * time.Millisecond}, {1, 100 * time.Millisecond}} {
		if got := percentile(sorted, c.q); got != c.want {
			t.Errorf("percentile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	if got := percentile(nil, 0.5); got != 0 {
		t.Errorf("percentile of nothing = %v, want 0", got)
	}
}

func TestPlanCallsCross(t *testing.T) {
	replicas := []*replicaProc{{base: "http://a"}, {base: "http://b"}, {base: "http://c"}}
	sc := newScenarios(&options{echoBytes: 200, chainBytes: 1})["status-cache"]
	users := []string{"user0", "user1", "user2"}
	calls := planCalls(sc, replicas, users, []int{0, 1, 2}, placementCross)
	if len(calls) != 6 {
		t.Fatalf("%d calls, want 6: each user through both other replicas", len(calls))
	}
	for i, c := range calls {
		user := users[i%3]
		own := replicas[i%3].base
		if strings.HasPrefix(c.url, own) {
			t.Errorf("call %d for %s goes to its own replica: %s", i, user, c.url)
		}
		if !strings.Contains(c.url, "user_id="+user+"&") {
			t.Errorf("call %d: %s does not name %s", i, c.url, user)
		}
	}
	same := planCalls(sc, replicas, users, []int{0, 1, 2}, placementSame)
	for i, c := range same {
		if !strings.HasPrefix(c.url, replicas[i].base) {
			t.Errorf("same-replica call %d goes to %s", i, c.url)
		}
	}
}

func TestIdleLadder(t *testing.T) {
	o := &options{idleAgents: 1000, redisIdleAgents: []int{100, 1000, 10000}}
	got := idleLadder(o)
	if len(got) != 2 || got[0] != 100 || got[1] != 1000 {
		t.Errorf("idleLadder = %v, want [100 1000]", got)
	}
}

func TestMedian(t *testing.T) {
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median of 3 values = %v, want 2", got)
	}
	if got := median([]float64{4, 1, 2, 3}); got != 2.5 {
		t.Errorf("median of 4 values = %v, want 2.5", got)
	}
}
