package relay

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/relay-project/relay/store"
)

// apiError is an error response of the backend API: {"error": code, "message": text}.
type apiError struct {
	status    int
	code      string
	message   string
	requestID string // the routed request's id, when one was sent
}

func (e *apiError) Error() string { return e.code + ": " + e.message }

func apiErr(status int, code, message string) error {
	return &apiError{status: status, code: code, message: message}
}

func invalid(format string, args ...any) error {
	return apiErr(http.StatusBadRequest, codeInvalidRequest, fmt.Sprintf(format, args...))
}

// handleHTTPError writes every error as the API's JSON error object.
func (s *Server) handleHTTPError(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	var ae *apiError
	var he *echo.HTTPError
	switch {
	case errors.As(err, &ae):
	case errors.As(err, &he):
		ae = &apiError{status: he.Code, code: httpErrorCode(he.Code), message: fmt.Sprint(he.Message)}
	default:
		s.log.Error("backend API handler failed", "path", c.Path(), "err", err)
		ae = &apiError{status: http.StatusInternalServerError, code: "internal_error", message: "The relay failed to handle the request."}
	}
	body := map[string]string{"error": ae.code, "message": ae.message}
	if ae.requestID != "" {
		body["request_id"] = ae.requestID
		c.Response().Header().Set(echo.HeaderXRequestID, ae.requestID)
	}
	_ = c.JSON(ae.status, body)
}

func httpErrorCode(status int) string {
	switch status {
	case http.StatusNotFound:
		return "not_found"
	case http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case http.StatusRequestEntityTooLarge:
		return "body_too_large"
	case http.StatusUnauthorized:
		return codeUnauthorized
	}
	return codeInvalidRequest
}

// requireToken checks the bearer token of backend calls when one is configured.
func (s *Server) requireToken(next echo.HandlerFunc) echo.HandlerFunc {
	if s.cfg.APIToken == "" {
		return next
	}
	want := []byte("Bearer " + s.cfg.APIToken)
	return func(c echo.Context) error {
		got := []byte(c.Request().Header.Get(echo.HeaderAuthorization))
		if subtle.ConstantTimeCompare(got, want) != 1 {
			s.metrics.unauthorized.Inc()
			return apiErr(http.StatusUnauthorized, codeUnauthorized, "Missing or invalid bearer token in the Authorization header.")
		}
		return next(c)
	}
}

func (s *Server) limitBody(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		r := c.Request()
		r.Body = http.MaxBytesReader(c.Response(), r.Body, s.cfg.MaxBodyBytes)
		return next(c)
	}
}

func (s *Server) handleHealthz(c echo.Context) error {
	return c.JSON(http.StatusOK, map[string]string{"status": "ok", "replica": s.id})
}

// handleReadyz fails only while draining. A Redis outage is reported in the
// body but does not fail readiness: every replica would fail at once and the
// load balancer would cut off every agent.
func (s *Server) handleReadyz(c echo.Context) error {
	status := http.StatusOK
	draining := s.draining.Load()
	if draining {
		status = http.StatusServiceUnavailable
	}
	return c.JSON(status, map[string]any{
		"ready":    !draining,
		"draining": draining,
		"replica":  s.id,
		"agents":   s.agentCount(),
		"store":    s.store.Health(),
	})
}

// providers returns the cluster-wide providers of userID, or of every user
// when userID is empty. When the registry is unavailable it returns this
// replica's own providers and complete false.
func (s *Server) providers(ctx context.Context, userID string) (list []store.Provider, complete bool) {
	var err error
	if userID == "" {
		list, err = s.store.Providers(ctx)
	} else {
		list, err = s.store.UserProviders(ctx, userID)
	}
	if err == nil {
		return list, true
	}
	list = nil
	for _, a := range s.agentList() {
		if userID == "" || a.userID == userID {
			list = append(list, a.snapshot())
		}
	}
	return list, false
}

