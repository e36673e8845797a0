package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/labstack/echo/v4"

	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/protocol"
	"github.com/relay-project/relay/store"
)

// closeReason is the reason the relay ends an agent connection: the WebSocket
// close status, the text sent with it, and the label counted in metrics. A reason
// without text drops the socket at once, with no close handshake: the peer
// is unresponsive, and the handshake would wait for it for seconds.
type closeReason struct {
	code   websocket.StatusCode
	text   string
	metric string
}

var (
	closeRestart       = closeReason{websocket.StatusServiceRestart, "relay restarting, reconnect", "restart"}
	closeShutdown      = closeReason{websocket.StatusGoingAway, "relay shutting down", "shutdown"}
	closeAuthFailed    = closeReason{websocket.StatusPolicyViolation, "authentication failed", "auth_failed"}
	closeAuthTimeout   = closeReason{websocket.StatusPolicyViolation, "no auth message in time", "auth_timeout"}
	closeAuthRetry     = closeReason{websocket.StatusTryAgainLater, "key validation unavailable, retry later", "auth_unavailable"}
	closeSlowReader    = closeReason{websocket.StatusPolicyViolation, "", "slow_reader"}
	closePingTimeout   = closeReason{websocket.StatusGoingAway, "", "ping_timeout"}
	closeAgentGone     = closeReason{websocket.StatusNormalClosure, "", "agent_closed"}
	closeReadFailed    = closeReason{websocket.StatusInternalError, "", "read_failed"}
	closeMessageTooBig = closeReason{websocket.StatusMessageTooBig, "message too big", "message_too_big"}
)

var heartbeatAck = []byte(`{"type":"heartbeat_ack"}`)

// agentConn is one authenticated agent connected to this replica.
type agentConn struct {
	s    *Server
	conn *websocket.Conn
	ip   string

	// Static after authentication.
	id     string
	userID string
	ctx    context.Context
	cancel context.CancelFunc
	send   chan []byte // frames for the writer; never closed

	lastRead  atomic.Int64 // unix nanoseconds of the last frame read
	invalid   atomic.Int64 // invalid frames received
	closeOnce sync.Once
	closing   atomic.Bool // set by close, after reason
	reason    closeReason // set once by close or rejectAuth

	mu sync.Mutex
	// Guarded by mu: the registry record and the requests sent to the agent
	// that it has not responded to yet, by request id.
	state    store.Provider
	inflight map[string]inflightRequest
}

// inflightRequest is a request forwarded to a local agent. origin is the
// replica waiting for the response, or "" when a caller on this replica waits.
type inflightRequest struct {
	origin      string
	requestType string
	deadline    time.Time
}

// handleAgent upgrades an agent's connection and serves it until it closes.
func (s *Server) handleAgent(c echo.Context) error {
	if s.draining.Load() {
		return apiErr(http.StatusServiceUnavailable, "draining", "This relay replica is restarting; connect again to reach another one.")
	}
	ip := c.RealIP()
	if s.limiter.blocked(ip, time.Now()) {
		s.metrics.auth.WithLabelValues("rate_limited").Inc()
		if s.limiter.firstBlock(ip) {
			s.storeAuthFailure(ip, "", fmt.Sprintf("address turned away for up to %s after %d failed authentications",
				s.cfg.AuthFailureWindow, s.cfg.AuthFailureLimit))
		}
		return apiErr(http.StatusTooManyRequests, "rate_limited", "Too many failed authentications from this address; retry later.")
	}
	conn, err := websocket.Accept(c.Response(), c.Request(), nil)
	if err != nil {
		// Accept has already written the HTTP error.
		s.log.Debug("websocket upgrade failed", "ip", ip, "err", err)
		return nil
	}
	conn.SetReadLimit(s.cfg.MaxMessageBytes)

	s.conns.Add(1)
	defer s.conns.Done()
	ctx, cancel := context.WithCancel(s.ctx)
	a := &agentConn{s: s, conn: conn, ip: ip, ctx: ctx, cancel: cancel, send: make(chan []byte, s.cfg.SendQueue), inflight: make(map[string]inflightRequest)}
	a.serve()
	return nil
}

