package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/relay-project/relay/store"
)

// Responses of the relay's backend API, decoded with the field names of the
// API. Provider, replica, health and auth failure records are the store's
// types, which the relay encodes as they are.

// clusterResponse is the response of GET /options/relay/cluster.
type clusterResponse struct {
	Replica      string              `json:"replica"`
	Draining     bool                `json:"draining"`
	Store        store.Health        `json:"store"`
	Replicas     []store.Replica     `json:"replicas"`
	Providers    int                 `json:"providers"`
	AuthFailures []store.AuthFailure `json:"auth_failures"`
	Time         time.Time           `json:"time"`
}

// registryResponse is the response of GET /options/relay/registry.
type registryResponse struct {
	ProvidersConnected int              `json:"providers_connected"`
	Providers          []store.Provider `json:"providers"`
	PendingRequests    int              `json:"pending_requests"`
}

// providerStatus is one checked provider in an ib-status response.
type providerStatus struct {
	ProviderID string `json:"provider_id"`
	UserID     string `json:"user_id"`
	InstanceID string `json:"instance_id"`
	Connected  bool   `json:"connected"`
	Source     string `json:"source"` // "agent" or "heartbeat_cache"
	Error      string `json:"error,omitempty"`
	Message    string `json:"message,omitempty"`
}

// ibStatusResponse is the response of GET /options/relay/ib-status.
type ibStatusResponse struct {
	Connected        bool             `json:"connected"`
	AgentConnected   bool             `json:"agent_connected"`
	Source           string           `json:"source"`
	ProviderStatuses []providerStatus `json:"provider_statuses"`
	Message          string           `json:"message"`
	Providers        []store.Provider `json:"providers"`
	AgentVersion     *string          `json:"agent_version,omitempty"`
	BootPhase        *store.BootPhase `json:"boot_phase,omitempty"`
}

// apiError is the relay's JSON error object.
type apiError struct {
	Code    string `json:"error"`
	Message string `json:"message"`
}

// Error codes of the relay that the diagnosis reads.
const (
	codeRegistryUnavailable  = "registry_unavailable"
	codeUnauthorized         = "unauthorized"
	codeTimeout              = "timeout"
	codeProviderDisconnected = "provider_disconnected"
)

// callMeta describes one HTTP call and how it ended.
type callMeta struct {
	Path   string
	At     time.Time     // local clock, when the call started
	Took   time.Duration // from the start of the call to the end of its response
	Status int           // 0 when no HTTP response came
	// Err is a transport failure, or a response that is neither the expected
	// JSON nor a relay error object.
	Err    string
	APIErr *apiError
}

// call is one HTTP call with its decoded response body. Response is nil
// unless the relay responded 200 with valid JSON.
type call[T any] struct {
	callMeta
	Response *T
}

// failure returns why the call counts as failed to reach a working relay,
// or "" when the relay responded. A relay error object counts as a response
// when its code is registry_unavailable or unauthorized, because the
// diagnosis explains those two.
func (m callMeta) failure() string {
	switch {
	case m.Err != "":
		return m.Path + ": " + m.Err
	case m.APIErr == nil:
		return ""
	case m.APIErr.Code == codeRegistryUnavailable || m.APIErr.Code == codeUnauthorized:
		return ""
	}
	return fmt.Sprintf("%s: HTTP %d %s: %s", m.Path, m.Status, m.APIErr.Code, m.APIErr.Message)
}

// sample is one round of calls. Cached is nil without a user.
type sample struct {
	Cluster  call[clusterResponse]
	Registry call[registryResponse]
	Cached   *call[ibStatusResponse]
}

// observations is everything one doctor run collected. It is the only input
// of diagnose.
type observations struct {
	URL        string
	UserID     string
	StaleAfter time.Duration
	// StatusWait is the timeout_ms sent with the live ib-status call.
	StatusWait time.Duration
	// RelayNow is the relay's clock at the end of sampling, estimated
	// from the time field of the cluster responses, so that heartbeat ages do
	// not depend on the operator's clock.
	RelayNow time.Time
	Samples  []sample
	// Live is the ib-status call that sends ib_status to the agents. It is nil without a
	// user, and when no call of the first sample reached the relay.
	Live *call[ibStatusResponse]
}

// calls returns the metadata of every call in the order they were made.
func (o observations) calls() []callMeta {
	var out []callMeta
	for _, s := range o.Samples {
		out = append(out, s.Cluster.callMeta, s.Registry.callMeta)
		if s.Cached != nil {
			out = append(out, s.Cached.callMeta)
		}
	}
	if o.Live != nil {
		out = append(out, o.Live.callMeta)
	}
	slices.SortStableFunc(out, func(a, b callMeta) int { return a.At.Compare(b.At) })
	return out
}

// maxResponseBytes bounds one response body. A registry listing of thousands of
// providers stays well below it.
const maxResponseBytes = 64 << 20

// client calls the relay's backend API.
type client struct {
	base    *url.URL
	token   string
	timeout time.Duration
	http    *http.Client
}

func newClient(opts doctorOptions) *client {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	// A new connection for every call lets a load balancer that balances
	// connections, not requests, send each call to another replica.
	transport.DisableKeepAlives = true
	return &client{base: opts.baseURL, token: opts.token, timeout: opts.timeout, http: &http.Client{Transport: transport}}
}

