package relay

import (
	"bufio"
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

const fixturePath = "../../shared/fixtures/agent-1.39.1-session.jsonl"

type fixtureLine struct {
	Dir string          `json:"dir"`
	Msg json.RawMessage `json:"msg"`
}

func readFixture(t *testing.T) []fixtureLine {
	t.Helper()
	f, err := os.Open(fixturePath)
	if err != nil {
		t.Skipf("fixture not available: %v", err)
	}
	defer f.Close()
	var lines []fixtureLine
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l fixtureLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("fixture line %q: %v", sc.Text(), err)
		}
		lines = append(lines, l)
	}
	return lines
}

// TestFixtureSessionReplay plays the recorded production agent session
// against the relay: the agent's frames are sent byte for byte, the relay's
// requests come from backend calls, and every relay frame is checked against
// the recording.
func TestFixtureSessionReplay(t *testing.T) {
	lines := readFixture(t)
	rs := newCluster(t, "memory", 1, nil)
	r := rs[0]
	a := dialRaw(t, r)

	// Backend answers arrive in request order, keyed by the recorded request id.
	type backendAnswer struct {
		status int
		ans    requestAnswer
	}
	answers := map[string]chan backendAnswer{}
	var wg sync.WaitGroup
	requestIDs := map[string]string{} // relay's request id -> recorded id

	for i, l := range lines {
		var m map[string]any
		json.Unmarshal(l.Msg, &m)
		switch {
		case l.Dir == "agent->relay":
			frame := string(l.Msg)
			if m["type"] == "auth" {
				frame = strings.Replace(frame, "REDACTED-API-KEY", "key-alice", 1)
			}
			if m["type"] == "response" {
				recorded := m["request_id"].(string)
				for relayID, rec := range requestIDs {
					if rec == recorded {
						frame = strings.Replace(frame, `"`+recorded+`"`, `"`+relayID+`"`, 1)
					}
				}
			}
			a.send(frame)
		case m["type"] == "request":
			recorded := m["request_id"].(string)
			ch := make(chan backendAnswer, 1)
			answers[recorded] = ch
			wg.Add(1)
			go func() {
				defer wg.Done()
				status, ans := r.request(t, map[string]any{"user_id": "alice", "request_type": m["request_type"], "payload": m["payload"]})
				ch <- backendAnswer{status, ans}
			}()
			got := a.read()
			if got["type"] != "request" || got["request_type"] != m["request_type"] {
				t.Fatalf("line %d: relay sent %v, recording has %v", i+1, got, m)
			}
			if payload, _ := json.Marshal(got["payload"]); string(payload) != mustCompact(t, m["payload"]) {
				t.Errorf("line %d: payload %s, want %s", i+1, payload, mustCompact(t, m["payload"]))
			}
			requestIDs[got["request_id"].(string)] = recorded
		default:
			got := a.read()
			if got["type"] != m["type"] {
				t.Fatalf("line %d: relay sent %v, recording has %v", i+1, got, m)
			}
			if m["type"] == "auth_response" && (got["success"] != true || got["provider_id"] == "") {
				t.Fatalf("auth_response %v", got)
			}
		}
	}
	wg.Wait()

	// Each backend call returns what the agent answered in the recording.
	for _, l := range lines {
		var m struct {
			Type      string          `json:"type"`
			RequestID string          `json:"request_id"`
			Success   bool            `json:"success"`
			Data      json.RawMessage `json:"data"`
			Error     *string         `json:"error"`
		}
		json.Unmarshal(l.Msg, &m)
		if l.Dir != "agent->relay" || m.Type != "response" {
			continue
		}
		got := <-answers[m.RequestID]
		if got.status != http.StatusOK || got.ans.Success != m.Success {
			t.Errorf("%s: status %d success %v, want 200 %v", m.RequestID, got.status, got.ans.Success, m.Success)
		}
		if mustCompact(t, got.ans.Data) != mustCompact(t, m.Data) {
			t.Errorf("%s: data %s, want %s", m.RequestID, got.ans.Data, m.Data)
		}
		if (got.ans.Error == nil) != (m.Error == nil) || (m.Error != nil && *got.ans.Error != *m.Error) {
			t.Errorf("%s: error %v, want %v", m.RequestID, got.ans.Error, m.Error)
		}
	}

	// The recorded state reached the registry.
	reg := r.registry(t)
	if len(reg.Providers) != 1 {
		t.Fatalf("registry has %d providers, want 1", len(reg.Providers))
	}
	p := reg.Providers[0]
	if p.AgentVersion != "1.39.1" || !isTrue(p.IBConnected) || p.AvailableScanLines != 90 || !p.AcceptExternalScans {
		t.Errorf("registry record %+v does not carry the recorded agent_state", p)
	}
	if len(p.IBAccounts) != 1 || p.IBAccounts[0] != "DU1234567" {
		t.Errorf("ib_accounts = %v, want [DU1234567]", p.IBAccounts)
	}
	if p.BootPhase != nil {
		t.Errorf("boot_phase = %+v after boot_complete, want none", p.BootPhase)
	}
}