// serve authenticates the agent, registers it and reads its frames until the
// connection ends, then removes it. It blocks for the connection's lifetime.
func (a *agentConn) serve() {
	s := a.s
	defer a.cancel()
	if !a.authenticate() {
		return
	}
	connectedAt := time.Now()
	s.metrics.auth.WithLabelValues("ok").Inc()
	s.log.Info("agent connected", "provider", a.id, "user", a.userID, "version", a.state.AgentVersion, "ip", a.ip)

	go a.writeLoop()
	reason := a.readLoop()

	a.close(reason)
	s.mu.Lock()
	delete(s.agents, a.id)
	s.mu.Unlock()
	a.failInflight()
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WriteTimeout)
	if err := s.store.Unregister(ctx, a.id); err != nil {
		s.log.Warn("agent removal not written to the registry; its entry expires with the replica's TTL", "provider", a.id, "err", err)
	}
	cancel()
	s.metrics.disconnects.WithLabelValues(a.reason.metric).Inc()
	s.log.Info("agent disconnected", "provider", a.id, "user", a.userID, "reason", a.reason.metric,
		"duration", time.Since(connectedAt).Round(time.Millisecond).String())
}

// authenticate reads the first frame, which must be auth, validates the key
// and registers the provider. On failure it sends a failed auth_response and closes the socket.
func (a *agentConn) authenticate() bool {
	s := a.s
	// A read whose context ends closes the socket, so the auth timeout is a
	// timer that sends the rejection while the read waits.
	timer := time.AfterFunc(s.cfg.AuthTimeout, func() {
		s.metrics.auth.WithLabelValues("timeout").Inc()
		s.storeAuthFailure(a.ip, "", "no auth message within "+s.cfg.AuthTimeout.String())
		a.rejectAuth("no auth message within "+s.cfg.AuthTimeout.String(), closeAuthTimeout)
	})
	typ, frame, err := a.conn.Read(a.ctx)
	if !timer.Stop() {
		return false
	}
	if err != nil {
		s.metrics.auth.WithLabelValues("closed").Inc()
		a.conn.CloseNow()
		return false
	}
	msgType, err := protocol.PeekType(frame)
	if typ != websocket.MessageText || err != nil || msgType != protocol.TypeAuth {
		s.metrics.auth.WithLabelValues("protocol_error").Inc()
		s.storeAuthFailure(a.ip, "", "first message was not auth")
		a.rejectAuth(`the first message must be {"type": "auth", "api_key": ...}`, closeAuthFailed)
		return false
	}
	var msg protocol.Auth
	if err := protocol.Decode(frame, msgType, &msg); err != nil || msg.APIKey == "" {
		s.metrics.auth.WithLabelValues("protocol_error").Inc()
		a.rejectAuth("auth message has no api_key", closeAuthFailed)
		return false
	}

	vctx, vcancel := context.WithTimeout(a.ctx, s.cfg.ValidateTimeout)
	userID, err := s.cfg.Auth.Validate(vctx, msg.APIKey)
	vcancel()
	switch {
	case errors.Is(err, auth.ErrInvalidKey):
		s.metrics.auth.WithLabelValues("invalid_key").Inc()
		s.recordAuthFailure(a.ip, msg.APIKey, "invalid API key")
		s.limiter.fail(a.ip, time.Now())
		a.rejectAuth("invalid API key", closeAuthFailed)
		return false
	case err != nil:
		s.metrics.auth.WithLabelValues("unavailable").Inc()
		s.log.Warn("agent key validation failed", "ip", a.ip, "key", auth.Fingerprint(msg.APIKey), "err", err)
		a.rejectAuth("key validation is unavailable, retry later", closeAuthRetry)
		return false
	}

	version := msg.Version
	if version == "" {
		version = protocol.DefaultAgentVersion
	}
	now := time.Now().UTC()
	a.id = newID(8)
	a.userID = userID
	a.state = store.Provider{
		ID: a.id, UserID: userID, AgentVersion: version, IBAccounts: []string{},
		ConnectedAt: now, LastHeartbeat: now, IsActive: true, InstanceID: s.id,
	}
	a.lastRead.Store(now.UnixNano())

	s.mu.Lock()
	s.agents[a.id] = a
	s.mu.Unlock()
	rctx, rcancel := context.WithTimeout(a.ctx, s.cfg.WriteTimeout)
	if err := s.store.Register(rctx, a.state); err != nil {
		// The agent stays: requests through this replica reach it, and the
		// store writes it again once Redis answers.
		s.log.Warn("agent registered on this replica only; the registry write failed", "provider", a.id, "err", err)
	}
	rcancel()

	resp, _ := json.Marshal(protocol.AuthResponse{Type: protocol.TypeAuthResponse, Success: true, ProviderID: a.id})
	wctx, wcancel := context.WithTimeout(a.ctx, s.cfg.WriteTimeout)
	defer wcancel()
	if err := a.conn.Write(wctx, websocket.MessageText, resp); err != nil {
		s.mu.Lock()
		delete(s.agents, a.id)
		s.mu.Unlock()
		_ = s.store.Unregister(context.Background(), a.id)
		a.conn.CloseNow()
		return false
	}
	return true
}

