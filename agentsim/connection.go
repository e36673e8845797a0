package agentsim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/relay-project/relay/protocol"
)

// Limits and timeouts of one connection.
const (
	// readLimit is the largest relay message the agent reads. Requests are
	// small, but a payload can carry a whole order list.
	readLimit = 16 << 20

	// dialTimeout and authTimeout are the open_timeout default of the
	// asyncio client of Python's websockets library, which the production
	// agent uses.
	dialTimeout = 10 * time.Second
	authTimeout = 10 * time.Second

	// writeTimeout bounds one message write. A multi-MB chain response written
	// to a relay that reads slowly can take seconds.
	writeTimeout = 60 * time.Second
)

// pongTimeout is the ping_timeout default of the websockets asyncio client.
// On a ping timeout that client closes the connection with status 1011, and
// so does this one. Tests shorten it.
//
// NOTE: the recorded session does not show whether the production agent
// changes the open and ping timeouts. It does change the ping interval to 30 s.
var pongTimeout = 20 * time.Second

// connection is one authenticated WebSocket connection to the relay. The
// goroutine in Agent.Run owns it, sends the periodic messages and pings, and
// ends it. A reader goroutine receives relay messages and starts one goroutine
// per request.
type connection struct {
	// Static after dial.
	agent *Agent
	ws    *websocket.Conn
	log   *slog.Logger

	// ctx is canceled when the connection ends, which stops the reader and
	// drops the responses to requests still in flight. It does not derive from
	// the context of Run, because a canceled read context closes the socket
	// at once, and Run closes it with a close handshake instead.
	ctx    context.Context
	cancel context.CancelFunc

	// readStopped is closed when the reader goroutine returns, and readErr is
	// the error that stopped it.
	readStopped chan struct{}
	readErr     error

	// writeSlot serializes writes: holding its one slot is the right to
	// write. A channel is used instead of a mutex so that a waiting writer
	// can give up when its context ends.
	writeSlot chan struct{}

	// requests tracks the goroutines that respond to requests.
	requests sync.WaitGroup

	// closeOnce makes the first close status the one sent.
	closeOnce sync.Once
}

// runConnection dials the relay, authenticates and serves the connection
// until it ends or ctx is done. authenticated reports whether the relay
// accepted the key. err is nil when the connection ended normally: the relay
// or Disconnect closed it with status 1000, 1001 or 1012, or ctx was done.
func (a *Agent) runConnection(ctx context.Context) (authenticated bool, err error) {
	a.dials.Add(1)

	dialCtx, cancelDial := context.WithTimeout(ctx, dialTimeout)
	ws, _, err := websocket.Dial(dialCtx, a.cfg.URL, &websocket.DialOptions{
		CompressionMode: a.cfg.Compression,
	})
	cancelDial()
	if err != nil {
		return false, fmt.Errorf("dial %s: %w", a.cfg.URL, err)
	}
	ws.SetReadLimit(readLimit)

	providerID, err := a.authenticate(ctx, ws)
	if err != nil {
		return false, err
	}

	c := a.newConnection(ctx, ws, providerID)
	defer c.cancel()

	a.connects.Add(1)
	a.setConnection(c, providerID)
	c.log.Debug("agent connected")

	go func() {
		defer close(c.readStopped)
		c.readErr = c.readLoop()
	}()

	err = c.serve(ctx)

	// Canceling c.ctx closes the socket if serve has not, which stops the
	// reader, and stops the requests in flight.
	a.clearConnection(c)
	c.cancel()
	<-c.readStopped
	a.recordClose(c.readErr)
	if code := closeCode(c.readErr); code != websocket.StatusAbnormalClosure && ctx.Err() == nil {
		c.log.Info("relay closed the connection", "close_code", int(code), "status", code.String())
	}
	c.requests.Wait()
	return true, err
}

func (a *Agent) newConnection(ctx context.Context, ws *websocket.Conn, providerID string) *connection {
	connCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &connection{
		agent:       a,
		ws:          ws,
		log:         a.log.With("provider_id", providerID),
		ctx:         connCtx,
		cancel:      cancel,
		readStopped: make(chan struct{}),
		writeSlot:   make(chan struct{}, 1),
	}
}

// authenticate sends the auth message and waits for the auth_response. On
// failure it records the relay's close code, closes ws and returns an error
// with the relay's reason.
func (a *Agent) authenticate(ctx context.Context, ws *websocket.Conn) (providerID string, err error) {
	authCtx, cancel := context.WithTimeout(ctx, authTimeout)
	defer cancel()

	if err := ws.Write(authCtx, websocket.MessageText, authFrame(a.cfg.APIKey, a.version)); err != nil {
		ws.CloseNow()
		return "", fmt.Errorf("send auth: %w", err)
	}

	_, frame, err := ws.Read(authCtx)
	if err != nil {
		a.authFailures.Add(1)
		a.recordClose(err)
		ws.CloseNow()
		return "", fmt.Errorf("read auth_response: %w", err)
	}

	var resp protocol.AuthResponse
	if err := protocol.Decode(frame, protocol.TypeAuthResponse, &resp); err != nil || resp.Type != protocol.TypeAuthResponse {
		a.authFailures.Add(1)
		ws.Close(websocket.StatusProtocolError, "expected auth_response")
		return "", fmt.Errorf("expected auth_response, got %.200q", frame)
	}
	if !resp.Success {
		a.authFailures.Add(1)
		a.awaitRelayClose(ctx, ws)
		return "", fmt.Errorf("relay rejected the API key: %q", resp.Error)
	}
	return resp.ProviderID, nil
}

