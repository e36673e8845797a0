package relay

import (
	"sync"
	"time"
)

// failureLimiter counts failed agent authentications per client address in a
// fixed window and blocks an address that reaches the limit until its window
// ends.
type failureLimiter struct {
	limit  int
	window time.Duration

	mu      sync.Mutex
	entries map[string]*failureWindow
}

type failureWindow struct {
	start    time.Time
	count    int
	reported bool // the block of this window has been recorded
}

// maxLimiterEntries bounds the limiter's memory under a flood from many addresses.
const maxLimiterEntries = 100_000

func newFailureLimiter(limit int, window time.Duration) *failureLimiter {
	return &failureLimiter{limit: limit, window: window, entries: make(map[string]*failureWindow)}
}

func (l *failureLimiter) blocked(ip string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.entries[ip]
	return w != nil && now.Sub(w.start) < l.window && w.count >= l.limit
}

// firstBlock reports whether this is the first time ip is turned away in its
// current window, so that the block is recorded once, not per attempt.
func (l *failureLimiter) firstBlock(ip string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.entries[ip]
	if w == nil || w.reported {
		return false
	}
	w.reported = true
	return true
}

func (l *failureLimiter) fail(ip string, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.entries[ip]
	if w == nil || now.Sub(w.start) >= l.window {
		if len(l.entries) >= maxLimiterEntries {
			l.pruneLocked(now)
		}
		l.entries[ip] = &failureWindow{start: now, count: 1}
		return
	}
	w.count++
}

// pruneLocked drops expired windows, or every window if none has expired.
func (l *failureLimiter) pruneLocked(now time.Time) {
	for ip, w := range l.entries {
		if now.Sub(w.start) >= l.window {
			delete(l.entries, ip)
		}
	}
	if len(l.entries) >= maxLimiterEntries {
		clear(l.entries)
	}
}