// rejectAuth sends a failed auth_response and closes the socket.
func (a *agentConn) rejectAuth(text string, reason closeReason) {
	resp, _ := json.Marshal(protocol.AuthResponse{Type: protocol.TypeAuthResponse, Success: false, Error: text})
	ctx, cancel := context.WithTimeout(a.ctx, a.s.cfg.WriteTimeout)
	defer cancel()
	if err := a.conn.Write(ctx, websocket.MessageText, resp); err == nil {
		a.reason = reason
		_ = a.conn.Close(reason.code, reason.text)
		return
	}
	a.conn.CloseNow()
}

// readLoop reads frames until the connection ends and returns why it ended.
func (a *agentConn) readLoop() closeReason {
	for {
		typ, frame, err := a.conn.Read(a.ctx)
		if err != nil {
			return a.readFailure(err)
		}
		a.lastRead.Store(time.Now().UnixNano())
		if typ != websocket.MessageText {
			a.invalidFrame("binary frame", nil)
			continue
		}
		a.handleFrame(frame)
	}
}

func (a *agentConn) readFailure(err error) closeReason {
	switch {
	case a.closing.Load():
		return a.reason // closed by the relay, which set the reason
	case websocket.CloseStatus(err) != -1:
		return closeAgentGone
	case errors.Is(err, websocket.ErrMessageTooBig):
		return closeMessageTooBig
	default:
		a.s.log.Debug("agent read failed", "provider", a.id, "err", err)
		return closeReadFailed
	}
}

