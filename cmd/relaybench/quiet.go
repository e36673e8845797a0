package main

import (
	"context"
	"time"
)

// quietSample is how long one check of the machine's other CPU use lasts.
const quietSample = time.Second

// waitQuiet waits, at most -quiet-wait, until programs other than the
// measured processes use less than -quiet-cores of CPU over one second, so
// that a run does not share the CPUs with, say, a test suite started by
// someone else. It returns the last reading in cores and whether it was
// below the limit.
func (b *bench) waitQuiet(ctx context.Context, pids []int) (otherCores float64, quiet bool) {
	deadline := time.Now().Add(b.opts.quietWait)
	logged := false
	for {
		s0 := readCPU(pids, b.cluster.redisPID)
		t0 := time.Now()
		if !sleepFor(ctx, quietSample) {
			return otherCores, false
		}
		otherCores = s0.until(readCPU(pids, b.cluster.redisPID)).Other.Seconds() / time.Since(t0).Seconds()
		if otherCores <= b.opts.quietCores {
			return otherCores, true
		}
		if !time.Now().Before(deadline) {
			b.log.Warn("other programs still use the CPUs; measuring anyway", "other_cores", round2(otherCores))
			return otherCores, false
		}
		if !logged {
			b.log.Info("waiting for other programs to leave the CPUs", "other_cores", round2(otherCores), "max_wait", b.opts.quietWait)
			logged = true
		}
	}
}