func mustCompact(t *testing.T, v any) string {
	t.Helper()
	var raw []byte
	switch v := v.(type) {
	case json.RawMessage:
		raw = v
	default:
		raw, _ = json.Marshal(v)
	}
	var out any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("invalid JSON %q: %v", raw, err)
	}
	b, _ := json.Marshal(out)
	return string(b)
}

func TestAuthRejections(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.AuthTimeout = 300 * time.Millisecond })
	r := rs[0]

	cases := map[string]struct {
		frame     string
		wantError string
	}{
		"unknown key":       {`{"type":"auth","api_key":"nope","version":"1.0.0"}`, "invalid API key"},
		"first not auth":    {`{"type":"heartbeat"}`, "first message must be"},
		"malformed JSON":    {`{"type":"auth",`, "first message must be"},
		"auth without key":  {`{"type":"auth","version":"1.0.0"}`, "no api_key"},
		"type not a string": {`{"type":5}`, "first message must be"},
		"JSON array":        {`[1,2,3]`, "first message must be"},
		"empty key":         {`{"type":"auth","api_key":""}`, "no api_key"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			a := dialRaw(t, r)
			a.send(tc.frame)
			m := a.read()
			if m["type"] != "auth_response" || m["success"] != false {
				t.Fatalf("got %v, want a failed auth_response", m)
			}
			if msg, _ := m["error"].(string); !strings.Contains(msg, tc.wantError) {
				t.Errorf("error %q, want it to contain %q", msg, tc.wantError)
			}
			err := a.readErr(2 * time.Second)
			if websocket.CloseStatus(err) != websocket.StatusPolicyViolation {
				t.Errorf("socket ended with %v, want close status 1008", err)
			}
		})
	}

	t.Run("no auth in time", func(t *testing.T) {
		a := dialRaw(t, r)
		start := time.Now()
		m := a.read()
		if m["success"] != false || !strings.Contains(m["error"].(string), "no auth message") {
			t.Errorf("got %v, want a failed auth_response for the timeout", m)
		}
		if waited := time.Since(start); waited < 250*time.Millisecond || waited > 2*time.Second {
			t.Errorf("rejected after %v, want the 300ms auth timeout", waited)
		}
	})

	t.Run("version absent means 0.0.0", func(t *testing.T) {
		a := dialRaw(t, r)
		a.send(`{"type":"auth","api_key":"key-carol"}`)
		m := a.read()
		id, _ := m["provider_id"].(string)
		for _, p := range r.registry(t).Providers {
			if p.ID == id && p.AgentVersion != "0.0.0" {
				t.Errorf("agent_version = %q, want 0.0.0", p.AgentVersion)
			}
		}
	})
}

func TestAuthFailuresRateLimited(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.AuthFailureLimit = 3 })
	for i := range 3 {
		a := dialRaw(t, rs[0])
		a.send(`{"type":"auth","api_key":"wrong"}`)
		if m := a.read(); m["success"] != false {
			t.Fatalf("attempt %d: %v", i, m)
		}
	}
	_, resp, err := websocket.Dial(t.Context(), rs[0].ws, nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("fourth attempt: err %v, response %v; want HTTP 429", err, resp)
	}
}

