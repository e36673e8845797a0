package agentsim

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/relay-project/relay/protocol"
)

// Request types the agent responds to.
const (
	requestIBStatus      = "ib_status"
	requestGetPositions  = "get_positions"
	requestGetOpenOrders = "get_open_orders"
	requestFetchChain    = "fetch_chain"

	// requestEcho and requestSleep exist only in the simulator, for tests.
	requestEcho  = "echo"
	requestSleep = "sleep"
)

// startRequest decodes a request and, unless the agent is silent, responds
// in a goroutine of its own, so that a slow response holds up no other.
func (c *connection) startRequest(frame []byte) {
	var req protocol.Request
	if err := protocol.Decode(frame, protocol.TypeRequest, &req); err != nil {
		c.log.Warn("invalid request from relay ignored", "error", err)
		return
	}

	a := c.agent
	a.requestsReceived.Add(1)
	if a.silent.Load() {
		c.log.Debug("request left without a response because the agent is silent",
			"request_id", req.RequestID, "request_type", req.RequestType)
		return
	}

	delay := time.Duration(a.responseDelay.Load())
	c.requests.Add(1)
	go func() {
		defer c.requests.Done()
		c.respond(req, delay)
	}()
}

// respond waits for delay, then builds and sends the response to req. It
// gives up without sending when the connection ends first or the agent has
// turned silent meanwhile.
func (c *connection) respond(req protocol.Request, delay time.Duration) {
	if !sleepContext(c.ctx, delay) {
		return
	}
	data, errMessage := c.agent.handleRequest(c.ctx, req)
	if c.ctx.Err() != nil {
		return
	}
	if c.agent.silent.Load() {
		c.log.Debug("response dropped because the agent turned silent", "request_id", req.RequestID)
		return
	}

	if err := c.send(c.ctx, responseFrame(req.RequestID, data, errMessage)); err != nil {
		if c.ctx.Err() == nil {
			c.log.Warn("response not sent", "request_id", req.RequestID,
				"request_type", req.RequestType, "error", err)
		}
		return
	}
	c.agent.requestsAnswered.Add(1)
}

// handleRequest returns the encoded data of the response to req, or the
// error message of a failed request.
func (a *Agent) handleRequest(ctx context.Context, req protocol.Request) (data json.RawMessage, errMessage string) {
	switch req.RequestType {
	case requestIBStatus:
		return mustMarshalPython(a.ibStatus()), ""

	case requestGetPositions:
		return mustMarshalPython(object{
			{"positions", []any{}},
			{"accounts", a.cfg.Accounts},
		}), ""

	case requestGetOpenOrders:
		return mustMarshalPython(object{
			{"orders", []any{}},
			{"live_order_count", 0},
			{"source", "live_book"},
		}), ""

	case requestFetchChain:
		var payload struct {
			Ticker string `json:"ticker"`
		}
		if err := json.Unmarshal(req.Payload, &payload); err != nil {
			return nil, fmt.Sprintf("Invalid fetch_chain payload: %v", err)
		}
		ticker := strings.ToUpper(strings.TrimSpace(payload.Ticker))
		if ticker == "" {
			// NOTE: the wording of this error is a guess, as the recorded
			// session has no fetch_chain request.
			return nil, "Missing ticker"
		}
		return optionChain(ticker, a.cfg.ChainBytes, time.Now()), ""

	case requestEcho:
		return req.Payload, ""

	case requestSleep:
		return handleSleep(ctx, req.Payload)
	}
	return nil, "Unknown request type: " + req.RequestType
}

// ibStatus returns the data of an ib_status response.
func (a *Agent) ibStatus() object {
	connected := a.twsConnected.Load()
	message := "IB TWS not connected"
	if connected {
		message = "IB TWS connected"
	}

	var lastConnected any
	if micros := a.lastTWSConnect.Load(); micros != 0 {
		lastConnected = float64(micros) / 1e6
	}

	return object{
		{"connected", connected},
		{"reconnecting", false},
		{"user_disconnect", false},
		{"message", message},
		{"farm_status", farmStatus(connected)},
		{"data_available", connected},
		{"read_only_session", false},
		{"last_connected", lastConnected},
	}
}

// handleSleep returns the data {"slept_ms": N} for a sleep request with
// payload {"ms": N}, after N milliseconds.
func handleSleep(ctx context.Context, payload json.RawMessage) (json.RawMessage, string) {
	var p struct {
		MS *int64 `json:"ms"`
	}
	if err := json.Unmarshal(payload, &p); err != nil || p.MS == nil || *p.MS < 0 {
		return nil, `Invalid sleep payload: expected {"ms": N} with N >= 0`
	}
	if !sleepContext(ctx, time.Duration(*p.MS)*time.Millisecond) {
		return nil, "Connection closed during sleep"
	}
	return mustMarshalPython(object{{"slept_ms", *p.MS}}), ""
}

// sleepContext waits for d and reports whether it did, or returns false as
// soon as ctx is done.
func sleepContext(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}
