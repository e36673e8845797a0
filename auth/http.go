package auth

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// validateKeyPath is the web app's endpoint, relative to HTTPConfig.BaseURL.
const validateKeyPath = "api/ma-options/validate-agent-key"

// Defaults for the zero values of HTTPConfig fields.
const (
	DefaultHTTPTimeout     = 5 * time.Second
	DefaultCacheTTL        = 5 * time.Minute
	DefaultNegativeTTL     = 30 * time.Second
	DefaultMaxConcurrent   = 16
	DefaultMaxCacheEntries = 100_000
)

// maxResponseBytes limits how much of a response body is read. A real
// response is under 100 bytes, and a larger one is treated as a backend
// failure.
const maxResponseBytes = 64 << 10

// failureLogInterval is the minimum time between two warnings about failed
// calls. A backend outage fails every agent's reconnect, which are frequent,
// so the failures in between are only counted and the count is logged with
// the next warning.
const failureLogInterval = 10 * time.Second

// HTTPConfig configures an HTTPValidator. Zero values mean the documented
// defaults.
type HTTPConfig struct {
	// BaseURL is the web app's base URL (API_BASE_URL), http or https, with
	// an optional path prefix. Required.
	BaseURL string

	// Client sends the requests. Nil means a client whose Timeout is
	// Timeout and that follows no redirects, so that the key in the request
	// body is never re-sent to another URL.
	Client *http.Client

	// Timeout limits each call to the endpoint, not counting the wait for
	// a concurrency slot. Zero means 5 s.
	Timeout time.Duration

	// CacheTTL is how long a "valid": true response is reused. A key
	// revoked in the web app keeps working for new connections until its
	// entry expires. Zero means 5 min.
	CacheTTL time.Duration

	// NegativeTTL is how long a "valid": false response is reused. A
	// longer value spares the backend from agents retrying a wrong key, but
	// delays a newly created key by up to this long. Zero means 30 s.
	NegativeTTL time.Duration

	// MaxConcurrent is the maximum number of calls in flight to the
	// endpoint. Further callers wait until their context ends. Zero means
	// 16.
	MaxConcurrent int

	// MaxCacheEntries is the maximum number of cached results, valid and
	// invalid together. Zero means 100000.
	MaxCacheEntries int

	// Logger receives warnings about failed calls. Nil means
	// slog.Default().
	Logger *slog.Logger
}

// HTTPValidator is a Validator that calls the web app's validate-agent-key
// endpoint and caches the results by key digest. Concurrent validations of
// the same key share one call. Backend failures are not cached. It is safe
// for concurrent use.
type HTTPValidator struct {
	// Static after construction.
	endpoint    string
	client      *http.Client
	timeout     time.Duration
	cacheTTL    time.Duration
	negativeTTL time.Duration
	logger      *slog.Logger
	now         func() time.Time // replaced in tests

	slots   chan struct{} // semaphore: one element per call in flight
	cache   *resultCache
	flights flightGroup
	stats   httpCounters

	failureLogMu     sync.Mutex
	lastFailureLog   time.Time // guarded by failureLogMu
	failuresUnlogged int       // guarded by failureLogMu
}

// HTTPStats are an HTTPValidator's counters since construction, for export
// as metrics.
type HTTPStats struct {
	CacheHits    uint64 // validations returned from the cache
	CacheMisses  uint64 // validations not in the cache, each sending or joining a call
	SharedCalls  uint64 // misses that joined a call in flight for the same key
	Calls        uint64 // requests sent to the endpoint
	Failures     uint64 // calls that ended in ErrUnavailable
	CacheEntries int    // entries now cached, expired ones included until removed
}

type httpCounters struct {
	cacheHits, cacheMisses, sharedCalls, calls, failures atomic.Uint64
}