// TestBadFramesKeepConnection sends every kind of bad frame after a
// successful auth: each is dropped, and the agent still answers requests.
func TestBadFramesKeepConnection(t *testing.T) {
	rs := newCluster(t, "memory", 1, nil)
	r := rs[0]
	a := dialRaw(t, r)
	a.auth("key-alice")

	bad := []string{
		`not json`,
		`{"no_type":1}`,
		`{"type":"agent_state","ib_connected":"yes"}`,
		`{"type":"ib_accounts","accounts":"DU1"}`,
		`{"type":"boot_phase","progress":"half"}`,
		`{"type":"response"}`,
		`{"type":"response","request_id":"never-sent","success":true,"data":{}}`,
		`{"type":"auth","api_key":"key-alice"}`,
		`{"type":"execution_telemetry","x":1}`,
		`{"type":"something_new"}`,
	}
	for _, f := range bad {
		a.send(f)
	}
	ctx := t.Context()
	if err := a.conn.Write(ctx, websocket.MessageBinary, []byte{0, 1, 2}); err != nil {
		t.Fatal(err)
	}

	// The connection still works: a request goes through and is answered.
	done := make(chan requestAnswer, 1)
	go func() {
		_, ans := r.request(t, map[string]any{"user_id": "alice", "request_type": "echo", "payload": map[string]any{"ok": true}})
		done <- ans
	}()
	m := a.read()
	if m["type"] != "request" {
		t.Fatalf("after bad frames the relay sent %v, want a request", m)
	}
	a.send(`{"type":"response","request_id":"` + m["request_id"].(string) + `","success":true,"data":{"ok":true},"error":null}`)
	if ans := <-done; !ans.Success || string(ans.Data) != `{"ok":true}` {
		t.Errorf("answer after bad frames: %+v", ans)
	}
}

func TestOversizeFrameClosesWith1009(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.MaxMessageBytes = 64 << 10 })
	a := dialRaw(t, rs[0])
	a.auth("key-alice")
	a.send(`{"type":"heartbeat","pad":"` + strings.Repeat("x", 128<<10) + `"}`)
	err := a.readErr(3 * time.Second)
	if websocket.CloseStatus(err) != websocket.StatusMessageTooBig {
		t.Errorf("socket ended with %v, want close status 1009", err)
	}
}

// TestResponseFromOtherProviderDropped checks that one agent cannot answer a
// request sent to another, even with the right request id.
func TestResponseFromOtherProviderDropped(t *testing.T) {
	rs := newCluster(t, "memory", 1, nil)
	r := rs[0]
	target := dialRaw(t, r)
	targetID := target.auth("key-alice")
	intruder := dialRaw(t, r)
	intruder.auth("key-bob")

	done := make(chan requestAnswer, 1)
	go func() {
		_, ans := r.request(t, map[string]any{"user_id": "alice", "provider_id": targetID, "request_type": "get_positions", "timeout_ms": 1500})
		done <- ans
	}()
	m := target.read()
	id := m["request_id"].(string)
	intruder.send(`{"type":"response","request_id":"` + id + `","success":true,"data":{"positions":["stolen"]},"error":null}`)
	time.Sleep(100 * time.Millisecond)
	target.send(`{"type":"response","request_id":"` + id + `","success":true,"data":{"positions":[]},"error":null}`)
	ans := <-done
	if string(ans.Data) != `{"positions":[]}` {
		t.Errorf("caller got %s, want the target agent's answer", ans.Data)
	}
}

func TestHeartbeatAcknowledged(t *testing.T) {
	rs := newCluster(t, "memory", 1, nil)
	a := dialRaw(t, rs[0])
	a.auth("key-alice")
	for range 3 {
		a.send(`{"type":"heartbeat"}`)
		if m := a.read(); m["type"] != "heartbeat_ack" {
			t.Fatalf("got %v, want heartbeat_ack", m)
		}
	}
}

func TestBootPhaseInStatus(t *testing.T) {
	rs := newCluster(t, "memory", 1, nil)
	a := dialRaw(t, rs[0])
	a.auth("key-alice")
	a.send(`{"type":"boot_phase","phase":"ib_connecting","detail":"Connecting to TWS","progress":0.4,"timestamp":1796413970.85}`)
	a.send(`{"type":"agent_state","ib_connected":false}`)
	var st ibStatusAnswer
	eventually(t, 2*time.Second, func() bool {
		st = rs[0].ibStatus(t, "user_id=alice&source=cache")
		return st.BootPhase != nil
	}, "boot_phase never appeared in ib-status")
	if st.BootPhase.Phase != "ib_connecting" || st.BootPhase.Detail != "Connecting to TWS" {
		t.Errorf("boot_phase = %+v", st.BootPhase)
	}
	if !strings.Contains(st.Message, "starting up") {
		t.Errorf("message %q does not say the agent is starting up", st.Message)
	}
}

