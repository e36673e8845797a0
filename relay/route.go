package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/relay-project/relay/store"
)

// Failure codes of a routed request. They are also the backend API's error codes.
const (
	codeTimeout              = "timeout"
	codeProviderDisconnected = "provider_disconnected"
	codeRegistryUnavailable  = "registry_unavailable"
	codeNoProvider           = "no_provider"
	codeInvalidRequest       = "invalid_request"
	codeUnauthorized         = "unauthorized"
)

// peerVersion is the version of the messages replicas send each other. A
// replica drops and counts messages of another version.
const peerVersion = 1

// callResult is the outcome of one routed request: the agent's response, or
// a failure code when no response came.
type callResult struct {
	Success bool
	Data    json.RawMessage // the agent's data as raw JSON; nil means null
	Error   *string
	Failure string // empty when the agent responded
	Message string // the reason the request failed, for people
	// Stale is set when the registry named a replica that no longer holds
	// the agent, so the request never reached it and may be retried.
	Stale bool
}

func failure(code, message string) callResult {
	return callResult{Failure: code, Message: message}
}

// staleFailure is the failure of a request that never reached the agent
// because the registry entry it followed is out of date.
func staleFailure(message string) callResult {
	return callResult{Failure: codeProviderDisconnected, Message: message, Stale: true}
}

// call is a request started on this replica, waiting for its response.
type call struct {
	providerID string
	replica    string
	result     chan callResult // buffered 1; receives exactly one result
}

// peerMessage is the header of a message between replicas. On the wire it is
// one JSON line followed by the body: the request payload or the answer data.
type peerMessage struct {
	V        int     `json:"v"`
	Kind     string  `json:"k"` // "req", "resp" or "fail"
	ID       string  `json:"id"`
	From     string  `json:"from,omitempty"`
	Provider string  `json:"p"`
	Type     string  `json:"t,omitempty"`
	Deadline int64   `json:"dl,omitempty"` // unix milliseconds
	OK       bool    `json:"ok,omitempty"`
	Err      *string `json:"err,omitempty"`
	Code     string  `json:"code,omitempty"`
	Message  string  `json:"msg,omitempty"`
	Stale    bool    `json:"stale,omitempty"`
}

func encodePeerMessage(h peerMessage, body []byte) []byte {
	head, _ := json.Marshal(h)
	msg := make([]byte, 0, len(head)+1+len(body))
	msg = append(msg, head...)
	msg = append(msg, '\n')
	return append(msg, body...)
}

func decodePeerMessage(msg []byte) (peerMessage, []byte, error) {
	var h peerMessage
	i := bytes.IndexByte(msg, '\n')
	if i < 0 {
		return h, nil, errors.New("no header line")
	}
	if err := json.Unmarshal(msg[:i], &h); err != nil {
		return h, nil, fmt.Errorf("invalid header: %w", err)
	}
	return h, msg[i+1:], nil
}

func (s *Server) nextRequestID() string {
	return s.id + "-" + strconv.FormatUint(s.seq.Add(1), 36)
}

// roundTrip sends one request to provider p, on this replica or through the
// bus to the replica that holds it, and waits up to timeout for the answer.
// The first result is the request id, unique in the cluster, which the
// agent receives and the logs of every replica involved contain.
func (s *Server) roundTrip(ctx context.Context, p store.Provider, requestType string, payload []byte, timeout time.Duration) (string, callResult) {
	start := time.Now()
	id := s.nextRequestID()
	route := "local"
	if p.InstanceID != s.id {
		route = "remote"
	}
	res := s.roundTripOnce(ctx, id, p, requestType, payload, timeout)
	outcome := "ok"
	switch {
	case res.Failure != "":
		outcome = res.Failure
	case !res.Success:
		outcome = "agent_error"
	}
	s.metrics.requests.WithLabelValues(requestTypeLabel(requestType), outcome, route).Inc()
	s.metrics.latency.WithLabelValues(route).Observe(time.Since(start).Seconds())
	if res.Failure != "" {
		s.log.Warn("request failed", "request_id", id, "request_type", requestType, "user", p.UserID, "provider", p.ID,
			"instance", p.InstanceID, "error", res.Failure, "message", res.Message)
	}
	return id, res
}

func (s *Server) roundTripOnce(ctx context.Context, id string, p store.Provider, requestType string, payload []byte, timeout time.Duration) callResult {
	deadline := time.Now().Add(timeout)
	c := &call{providerID: p.ID, replica: p.InstanceID, result: make(chan callResult, 1)}
	s.mu.Lock()
	s.calls[id] = c
	s.store.SetPending(len(s.calls))
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.calls, id)
		s.store.SetPending(len(s.calls))
		s.mu.Unlock()
	}()

	if p.InstanceID == s.id {
		a := s.agent(p.ID)
		if a == nil {
			return staleFailure("The agent is no longer connected.")
		}
		if !a.request(id, requestType, payload, "", deadline) {
			return failure(codeProviderDisconnected, "The agent is no longer connected.")
		}
	} else {
		msg := encodePeerMessage(peerMessage{V: peerVersion, Kind: "req", ID: id, From: s.id, Provider: p.ID, Type: requestType, Deadline: deadline.UnixMilli()}, payload)
		err := s.store.Send(ctx, p.InstanceID, msg)
		switch {
		case errors.Is(err, store.ErrReplicaGone):
			return staleFailure(fmt.Sprintf("Replica %s, which held the agent, is gone.", p.InstanceID))
		case err != nil:
			return failure(codeRegistryUnavailable, "The request could not be routed to the agent's replica: Redis is unavailable.")
		}
		s.metrics.peerMessages.WithLabelValues("out", "req").Inc()
	}

	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case res := <-c.result:
		return res
	case <-timer.C:
		return failure(codeTimeout, fmt.Sprintf("The agent did not respond to %s within %d ms.", requestType, timeout.Milliseconds()))
	case <-ctx.Done():
		return failure(codeTimeout, "The caller stopped waiting: "+ctx.Err().Error())
	}
}