// NewHTTPValidator checks cfg, fills in defaults and returns a validator.
func NewHTTPValidator(cfg HTTPConfig) (*HTTPValidator, error) {
	endpoint, err := endpointURL(cfg.BaseURL)
	if err != nil {
		return nil, err
	}
	if cfg.Timeout < 0 || cfg.CacheTTL < 0 || cfg.NegativeTTL < 0 {
		return nil, errors.New("auth: HTTPConfig Timeout, CacheTTL and NegativeTTL must not be negative")
	}
	if cfg.MaxConcurrent < 0 || cfg.MaxCacheEntries < 0 {
		return nil, errors.New("auth: HTTPConfig MaxConcurrent and MaxCacheEntries must not be negative")
	}

	v := &HTTPValidator{
		endpoint:    endpoint,
		client:      cfg.Client,
		timeout:     orDefault(cfg.Timeout, DefaultHTTPTimeout),
		cacheTTL:    orDefault(cfg.CacheTTL, DefaultCacheTTL),
		negativeTTL: orDefault(cfg.NegativeTTL, DefaultNegativeTTL),
		logger:      cfg.Logger,
		now:         time.Now,
		slots:       make(chan struct{}, orDefault(cfg.MaxConcurrent, DefaultMaxConcurrent)),
		cache:       newResultCache(orDefault(cfg.MaxCacheEntries, DefaultMaxCacheEntries)),
	}
	if v.client == nil {
		v.client = &http.Client{
			Timeout: v.timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		}
	}
	if v.logger == nil {
		v.logger = slog.Default()
	}
	return v, nil
}

// endpointURL checks baseURL and returns the endpoint URL under it.
func endpointURL(baseURL string) (string, error) {
	if baseURL == "" {
		return "", errors.New("auth: HTTPConfig BaseURL is missing, set it to the web app's URL (API_BASE_URL)")
	}
	base, err := url.Parse(baseURL)
	if err != nil {
		// The *url.Error quotes the whole URL, which may contain a password.
		if urlErr, ok := errors.AsType[*url.Error](err); ok {
			err = urlErr.Err
		}
		return "", fmt.Errorf("auth: invalid BaseURL: %w", err)
	}
	if base.Scheme != "http" && base.Scheme != "https" {
		return "", fmt.Errorf("auth: invalid BaseURL %q: the scheme must be http or https", base.Redacted())
	}
	if base.Host == "" {
		return "", fmt.Errorf("auth: invalid BaseURL %q: the host is missing", base.Redacted())
	}
	if base.RawQuery != "" || base.Fragment != "" {
		return "", fmt.Errorf("auth: invalid BaseURL %q: a query or fragment is not allowed", base.Redacted())
	}
	return base.JoinPath(validateKeyPath).String(), nil
}

func orDefault[T comparable](value, fallback T) T {
	var zero T
	if value == zero {
		return fallback
	}
	return value
}

// Validate returns the user id for key from the cache or from the endpoint.
// It returns ErrInvalidKey for an empty key or one the endpoint rejects, and
// an error wrapping ErrUnavailable when the endpoint fails or ctx ends first.
func (v *HTTPValidator) Validate(ctx context.Context, key string) (string, error) {
	if key == "" {
		return "", ErrInvalidKey
	}
	d := digestOf(key)

	if userID, valid, found := v.cache.get(d, v.now()); found {
		v.stats.cacheHits.Add(1)
		if !valid {
			return "", ErrInvalidKey
		}
		return userID, nil
	}
	v.stats.cacheMisses.Add(1)

	userID, shared, err := v.flights.do(ctx, d, func(callCtx context.Context) (string, error) {
		return v.fetch(callCtx, d, key)
	})
	if shared {
		v.stats.sharedCalls.Add(1)
	}
	return userID, err
}

// Stats returns a snapshot of the counters.
func (v *HTTPValidator) Stats() HTTPStats {
	return HTTPStats{
		CacheHits:    v.stats.cacheHits.Load(),
		CacheMisses:  v.stats.cacheMisses.Load(),
		SharedCalls:  v.stats.sharedCalls.Load(),
		Calls:        v.stats.calls.Load(),
		Failures:     v.stats.failures.Load(),
		CacheEntries: v.cache.len(),
	}
}

// fetch waits for a concurrency slot, calls the endpoint and caches a
// definite result. ctx is the shared call's context from flightGroup.do.
func (v *HTTPValidator) fetch(ctx context.Context, d digest, key string) (string, error) {
	// A call for this key may have filled the cache after the caller's
	// cache miss and before this call started.
	if userID, valid, found := v.cache.get(d, v.now()); found {
		if !valid {
			return "", ErrInvalidKey
		}
		return userID, nil
	}

	select {
	case v.slots <- struct{}{}:
	case <-ctx.Done():
		return "", fmt.Errorf("%w: waiting for a free call slot: %w", ErrUnavailable, ctx.Err())
	}
	defer func() { <-v.slots }()

	userID, valid, err := v.post(ctx, key)
	if err != nil {
		// A canceled ctx means every caller gave up, which is not a
		// backend failure.
		if ctx.Err() == nil {
			v.stats.failures.Add(1)
			v.logFailure(d, err)
		}
		return "", err
	}

	now := v.now()
	if !valid {
		v.cache.put(d, "", false, now.Add(v.negativeTTL), now)
		return "", ErrInvalidKey
	}
	v.cache.put(d, userID, true, now.Add(v.cacheTTL), now)
	return userID, nil
}

