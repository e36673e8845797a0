package agentsim

import (
	"encoding/json"
	"hash/fnv"
	"math"
	"strconv"
	"sync"
	"time"
)

// Parameters of the simulated option market.
const (
	riskFreeRate = 0.04
	// chainStrikes is the number of strikes per expiration, centered on the
	// underlying price.
	chainStrikes = 80
	// chainCacheSize bounds the number of chains kept, so that a load test
	// with many agents and tickers holds a few chains in memory, not one per
	// agent.
	chainCacheSize = 16
)

// chainKey identifies a cached chain. The day is part of it because the
// expirations and the time to expiry change with it.
type chainKey struct {
	ticker   string
	minBytes int
	day      string
}

type chainEntry struct {
	once sync.Once
	data json.RawMessage
}

// chainCache holds built chains for all agents of the process. Entries are
// evicted in insertion order.
var chainCache struct {
	mu      sync.Mutex
	entries map[chainKey]*chainEntry
	order   []chainKey
}

// optionChain returns the encoded data of a fetch_chain response for ticker,
// at least minBytes long. The data is shared between callers and must not
// be modified.
func optionChain(ticker string, minBytes int, now time.Time) json.RawMessage {
	now = now.UTC()
	key := chainKey{ticker: ticker, minBytes: minBytes, day: now.Format(time.DateOnly)}

	chainCache.mu.Lock()
	if chainCache.entries == nil {
		chainCache.entries = make(map[chainKey]*chainEntry)
	}
	entry, ok := chainCache.entries[key]
	if !ok {
		if len(chainCache.order) >= chainCacheSize {
			delete(chainCache.entries, chainCache.order[0])
			chainCache.order = chainCache.order[1:]
		}
		entry = &chainEntry{}
		chainCache.entries[key] = entry
		chainCache.order = append(chainCache.order, key)
	}
	chainCache.mu.Unlock()

	// Concurrent requests for the same chain wait for one build.
	entry.once.Do(func() {
		entry.data = buildOptionChain(ticker, minBytes, now)
	})
	return entry.data
}

// buildOptionChain builds the data of a fetch_chain response:
//
//	{"ticker": ..., "underlying_price": ..., "expirations": [...],
//	 "strikes": [...], "calls": [row, ...], "puts": [row, ...]}
//
// Each row carries quotes and greeks priced with the Black-Scholes model on
// a volatility smile. Weekly expirations are added until the rows reach
// minBytes, so a large minBytes gives a chain with many expirations.
func buildOptionChain(ticker string, minBytes int, now time.Time) json.RawMessage {
	seed := tickerSeed(ticker)
	spot := 20 + float64(seed%58000)/100 // from 20.00 to 599.99
	strikes := strikeList(spot)

	// A row is about 300 bytes, and calls and puts grow at the same pace.
	calls := make([]byte, 0, minBytes/2+300)
	puts := make([]byte, 0, minBytes/2+300)
	var expirations []string

	firstExpiry := nextFriday(now)
	for len(calls)+len(puts) < minBytes {
		expiry := firstExpiry.AddDate(0, 0, 7*len(expirations))
		expiration := expiry.Format("20060102")
		expirations = append(expirations, expiration)
		// Options expire at the 16:00 close, taken here as 16:00 UTC.
		years := (expiry.Sub(now).Hours() + 16) / (24 * 365)

		for i, strike := range strikes {
			q := priceOption(spot, strike, years, seed)
			expiryIndex := len(expirations) - 1
			calls = appendChainRow(calls, ticker, expiration, strike, "C", q.call, q, rowNoise(seed, expiryIndex, i, 'C'))
			puts = appendChainRow(puts, ticker, expiration, strike, "P", q.put, q, rowNoise(seed, expiryIndex, i, 'P'))
			if len(calls)+len(puts) >= minBytes {
				break
			}
		}
	}

	data := make([]byte, 0, len(calls)+len(puts)+len(expirations)*12+len(strikes)*10+256)
	data = append(data, `{"ticker": `...)
	data = appendPythonString(data, ticker)
	data = append(data, `, "underlying_price": `...)
	data = appendPythonFloat(data, spot)
	data = append(data, `, "expirations": `...)
	data, _ = appendPython(data, expirations)
	data = append(data, `, "strikes": [`...)
	for i, k := range strikes {
		if i > 0 {
			data = append(data, ", "...)
		}
		data = appendPythonFloat(data, k)
	}
	data = append(data, `], "calls": [`...)
	data = append(data, calls...)
	data = append(data, `], "puts": [`...)
	data = append(data, puts...)
	data = append(data, "]}"...)
	return data
}

// strikeList returns chainStrikes increasing, positive strikes centered on
// spot where the price allows it.
func strikeList(spot float64) []float64 {
	step := strikeStep(spot)
	atm := math.Round(spot/step) * step

	strikes := make([]float64, 0, chainStrikes)
	for i := -chainStrikes / 2; len(strikes) < chainStrikes; i++ {
		if k := atm + float64(i)*step; k > 0 {
			strikes = append(strikes, k)
		}
	}
	return strikes
}

func tickerSeed(ticker string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(ticker))
	return h.Sum32()
}