func (s *Server) agent(id string) *agentConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.agents[id]
}

// deliver hands a result to the call waiting for request id. Results for
// calls that are gone (timed out, or answered already) or that name another
// provider are dropped and counted.
func (s *Server) deliver(id, providerID string, res callResult) {
	s.mu.Lock()
	c := s.calls[id]
	if c != nil && c.providerID == providerID {
		delete(s.calls, id)
	}
	s.mu.Unlock()
	switch {
	case c == nil:
		s.metrics.lateResponses.WithLabelValues("no_caller").Inc()
		return
	case c.providerID != providerID:
		s.metrics.lateResponses.WithLabelValues("wrong_provider").Inc()
		s.log.Warn("response from a provider other than the request's dropped", "request_id", id, "provider", providerID, "expected", c.providerID)
		return
	}
	c.result <- res
}

// sendResult sends an agent's answer, or a failure, to the replica that
// started the request.
func (s *Server) sendResult(replica, id, providerID string, res callResult) {
	h := peerMessage{V: peerVersion, ID: id, Provider: providerID}
	var body []byte
	if res.Failure != "" {
		h.Kind, h.Code, h.Message, h.Stale = "fail", res.Failure, res.Message, res.Stale
	} else {
		h.Kind, h.OK, h.Err = "resp", res.Success, res.Error
		body = res.Data
	}
	// Not s.ctx: answers must still go out while the server closes.
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WriteTimeout)
	defer cancel()
	if err := s.store.Send(ctx, replica, encodePeerMessage(h, body)); err != nil {
		s.metrics.peerSendErrors.Inc()
		s.log.Warn("response not delivered to the requesting replica", "request_id", id, "to", replica, "err", err)
		return
	}
	s.metrics.peerMessages.WithLabelValues("out", h.Kind).Inc()
}

// sendResultAsync sends a result without blocking the caller, counted in
// sending until it is out.
func (s *Server) sendResultAsync(replica, id, providerID string, res callResult) {
	s.sending.Add(1)
	go func() {
		defer s.sending.Add(-1)
		s.sendResult(replica, id, providerID, res)
	}()
}

// HandleMessage receives a message from another replica. It runs on the
// store's delivery goroutine, so everything that may block runs elsewhere.
func (s *Server) HandleMessage(msg []byte) {
	h, body, err := decodePeerMessage(msg)
	if err != nil || h.V != peerVersion {
		s.metrics.peerMessages.WithLabelValues("in", "unknown").Inc()
		s.log.Debug("message from another replica dropped: unknown format", "version", h.V, "bytes", len(msg), "err", err)
		return
	}
	s.metrics.peerMessages.WithLabelValues("in", h.Kind).Inc()
	switch h.Kind {
	case "req":
		if h.From == "" || h.ID == "" {
			s.log.Debug("request from another replica dropped: no origin or id", "request_id", h.ID)
			return
		}
		a := s.agent(h.Provider)
		if a == nil {
			s.sendResultAsync(h.From, h.ID, h.Provider, staleFailure(fmt.Sprintf("The agent is no longer connected to replica %s.", s.id)))
			return
		}
		if !a.request(h.ID, h.Type, body, h.From, time.UnixMilli(h.Deadline)) {
			s.sendResultAsync(h.From, h.ID, h.Provider, failure(codeProviderDisconnected,
				fmt.Sprintf("The agent on replica %s was disconnected before it took the request.", s.id)))
		}
	case "resp":
		s.deliver(h.ID, h.Provider, callResult{Success: h.OK, Data: body, Error: h.Err})
	case "fail":
		if h.Code == "" {
			h.Code = codeProviderDisconnected
		}
		s.deliver(h.ID, h.Provider, callResult{Failure: h.Code, Message: h.Message, Stale: h.Stale})
	default:
		s.log.Debug("message from another replica dropped: unknown kind", "kind", h.Kind)
	}
}

// HandleReplicaDown fails, at once, every call waiting on a replica that died
// or stopped.
func (s *Server) HandleReplicaDown(replica string) {
	s.mu.Lock()
	var waiting []string
	for id, c := range s.calls {
		if c.replica == replica {
			waiting = append(waiting, id)
		}
	}
	s.mu.Unlock()
	if len(waiting) > 0 {
		s.log.Warn("replica gone with requests in flight", "peer", replica, "requests", len(waiting))
	}
	for _, id := range waiting {
		s.mu.Lock()
		c := s.calls[id]
		s.mu.Unlock()
		if c != nil {
			s.deliver(id, c.providerID, failure(codeProviderDisconnected, fmt.Sprintf("Replica %s, which held the agent, stopped.", replica)))
		}
	}
}

// pingLoop pings every agent each PingInterval. One loop for all agents,
// with a goroutine per agent only while its ping waits, costs less memory
// than a loop per agent.
func (s *Server) pingLoop() {
	t := time.NewTicker(s.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			for _, a := range s.agentList() {
				go a.ping()
			}
		}
	}
}

// sweepLoop drops forwarded requests long past their deadline, so an agent
// that never responds cannot grow memory without bound.
func (s *Server) sweepLoop() {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-t.C:
			for _, a := range s.agentList() {
				a.expireInflight(now)
			}
		}
	}
}