// validateRequest is the body sent to the endpoint.
type validateRequest struct {
	Key string `json:"key"`
}

// validateResponse is the endpoint's response body. Valid is nil when the
// field is missing.
type validateResponse struct {
	Valid  *bool           `json:"valid"`
	UserID json.RawMessage `json:"userId"`
}

// post sends one request. valid is false with a nil error only for a clear
// {"valid": false} response. Errors wrap ErrUnavailable and never contain
// the key or the response body, which might echo the key.
func (v *HTTPValidator) post(ctx context.Context, key string) (userID string, valid bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()

	body, err := json.Marshal(validateRequest{Key: key})
	if err != nil {
		return "", false, fmt.Errorf("%w: encode request: %w", ErrUnavailable, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, v.endpoint, bytes.NewReader(body))
	if err != nil {
		return "", false, fmt.Errorf("%w: build request: %w", ErrUnavailable, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")

	v.stats.calls.Add(1)
	resp, err := v.client.Do(req)
	if err != nil {
		return "", false, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	defer resp.Body.Close()

	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes+1))
	if err != nil {
		return "", false, fmt.Errorf("%w: read response body (HTTP %d): %w", ErrUnavailable, resp.StatusCode, err)
	}
	if len(data) > maxResponseBytes {
		return "", false, fmt.Errorf("%w: response body (HTTP %d) is larger than %d bytes", ErrUnavailable, resp.StatusCode, maxResponseBytes)
	}
	return parseResponse(resp.StatusCode, data)
}

// parseResponse interprets the endpoint's status and body. A 2xx status needs
// a "valid" field, and "userId" when it is true. A 4xx status counts as an
// invalid key only with a {"valid": false} body, because a 4xx without it
// more likely means a misconfigured URL or proxy than a wrong key.
func parseResponse(status int, data []byte) (userID string, valid bool, err error) {
	var body validateResponse
	decodeErr := json.Unmarshal(data, &body)

	switch {
	case status >= 200 && status < 300:
		if decodeErr != nil {
			return "", false, fmt.Errorf("%w: response body (HTTP %d) is not the expected JSON object", ErrUnavailable, status)
		}
		if body.Valid == nil {
			return "", false, fmt.Errorf("%w: response (HTTP %d) has no \"valid\" field", ErrUnavailable, status)
		}
		if !*body.Valid {
			return "", false, nil
		}
		userID, ok := parseUserID(body.UserID)
		if !ok {
			return "", false, fmt.Errorf("%w: response (HTTP %d) has \"valid\": true but no usable \"userId\"", ErrUnavailable, status)
		}
		return userID, true, nil

	case status >= 400 && status < 500 && decodeErr == nil && body.Valid != nil && !*body.Valid:
		return "", false, nil

	case status >= 300 && status < 400:
		return "", false, fmt.Errorf("%w: endpoint returned HTTP %d (redirects are not followed), so set the base URL to the web app's final URL",
			ErrUnavailable, status)

	default:
		return "", false, fmt.Errorf("%w: endpoint returned HTTP %d", ErrUnavailable, status)
	}
}

// parseUserID accepts a non-empty JSON string or a JSON number, which is kept
// as written.
func parseUserID(raw json.RawMessage) (string, bool) {
	var text string
	if err := json.Unmarshal(raw, &text); err == nil {
		return text, text != ""
	}
	var number json.Number
	if err := json.Unmarshal(raw, &number); err == nil {
		return number.String(), true
	}
	return "", false
}

// logFailure logs a failed call unless another was logged less than
// failureLogInterval ago, and counts the failures it skips for the next line.
func (v *HTTPValidator) logFailure(d digest, err error) {
	v.failureLogMu.Lock()
	now := v.now()
	if now.Sub(v.lastFailureLog) < failureLogInterval {
		v.failuresUnlogged++
		v.failureLogMu.Unlock()
		return
	}
	unlogged := v.failuresUnlogged
	v.lastFailureLog = now
	v.failuresUnlogged = 0
	v.failureLogMu.Unlock()

	v.logger.Warn("agent key validation failed",
		"error", err,
		"key_fingerprint", d.fingerprint(),
		"failures_not_logged", unlogged)
}
