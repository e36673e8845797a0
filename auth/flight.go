package auth

import (
	"context"
	"fmt"
	"sync"
)

// flightGroup lets concurrent validations of the same key share one call to
// the backend. It is safe for concurrent use.
type flightGroup struct {
	mu      sync.Mutex
	flights map[digest]*flight
}

// flight is one shared call. Its result fields are written before done is
// closed and only read after.
type flight struct {
	done   chan struct{}
	userID string
	err    error

	cancel  context.CancelFunc // cancels the call's context
	waiters int                // guarded by flightGroup.mu
}

// do runs fn once for all callers that ask for d while a call is in flight,
// and returns its result. shared is true when this caller joined a call that
// another caller started.
//
// The call runs on its own goroutine with a context that keeps the values of
// the first caller's context but not its cancellation. The context is
// canceled when every caller waiting for the call has given up, so one
// impatient caller does not fail the others, and a call that no caller waits
// for stops, even while it waits for a concurrency slot. A caller whose ctx ends
// first gets an error wrapping ErrUnavailable and ctx.Err().
func (g *flightGroup) do(ctx context.Context, d digest, fn func(context.Context) (string, error)) (userID string, shared bool, err error) {
	g.mu.Lock()
	f, shared := g.flights[d]
	if !shared {
		if g.flights == nil {
			g.flights = make(map[digest]*flight)
		}
		callCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel}
		g.flights[d] = f
		go g.run(callCtx, d, f, fn)
	}
	f.waiters++
	g.mu.Unlock()

	select {
	case <-f.done:
		return f.userID, shared, f.err
	case <-ctx.Done():
		g.leave(d, f)
		return "", shared, fmt.Errorf("%w: %w", ErrUnavailable, ctx.Err())
	}
}

func (g *flightGroup) run(ctx context.Context, d digest, f *flight, fn func(context.Context) (string, error)) {
	f.userID, f.err = fn(ctx)

	g.mu.Lock()
	if g.flights[d] == f {
		delete(g.flights, d)
	}
	g.mu.Unlock()

	f.cancel()
	close(f.done)
}

// leave removes one waiter from f. The last waiter to leave cancels the call
// and removes it from the group, so that a later caller starts a new call
// instead of joining a canceled one.
func (g *flightGroup) leave(d digest, f *flight) {
	g.mu.Lock()
	defer g.mu.Unlock()

	f.waiters--
	if f.waiters > 0 {
		return
	}
	f.cancel()
	if g.flights[d] == f {
		delete(g.flights, d)
	}
}
