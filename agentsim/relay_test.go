package agentsim

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/relay-project/relay/protocol"
)

const fixturePath = "../../shared/fixtures/agent-1.39.1-session.jsonl"

// waitTimeout bounds every wait of the tests for a frame or a connection.
const waitTimeout = 5 * time.Second

// fakeRelay is a minimal relay for the tests: it accepts agent WebSockets,
// checks the API key, acknowledges heartbeats and hands each authenticated
// connection to the test.
type fakeRelay struct {
	t   *testing.T
	srv *httptest.Server

	// accept decides the auth_response for the n-th auth message (from 1).
	// It returns the provider id, or "" to reject the key.
	accept func(n int, key string) string

	auths atomic.Int64
	pings atomic.Int64

	// ignorePings makes the relay drop pings without sending a pong.
	ignorePings atomic.Bool

	// conns receives each authenticated connection.
	conns chan *relayConn
}

// relayConn is the relay's side of one agent connection.
type relayConn struct {
	t    *testing.T
	ws   *websocket.Conn
	auth []byte

	// frames receives every text frame after auth, in order.
	frames chan []byte
	// closed receives the error that ended the read loop.
	closed chan error
}

func newFakeRelay(t *testing.T) *fakeRelay {
	t.Helper()
	r := &fakeRelay{
		t:     t,
		conns: make(chan *relayConn, 16),
		accept: func(n int, key string) string {
			return fmt.Sprintf("provider-%d", n)
		},
	}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serveWS))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *fakeRelay) url() string {
	return "ws" + strings.TrimPrefix(r.srv.URL, "http") + "/ws/data-provider"
}

func (r *fakeRelay) serveWS(w http.ResponseWriter, req *http.Request) {
	ws, err := websocket.Accept(w, req, &websocket.AcceptOptions{
		OnPingReceived: func(context.Context, []byte) bool {
			r.pings.Add(1)
			return !r.ignorePings.Load()
		},
	})
	if err != nil {
		r.t.Errorf("fake relay: accept: %v", err)
		return
	}
	ws.SetReadLimit(64 << 20)
	ctx := context.Background()

	_, auth, err := ws.Read(ctx)
	if err != nil {
		ws.CloseNow()
		return
	}
	var msg protocol.Auth
	if err := json.Unmarshal(auth, &msg); err != nil {
		r.t.Errorf("fake relay: invalid auth frame %s: %v", auth, err)
	}
	n := int(r.auths.Add(1))
	providerID := r.accept(n, msg.APIKey)
	if providerID == "" {
		ws.Write(ctx, websocket.MessageText, []byte(`{"type":"auth_response","success":false,"error":"invalid API key"}`))
		ws.Close(websocket.StatusPolicyViolation, "invalid API key")
		return
	}
	resp := fmt.Sprintf(`{"type":"auth_response","success":true,"provider_id":%q}`, providerID)
	if err := ws.Write(ctx, websocket.MessageText, []byte(resp)); err != nil {
		ws.CloseNow()
		return
	}

	rc := &relayConn{
		t:      r.t,
		ws:     ws,
		auth:   auth,
		frames: make(chan []byte, 1024),
		closed: make(chan error, 1),
	}
	r.conns <- rc
	for {
		_, frame, err := ws.Read(ctx)
		if err != nil {
			rc.closed <- err
			return
		}
		if typ, _ := protocol.PeekType(frame); typ == protocol.TypeHeartbeat {
			ws.Write(ctx, websocket.MessageText, []byte(`{"type":"heartbeat_ack"}`))
		}
		rc.frames <- frame
	}
}

// nextConn returns the next authenticated connection.
func (r *fakeRelay) nextConn() *relayConn {
	r.t.Helper()
	select {
	case rc := <-r.conns:
		return rc
	case <-time.After(waitTimeout):
		r.t.Fatal("fake relay: no agent connected")
		return nil
	}
}

// next returns the next frame the agent sent.
func (rc *relayConn) next() []byte {
	rc.t.Helper()
	select {
	case frame := <-rc.frames:
		return frame
	case err := <-rc.closed:
		rc.t.Fatalf("fake relay: connection closed while waiting for a frame: %v", err)
	case <-time.After(waitTimeout):
		rc.t.Fatal("fake relay: no frame from the agent")
	}
	return nil
}

