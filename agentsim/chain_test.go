package agentsim

import (
	"encoding/json"
	"testing"
	"time"
)

func TestBuildOptionChainShape(t *testing.T) {
	now := time.Date(2026, 12, 4, 15, 0, 0, 0, time.UTC) // a Friday
	data := buildOptionChain("QQQ", 100_000, now)

	var chain chainData
	if err := json.Unmarshal(data, &chain); err != nil {
		t.Fatalf("chain is not valid JSON: %v", err)
	}
	checkChain(t, chain, "QQQ")
	if chain.Expirations[0] != "20261211" {
		t.Errorf("first expiration = %s, want the next Friday 20261211", chain.Expirations[0])
	}
	if len(chain.Strikes) != chainStrikes {
		t.Errorf("chain has %d strikes, want %d", len(chain.Strikes), chainStrikes)
	}
	for i := 1; i < len(chain.Strikes); i++ {
		if chain.Strikes[i] <= chain.Strikes[i-1] {
			t.Fatalf("strikes are not increasing at %d: %v", i, chain.Strikes[i-1:i+1])
		}
	}
}

func TestStrikeListStaysPositive(t *testing.T) {
	// At 20.37 the strikes are 0.5 apart, and half of them below the price
	// would reach under zero.
	strikes := strikeList(20.37)
	if len(strikes) != chainStrikes {
		t.Errorf("got %d strikes, want %d", len(strikes), chainStrikes)
	}
	if strikes[0] <= 0 {
		t.Errorf("lowest strike = %v, want > 0", strikes[0])
	}
	if strikes[1]-strikes[0] != 0.5 {
		t.Errorf("strike step = %v, want 0.5", strikes[1]-strikes[0])
	}
}

func TestOptionChainCacheSharesData(t *testing.T) {
	now := time.Now()
	first := optionChain("CACHE", 10_000, now)
	second := optionChain("CACHE", 10_000, now)
	if &first[0] != &second[0] {
		t.Error("two requests for the same chain built it twice")
	}
	other := optionChain("CACHE", 20_000, now)
	if len(other) < 20_000 {
		t.Errorf("chain with another size is %d bytes, want at least 20000", len(other))
	}
}

func TestOptionChainCacheIsBounded(t *testing.T) {
	now := time.Now()
	for i := range 3 * chainCacheSize {
		optionChain("BOUND", 1_000+i, now)
	}
	chainCache.mu.Lock()
	defer chainCache.mu.Unlock()
	if n := len(chainCache.entries); n > chainCacheSize {
		t.Errorf("cache holds %d chains, want at most %d", n, chainCacheSize)
	}
	if len(chainCache.order) != len(chainCache.entries) {
		t.Errorf("cache order has %d keys for %d entries", len(chainCache.order), len(chainCache.entries))
	}
}

func TestNextFriday(t *testing.T) {
	tests := map[string]struct {
		now  time.Time
		want string
	}{
		"monday":   {time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC), "2026-12-04"},
		"thursday": {time.Date(2026, 12, 3, 23, 0, 0, 0, time.UTC), "2026-12-04"},
		"friday":   {time.Date(2026, 12, 4, 9, 0, 0, 0, time.UTC), "2026-12-11"},
		"saturday": {time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC), "2026-12-11"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := nextFriday(tc.now).Format(time.DateOnly); got != tc.want {
				t.Errorf("nextFriday(%v) = %s, want %s", tc.now, got, tc.want)
			}
		})
	}
}

func BenchmarkBuildOptionChain5MB(b *testing.B) {
	now := time.Now()
	for b.Loop() {
		buildOptionChain("SPY", 5_000_000, now)
	}
}
