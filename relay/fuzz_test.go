package relay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/protocol"
	"github.com/relay-project/relay/store"
)

// Identities used by the fuzz targets. The seeds name them, so that mutated
// inputs reach the waiting calls and the connected agent.
const (
	fuzzReplica       = "r1"
	fuzzPeerReplica   = "r2" // not started: sends to it fail with ErrReplicaGone
	fuzzLocalProvider = "a1b2c3d4"
	fuzzUser          = "alice"
	fuzzRemoteGood    = "e5f6a7b8" // provider that call fuzzCallGood waits for
	fuzzRemoteOther   = "c9d0e1f2" // provider that call fuzzCallOther waits for
	fuzzCallGood      = "r1-1"
	fuzzCallOther     = "r1-2"
	fuzzInflightLocal = "r1-3" // sent to the local agent for a caller on this replica
	fuzzInflightPeer  = "r1-4" // sent to the local agent for a caller on fuzzPeerReplica
)

// fixtureAgentFrames returns the agent's frames of the recorded session, or
// nil when the fixture is not present.
func fixtureAgentFrames(tb testing.TB) [][]byte {
	tb.Helper()
	f, err := os.Open(fixturePath)
	if err != nil {
		tb.Logf("fixture not available, fuzzing without its frames: %v", err)
		return nil
	}
	defer f.Close()
	var frames [][]byte
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l fixtureLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			tb.Fatalf("fixture line %q: %v", sc.Text(), err)
		}
		if l.Dir == "agent->relay" {
			frames = append(frames, l.Msg)
		}
	}
	if err := sc.Err(); err != nil {
		tb.Fatalf("read fixture: %v", err)
	}
	return frames
}

// fixtureResponseData returns the data of every response in the recorded
// session, as peer message bodies.
func fixtureResponseData(tb testing.TB) [][]byte {
	var bodies [][]byte
	for _, frame := range fixtureAgentFrames(tb) {
		var r protocol.Response
		if json.Unmarshal(frame, &r) == nil && r.RequestID != "" {
			bodies = append(bodies, r.Data)
		}
	}
	return bodies
}

// newFuzzServer starts a single replica on an in-memory store. Its logs go
// to stderr only with -v.
func newFuzzServer(tb testing.TB) *Server {
	tb.Helper()
	keys, err := auth.ParseKeys(strings.NewReader(testKeys))
	if err != nil {
		tb.Fatal(err)
	}
	srv, err := New(Config{Store: store.NewMemory(fuzzReplica), Auth: keys, Logger: testLogger(tb)})
	if err != nil {
		tb.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		tb.Fatal(err)
	}
	return srv
}

// newSocketlessAgent returns an authenticated agent of srv with no socket,
// registered in srv's store but not in srv.agents.
//
// NOTE: the agent has a nil conn, so any path that closes it panics. Only a
// full send queue closes an agent from handleFrame or request, and the queue
// here holds far more frames than one input produces.
func newSocketlessAgent(tb testing.TB, srv *Server) *agentConn {
	tb.Helper()
	ctx, cancel := context.WithCancel(srv.ctx)
	now := time.Now().UTC()
	connected := true
	a := &agentConn{
		s: srv, ip: "127.0.0.1", id: fuzzLocalProvider, userID: fuzzUser,
		ctx: ctx, cancel: cancel, send: make(chan []byte, 64),
		state: store.Provider{
			ID: fuzzLocalProvider, UserID: fuzzUser, AgentVersion: "1.39.1", IBAccounts: []string{"DU1234567"},
			ConnectedAt: now, LastHeartbeat: now, IsActive: true, IBConnected: &connected,
			AvailableScanLines: 90, InstanceID: srv.id,
		},
		inflight: make(map[string]inflightRequest),
	}
	if err := srv.store.Register(context.Background(), a.state); err != nil {
		tb.Fatalf("register agent: %v", err)
	}
	return a
}

// addCall registers a call that waits for provider's response to request id.
func addCall(srv *Server, id, provider, replica string) *call {
	c := &call{providerID: provider, replica: replica, result: make(chan callResult, 1)}
	srv.mu.Lock()
	srv.calls[id] = c
	srv.mu.Unlock()
	return c
}