// strikeStep returns the strike spacing of a simulated chain, finer for a
// cheaper underlying.
func strikeStep(spot float64) float64 {
	switch {
	case spot < 25:
		return 0.5
	case spot < 100:
		return 1
	default:
		return 2.5
	}
}

// nextFriday returns midnight UTC of the first Friday after now's day.
func nextFriday(now time.Time) time.Time {
	day := time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, time.UTC)
	days := (int(time.Friday) - int(day.Weekday()) + 7) % 7
	if days == 0 {
		days = 7
	}
	return day.AddDate(0, 0, days)
}

// optionSide is the model value of one option.
type optionSide struct {
	price, delta, theta float64
}

type optionQuote struct {
	call, put   optionSide
	iv          float64
	gamma, vega float64
}

// priceOption prices the call and the put at strike with the Black-Scholes
// model. The volatility is a smile around a base level derived from seed.
func priceOption(spot, strike, years float64, seed uint32) optionQuote {
	years = math.Max(years, 1.0/365)
	base := 0.15 + float64(seed%30)/100
	moneyness := math.Log(strike / spot)
	iv := base - 0.1*moneyness + 0.8*moneyness*moneyness

	sqrtT := math.Sqrt(years)
	d1 := (-moneyness + (riskFreeRate+iv*iv/2)*years) / (iv * sqrtT)
	d2 := d1 - iv*sqrtT
	discount := math.Exp(-riskFreeRate * years)
	density := math.Exp(-d1*d1/2) / math.Sqrt(2*math.Pi)
	decay := -spot * density * iv / (2 * sqrtT)

	return optionQuote{
		call: optionSide{
			price: spot*normCDF(d1) - strike*discount*normCDF(d2),
			delta: normCDF(d1),
			theta: (decay - riskFreeRate*strike*discount*normCDF(d2)) / 365,
		},
		put: optionSide{
			price: strike*discount*normCDF(-d2) - spot*normCDF(-d1),
			delta: normCDF(d1) - 1,
			theta: (decay + riskFreeRate*strike*discount*normCDF(-d2)) / 365,
		},
		iv:    iv,
		gamma: density / (spot * iv * sqrtT),
		vega:  spot * density * sqrtT / 100,
	}
}

func normCDF(x float64) float64 {
	return 0.5 * math.Erfc(-x/math.Sqrt2)
}

// roundTo rounds x to the given number of decimal places.
func roundTo(x float64, places int) float64 {
	scale := math.Pow10(places)
	return math.Round(x*scale) / scale
}

// appendChainRow appends one option row to buf, after ", " unless buf is
// empty.
func appendChainRow(buf []byte, ticker, expiration string, strike float64, right string, side optionSide, q optionQuote, noise uint64) []byte {
	mid := math.Max(side.price, 0.01)
	// The spread is 2% of the price, from 1 cent to 50 cents.
	spread := min(max(0.01, roundTo(mid*0.02, 2)), 0.5)
	bid := roundTo(math.Max(mid-spread/2, 0), 2)
	ask := roundTo(bid+spread, 2)

	if len(buf) > 0 {
		buf = append(buf, ", "...)
	}
	buf = append(buf, `{"symbol": `...)
	buf = appendPythonString(buf, ticker)
	buf = append(buf, `, "expiration": "`...)
	buf = append(buf, expiration...)
	buf = append(buf, `", "strike": `...)
	buf = appendPythonFloat(buf, strike)
	buf = append(buf, `, "right": "`...)
	buf = append(buf, right...)
	buf = append(buf, `", "bid": `...)
	buf = appendPythonFloat(buf, bid)
	buf = append(buf, `, "ask": `...)
	buf = appendPythonFloat(buf, ask)
	buf = append(buf, `, "last": `...)
	buf = appendPythonFloat(buf, roundTo(mid, 2))
	buf = append(buf, `, "volume": `...)
	buf = strconv.AppendUint(buf, noise%5000, 10)
	buf = append(buf, `, "open_interest": `...)
	buf = strconv.AppendUint(buf, (noise>>16)%50000, 10)
	buf = append(buf, `, "iv": `...)
	buf = appendPythonFloat(buf, roundTo(q.iv, 4))
	buf = append(buf, `, "delta": `...)
	buf = appendPythonFloat(buf, roundTo(side.delta, 4))
	buf = append(buf, `, "gamma": `...)
	buf = appendPythonFloat(buf, roundTo(q.gamma, 4))
	buf = append(buf, `, "theta": `...)
	buf = appendPythonFloat(buf, roundTo(side.theta, 4))
	buf = append(buf, `, "vega": `...)
	buf = appendPythonFloat(buf, roundTo(q.vega, 4))
	return append(buf, '}')
}

// rowNoise returns deterministic pseudo-random bits for one row, for volumes
// and open interest that vary from row to row. It is the SplitMix64 finalizer.
func rowNoise(seed uint32, expiryIndex, strikeIndex int, right byte) uint64 {
	x := uint64(seed)<<32 ^ uint64(expiryIndex)<<16 ^ uint64(strikeIndex)<<1 ^ uint64(right)
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}