// handleFrame acts on one text frame from an authenticated agent. Invalid
// frames are counted and dropped; they never end the connection.
func (a *agentConn) handleFrame(frame []byte) {
	// Responses can be megabytes: those that start with their type skip the
	// first parse, and their decoding below validates them.
	msgType := protocol.TypeResponse
	if !protocol.IsResponse(frame) {
		var err error
		if msgType, err = protocol.PeekType(frame); err != nil {
			a.invalidFrame("invalid JSON or no type", err)
			return
		}
	}
	now := time.Now().UTC()
	switch msgType {
	case protocol.TypeHeartbeat:
		a.enqueue(heartbeatAck)
		a.updateState(func(p *store.Provider) { p.LastHeartbeat = now })
	case protocol.TypeAgentState:
		var msg protocol.AgentState
		if err := protocol.Decode(frame, msgType, &msg); err != nil {
			a.invalidFrame("invalid agent_state", err)
			return
		}
		a.updateState(func(p *store.Provider) {
			p.IBConnected = msg.IBConnected
			p.ExecutionActive = msg.ExecutionActive
			p.ExecutionLinesHeld = msg.ExecutionLinesHeld
			p.AvailableScanLines = msg.AvailableScanLines
			p.AcceptExternalScans = msg.AcceptExternalScans
			p.StateAt = now
			p.LastHeartbeat = now
		})
	case protocol.TypeIBAccounts:
		var msg protocol.IBAccounts
		if err := protocol.Decode(frame, msgType, &msg); err != nil {
			a.invalidFrame("invalid ib_accounts", err)
			return
		}
		if msg.Accounts == nil {
			msg.Accounts = []string{}
		}
		a.updateState(func(p *store.Provider) { p.IBAccounts = msg.Accounts })
	case protocol.TypeBootPhase:
		var msg protocol.BootPhase
		if err := protocol.Decode(frame, msgType, &msg); err != nil {
			a.invalidFrame("invalid boot_phase", err)
			return
		}
		a.updateState(func(p *store.Provider) {
			if msg.Phase == protocol.BootPhaseComplete {
				p.BootPhase = nil
			} else {
				p.BootPhase = &store.BootPhase{Phase: msg.Phase, Detail: msg.Detail}
			}
		})
	case protocol.TypeResponse:
		var msg protocol.Response
		if err := protocol.Decode(frame, msgType, &msg); err != nil || msg.RequestID == "" {
			a.invalidFrame("invalid response", err)
			return
		}
		a.resolve(msg)
	case protocol.TypeAccountEvent:
		a.storeAccountEvent(frame, now)
	case protocol.TypeAuth:
		a.invalidFrame("auth after authentication", nil)
	default:
		a.s.metrics.otherMessages.Inc()
		a.s.log.Debug("agent message type ignored", "provider", a.id, "type", msgType)
	}
}

// invalidFrame counts a frame that could not be used. The first one of a
// connection is logged as a warning, later ones only at debug level.
func (a *agentConn) invalidFrame(what string, err error) {
	a.s.metrics.invalidFrames.Inc()
	if a.invalid.Add(1) == 1 {
		a.s.log.Warn("invalid frame from agent dropped", "provider", a.id, "user", a.userID, "problem", what, "err", err)
		return
	}
	a.s.log.Debug("invalid frame from agent dropped", "provider", a.id, "problem", what, "err", err)
}

func (a *agentConn) updateState(change func(p *store.Provider)) {
	a.mu.Lock()
	change(&a.state)
	p := a.state
	a.mu.Unlock()
	a.s.store.Update(p)
}

func (a *agentConn) snapshot() store.Provider {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state
}

func (a *agentConn) storeAccountEvent(frame []byte, at time.Time) {
	ev := store.AccountEvent{Message: frame, ReceivedAt: float64(at.UnixMicro()) / 1e6}
	ctx, cancel := context.WithTimeout(a.ctx, a.s.cfg.WriteTimeout)
	defer cancel()
	if err := a.s.store.AppendAccountEvent(ctx, a.userID, ev); err != nil {
		a.s.metrics.accountEventErrors.Inc()
		a.s.log.Warn("account event not stored", "provider", a.id, "user", a.userID, "err", err)
	}
}

// enqueue queues a frame for the writer. An agent whose queue is full reads
// too slowly to keep up: it is disconnected rather than let frames pile up.
func (a *agentConn) enqueue(frame []byte) bool {
	if a.ctx.Err() != nil {
		return false
	}
	select {
	case a.send <- frame:
		return true
	default:
		go a.close(closeSlowReader)
		return false
	}
}

func (a *agentConn) writeLoop() {
	for {
		select {
		case <-a.ctx.Done():
			return
		case frame := <-a.send:
			ctx, cancel := context.WithTimeout(a.ctx, a.s.cfg.WriteTimeout)
			err := a.conn.Write(ctx, websocket.MessageText, frame)
			cancel()
			if err != nil {
				if a.ctx.Err() == nil {
					a.s.log.Debug("agent write failed", "provider", a.id, "err", err)
				}
				a.close(closeSlowReader)
				return
			}
		}
	}
}

