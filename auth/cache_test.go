package auth

import (
	"strconv"
	"testing"
	"time"
)

func TestResultCacheExpiry(t *testing.T) {
	cache := newResultCache(10)
	start := time.Unix(1_000_000, 0)
	d := digestOf("key")

	cache.put(d, "user-1", true, start.Add(time.Minute), start)

	userID, valid, found := cache.get(d, start.Add(59*time.Second))
	if !found || !valid || userID != "user-1" {
		t.Errorf("get before expiry = (%q, %v, %v), want (user-1, true, true)", userID, valid, found)
	}
	if _, _, found := cache.get(d, start.Add(time.Minute)); found {
		t.Error("get at the expiry time found the entry")
	}
	if n := cache.len(); n != 0 {
		t.Errorf("len after an expired get = %d, want 0", n)
	}
}

func TestResultCacheNegativeEntry(t *testing.T) {
	cache := newResultCache(10)
	now := time.Unix(1_000_000, 0)
	d := digestOf("wrong-key")

	cache.put(d, "", false, now.Add(time.Second), now)

	userID, valid, found := cache.get(d, now)
	if !found || valid || userID != "" {
		t.Errorf("get = (%q, %v, %v), want (\"\", false, true)", userID, valid, found)
	}
}

func TestResultCacheEvictsOldest(t *testing.T) {
	cache := newResultCache(3)
	now := time.Unix(1_000_000, 0)
	for i := range 5 {
		cache.put(digestOf("key-"+strconv.Itoa(i)), "user", true, now.Add(time.Hour), now)
	}

	if n := cache.len(); n != 3 {
		t.Fatalf("len = %d, want 3", n)
	}
	for i, wantFound := range []bool{false, false, true, true, true} {
		if _, _, found := cache.get(digestOf("key-"+strconv.Itoa(i)), now); found != wantFound {
			t.Errorf("key-%d found = %v, want %v", i, found, wantFound)
		}
	}
}

func TestResultCacheEvictsExpiredFirst(t *testing.T) {
	cache := newResultCache(3)
	now := time.Unix(1_000_000, 0)
	cache.put(digestOf("old-valid"), "user", true, now.Add(time.Hour), now)
	cache.put(digestOf("short-lived"), "", false, now.Add(time.Second), now)
	cache.put(digestOf("newer-valid"), "user", true, now.Add(time.Hour), now)

	later := now.Add(2 * time.Second)
	cache.put(digestOf("newest"), "user", true, later.Add(time.Hour), later)

	for _, key := range []string{"old-valid", "newer-valid", "newest"} {
		if _, _, found := cache.get(digestOf(key), later); !found {
			t.Errorf("%s was evicted, want the expired entry evicted instead", key)
		}
	}
}

func TestResultCacheUpdateRefreshesOrder(t *testing.T) {
	cache := newResultCache(2)
	now := time.Unix(1_000_000, 0)
	cache.put(digestOf("a"), "user-a", true, now.Add(time.Hour), now)
	cache.put(digestOf("b"), "user-b", true, now.Add(time.Hour), now)
	cache.put(digestOf("a"), "user-a2", true, now.Add(time.Hour), now) // a is now the newest
	cache.put(digestOf("c"), "user-c", true, now.Add(time.Hour), now)

	if _, _, found := cache.get(digestOf("b"), now); found {
		t.Error("b is still cached, want it evicted as the oldest")
	}
	userID, _, found := cache.get(digestOf("a"), now)
	if !found || userID != "user-a2" {
		t.Errorf("a = (%q, %v), want (user-a2, true)", userID, found)
	}
}
