package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// redisLogger routes go-redis's own log lines, which it prints as plain text
// by default, into the structured log. During a Redis outage go-redis logs
// every failed dial, so lines are rate-limited: at most one per interval,
// with the count of the lines suppressed since the last one.
type redisLogger struct {
	log      *slog.Logger
	interval time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func newRedisLogger(log *slog.Logger, interval time.Duration) *redisLogger {
	return &redisLogger{log: log.With("component", "go-redis"), interval: interval}
}

// Printf implements go-redis's logging interface.
func (l *redisLogger) Printf(_ context.Context, format string, v ...any) {
	l.mu.Lock()
	now := time.Now()
	if now.Sub(l.last) < l.interval {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := l.suppressed
	l.last, l.suppressed = now, 0
	l.mu.Unlock()
	l.log.Warn(fmt.Sprintf(format, v...), "suppressed_since_last", suppressed)
}