// nextOfType returns the next frame of type msgType, skipping others.
func (rc *relayConn) nextOfType(msgType string) []byte {
	rc.t.Helper()
	for {
		frame := rc.next()
		if typ, _ := protocol.PeekType(frame); typ == msgType {
			return frame
		}
	}
}

// skipStartup reads the six frames the agent sends after auth: three
// boot phases, ib_accounts, and the first heartbeat and agent_state.
func (rc *relayConn) skipStartup() {
	rc.t.Helper()
	for range 6 {
		rc.next()
	}
}

// send writes a frame to the agent.
func (rc *relayConn) send(frame string) {
	rc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := rc.ws.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
		rc.t.Fatalf("fake relay: send %s: %v", frame, err)
	}
}

// request sends a request with an encoded payload.
func (rc *relayConn) request(id, requestType, payload string) {
	rc.t.Helper()
	frame, err := protocol.EncodeRequest(id, requestType, json.RawMessage(payload))
	if err != nil {
		rc.t.Fatalf("encode request: %v", err)
	}
	rc.send(string(frame))
}

// decodedResponse is a response frame decoded for checks, with the frame.
type decodedResponse struct {
	protocol.Response
	frame []byte
}

// nextResponse returns the next response frame, skipping heartbeats and
// agent states.
func (rc *relayConn) nextResponse() decodedResponse {
	rc.t.Helper()
	frame := rc.nextOfType(protocol.TypeResponse)
	var resp decodedResponse
	if err := json.Unmarshal(frame, &resp.Response); err != nil {
		rc.t.Fatalf("invalid response frame %.300s: %v", frame, err)
	}
	resp.frame = frame
	return resp
}

// expectNoResponse fails if a response arrives within d.
func (rc *relayConn) expectNoResponse(d time.Duration) {
	rc.t.Helper()
	deadline := time.After(d)
	for {
		select {
		case frame := <-rc.frames:
			if typ, _ := protocol.PeekType(frame); typ == protocol.TypeResponse {
				rc.t.Fatalf("unexpected response %s", frame)
			}
		case <-deadline:
			return
		}
	}
}

// waitClosed returns the close status of the agent's side of the connection.
func (rc *relayConn) waitClosed() websocket.StatusCode {
	rc.t.Helper()
	select {
	case err := <-rc.closed:
		return websocket.CloseStatus(err)
	case <-time.After(waitTimeout):
		rc.t.Fatal("fake relay: connection not closed")
		return -1
	}
}

// fixtureFrame is one message of the recorded production session, as the
// exact text Python sent.
type fixtureFrame struct {
	dir  string
	text string
}

// readFixture returns the messages of the recorded session. Each line is
// {"dir": "...", "msg": {...}} written by Python's json.dumps, so the text
// after `"msg": ` up to the closing brace of the line is the message as the
// agent sent it.
func readFixture(t *testing.T) []fixtureFrame {
	t.Helper()
	f, err := os.Open(fixturePath)
	if err != nil {
		t.Fatalf("open fixture: %v", err)
	}
	defer f.Close()

	var frames []fixtureFrame
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		line := scanner.Text()
		var rec struct {
			Dir string `json:"dir"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("fixture line %q: %v", line, err)
		}
		_, msg, ok := strings.Cut(line, `"msg": `)
		if !ok || !strings.HasSuffix(msg, "}") {
			t.Fatalf("fixture line without a msg object: %q", line)
		}
		frames = append(frames, fixtureFrame{dir: rec.Dir, text: strings.TrimSuffix(msg, "}")})
	}
	if err := scanner.Err(); err != nil {
		t.Fatalf("read fixture: %v", err)
	}
	return frames
}

// startAgent runs an agent for cfg until the test ends, with a fast reconnect
// and a logger that writes to the test log.
func startAgent(t *testing.T, cfg Config) *Agent {
	t.Helper()
	if cfg.ReconnectDelay == 0 {
		cfg.ReconnectDelay = 20 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	agent := New(cfg)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != context.Canceled {
				t.Errorf("Run returned %v, want context.Canceled", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return after its context was canceled")
		}
	})
	return agent
}

// testWriter sends log output to t.Log, so it shows only for failed tests.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

var _ io.Writer = testWriter{}