// takeResult returns the result delivered to c, if any, without waiting.
func takeResult(c *call) (callResult, bool) {
	select {
	case res := <-c.result:
		return res, true
	default:
		return callResult{}, false
	}
}

func hasCall(srv *Server, id string) bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.calls[id] != nil
}

// queuedFrames drains and returns the frames queued for a's writer.
func queuedFrames(a *agentConn) [][]byte {
	var frames [][]byte
	for {
		select {
		case frame := <-a.send:
			frames = append(frames, frame)
		default:
			return frames
		}
	}
}

// sameJSON reports whether a and b decode to the same value, with numbers
// compared as written.
func sameJSON(a, b []byte) bool {
	decode := func(data []byte) (any, bool) {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			return nil, false
		}
		return v, true
	}
	va, okA := decode(a)
	vb, okB := decode(b)
	return okA && okB && reflect.DeepEqual(va, vb)
}

func stringPointersEqual(a, b *string) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// peerSeeds returns encoded peer messages of every kind for the identities
// above, with bodies from the recorded session.
func peerSeeds(tb testing.TB) [][]byte {
	errText := "Could not resolve SPY"
	emptyErr := ""
	deadline := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()
	var seeds [][]byte
	add := func(h peerMessage, body string) {
		seeds = append(seeds, encodePeerMessage(h, []byte(body)))
	}

	add(peerMessage{V: peerVersion, Kind: "resp", ID: fuzzCallGood, Provider: fuzzRemoteGood, OK: true}, `{"connected": true}`)
	add(peerMessage{V: peerVersion, Kind: "resp", ID: fuzzCallGood, Provider: fuzzRemoteOther, OK: true}, `{"connected": true}`)
	add(peerMessage{V: peerVersion, Kind: "resp", ID: fuzzCallOther, Provider: fuzzRemoteGood, OK: true}, `{}`)
	add(peerMessage{V: peerVersion, Kind: "resp", ID: fuzzCallOther, Provider: fuzzRemoteOther, Err: &errText}, `null`)
	add(peerMessage{V: peerVersion, Kind: "resp", ID: fuzzCallGood, Provider: fuzzRemoteGood, Err: &emptyErr}, ``)
	add(peerMessage{V: peerVersion, Kind: "fail", ID: fuzzCallGood, Provider: fuzzRemoteGood, Code: codeProviderDisconnected, Message: "The agent disconnected before it responded."}, ``)
	add(peerMessage{V: peerVersion, Kind: "fail", ID: fuzzCallOther, Provider: fuzzRemoteGood, Code: codeTimeout}, ``)
	add(peerMessage{V: peerVersion, Kind: "fail", ID: fuzzCallGood, Provider: fuzzRemoteGood}, ``)
	add(peerMessage{V: peerVersion, Kind: "req", ID: "r2-1", From: fuzzPeerReplica, Provider: fuzzLocalProvider, Type: "ib_status", Deadline: deadline}, `{}`)
	add(peerMessage{V: peerVersion, Kind: "req", ID: "r2-2", From: fuzzPeerReplica, Provider: fuzzLocalProvider, Type: "check_availability", Deadline: deadline}, `{"ticker": "SPY"}`)
	add(peerMessage{V: peerVersion, Kind: "req", ID: "r2-3", From: fuzzPeerReplica, Provider: fuzzLocalProvider, Type: "get_positions"}, ``)
	add(peerMessage{V: peerVersion, Kind: "req", ID: "r2-4", From: fuzzPeerReplica, Provider: fuzzLocalProvider, Type: "x"}, `{"unterminated":`)
	add(peerMessage{V: peerVersion, Kind: "req", ID: "r2-5", From: fuzzPeerReplica, Provider: fuzzRemoteGood, Type: "ib_status"}, `{}`)
	add(peerMessage{V: peerVersion, Kind: "req", ID: fuzzCallGood, From: fuzzReplica, Provider: fuzzRemoteGood, Type: "ib_status"}, `{}`)
	add(peerMessage{V: peerVersion, Kind: "req", ID: fuzzCallGood, Provider: fuzzLocalProvider, Type: "ib_status"}, `null`)
	add(peerMessage{V: peerVersion + 1, Kind: "resp", ID: fuzzCallGood, Provider: fuzzRemoteGood, OK: true}, `{}`)
	add(peerMessage{V: peerVersion, Kind: "ping", ID: fuzzCallGood, Provider: fuzzRemoteGood}, `{}`)
	for i, body := range fixtureResponseData(tb) {
		id := fuzzCallGood
		if i%2 == 1 {
			id = fuzzCallOther
		}
		add(peerMessage{V: peerVersion, Kind: "resp", ID: id, Provider: fuzzRemoteGood, OK: true}, string(body))
	}

	for _, raw := range []string{
		"",
		"\n",
		"{}\n",
		"no newline",
		"{bad json\n{}",
		`{"v":1}` + "\n",
		`{"v":1.0,"k":"resp","id":"r1-1","p":"e5f6a7b8"}` + "\n{}",
		`{"v":1e400,"k":"resp","id":"r1-1","p":"e5f6a7b8"}` + "\n{}",
		`{"v":"1","k":"resp","id":"r1-1","p":"e5f6a7b8"}` + "\n{}",
		`{"V":1,"K":"resp","ID":"r1-1","P":"e5f6a7b8","OK":true}` + "\n{}",
		`{"v":1,"k":"resp","id":"r1-1","p":"c9d0e1f2","p":"e5f6a7b8","ok":true}` + "\n{}",
		`{"v":1,"k":"resp","id":"r1-1","p":"e5f6a7b8","P":"c9d0e1f2","ok":true}` + "\n{}",
		`{"v":1,"k":"resp","id":"r1-1","p":"e5f6a7b8","ok":null,"err":null,"dl":null}` + "\n\n\n",
		`{"v":1,"k":"fail","id":"r1-1","p":"e5f6a7b8","code":"timeout","msg":"` + "\xff\xfe" + `"}` + "\n",
		"{\"v\":1,\"k\":\"resp\",\"id\":\"r1-1\",\"p\":\"e5f6a7b8\xff\",\"ok\":true}\n{}",
		`{"v":1,"k":"req","id":"r2-9","from":"r2","p":"a1b2c3d4","t":"x","dl":-9223372036854775808}` + "\n[]",
		`{"v":1,"k":"req","id":"r2-9","from":"r2","p":"a1b2c3d4","t":"x","dl":99999999999999999999}` + "\n{}",
		`{"v":1,"k":"req","id":"r2-9","from":"r2","p":"a1b2c3d4","t":"x"}` + "\n " + strings.Repeat("[", 10001) + strings.Repeat("]", 10001),
		`{"v":1,"k":"resp","id":"r1-1","p":"e5f6a7b8","ok":true,"x":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + "}\n{}",
		`[1]` + "\n{}",
		`null` + "\n{}",
	} {
		seeds = append(seeds, []byte(raw))
	}
	return seeds
}

// FuzzPeerMessage checks that decodePeerMessage never panics, that the body
// is everything after the first newline, and that a decoded message encodes
// to one that decodes to the same header and body.
func FuzzPeerMessage(f *testing.F) {
	for _, seed := range peerSeeds(f) {
		f.Add(seed)
	}

	f.Fuzz(func(t *testing.T, msg []byte) {
		h, body, err := decodePeerMessage(msg)
		newline := bytes.IndexByte(msg, '\n')
		if err != nil {
			if body != nil {
				t.Fatalf("decodePeerMessage(%q) returned body %q with error %v", msg, body, err)
			}
			return
		}
		if newline < 0 {
			t.Fatalf("decodePeerMessage(%q) accepted a message with no header line", msg)
		}
		if !bytes.Equal(body, msg[newline+1:]) {
			t.Fatalf("decodePeerMessage(%q): body %q, want the bytes after the first newline", msg, body)
		}

		encoded := encodePeerMessage(h, body)
		if i := bytes.IndexByte(encoded, '\n'); i < 0 || !json.Valid(encoded[:i]) {
			t.Fatalf("encodePeerMessage(%+v) = %q: no valid JSON header line", h, encoded)
		}
		h2, body2, err := decodePeerMessage(encoded)
		if err != nil {
			t.Fatalf("decode(encode(%+v)) of %q: %v", h, encoded, err)
		}
		if !reflect.DeepEqual(h2, h) {
			t.Fatalf("header changed in a round trip through %q: got %+v, want %+v", encoded, h2, h)
		}
		if !bytes.Equal(body2, body) {
			t.Fatalf("body changed in a round trip: got %q, want %q", body2, body)
		}
	})
}

// FuzzPeerMessageEncode checks that every header a replica can build, with
// any body, decodes to the same header and body. Replicas build headers from
// decoded JSON and their own ids, so strings are valid UTF-8. encoding/json
// replaces invalid bytes with U+FFFD, so other strings are skipped.
func FuzzPeerMessageEncode(f *testing.F) {
	f.Add(peerVersion, "resp", fuzzCallGood, "", fuzzRemoteGood, "", int64(0), true, "", false, "", "", []byte(`{"connected": true}`))
	f.Add(peerVersion, "resp", "r1-9", "", "p1", "", int64(0), false, "boom\nline", true, "", "", []byte("{\"a\":\"x\\ny\"}\n"))
	f.Add(peerVersion, "fail", fuzzCallGood, "", fuzzRemoteGood, "", int64(0), false, "", false, codeTimeout, "The agent did not respond to ib_status within 5000 ms.", []byte(nil))
	f.Add(peerVersion, "req", "r2-1", fuzzPeerReplica, fuzzLocalProvider, "fetch_chain", int64(1893456000000), false, "", false, "", "", []byte(`{"ticker": "SPY"}`))
	f.Add(-1, "", "", "", "", "", int64(-1), false, "", true, "", "", []byte("\n\n"))
	f.Add(1<<62, "req", "\u2028<&>", "\"", "\\", "\x00", int64(-9223372036854775808), true, "\ud7ff", true, "\u00e9", "\U0001F600", []byte("\xff"))

	f.Fuzz(func(t *testing.T, version int, kind, id, from, provider, requestType string, deadline int64,
		ok bool, errText string, hasErr bool, code, message string, body []byte) {
		for _, s := range []string{kind, id, from, provider, requestType, errText, code, message} {
			if !utf8.ValidString(s) {
				return
			}
		}
		h := peerMessage{V: version, Kind: kind, ID: id, From: from, Provider: provider, Type: requestType,
			Deadline: deadline, OK: ok, Code: code, Message: message}
		if hasErr {
			h.Err = &errText
		}

		got, gotBody, err := decodePeerMessage(encodePeerMessage(h, body))
		if err != nil {
			t.Fatalf("decode(encode(%+v)): %v", h, err)
		}
		if !reflect.DeepEqual(got, h) {
			t.Fatalf("header changed in a round trip: got %+v, want %+v", got, h)
		}
		if !bytes.Equal(gotBody, body) {
			t.Fatalf("body changed in a round trip: got %q, want %q", gotBody, body)
		}
	})
}

// FuzzHandleMessage feeds arbitrary bytes to Server.HandleMessage on a
// replica with two waiting calls and one connected agent. It checks that
// HandleMessage does not change the message (the Redis store passes the
// bytes of an immutable string), that a call receives only a result that
// names its request id and its provider, and that a request for the local
// agent reaches the agent's send queue intact.
func FuzzHandleMessage(f *testing.F) {
	for _, seed := range peerSeeds(f) {
		f.Add(seed)
	}

	f.Fuzz(func(t *testing.T, msg []byte) {
		// Each input gets its own server and hub: a provider_disconnected
		// failure that a "req" sends to its own replica arrives on another
		// goroutine and must not reach the calls of a later input.
		srv := newFuzzServer(t)
		a := newSocketlessAgent(t, srv)
		srv.mu.Lock()
		srv.agents[a.id] = a
		srv.mu.Unlock()
		defer func() {
			// Close would close the agent's nil socket.
			srv.mu.Lock()
			delete(srv.agents, a.id)
			srv.mu.Unlock()
			a.cancel()
			srv.Close()
		}()
		calls := map[string]*call{
			fuzzCallGood:  addCall(srv, fuzzCallGood, fuzzRemoteGood, fuzzPeerReplica),
			fuzzCallOther: addCall(srv, fuzzCallOther, fuzzRemoteOther, fuzzPeerReplica),
		}

		input := bytes.Clone(msg)
		srv.HandleMessage(input)
		if !bytes.Equal(input, msg) {
			t.Fatalf("HandleMessage changed its message from %q to %q", msg, input)
		}

		h, body, err := decodePeerMessage(msg)
		valid := err == nil && h.V == peerVersion
		for id, c := range calls {
			res, delivered := takeResult(c)
			resolvesCall := valid && (h.Kind == "resp" || h.Kind == "fail") && h.ID == id && h.Provider == c.providerID
			if delivered && (!valid || h.ID != id || h.Provider != c.providerID) {
				t.Fatalf("call %s for provider %s received %+v from message %q", id, c.providerID, res, msg)
			}
			if resolvesCall && !delivered {
				t.Fatalf("call %s for provider %s received nothing from its response %q", id, c.providerID, msg)
			}
			if delivered && hasCall(srv, id) {
				t.Fatalf("call %s is still waiting after it received %+v", id, res)
			}
			if !resolvesCall || !delivered {
				continue
			}

			want := callResult{Success: h.OK, Data: body, Error: h.Err}
			if h.Kind == "fail" {
				// A failure without a code is reported as a disconnection.
				code := h.Code
				if code == "" {
					code = codeProviderDisconnected
				}
				want = failure(code, h.Message)
			}
			if res.Success != want.Success || !bytes.Equal(res.Data, want.Data) || !stringPointersEqual(res.Error, want.Error) ||
				res.Failure != want.Failure || res.Message != want.Message {
				t.Fatalf("call %s received %+v, want %+v, from message %q", id, res, want, msg)
			}
		}

		frames := queuedFrames(a)
		// A request without an origin replica or an id has nowhere to answer, and is dropped.
		reachesAgent := valid && h.Kind == "req" && h.Provider == a.id && h.From != "" && h.ID != ""
		if !reachesAgent {
			if len(frames) != 0 || a.inflightCount() != 0 {
				t.Fatalf("message %q queued %q and left %d requests in flight for the agent, want none", msg, frames, a.inflightCount())
			}
			return
		}
		_, encodeErr := protocol.EncodeRequest(h.ID, h.Type, body)
		if encodeErr != nil {
			if len(frames) != 0 || a.inflightCount() != 0 {
				t.Fatalf("request %q with an unencodable payload queued %q for the agent", msg, frames)
			}
			return
		}
		checkForwardedRequest(t, a, h, body, frames)
	})
}

// checkForwardedRequest checks that a peer's request h with payload body was
// queued for the agent as one request frame and recorded as in flight.
func checkForwardedRequest(t *testing.T, a *agentConn, h peerMessage, body []byte, frames [][]byte) {
	t.Helper()
	if len(frames) != 1 {
		t.Fatalf("request %+v queued %d frames for the agent, want 1", h, len(frames))
	}
	var got protocol.Request
	if err := json.Unmarshal(frames[0], &got); err != nil {
		t.Fatalf("frame %q sent to the agent is not a request: %v", frames[0], err)
	}
	if got.Type != protocol.TypeRequest || got.RequestID != h.ID || got.RequestType != h.Type {
		t.Fatalf("frame %q sent to the agent does not carry request %q of type %q", frames[0], h.ID, h.Type)
	}
	wantPayload := body
	if len(body) == 0 || string(body) == "null" {
		wantPayload = []byte(`{}`)
	}
	if !sameJSON(got.Payload, wantPayload) {
		t.Fatalf("frame %q sent to the agent has payload %q, want %q", frames[0], got.Payload, wantPayload)
	}

	a.mu.Lock()
	req, ok := a.inflight[h.ID]
	a.mu.Unlock()
	if !ok || req.origin != h.From || req.requestType != h.Type || !req.deadline.Equal(time.UnixMilli(h.Deadline)) {
		t.Fatalf("request %+v in flight as %+v (found %v), want origin %q, type %q, deadline %d ms", h, req, ok, h.From, h.Type, h.Deadline)
	}
}

// agentFrameSeeds returns frames an agent may send: the recorded session
// and hand-written edge cases, with request ids that the fuzz agent has in
// flight.
func agentFrameSeeds(tb testing.TB) [][]byte {
	seeds := fixtureAgentFrames(tb)
	for _, raw := range []string{
		``,
		`null`,
		`[]`,
		`{}`,
		`{"type":""}`,
		`{"type":null}`,
		`{"TYPE":"heartbeat"}`,
		`{"Type":"ib_accounts","Accounts":["DU7654321"]}`,
		`{"type":"heartbeat","type":"boot_phase","phase":"x"}`,
		`{"type":"auth","api_key":"key-bob","version":"9.9.9"}`,
		`{"type":"auth","api_key":"key-alice","id":"ffffffff","user_id":"bob","instance_id":"r9"}`,
		`{"type":"agent_state","id":"ffffffff","user_id":"bob","ib_accounts":null,"agent_version":"0"}`,
		`{"type":"agent_state","ib_connected":null,"execution_active":null,"execution_lines_held":null}`,
		`{"type":"agent_state","ib_connected":"yes"}`,
		`{"type":"agent_state","execution_lines_held":99999999999999999999}`,
		`{"type":"agent_state","execution_lines_held":1e400}`,
		`{"type":"agent_state","available_scan_lines":-9223372036854775808,"ib_farms":[` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `]}`,
		`{"type":"ib_accounts","accounts":null}`,
		`{"type":"ib_accounts","accounts":[]}`,
		`{"type":"ib_accounts","accounts":[null,"DU1234567",""]}`,
		`{"type":"ib_accounts","accounts":"DU1234567"}`,
		`{"type":"ib_accounts"}`,
		`{"type":"boot_phase","phase":null,"detail":null,"progress":null,"timestamp":null}`,
		`{"type":"boot_phase","phase":"boot_complete"}`,
		`{"type":"boot_phase","phase":"BOOT_COMPLETE","progress":1e309}`,
		`{"type":"response","request_id":"r1-3","success":true,"data":{"connected":true},"error":null}`,
		`{"type":"response","request_id":"r1-3","success":false,"data":null,"error":"Could not resolve SPY"}`,
		`{"type":"response","request_id":"r1-3","request_id":"r1-1","success":true,"data":{}}`,
		`{"type":"response","request_id":"r1-4","success":true,"data":[1,2,3]}`,
		`{"type":"response","request_id":"r1-1","success":true,"data":{}}`,
		`{"type":"response","request_id":"","success":true}`,
		`{"type":"response","request_id":null,"success":null,"data":null,"error":null}`,
		`{"type":"response","request_id":5,"success":"true"}`,
		`{"type":"response","request_id":"r1-3","success":true,"data":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`,
		"{\"type\":\"response\",\"request_id\":\"r1-3\xff\",\"success\":true,\"data\":{\"k\":\"\xff\"}}",
		"{\"type\":\"heart\xffbeat\"}",
		"\xef\xbb\xbf" + `{"type":"heartbeat"}`,
		`{"type":"heartbeat"} {"type":"auth"}`,
		`{"type":"account_event","event":"fill","data":{"qty":1}}`,
		`{"type":"account_event","event":null}`,
		`{"type":"execution_telemetry","lines":[1,2,3]}`,
		`{"type":"heartbeat_ack"}`,
		`{"type":"request","request_id":"r1-3","request_type":"ib_status","payload":{}}`,
	} {
		seeds = append(seeds, []byte(raw))
	}
	return seeds
}

// FuzzHandleFrame feeds arbitrary frames to an authenticated agent's frame
// handler. It checks that the handler never panics or changes the frame,
// that the agent's identity fields stay as authentication set them, that
// the store holds the agent's current state, and that each message type
// changes only what it should.
func FuzzHandleFrame(f *testing.F) {
	for _, seed := range agentFrameSeeds(f) {
		f.Add(seed)
	}
	srv := newFuzzServer(f)
	f.Cleanup(func() { srv.Close() })

	f.Fuzz(func(t *testing.T, frame []byte) {
		a := newSocketlessAgent(t, srv)
		defer a.cancel()
		a.inflight[fuzzInflightLocal] = inflightRequest{origin: "", requestType: "ib_status", deadline: time.Now().Add(time.Minute)}
		a.inflight[fuzzInflightPeer] = inflightRequest{origin: fuzzPeerReplica, requestType: "get_positions", deadline: time.Now().Add(time.Minute)}
		localCall := addCall(srv, fuzzInflightLocal, a.id, srv.id)
		otherCall := addCall(srv, fuzzCallGood, fuzzRemoteGood, fuzzPeerReplica)
		defer func() {
			srv.mu.Lock()
			delete(srv.calls, fuzzInflightLocal)
			delete(srv.calls, fuzzCallGood)
			srv.mu.Unlock()
		}()
		before := a.snapshot()

		// The handler gets its own copy, which is overwritten afterwards to
		// catch state or results that still point into the frame.
		input := bytes.Clone(frame)
		a.handleFrame(input)
		if !bytes.Equal(input, frame) {
			t.Fatalf("handleFrame changed its frame from %q to %q", frame, input)
		}
		for i := range input {
			input[i] = 'x'
		}

		after := a.snapshot()
		checkAgentIdentity(t, a, before, after)

		if res, ok := takeResult(otherCall); ok {
			t.Fatalf("frame %q from agent %s answered call %s of provider %s with %+v", frame, a.id, fuzzCallGood, fuzzRemoteGood, res)
		}
		localResult, localDelivered := takeResult(localCall)
		frames := queuedFrames(a)
		inflight := a.inflightCount()
		invalid := a.invalid.Load()

		msgType, err := protocol.PeekType(frame)
		if err != nil {
			msgType = ""
		}
		if msgType != protocol.TypeHeartbeat && len(frames) != 0 {
			t.Fatalf("frame %q queued %q for the agent, want nothing", frame, frames)
		}
		if msgType != protocol.TypeResponse && (localDelivered || inflight != 2) {
			t.Fatalf("frame %q resolved requests: call result %+v (delivered %v), %d requests left in flight, want 2", frame, localResult, localDelivered, inflight)
		}

		expect := stateExpectation{t: t, frame: frame, before: before, after: after, invalid: invalid}
		switch msgType {
		case "":
			expect.dropped()
		case protocol.TypeHeartbeat:
			if len(frames) != 1 || !bytes.Equal(frames[0], heartbeatAck) {
				t.Fatalf("heartbeat queued %q, want one %s", frames, heartbeatAck)
			}
			expect.changed(func(p *store.Provider) { p.LastHeartbeat = after.LastHeartbeat })
			if after.LastHeartbeat.Before(before.LastHeartbeat) {
				t.Fatalf("heartbeat moved last_heartbeat back from %v to %v", before.LastHeartbeat, after.LastHeartbeat)
			}
		case protocol.TypeAgentState:
			var msg protocol.AgentState
			if protocol.Decode(frame, msgType, &msg) != nil {
				expect.dropped()
				break
			}
			expect.changed(func(p *store.Provider) {
				p.IBConnected, p.ExecutionActive, p.ExecutionLinesHeld = msg.IBConnected, msg.ExecutionActive, msg.ExecutionLinesHeld
				p.AvailableScanLines, p.AcceptExternalScans = msg.AvailableScanLines, msg.AcceptExternalScans
				p.StateAt, p.LastHeartbeat = after.StateAt, after.LastHeartbeat
			})
			if after.StateAt.IsZero() || !after.StateAt.Equal(after.LastHeartbeat) {
				t.Fatalf("agent_state set state_at %v and last_heartbeat %v, want the same non-zero time", after.StateAt, after.LastHeartbeat)
			}
		case protocol.TypeIBAccounts:
			var msg protocol.IBAccounts
			if protocol.Decode(frame, msgType, &msg) != nil {
				expect.dropped()
				break
			}
			if msg.Accounts == nil {
				msg.Accounts = []string{}
			}
			expect.changed(func(p *store.Provider) { p.IBAccounts = msg.Accounts })
		case protocol.TypeBootPhase:
			var msg protocol.BootPhase
			if protocol.Decode(frame, msgType, &msg) != nil {
				expect.dropped()
				break
			}
			expect.changed(func(p *store.Provider) {
				p.BootPhase = &store.BootPhase{Phase: msg.Phase, Detail: msg.Detail}
				if msg.Phase == protocol.BootPhaseComplete {
					p.BootPhase = nil
				}
			})
		case protocol.TypeResponse:
			checkResponseFrame(t, frame, expect, localResult, localDelivered, inflight)
		case protocol.TypeAccountEvent:
			expect.changed(nil)
			checkAccountEventStored(t, srv, frame)
		case protocol.TypeAuth:
			expect.dropped()
		default:
			expect.changed(nil)
		}
	})
}

// checkAgentIdentity checks what no frame may change: the fields set at
// authentication, a non-nil account list, and the store's copy of the state.
func checkAgentIdentity(t *testing.T, a *agentConn, before, after store.Provider) {
	t.Helper()
	if a.id != fuzzLocalProvider || a.userID != fuzzUser {
		t.Fatalf("agent identity changed to provider %q, user %q", a.id, a.userID)
	}
	if after.ID != before.ID || after.UserID != before.UserID || after.AgentVersion != before.AgentVersion ||
		!after.ConnectedAt.Equal(before.ConnectedAt) || after.IsActive != before.IsActive || after.InstanceID != before.InstanceID {
		t.Fatalf("agent identity changed from %+v to %+v", before, after)
	}
	if after.IBAccounts == nil {
		t.Fatalf("agent state has nil ib_accounts: %+v", after)
	}
	providers, err := a.s.store.Providers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range providers {
		if p.ID == a.id {
			if !reflect.DeepEqual(p, after) {
				t.Fatalf("store has state %+v, agent has %+v", p, after)
			}
			return
		}
	}
	t.Fatalf("agent %s missing from the store", a.id)
}

// stateExpectation compares an agent's state after one frame with the state
// before it.
type stateExpectation struct {
	t             *testing.T
	frame         []byte
	before, after store.Provider
	invalid       int64 // invalid frames counted by the agent
}

// dropped checks that the frame was counted as invalid and changed nothing.
func (e stateExpectation) dropped() {
	e.t.Helper()
	if e.invalid != 1 {
		e.t.Fatalf("frame %q counted as %d invalid frames, want 1", e.frame, e.invalid)
	}
	if !reflect.DeepEqual(e.after, e.before) {
		e.t.Fatalf("invalid frame %q changed the state from %+v to %+v", e.frame, e.before, e.after)
	}
}

// changed checks that the frame was accepted and that the state is the
// previous one with change applied. A nil change means no change.
func (e stateExpectation) changed(change func(p *store.Provider)) {
	e.t.Helper()
	if e.invalid != 0 {
		e.t.Fatalf("frame %q counted as %d invalid frames, want 0", e.frame, e.invalid)
	}
	want := e.before
	if change != nil {
		change(&want)
	}
	if !reflect.DeepEqual(e.after, want) {
		e.t.Fatalf("frame %q changed the state to %+v, want %+v", e.frame, e.after, want)
	}
}

// checkResponseFrame checks that a response frame resolved only a request
// sent to this agent, and gave the local caller the agent's response.
func checkResponseFrame(t *testing.T, frame []byte, expect stateExpectation, res callResult, delivered bool, inflight int) {
	t.Helper()
	var msg protocol.Response
	if err := protocol.Decode(frame, protocol.TypeResponse, &msg); err != nil || msg.RequestID == "" {
		expect.dropped()
		if delivered || inflight != 2 {
			t.Fatalf("invalid response %q resolved a request", frame)
		}
		return
	}
	expect.changed(nil)

	switch msg.RequestID {
	case fuzzInflightLocal:
		if !delivered || inflight != 1 {
			t.Fatalf("response %q: delivered %v with %d requests in flight, want delivered with 1", frame, delivered, inflight)
		}
		if res.Success != msg.Success || !bytes.Equal(res.Data, msg.Data) || !stringPointersEqual(res.Error, msg.Error) || res.Failure != "" {
			t.Fatalf("response %q delivered %+v, want success %v, data %s, error %v", frame, res, msg.Success, msg.Data, msg.Error)
		}
	case fuzzInflightPeer:
		// sendResult sends the response to the peer replica on another goroutine.
		if delivered || inflight != 1 {
			t.Fatalf("response %q for a peer's request: delivered %v locally with %d requests in flight, want 1 and no local delivery", frame, delivered, inflight)
		}
	default:
		if delivered || inflight != 2 {
			t.Fatalf("response %q for no request in flight: delivered %v with %d requests in flight", frame, delivered, inflight)
		}
	}
}

// checkAccountEventStored checks that the newest stored event of the fuzz
// user is the frame.
func checkAccountEventStored(t *testing.T, srv *Server, frame []byte) {
	t.Helper()
	events, err := srv.store.AccountEvents(context.Background(), fuzzUser, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(events) == 0 || !bytes.Equal(events[len(events)-1].Message, frame) {
		t.Fatalf("account event %q not stored as the newest event", frame)
	}
}