func TestBackendRequestValidation(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.MaxBodyBytes = 1 << 10 })
	r := rs[0]
	cases := map[string]struct {
		body       string
		wantStatus int
		wantCode   string
	}{
		"invalid JSON":        {`{"request_type":`, 400, "invalid_request"},
		"missing type":        {`{"user_id":"alice"}`, 400, "invalid_request"},
		"missing user":        {`{"request_type":"echo"}`, 400, "invalid_request"},
		"payload not object":  {`{"request_type":"echo","user_id":"alice","payload":[1]}`, 400, "invalid_request"},
		"zero timeout":        {`{"request_type":"echo","user_id":"alice","timeout_ms":0}`, 400, "invalid_request"},
		"absurd timeout":      {`{"request_type":"echo","user_id":"alice","timeout_ms":1e12}`, 400, "invalid_request"},
		"bad type characters": {`{"request_type":"a b","user_id":"alice"}`, 400, "invalid_request"},
		"unknown user":        {`{"request_type":"echo","user_id":"nobody"}`, 503, "no_provider"},
		"numeric user id":     {`{"request_type":"echo","user_id":12345}`, 503, "no_provider"},
		"body too large":      {`{"request_type":"echo","user_id":"alice","payload":{"x":"` + strings.Repeat("y", 2<<10) + `"}}`, 413, "body_too_large"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var out struct {
				Error   string `json:"error"`
				Message string `json:"message"`
			}
			status := r.postRaw(t, "/options/relay/request", tc.body, &out)
			if status != tc.wantStatus || out.Error != tc.wantCode {
				t.Errorf("status %d error %q, want %d %q", status, out.Error, tc.wantStatus, tc.wantCode)
			}
			if out.Message == "" {
				t.Error("error answer has no message")
			}
		})
	}

	for _, q := range []string{"timeout_ms=abc", "timeout_ms=-5", "source=disk"} {
		var out map[string]string
		if status := r.getJSON(t, "/options/relay/ib-status?"+q, &out); status != 400 || out["error"] != "invalid_request" {
			t.Errorf("ib-status?%s: status %d %v, want 400 invalid_request", q, status, out)
		}
	}
	var out map[string]string
	if status := r.getJSON(t, "/options/relay/account-events?since=1", &out); status != 400 {
		t.Errorf("account-events without user_id: status %d, want 400", status)
	}
	if status := r.getJSON(t, "/no/such/path", &out); status != 404 || out["error"] != "not_found" {
		t.Errorf("unknown path: %d %v", status, out)
	}
}

func TestAPITokenRequired(t *testing.T) {
	rs := newCluster(t, "memory", 1, func(c *Config) { c.APIToken = "s3cret-token" })
	r := rs[0]
	get := func(path, auth string) int {
		req, _ := http.NewRequest(http.MethodGet, r.base+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := get("/options/relay/registry", ""); got != 401 {
		t.Errorf("no token: %d, want 401", got)
	}
	if got := get("/options/relay/registry", "Bearer wrong"); got != 401 {
		t.Errorf("wrong token: %d, want 401", got)
	}
	if got := get("/options/relay/registry", "Bearer s3cret-token"); got != 200 {
		t.Errorf("right token: %d, want 200", got)
	}
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		if got := get(path, ""); got != 200 {
			t.Errorf("%s without token: %d, want 200", path, got)
		}
	}
}

func TestDrainClosesAgentsWith1012(t *testing.T) {
	rs := newCluster(t, "memory", 2, nil)
	a := dialRaw(t, rs[0])
	id := a.auth("key-alice")

	errc := make(chan error, 1)
	go func() { errc <- a.readErr(10 * time.Second) }()
	if err := rs[0].srv.Drain(t.Context()); err != nil {
		t.Fatal(err)
	}
	err := <-errc
	if websocket.CloseStatus(err) != websocket.StatusServiceRestart {
		t.Errorf("agent socket ended with %v, want close status 1012", err)
	}
	if rs[1].hasProvider(t, id) {
		t.Error("drained replica's provider still listed by the other replica")
	}
	var ready map[string]any
	if status := rs[0].getJSON(t, "/readyz", &ready); status != http.StatusServiceUnavailable || ready["draining"] != true {
		t.Errorf("readyz while drained: %d %v", status, ready)
	}
	if _, _, err := websocket.Dial(t.Context(), rs[0].ws, nil); err == nil {
		t.Error("a drained replica accepted a new agent")
	}
}