// awaitRelayClose waits briefly for the close frame that the relay sends
// after a failed authentication, records its code and closes ws.
func (a *Agent) awaitRelayClose(ctx context.Context, ws *websocket.Conn) {
	ctx, cancel := context.WithTimeout(ctx, authTimeout)
	defer cancel()
	for {
		if _, _, err := ws.Read(ctx); err != nil {
			a.recordClose(err)
			ws.CloseNow()
			return
		}
	}
}

// recordClose stores the close status carried by a read error for Stats.
func (a *Agent) recordClose(err error) {
	a.lastCloseCode.Store(int64(closeCode(err)))
}

// closeCode returns the close status carried by a read error, or
// StatusAbnormalClosure when the connection ended without a close frame.
func closeCode(err error) websocket.StatusCode {
	code := websocket.CloseStatus(err)
	if code == -1 {
		return websocket.StatusAbnormalClosure
	}
	return code
}

// serve sends the start-up messages, then heartbeats, agent states and pings
// until the reader stops or ctx is done. When ctx is done it closes the
// socket with status 1000.
func (c *connection) serve(ctx context.Context) error {
	if err := c.sendStartup(); err != nil {
		return c.fail("send start-up messages", err)
	}

	heartbeat := time.NewTicker(c.agent.cfg.HeartbeatInterval)
	defer heartbeat.Stop()
	ping := time.NewTicker(c.agent.cfg.PingInterval)
	defer ping.Stop()

	for {
		select {
		case <-ctx.Done():
			c.close(websocket.StatusNormalClosure)
			return nil

		case <-c.readStopped:
			return c.readEnded(c.readErr)

		case <-heartbeat.C:
			if err := c.sendHeartbeat(); err != nil {
				return c.fail("send heartbeat", err)
			}

		case <-ping.C:
			// Ping blocks until the pong arrives, which the reader
			// goroutine receives. Heartbeats wait meanwhile, as the
			// relay returns pongs at once unless it is stuck.
			pingCtx, cancel := context.WithTimeout(ctx, pongTimeout)
			err := c.ws.Ping(pingCtx)
			cancel()
			if err == nil {
				continue
			}
			if ctx.Err() != nil {
				c.close(websocket.StatusNormalClosure)
				return nil
			}
			return c.fail("keepalive ping", err)
		}
	}
}

// fail ends the connection after a failed write or ping. When the socket was
// already closed, which is usually the relay closing it, the result is the
// relay's close status. Otherwise fail closes the socket with status 1011
// and returns err.
func (c *connection) fail(step string, err error) error {
	if errors.Is(err, net.ErrClosed) {
		// The reader stops at once on a closed socket.
		<-c.readStopped
		return c.readEnded(c.readErr)
	}
	c.close(websocket.StatusInternalError)
	return fmt.Errorf("%s: %w", step, err)
}

// readEnded turns the reader's error into the connection's result: nil for
// the close codes of a planned shutdown, an error otherwise.
func (c *connection) readEnded(err error) error {
	code := closeCode(err)
	switch code {
	case websocket.StatusNormalClosure, websocket.StatusGoingAway, websocket.StatusServiceRestart:
		c.log.Debug("connection closed, reconnecting", "close_code", int(code))
		return nil
	}
	return fmt.Errorf("connection closed with status %d: %w", int(code), err)
}

// sendStartup sends the messages that the production agent sends right after
// a successful authentication, in its order.
func (c *connection) sendStartup() error {
	now := time.Now()
	if err := c.send(c.ctx, bootPhaseFrame(bootPhases[0].phase, bootPhases[0].detail, now)); err != nil {
		return err
	}
	if err := c.send(c.ctx, ibAccountsFrame(c.agent.cfg.Accounts)); err != nil {
		return err
	}
	for _, bp := range bootPhases[1:] {
		if err := c.send(c.ctx, bootPhaseFrame(bp.phase, bp.detail, time.Now())); err != nil {
			return err
		}
	}
	return c.sendHeartbeat()
}

func (c *connection) sendHeartbeat() error {
	if err := c.send(c.ctx, heartbeatFrame); err != nil {
		return err
	}
	return c.send(c.ctx, agentStateFrame(c.agent.twsConnected.Load()))
}

// send writes frame as one text message. Only one write runs at a time,
// and each gets writeTimeout.
func (c *connection) send(ctx context.Context, frame []byte) error {
	select {
	case c.writeSlot <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.ctx.Done():
		return c.ctx.Err()
	}
	defer func() { <-c.writeSlot }()

	writeCtx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	return c.ws.Write(writeCtx, websocket.MessageText, frame)
}

// close closes the WebSocket with code. The first call sends the close frame
// and waits for the relay's, at most about 10 s; later calls return at once.
func (c *connection) close(code websocket.StatusCode) {
	c.closeOnce.Do(func() {
		c.ws.Close(code, "")
	})
}

// readLoop receives relay messages until the connection ends, and returns
// the error that ended it.
func (c *connection) readLoop() error {
	for {
		typ, frame, err := c.ws.Read(c.ctx)
		if err != nil {
			return err
		}
		if typ != websocket.MessageText {
			c.log.Debug("binary message ignored", "bytes", len(frame))
			continue
		}

		msgType, err := protocol.PeekType(frame)
		if err != nil {
			c.log.Warn("invalid message from relay ignored", "error", err, "bytes", len(frame))
			continue
		}
		switch msgType {
		case protocol.TypeHeartbeatAck:
		case protocol.TypeRequest:
			c.startRequest(frame)
		default:
			c.log.Debug("message from relay ignored", "type", msgType)
		}
	}
}
