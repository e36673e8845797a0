package store

import "sync/atomic"

// Metrics counts store events for export by the caller.
type Metrics struct {
	RedisErrors   atomic.Int64 // failed Redis calls
	Reloads       atomic.Int64 // registry view reloads
	Rewrites      atomic.Int64 // full rewrites of this replica's hash
	UnknownEvents atomic.Int64 // registry events or records that could not be read
	PubSubStalls  atomic.Int64 // times pub/sub stopped delivering
	Resubscribes  atomic.Int64 // subscriptions replaced after a stall
}

func (m *Metrics) inc(c *atomic.Int64) { c.Add(1) }