// ping pings the agent and closes the connection when the pong does not
// come back within PongTimeout, which finds half-open TCP connections that
// never deliver a close.
func (a *agentConn) ping() {
	ctx, cancel := context.WithTimeout(a.ctx, a.s.cfg.PongTimeout)
	err := a.conn.Ping(ctx)
	cancel()
	if err != nil && a.ctx.Err() == nil {
		a.s.log.Info("agent did not respond to ping", "provider", a.id, "user", a.userID, "err", err)
		a.close(closePingTimeout)
	}
}

// close ends the connection once, with reason's close status. It does not
// wait for the read loop, which cleans up after itself.
func (a *agentConn) close(reason closeReason) {
	a.closeOnce.Do(func() {
		a.reason = reason
		a.closing.Store(true)
		// The close frame goes out before the context ends, because a read
		// or write whose context ends drops the socket without one.
		if reason.text == "" {
			a.conn.CloseNow()
		} else {
			_ = a.conn.Close(reason.code, reason.text)
		}
		a.cancel()
	})
}

// request sends a request to the agent and records it as in flight.
func (a *agentConn) request(id, requestType string, payload []byte, origin string, deadline time.Time) bool {
	frame, err := protocol.EncodeRequest(id, requestType, payload)
	if err != nil {
		return false
	}
	a.mu.Lock()
	a.inflight[id] = inflightRequest{origin: origin, requestType: requestType, deadline: deadline}
	a.mu.Unlock()
	if !a.enqueue(frame) {
		a.mu.Lock()
		delete(a.inflight, id)
		a.mu.Unlock()
		return false
	}
	return true
}

// resolve hands an agent's response to the caller waiting for it. A response
// whose request id this agent was not sent is dropped: one agent never
// responds for another, and late or repeated responses reach no caller.
func (a *agentConn) resolve(msg protocol.Response) {
	a.mu.Lock()
	req, ok := a.inflight[msg.RequestID]
	delete(a.inflight, msg.RequestID)
	a.mu.Unlock()
	if !ok {
		a.s.metrics.lateResponses.WithLabelValues("unknown_request").Inc()
		a.s.log.Debug("response for no request in flight dropped", "provider", a.id, "request_id", msg.RequestID)
		return
	}
	res := callResult{Success: msg.Success, Data: msg.Data, Error: msg.Error}
	if req.origin == "" {
		a.s.deliver(msg.RequestID, a.id, res)
		return
	}
	a.s.sendResultAsync(req.origin, msg.RequestID, a.id, res)
}

func (a *agentConn) inflightCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.inflight)
}

// waitingCount counts the requests in flight whose callers still wait.
// Requests past their deadline stay recorded until expireInflight, so that a
// late response is recognized, but no caller waits for them.
func (a *agentConn) waitingCount(now time.Time) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, req := range a.inflight {
		if now.Before(req.deadline) {
			n++
		}
	}
	return n
}

// failInflight answers every request still in flight with
// provider_disconnected, once the connection is gone.
func (a *agentConn) failInflight() {
	a.mu.Lock()
	inflight := a.inflight
	a.inflight = make(map[string]inflightRequest)
	a.mu.Unlock()
	message := "The agent disconnected before it responded."
	switch a.reason {
	case closeRestart, closeShutdown:
		message = fmt.Sprintf("Replica %s, which held the agent, stopped before the agent responded; the agent reconnects to another replica.", a.s.id)
	case closePingTimeout:
		message = "The agent stopped responding to pings and was disconnected before it responded."
	case closeSlowReader:
		message = "The agent read too slowly and was disconnected before it responded."
	}
	for id, req := range inflight {
		res := failure(codeProviderDisconnected, message)
		if req.origin == "" {
			a.s.deliver(id, a.id, res)
		} else {
			a.s.sendResultAsync(req.origin, id, a.id, res)
		}
	}
}

// expireInflight drops the requests whose callers stopped waiting long ago.
func (a *agentConn) expireInflight(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for id, req := range a.inflight {
		if now.After(req.deadline.Add(time.Minute)) {
			delete(a.inflight, id)
		}
	}
}