var errRegistryUnavailable = apiErr(http.StatusServiceUnavailable, codeRegistryUnavailable,
	"The cluster registry is unavailable on this replica: Redis cannot be reached, or its pub/sub subscription stopped delivering. Only agents on this replica can be reached; see /readyz for the store state.")

// registryListing is the response of GET /options/relay/registry.
type registryListing struct {
	ProvidersConnected int              `json:"providers_connected"`
	Providers          []store.Provider `json:"providers"`
	PendingRequests    int              `json:"pending_requests"`
}

func (s *Server) handleRegistry(c echo.Context) error {
	ctx := c.Request().Context()
	list, complete := s.providers(ctx, "")
	if !complete {
		return errRegistryUnavailable
	}
	if list == nil {
		list = []store.Provider{}
	}
	sortForListing(list)
	pending := 0
	if replicas, err := s.store.Replicas(ctx); err == nil {
		for _, r := range replicas {
			pending += r.Pending
		}
	}
	return c.JSON(http.StatusOK, registryListing{ProvidersConnected: len(list), Providers: list, PendingRequests: pending})
}

// sortForListing orders providers by user, then as routing prefers them.
func sortForListing(list []store.Provider) {
	sortByPreference(list)
	slices.SortStableFunc(list, func(a, b store.Provider) int { return strings.Compare(a.UserID, b.UserID) })
}

// flexString accepts a JSON string or number, since backends send user ids as either.
type flexString string

