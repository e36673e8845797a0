package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// backend is a fake web app that serves the validate-agent-key endpoint on
// a loopback port and records what it receives.
type backend struct {
	t       *testing.T
	server  *httptest.Server
	respond func(w http.ResponseWriter, r *http.Request, key string)

	calls       atomic.Int64
	inFlight    atomic.Int64
	maxInFlight atomic.Int64
	received    chan string // each request's key, when not full
}

// newBackend starts a backend that responds with respond. Each request is
// first checked for the method, path, content type and JSON body.
func newBackend(t *testing.T, respond func(w http.ResponseWriter, r *http.Request, key string)) *backend {
	t.Helper()
	b := &backend{t: t, respond: respond, received: make(chan string, 1000)}
	b.server = httptest.NewServer(http.HandlerFunc(b.serveHTTP))
	t.Cleanup(b.server.Close)
	return b
}

func (b *backend) serveHTTP(w http.ResponseWriter, r *http.Request) {
	b.calls.Add(1)
	current := b.inFlight.Add(1)
	defer b.inFlight.Add(-1)
	for {
		highest := b.maxInFlight.Load()
		if current <= highest || b.maxInFlight.CompareAndSwap(highest, current) {
			break
		}
	}

	if r.Method != http.MethodPost {
		b.t.Errorf("request method = %s, want POST", r.Method)
	}
	if r.URL.Path != "/api/ma-options/validate-agent-key" {
		b.t.Errorf("request path = %s, want /api/ma-options/validate-agent-key", r.URL.Path)
	}
	if contentType := r.Header.Get("Content-Type"); contentType != "application/json" {
		b.t.Errorf("request Content-Type = %q, want application/json", contentType)
	}
	var body struct {
		Key string `json:"key"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		b.t.Errorf("request body is not the expected JSON: %v", err)
	}

	select {
	case b.received <- body.Key:
	default:
	}
	b.respond(w, r, body.Key)
}

func (b *backend) url() string { return b.server.URL }

// waitForRequest waits until the backend has received a request and returns
// its key.
func (b *backend) waitForRequest(t *testing.T) string {
	t.Helper()
	select {
	case key := <-b.received:
		return key
	case <-time.After(2 * time.Second):
		t.Fatal("backend received no request within 2 s")
		return ""
	}
}

// respondFromUsers responds from a fixed key-to-user map.
func respondFromUsers(users map[string]string) func(http.ResponseWriter, *http.Request, string) {
	return func(w http.ResponseWriter, _ *http.Request, key string) {
		w.Header().Set("Content-Type", "application/json")
		if user, ok := users[key]; ok {
			fmt.Fprintf(w, `{"valid":true,"userId":%q}`, user)
			return
		}
		fmt.Fprint(w, `{"valid":false}`)
	}
}

// slowly delays respond by delay, or until the request is canceled.
func slowly(delay time.Duration, respond func(http.ResponseWriter, *http.Request, string)) func(http.ResponseWriter, *http.Request, string) {
	return func(w http.ResponseWriter, r *http.Request, key string) {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
		respond(w, r, key)
	}
}

// afterGate holds each request until gate is closed or the request is
// canceled.
func afterGate(gate <-chan struct{}, respond func(http.ResponseWriter, *http.Request, string)) func(http.ResponseWriter, *http.Request, string) {
	return func(w http.ResponseWriter, r *http.Request, key string) {
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
		respond(w, r, key)
	}
}

// newGate returns a channel that is closed at the latest when the test
// ends, before the backend shuts down, and a function that closes it early.
func newGate(t *testing.T) (gate chan struct{}, open func()) {
	gate = make(chan struct{})
	var once sync.Once
	open = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	return gate, open
}

// testClock is a settable clock for cache expiry tests.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// newTestValidator builds a validator for b with cfg, on a test clock.
func newTestValidator(t *testing.T, b *backend, cfg HTTPConfig) (*HTTPValidator, *testClock) {
	t.Helper()
	cfg.BaseURL = b.url()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger
	}
	v, err := NewHTTPValidator(cfg)
	if err != nil {
		t.Fatalf("NewHTTPValidator: %v", err)
	}
	clock := &testClock{now: time.Unix(1_800_000_000, 0)}
	v.now = clock.Now
	return v, clock
}

func TestHTTPValidatorValidAndInvalid(t *testing.T) {
	b := newBackend(t, respondFromUsers(map[string]string{"good-key": "user-1"}))
	v, _ := newTestValidator(t, b, HTTPConfig{})
	ctx := context.Background()

	user, err := v.Validate(ctx, "good-key")
	if err != nil || user != "user-1" {
		t.Errorf("Validate(good-key) = (%q, %v), want (user-1, nil)", user, err)
	}
	if key := b.waitForRequest(t); key != "good-key" {
		t.Errorf("backend received key %q, want good-key", key)
	}

	user, err = v.Validate(ctx, "bad-key")
	if !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Validate(bad-key) error = %v, want ErrInvalidKey", err)
	}
	if user != "" {
		t.Errorf("Validate(bad-key) user = %q, want empty", user)
	}

	if _, err := v.Validate(ctx, ""); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Validate(\"\") error = %v, want ErrInvalidKey", err)
	}
	if calls := b.calls.Load(); calls != 2 {
		t.Errorf("backend calls = %d, want 2 (none for the empty key)", calls)
	}
}

func TestHTTPValidatorCachesValidAnswer(t *testing.T) {
	b := newBackend(t, respondFromUsers(map[string]string{"good-key": "user-1"}))
	v, clock := newTestValidator(t, b, HTTPConfig{CacheTTL: time.Minute})
	ctx := context.Background()

	for range 3 {
		if user, err := v.Validate(ctx, "good-key"); err != nil || user != "user-1" {
			t.Fatalf("Validate = (%q, %v), want (user-1, nil)", user, err)
		}
	}
	if calls := b.calls.Load(); calls != 1 {
		t.Errorf("backend calls within CacheTTL = %d, want 1", calls)
	}
	stats := v.Stats()
	want := HTTPStats{CacheHits: 2, CacheMisses: 1, Calls: 1, CacheEntries: 1}
	if stats != want {
		t.Errorf("Stats = %+v, want %+v", stats, want)
	}

	clock.Advance(time.Minute)
	if user, err := v.Validate(ctx, "good-key"); err != nil || user != "user-1" {
		t.Fatalf("Validate after expiry = (%q, %v), want (user-1, nil)", user, err)
	}
	if calls := b.calls.Load(); calls != 2 {
		t.Errorf("backend calls after CacheTTL = %d, want 2", calls)
	}
}

func TestHTTPValidatorCachesInvalidAnswer(t *testing.T) {
	b := newBackend(t, respondFromUsers(nil))
	v, clock := newTestValidator(t, b, HTTPConfig{CacheTTL: time.Hour, NegativeTTL: 10 * time.Second})
	ctx := context.Background()

	for range 3 {
		if _, err := v.Validate(ctx, "bad-key"); !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("Validate error = %v, want ErrInvalidKey", err)
		}
	}
	if calls := b.calls.Load(); calls != 1 {
		t.Errorf("backend calls within NegativeTTL = %d, want 1", calls)
	}

	// The negative entry expires after NegativeTTL, long before CacheTTL.
	clock.Advance(10 * time.Second)
	if _, err := v.Validate(ctx, "bad-key"); !errors.Is(err, ErrInvalidKey) {
		t.Fatalf("Validate after expiry error = %v, want ErrInvalidKey", err)
	}
	if calls := b.calls.Load(); calls != 2 {
		t.Errorf("backend calls after NegativeTTL = %d, want 2", calls)
	}
}

func TestHTTPValidatorSharesConcurrentCalls(t *testing.T) {
	b := newBackend(t, slowly(200*time.Millisecond, respondFromUsers(map[string]string{"good-key": "user-1"})))
	v, _ := newTestValidator(t, b, HTTPConfig{})

	const callers = 50
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			user, err := v.Validate(context.Background(), "good-key")
			if err != nil || user != "user-1" {
				t.Errorf("Validate = (%q, %v), want (user-1, nil)", user, err)
			}
		})
	}
	wg.Wait()

	if calls := b.calls.Load(); calls != 1 {
		t.Errorf("backend calls = %d, want 1", calls)
	}
	stats := v.Stats()
	if stats.SharedCalls+stats.CacheHits != callers-1 {
		t.Errorf("SharedCalls %d + CacheHits %d = %d, want %d",
			stats.SharedCalls, stats.CacheHits, stats.SharedCalls+stats.CacheHits, callers-1)
	}
}

func TestHTTPValidatorMaxConcurrent(t *testing.T) {
	const maxConcurrent = 4
	b := newBackend(t, slowly(20*time.Millisecond, respondFromUsers(nil)))
	v, _ := newTestValidator(t, b, HTTPConfig{MaxConcurrent: maxConcurrent})

	const keys = 100
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			_, err := v.Validate(context.Background(), fmt.Sprintf("key-%d", i))
			if !errors.Is(err, ErrInvalidKey) {
				t.Errorf("Validate(key-%d) error = %v, want ErrInvalidKey", i, err)
			}
		})
	}
	wg.Wait()

	if calls := b.calls.Load(); calls != keys {
		t.Errorf("backend calls = %d, want %d", calls, keys)
	}
	highest := b.maxInFlight.Load()
	if highest > maxConcurrent {
		t.Errorf("backend saw %d calls in flight, want at most %d", highest, maxConcurrent)
	}
	if highest < 2 {
		t.Errorf("backend saw at most %d call in flight, want calls to run in parallel", highest)
	}
}

func TestHTTPValidatorServerErrorNotCached(t *testing.T) {
	const key = "key-during-outage"
	b := newBackend(t, func(w http.ResponseWriter, _ *http.Request, key string) {
		http.Error(w, "internal error for "+key, http.StatusInternalServerError)
	})
	logger, logs := newTestLogger(t)
	v, _ := newTestValidator(t, b, HTTPConfig{Logger: logger})

	for range 2 {
		_, err := v.Validate(context.Background(), key)
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Validate error = %v, want ErrUnavailable", err)
		}
		if errors.Is(err, ErrInvalidKey) {
			t.Errorf("Validate error %v also matches ErrInvalidKey", err)
		}
		if !strings.Contains(err.Error(), "HTTP 500") {
			t.Errorf("error %q does not name the status", err)
		}
		if strings.Contains(err.Error(), key) {
			t.Errorf("error %q contains the key", err)
		}
	}

	if calls := b.calls.Load(); calls != 2 {
		t.Errorf("backend calls = %d, want 2 because failures are not cached", calls)
	}
	stats := v.Stats()
	if stats.Failures != 2 || stats.CacheEntries != 0 {
		t.Errorf("Stats = %+v, want 2 failures and no cache entries", stats)
	}
	if !strings.Contains(logs.String(), Fingerprint(key)) {
		t.Errorf("log does not name the key's fingerprint:\n%s", logs)
	}
	if strings.Contains(logs.String(), key) {
		t.Errorf("log contains the key:\n%s", logs)
	}
}

func TestHTTPValidatorFailureLogRateLimited(t *testing.T) {
	b := newBackend(t, func(w http.ResponseWriter, _ *http.Request, _ string) {
		w.WriteHeader(http.StatusBadGateway)
	})
	logger, logs := newTestLogger(t)
	v, clock := newTestValidator(t, b, HTTPConfig{Logger: logger})

	for i := range 5 {
		if _, err := v.Validate(context.Background(), fmt.Sprintf("key-%d", i)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Validate error = %v, want ErrUnavailable", err)
		}
	}
	if count := strings.Count(logs.String(), "level=WARN"); count != 1 {
		t.Errorf("5 failures within %v logged %d warnings, want 1", failureLogInterval, count)
	}

	clock.Advance(failureLogInterval)
	if _, err := v.Validate(context.Background(), "key-after-interval"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Validate error = %v, want ErrUnavailable", err)
	}
	if count := strings.Count(logs.String(), "level=WARN"); count != 2 {
		t.Errorf("warnings after the interval = %d, want 2", count)
	}
	if !strings.Contains(logs.String(), "failures_not_logged=4") {
		t.Errorf("second warning does not count the 4 failures not logged:\n%s", logs)
	}
}

func TestHTTPValidatorResponses(t *testing.T) {
	const key = "response-test-key"
	tests := map[string]struct {
		status   int
		body     string
		wantUser string
		wantErr  error
	}{
		"valid":                   {status: 200, body: `{"valid":true,"userId":"user-1"}`, wantUser: "user-1"},
		"valid with extra fields": {status: 200, body: `{"valid":true,"userId":"user-1","plan":"pro"}`, wantUser: "user-1"},
		"numeric user id":         {status: 200, body: `{"valid":true,"userId":42}`, wantUser: "42"},
		"invalid":                 {status: 200, body: `{"valid":false}`, wantErr: ErrInvalidKey},
		"invalid with 401":        {status: 401, body: `{"valid":false,"error":"unknown key"}`, wantErr: ErrInvalidKey},
		"invalid with 404":        {status: 404, body: `{"valid":false}`, wantErr: ErrInvalidKey},
		"valid without user id":   {status: 200, body: `{"valid":true}`, wantErr: ErrUnavailable},
		"valid with empty user":   {status: 200, body: `{"valid":true,"userId":""}`, wantErr: ErrUnavailable},
		"valid with null user":    {status: 200, body: `{"valid":true,"userId":null}`, wantErr: ErrUnavailable},
		"no valid field":          {status: 200, body: `{"userId":"user-1"}`, wantErr: ErrUnavailable},
		"not JSON":                {status: 200, body: `<html>` + key + `</html>`, wantErr: ErrUnavailable},
		"no content":              {status: 204, wantErr: ErrUnavailable},
		"oversized response":      {status: 200, body: `{"valid":true,"userId":"user-1","pad":"` + strings.Repeat("x", maxResponseBytes) + `"}`, wantErr: ErrUnavailable},
		"400 echoing the key":     {status: 400, body: `bad request for key ` + key, wantErr: ErrUnavailable},
		"403 from a proxy":        {status: 403, body: `<html>Forbidden</html>`, wantErr: ErrUnavailable},
		"404 without JSON body":   {status: 404, body: `not found`, wantErr: ErrUnavailable},
		"429 rate limited":        {status: 429, body: `{"error":"rate limited"}`, wantErr: ErrUnavailable},
		"503":                     {status: 503, body: `{"valid":false}`, wantErr: ErrUnavailable},
		"redirect":                {status: 302, wantErr: ErrUnavailable},
	}

	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			b := newBackend(t, func(w http.ResponseWriter, _ *http.Request, _ string) {
				w.WriteHeader(tt.status)
				fmt.Fprint(w, tt.body)
			})
			v, _ := newTestValidator(t, b, HTTPConfig{})

			user, err := v.Validate(context.Background(), key)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Validate error = %v, want %v", err, tt.wantErr)
			}
			if user != tt.wantUser {
				t.Errorf("Validate user = %q, want %q", user, tt.wantUser)
			}
			if err != nil && strings.Contains(err.Error(), key) {
				t.Errorf("error %q contains the key", err)
			}
		})
	}
}

func TestHTTPValidatorTimeout(t *testing.T) {
	b := newBackend(t, slowly(5*time.Second, respondFromUsers(map[string]string{"good-key": "user-1"})))
	v, _ := newTestValidator(t, b, HTTPConfig{Timeout: 50 * time.Millisecond})

	start := time.Now()
	_, err := v.Validate(context.Background(), "good-key")
	elapsed := time.Since(start)

	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Validate error = %v, want ErrUnavailable", err)
	}
	if strings.Contains(err.Error(), "good-key") {
		t.Errorf("error %q contains the key", err)
	}
	if elapsed > time.Second {
		t.Errorf("Validate took %v with a 50ms timeout", elapsed)
	}
	if stats := v.Stats(); stats.Failures != 1 || stats.CacheEntries != 0 {
		t.Errorf("Stats = %+v, want 1 failure and no cache entries", stats)
	}
}

func TestHTTPValidatorNetworkError(t *testing.T) {
	b := newBackend(t, respondFromUsers(nil))
	v, _ := newTestValidator(t, b, HTTPConfig{})
	b.server.Close()

	_, err := v.Validate(context.Background(), "key-for-closed-server")
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Validate error = %v, want ErrUnavailable", err)
	}
	if strings.Contains(err.Error(), "key-for-closed-server") {
		t.Errorf("error %q contains the key", err)
	}
}

func TestHTTPValidatorCancelWhileWaitingForSlot(t *testing.T) {
	gate, openGate := newGate(t)
	b := newBackend(t, afterGate(gate, respondFromUsers(map[string]string{"first-key": "user-1"})))
	v, _ := newTestValidator(t, b, HTTPConfig{MaxConcurrent: 1})

	firstDone := make(chan error, 1)
	go func() {
		_, err := v.Validate(context.Background(), "first-key")
		firstDone <- err
	}()
	b.waitForRequest(t) // first-key now holds the only slot

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := v.Validate(ctx, "second-key")
	elapsed := time.Since(start)

	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Validate error = %v, want ErrUnavailable and context.DeadlineExceeded", err)
	}
	if elapsed > time.Second {
		t.Errorf("Validate took %v with a 50ms context", elapsed)
	}

	openGate()
	if err := <-firstDone; err != nil {
		t.Errorf("first Validate: %v", err)
	}
	// The abandoned second call must not take the freed slot and reach the
	// backend. Give it time to do so if it wrongly would.
	time.Sleep(50 * time.Millisecond)
	if calls := b.calls.Load(); calls != 1 {
		t.Errorf("backend calls = %d, want 1", calls)
	}
	if stats := v.Stats(); stats.Failures != 0 {
		t.Errorf("Failures = %d, want 0 because a canceled caller is not a backend failure", stats.Failures)
	}
}

func TestHTTPValidatorSharedCallOutlivesCanceledCaller(t *testing.T) {
	gate, openGate := newGate(t)
	b := newBackend(t, afterGate(gate, respondFromUsers(map[string]string{"good-key": "user-1"})))
	v, _ := newTestValidator(t, b, HTTPConfig{})

	firstCtx, cancelFirst := context.WithCancel(context.Background())
	firstDone := make(chan error, 1)
	go func() {
		_, err := v.Validate(firstCtx, "good-key")
		firstDone <- err
	}()
	b.waitForRequest(t)

	secondDone := make(chan string, 1)
	go func() {
		user, err := v.Validate(context.Background(), "good-key")
		if err != nil {
			t.Errorf("second Validate: %v", err)
		}
		secondDone <- user
	}()
	waitFor(t, "the second caller joins the call", func() bool { return flightWaiters(v, "good-key") == 2 })

	cancelFirst()
	if err := <-firstDone; !errors.Is(err, context.Canceled) || !errors.Is(err, ErrUnavailable) {
		t.Errorf("first Validate error = %v, want ErrUnavailable and context.Canceled", err)
	}

	openGate()
	if user := <-secondDone; user != "user-1" {
		t.Errorf("second Validate user = %q, want user-1", user)
	}
	if calls := b.calls.Load(); calls != 1 {
		t.Errorf("backend calls = %d, want 1", calls)
	}
}

// flightWaiters returns the number of callers waiting on the call in flight
// for key.
func flightWaiters(v *HTTPValidator, key string) int {
	v.flights.mu.Lock()
	defer v.flights.mu.Unlock()
	f, ok := v.flights.flights[digestOf(key)]
	if !ok {
		return 0
	}
	return f.waiters
}

func TestNewHTTPValidatorDefaults(t *testing.T) {
	v, err := NewHTTPValidator(HTTPConfig{BaseURL: "https://app.example.com"})
	if err != nil {
		t.Fatalf("NewHTTPValidator: %v", err)
	}
	if v.endpoint != "https://app.example.com/api/ma-options/validate-agent-key" {
		t.Errorf("endpoint = %q", v.endpoint)
	}
	if v.timeout != DefaultHTTPTimeout {
		t.Errorf("timeout = %v, want %v", v.timeout, DefaultHTTPTimeout)
	}
	if v.client == nil || v.client.Timeout != DefaultHTTPTimeout {
		t.Errorf("client = %+v, want one with Timeout %v", v.client, DefaultHTTPTimeout)
	}
	if v.cacheTTL != DefaultCacheTTL || v.negativeTTL != DefaultNegativeTTL {
		t.Errorf("cacheTTL, negativeTTL = %v, %v, want %v, %v", v.cacheTTL, v.negativeTTL, DefaultCacheTTL, DefaultNegativeTTL)
	}
	if cap(v.slots) != DefaultMaxConcurrent {
		t.Errorf("slots = %d, want %d", cap(v.slots), DefaultMaxConcurrent)
	}
	if v.cache.maxEntries != DefaultMaxCacheEntries {
		t.Errorf("cache max entries = %d, want %d", v.cache.maxEntries, DefaultMaxCacheEntries)
	}
}

func TestNewHTTPValidatorBaseURL(t *testing.T) {
	valid := map[string]string{
		"host only":        "http://127.0.0.1:3000",
		"trailing slash":   "http://127.0.0.1:3000/",
		"path prefix":      "https://example.com/app",
		"prefix and slash": "https://example.com/app/",
	}
	wantEndpoints := map[string]string{
		"host only":        "http://127.0.0.1:3000/api/ma-options/validate-agent-key",
		"trailing slash":   "http://127.0.0.1:3000/api/ma-options/validate-agent-key",
		"path prefix":      "https://example.com/app/api/ma-options/validate-agent-key",
		"prefix and slash": "https://example.com/app/api/ma-options/validate-agent-key",
	}
	for name, baseURL := range valid {
		t.Run(name, func(t *testing.T) {
			v, err := NewHTTPValidator(HTTPConfig{BaseURL: baseURL})
			if err != nil {
				t.Fatalf("NewHTTPValidator(%q): %v", baseURL, err)
			}
			if v.endpoint != wantEndpoints[name] {
				t.Errorf("endpoint = %q, want %q", v.endpoint, wantEndpoints[name])
			}
		})
	}

	invalid := map[string]HTTPConfig{
		"empty":                  {},
		"no scheme":              {BaseURL: "example.com"},
		"ftp scheme":             {BaseURL: "ftp://example.com"},
		"no host":                {BaseURL: "http://"},
		"query":                  {BaseURL: "https://example.com/?a=1"},
		"fragment":               {BaseURL: "https://example.com/#top"},
		"unparsable":             {BaseURL: "http://[::1"},
		"negative timeout":       {BaseURL: "https://example.com", Timeout: -time.Second},
		"negative cache TTL":     {BaseURL: "https://example.com", CacheTTL: -time.Second},
		"negative max in flight": {BaseURL: "https://example.com", MaxConcurrent: -1},
	}
	for name, cfg := range invalid {
		t.Run("invalid "+name, func(t *testing.T) {
			if _, err := NewHTTPValidator(cfg); err == nil {
				t.Errorf("NewHTTPValidator(%+v) returned no error", cfg)
			}
		})
	}
}

func TestNewHTTPValidatorRedactsPassword(t *testing.T) {
	for _, baseURL := range []string{"ftp://user:hunter2@example.com", "http://user:hunter2@[::1"} {
		_, err := NewHTTPValidator(HTTPConfig{BaseURL: baseURL})
		if err == nil {
			t.Fatalf("NewHTTPValidator(%q) returned no error", baseURL)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("error %q contains the URL's password", err)
		}
	}
}

func TestHTTPValidatorDoesNotFollowRedirects(t *testing.T) {
	elsewhere := newBackend(t, respondFromUsers(map[string]string{"good-key": "user-1"}))
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request, _ string) {
		http.Redirect(w, r, elsewhere.url()+r.URL.Path, http.StatusPermanentRedirect)
	})
	v, _ := newTestValidator(t, b, HTTPConfig{})

	_, err := v.Validate(context.Background(), "good-key")
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Validate error = %v, want ErrUnavailable", err)
	}
	if !strings.Contains(err.Error(), "HTTP 308") {
		t.Errorf("error %q does not name the redirect status", err)
	}
	if calls := elsewhere.calls.Load(); calls != 0 {
		t.Errorf("redirect target received %d requests with the key, want 0", calls)
	}
}
