package auth

import (
	"container/list"
	"sync"
	"time"
)

// cacheSweepInterval is the minimum time between two scans of a full cache
// for expired entries. A scan visits every entry, so running it on every
// insert into a full cache would make each insert cost O(entries).
const cacheSweepInterval = time.Second

// resultCache stores validation results by key digest, each until its own
// expiry time. When full it first drops expired entries and then the
// entries inserted longest ago. It is safe for concurrent use.
type resultCache struct {
	maxEntries int // static after construction

	mu        sync.Mutex
	entries   map[digest]*cacheEntry
	order     *list.List // of digest, oldest insertion first
	lastSweep time.Time
}

type cacheEntry struct {
	userID  string // empty for a negative entry
	valid   bool
	expires time.Time
	element *list.Element // the entry's place in resultCache.order
}

func newResultCache(maxEntries int) *resultCache {
	return &resultCache{
		maxEntries: maxEntries,
		entries:    make(map[digest]*cacheEntry),
		order:      list.New(),
	}
}

// get returns the stored result for d. found is false when there is none or
// it expired by now.
func (c *resultCache) get(d digest, now time.Time) (userID string, valid, found bool) {
	c.mu.Lock()
	defer c.mu.Unlock()

	entry, ok := c.entries[d]
	if !ok {
		return "", false, false
	}
	if !now.Before(entry.expires) {
		c.removeLocked(d, entry)
		return "", false, false
	}
	return entry.userID, entry.valid, true
}

// put stores a result for d until expires, replacing any earlier one.
func (c *resultCache) put(d digest, userID string, valid bool, expires, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()

	if entry, ok := c.entries[d]; ok {
		entry.userID, entry.valid, entry.expires = userID, valid, expires
		c.order.MoveToBack(entry.element)
		return
	}

	if len(c.entries) >= c.maxEntries {
		c.makeRoomLocked(now)
	}
	entry := &cacheEntry{userID: userID, valid: valid, expires: expires}
	entry.element = c.order.PushBack(d)
	c.entries[d] = entry
}

// makeRoomLocked frees at least one slot.
func (c *resultCache) makeRoomLocked(now time.Time) {
	if now.Sub(c.lastSweep) >= cacheSweepInterval {
		c.lastSweep = now
		for element := c.order.Front(); element != nil; {
			next := element.Next()
			d := element.Value.(digest)
			if entry := c.entries[d]; !now.Before(entry.expires) {
				c.removeLocked(d, entry)
			}
			element = next
		}
	}
	for len(c.entries) >= c.maxEntries {
		oldest := c.order.Front()
		d := oldest.Value.(digest)
		c.removeLocked(d, c.entries[d])
	}
}

func (c *resultCache) removeLocked(d digest, entry *cacheEntry) {
	c.order.Remove(entry.element)
	delete(c.entries, d)
}

// len returns the number of entries, expired ones included until they are
// removed.
func (c *resultCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