func (f *flexString) UnmarshalJSON(data []byte) error {
	if len(data) > 0 && data[0] == '"' {
		var s string
		if err := json.Unmarshal(data, &s); err != nil {
			return err
		}
		*f = flexString(s)
		return nil
	}
	if string(data) == "null" {
		*f = ""
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(data, &n); err != nil {
		return errors.New("must be a string or a number")
	}
	*f = flexString(n.String())
	return nil
}

// requestBody is the body of POST /options/relay/request.
type requestBody struct {
	RequestType   string          `json:"request_type"`
	Payload       json.RawMessage `json:"payload"`
	UserID        flexString      `json:"user_id"`
	TimeoutMS     *float64        `json:"timeout_ms"`
	ProviderID    string          `json:"provider_id"`
	AllowFallback bool            `json:"allow_fallback"`
}

var requestTypePattern = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.:-]{0,63}$`)

func (s *Server) handleRequest(c echo.Context) error {
	var body requestBody
	dec := json.NewDecoder(c.Request().Body)
	if err := dec.Decode(&body); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return apiErr(http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("The request body is larger than %d bytes.", s.cfg.MaxBodyBytes))
		}
		return invalid("The request body is not valid JSON: %v.", err)
	}
	if !requestTypePattern.MatchString(body.RequestType) {
		return invalid("request_type is missing or invalid: it must be 1 to 64 letters, digits or _ . : -, starting with a letter.")
	}
	payload := bytes.TrimSpace(body.Payload)
	if len(payload) > 0 && payload[0] != '{' && string(payload) != "null" {
		return invalid("payload must be a JSON object.")
	}
	userID := string(body.UserID)
	if userID == "" && body.ProviderID == "" {
		return invalid("user_id is required (or provider_id for one exact provider).")
	}
	timeout, err := parseTimeout(body.TimeoutMS, s.cfg.RequestTimeout, s.cfg.MaxRequestTimeout)
	if err != nil {
		return err
	}

	ctx := c.Request().Context()
	list, complete := s.candidates(ctx, userID, body)
	p, ok := s.selectProvider(list, userID, body)
	if !ok {
		if !complete {
			return errRegistryUnavailable
		}
		return s.noProvider(userID, body)
	}

	id, res := s.roundTrip(ctx, p, body.RequestType, payload, timeout)
	if res.Stale && body.ProviderID == "" {
		// The registry was out of date: choose again without that provider, once.
		if p, ok = s.reselectProvider(ctx, p, userID, body); ok {
			s.log.Info("retrying a request after a stale registry entry", "request_id", id, "provider", p.ID)
			id, res = s.roundTrip(ctx, p, body.RequestType, payload, timeout)
		}
	}
	if res.Failure != "" {
		err := failureError(res).(*apiError)
		err.requestID = id
		return err
	}
	return writeAnswer(c, id, p, res)
}

// reselectProvider chooses a provider again from a fresh listing, leaving out
// the one whose registry entry proved stale.
func (s *Server) reselectProvider(ctx context.Context, stale store.Provider, userID string, body requestBody) (store.Provider, bool) {
	list, _ := s.candidates(ctx, userID, body)
	list = slices.DeleteFunc(list, func(p store.Provider) bool { return p.ID == stale.ID })
	return s.selectProvider(list, userID, body)
}

// candidates returns the providers a request may go to: the user's own, or
// every provider when provider_id is set or fallback may be needed.
func (s *Server) candidates(ctx context.Context, userID string, body requestBody) ([]store.Provider, bool) {
	if userID != "" && body.ProviderID == "" {
		own, complete := s.providers(ctx, userID)
		if len(own) > 0 || !body.AllowFallback || isAccountRequest(body.RequestType) {
			return own, complete
		}
	}
	return s.providers(ctx, "")
}

// selectProvider applies provider_id when given, and the routing preference otherwise.
func (s *Server) selectProvider(list []store.Provider, userID string, body requestBody) (store.Provider, bool) {
	if body.ProviderID == "" {
		return chooseProvider(list, userID, body.RequestType, body.AllowFallback)
	}
	for _, p := range list {
		if p.ID != body.ProviderID {
			continue
		}
		if userID == "" || p.UserID == userID {
			return p, true
		}
		// Another user's provider serves only what fallback allows.
		if body.AllowFallback && !isAccountRequest(body.RequestType) {
			return p, true
		}
	}
	return store.Provider{}, false
}

func (s *Server) noProvider(userID string, body requestBody) error {
	s.metrics.requests.WithLabelValues(requestTypeLabel(body.RequestType), codeNoProvider, "none").Inc()
	switch {
	case body.ProviderID != "":
		return apiErr(http.StatusServiceUnavailable, codeNoProvider, fmt.Sprintf("Provider %s is not connected, or does not serve user %s.", body.ProviderID, userID))
	case body.AllowFallback && isAccountRequest(body.RequestType):
		return apiErr(http.StatusServiceUnavailable, codeNoProvider, fmt.Sprintf("No agent of user %s is connected; %s is an account request and never uses another user's agent.", userID, body.RequestType))
	default:
		return apiErr(http.StatusServiceUnavailable, codeNoProvider, fmt.Sprintf("No agent of user %s is connected to the relay.", userID))
	}
}

// failureError maps a routing failure to its HTTP status.
func failureError(res callResult) error {
	status := http.StatusBadGateway
	switch res.Failure {
	case codeTimeout:
		status = http.StatusGatewayTimeout
	case codeRegistryUnavailable, codeNoProvider:
		status = http.StatusServiceUnavailable
	}
	return apiErr(status, res.Failure, res.Message)
}

// parseTimeout reads timeout_ms: absent means def, and values outside
// 1 ms to maxTimeout are rejected.
func parseTimeout(ms *float64, def, maxTimeout time.Duration) (time.Duration, error) {
	if ms == nil {
		return def, nil
	}
	v := *ms
	if math.IsNaN(v) || v < 1 || v > float64(maxTimeout.Milliseconds()) {
		return 0, invalid("timeout_ms must be between 1 and %d.", maxTimeout.Milliseconds())
	}
	return time.Duration(v * float64(time.Millisecond)), nil
}

// answerHead is the response of POST /options/relay/request without its
// data, which is spliced in as raw JSON so that large data is not re-encoded.
type answerHead struct {
	RequestID  string  `json:"request_id"`
	ProviderID string  `json:"provider_id"`
	InstanceID string  `json:"instance_id"`
	Success    bool    `json:"success"`
	Error      *string `json:"error"`
}

func writeAnswer(c echo.Context, requestID string, p store.Provider, res callResult) error {
	head, err := json.Marshal(answerHead{RequestID: requestID, ProviderID: p.ID, InstanceID: p.InstanceID, Success: res.Success, Error: res.Error})
	if err != nil {
		return err
	}
	data := bytes.TrimSpace(res.Data)
	if len(data) == 0 {
		data = []byte("null")
	}
	w := c.Response()
	w.Header().Set(echo.HeaderContentType, echo.MIMEApplicationJSON)
	w.Header().Set(echo.HeaderXRequestID, requestID)
	w.Header().Set(echo.HeaderContentLength, strconv.Itoa(len(`{"data":`)+len(data)+1+len(head)-1))
	w.WriteHeader(http.StatusOK)
	w.Write([]byte(`{"data":`))
	w.Write(data)
	w.Write([]byte(","))
	_, err = w.Write(head[1:])
	return err
}

func (s *Server) handleAccountEvents(c echo.Context) error {
	userID := c.QueryParam("user_id")
	if userID == "" {
		return invalid("user_id is required.")
	}
	since := 0.0
	if v := c.QueryParam("since"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return invalid("since must be a number of seconds since the Unix epoch, got %q.", v)
		}
		since = f
	}
	events, err := s.store.AccountEvents(c.Request().Context(), userID, since)
	if err != nil {
		return errRegistryUnavailable
	}
	var buf bytes.Buffer
	buf.WriteString(`{"events":[`)
	for i, ev := range events {
		if i > 0 {
			buf.WriteByte(',')
		}
		writeEventWithTime(&buf, ev)
	}
	buf.WriteString("]}")
	return c.JSONBlob(http.StatusOK, buf.Bytes())
}

// writeEventWithTime writes the event's JSON object with received_at added.
func writeEventWithTime(buf *bytes.Buffer, ev store.AccountEvent) {
	msg := bytes.TrimSpace(ev.Message)
	at := strconv.FormatFloat(ev.ReceivedAt, 'f', 6, 64)
	if len(msg) < 2 || msg[0] != '{' || msg[len(msg)-1] != '}' {
		buf.WriteString(`{"received_at":` + at + `}`)
		return
	}
	inner := bytes.TrimSpace(msg[1 : len(msg)-1])
	buf.WriteByte('{')
	if len(inner) > 0 {
		buf.Write(inner)
		buf.WriteByte(',')
	}
	buf.WriteString(`"received_at":` + at + `}`)
}

// clusterView is the answer of GET /options/relay/cluster: what this replica
// sees of the cluster, for operators and the status page.
type clusterView struct {
	Replica      string              `json:"replica"`
	Draining     bool                `json:"draining"`
	Store        store.Health        `json:"store"`
	Replicas     []store.Replica     `json:"replicas"`
	Providers    int                 `json:"providers"`
	AuthFailures []store.AuthFailure `json:"auth_failures"`
	Time         time.Time           `json:"time"`
}

func (s *Server) handleCluster(c echo.Context) error {
	ctx := c.Request().Context()
	view := clusterView{Replica: s.id, Draining: s.draining.Load(), Store: s.store.Health(), Time: time.Now().UTC()}
	replicas, err := s.store.Replicas(ctx)
	if err != nil {
		replicas = []store.Replica{}
	}
	slices.SortFunc(replicas, func(a, b store.Replica) int { return strings.Compare(a.ID, b.ID) })
	view.Replicas = replicas
	list, _ := s.providers(ctx, "")
	view.Providers = len(list)
	// With Redis down, reading the failures would wait for the Redis timeout.
	if view.Store.RegistryOK {
		fctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		view.AuthFailures, err = s.store.AuthFailures(fctx)
		cancel()
	}
	if err != nil || view.AuthFailures == nil {
		view.AuthFailures = []store.AuthFailure{}
	}
	return c.JSON(http.StatusOK, view)
}