// fetch sends GET path?query and decodes a 200 response into T.
func fetch[T any](ctx context.Context, c *client, path string, query url.Values) call[T] {
	target := c.base.JoinPath(path)
	target.RawQuery = query.Encode()
	result := call[T]{callMeta: callMeta{Path: path, At: time.Now()}}
	if len(query) > 0 {
		result.Path += "?" + query.Encode()
	}
	defer func() { result.Took = time.Since(result.At) }()

	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target.String(), nil)
	if err != nil {
		result.Err = err.Error()
		return result
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		result.Err = transportError(ctx, err, c.timeout)
		return result
	}
	defer resp.Body.Close()
	result.Status = resp.StatusCode
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		result.Err = fmt.Sprintf("read response body (HTTP %d): %v", resp.StatusCode, err)
		return result
	}

	if resp.StatusCode != http.StatusOK {
		var ae apiError
		if json.Unmarshal(body, &ae) == nil && ae.Code != "" {
			result.APIErr = &ae
			return result
		}
		result.Err = fmt.Sprintf("HTTP %s, not a relay error object: %s", resp.Status, snippet(body))
		return result
	}
	var decoded T
	if err := json.Unmarshal(body, &decoded); err != nil {
		result.Err = fmt.Sprintf("invalid JSON response (HTTP 200): %v: %s", err, snippet(body))
		return result
	}
	result.Response = &decoded
	return result
}

// transportError describes a failed call without the method and URL that
// net/http repeats in every error.
func transportError(ctx context.Context, err error, timeout time.Duration) string {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Sprintf("no response within %s (-timeout)", timeout)
	}
	var urlErr *url.Error
	if errors.As(err, &urlErr) {
		return urlErr.Err.Error()
	}
	return err.Error()
}

// snippet returns the start of a body for an error message, on one line.
func snippet(body []byte) string {
	const maxRunes = 120
	s := strings.Join(strings.Fields(string(bytes.ToValidUTF8(body, []byte("?")))), " ")
	if runes := []rune(s); len(runes) > maxRunes {
		s = string(runes[:maxRunes]) + "…"
	}
	if s == "" {
		return "(empty body)"
	}
	return strconv.Quote(s)
}

// collect runs the samples and the live ib-status call.
//
// Each sample calls the cluster and registry endpoints, and with a user the
// cached ib-status. The order rotates from one sample to the next. Behind a
// round-robin balancer a fixed order of two calls would send every cluster
// call to one replica and every registry call to another.
func collect(ctx context.Context, opts doctorOptions) observations {
	c := newClient(opts)
	obs := observations{
		URL:        opts.baseURL.String(),
		UserID:     opts.userID,
		StaleAfter: opts.staleAfter,
		StatusWait: statusWait(opts.timeout),
	}

	for i := range opts.samples {
		if i > 0 && ctx.Err() != nil {
			break
		}
		var s sample
		steps := []func(){
			func() { s.Cluster = fetch[clusterResponse](ctx, c, "/options/relay/cluster", nil) },
			func() { s.Registry = fetch[registryResponse](ctx, c, "/options/relay/registry", nil) },
		}
		if opts.userID != "" {
			steps = append(steps, func() {
				cached := fetch[ibStatusResponse](ctx, c, "/options/relay/ib-status", url.Values{"user_id": {opts.userID}, "source": {"cache"}})
				s.Cached = &cached
			})
		}
		for j := range steps {
			steps[(i+j)%len(steps)]()
		}
		obs.Samples = append(obs.Samples, s)
		// Waiting out the timeout of every remaining call is no use when
		// the relay cannot be reached at all.
		if i == 0 && s.Cluster.Err != "" && s.Registry.Err != "" && (s.Cached == nil || s.Cached.Err != "") {
			break
		}
	}

	// Ages are measured at the end of sampling, where the registry and
	// cluster data come from, not after the live call, which may wait for
	// a silent agent for most of -timeout.
	sampledAt := time.Now()

	first := obs.Samples[0]
	reached := first.Cluster.Err == "" || first.Registry.Err == "" || (first.Cached != nil && first.Cached.Err == "")
	if opts.userID != "" && reached && ctx.Err() == nil {
		query := url.Values{"user_id": {opts.userID}, "timeout_ms": {strconv.FormatInt(obs.StatusWait.Milliseconds(), 10)}}
		live := fetch[ibStatusResponse](ctx, c, "/options/relay/ib-status", query)
		obs.Live = &live
	}

	obs.RelayNow = sampledAt.Add(relayClockOffset(obs.Samples))
	return obs
}

// statusWait returns the timeout_ms of the live ib-status call: 3/4 of the
// HTTP timeout, so that the relay's response about a silent agent arrives
// before the HTTP call itself times out.
func statusWait(timeout time.Duration) time.Duration {
	return max(timeout*3/4, time.Millisecond)
}

// relayClockOffset estimates the relay's clock minus the local clock as the
// median over the cluster responses, each compared with the middle of its call.
func relayClockOffset(samples []sample) time.Duration {
	var offsets []time.Duration
	for _, s := range samples {
		a := s.Cluster.Response
		if a == nil || a.Time.IsZero() {
			continue
		}
		mid := s.Cluster.At.Add(s.Cluster.Took / 2)
		offsets = append(offsets, a.Time.Sub(mid))
	}
	if len(offsets) == 0 {
		return 0
	}
	slices.Sort(offsets)
	return offsets[len(offsets)/2]
}
