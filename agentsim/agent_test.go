package agentsim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/relay-project/relay/protocol"
)

// floatFields matches the fields whose values change from run to run. The
// pattern requires a decimal point, so a mask also checks that the value is
// written as a float.
var floatFields = regexp.MustCompile(`"(timestamp|last_connected)": [0-9]+\.[0-9]+`)

func maskFloats(frame string) string {
	return floatFields.ReplaceAllString(frame, `"$1": <float>`)
}

// quietConfig returns a Config for url whose periodic messages stay out of
// the way of a test.
func quietConfig(url string) Config {
	return Config{
		URL:               url,
		APIKey:            "test-key",
		TWSConnected:      true,
		HeartbeatInterval: time.Hour,
		PingInterval:      time.Hour,
	}
}

func TestSessionMatchesFixture(t *testing.T) {
	fixture := readFixture(t)
	relay := newFakeRelay(t)
	startAgent(t, Config{
		URL:               relay.url(),
		APIKey:            "REDACTED-API-KEY",
		Accounts:          []string{"DU1234567"},
		TWSConnected:      true,
		HeartbeatInterval: time.Hour,
		PingInterval:      time.Hour,
	})
	rc := relay.nextConn()

	if fixture[0].dir != "agent->relay" {
		t.Fatalf("fixture starts with %s, want the agent's auth", fixture[0].dir)
	}
	if string(rc.auth) != fixture[0].text {
		t.Errorf("auth frame\n got %s\nwant %s", rc.auth, fixture[0].text)
	}

	// The start-up frames run from after the auth_response up to the first
	// request. The fake relay sends its own heartbeat_ack.
	i := 2
	for ; i < len(fixture); i++ {
		want := fixture[i]
		if want.dir == "relay->agent" {
			if strings.Contains(want.text, `"type": "request"`) {
				break
			}
			continue
		}
		got := string(rc.next())
		if maskFloats(got) != maskFloats(want.text) {
			t.Errorf("start-up frame %d\n got %s\nwant %s", i, got, want.text)
		}
	}

	// Each request is followed by the agent's response in the fixture.
	compared := 0
	for ; i+1 < len(fixture); i++ {
		request := fixture[i]
		if request.dir != "relay->agent" || !strings.Contains(request.text, `"type": "request"`) {
			continue
		}
		want := fixture[i+1]
		i++
		// The simulator has no IB contract lookup, so its response to
		// check_availability differs from the production agent's.
		if strings.Contains(request.text, `"check_availability"`) {
			continue
		}
		rc.send(request.text)
		got := string(rc.nextResponse().frame)
		if maskFloats(got) != maskFloats(want.text) {
			t.Errorf("response to %s\n got %s\nwant %s", request.text, got, want.text)
		}
		compared++
	}
	if compared != 4 {
		t.Errorf("compared %d responses with the fixture, want 4", compared)
	}
}

func TestStartupTimestampsAreCurrent(t *testing.T) {
	relay := newFakeRelay(t)
	startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()

	var phase protocol.BootPhase
	if err := json.Unmarshal(rc.next(), &phase); err != nil {
		t.Fatalf("decode boot_phase: %v", err)
	}
	age := time.Since(time.UnixMicro(int64(phase.Timestamp * 1e6)))
	if age < 0 || age > time.Minute {
		t.Errorf("boot_phase timestamp %f is %v old", phase.Timestamp, age)
	}
}

func TestHeartbeatRepeatsWithAgentState(t *testing.T) {
	fixture := readFixture(t)
	heartbeat, state := fixture[6].text, fixture[8].text

	relay := newFakeRelay(t)
	const interval = 30 * time.Millisecond
	startAgent(t, Config{URL: relay.url(), APIKey: "k", TWSConnected: true, HeartbeatInterval: interval, PingInterval: time.Hour})
	rc := relay.nextConn()
	rc.skipStartup()

	start := time.Now()
	for n := range 3 {
		if got := string(rc.next()); got != heartbeat {
			t.Fatalf("periodic frame %d = %s, want %s", 2*n, got, heartbeat)
		}
		if got := string(rc.next()); got != state {
			t.Fatalf("periodic frame %d = %s, want %s", 2*n+1, got, state)
		}
	}
	if elapsed := time.Since(start); elapsed < 2*interval {
		t.Errorf("3 heartbeats took %v, want at least %v", elapsed, 2*interval)
	}
}

func TestIBStatusFollowsTWSState(t *testing.T) {
	relay := newFakeRelay(t)
	cfg := quietConfig(relay.url())
	cfg.TWSConnected = false
	agent := startAgent(t, cfg)
	rc := relay.nextConn()
	rc.skipStartup()

	rc.request("r1", "ib_status", "{}")
	resp := rc.nextResponse()
	want := `{"connected": false, "reconnecting": false, "user_disconnect": false, "message": "IB TWS not connected", ` +
		`"farm_status": {"usfarm": false, "ushmds": false, "secdefnj": false}, "data_available": false, ` +
		`"read_only_session": false, "last_connected": null}`
	if !resp.Success {
		t.Errorf("ib_status success = false, error %v", resp.Error)
	}
	if string(resp.Data) != want {
		t.Errorf("ib_status data while TWS is not connected\n got %s\nwant %s", resp.Data, want)
	}

	agent.SetTWSConnected(true)
	state := string(rc.next())
	if !strings.Contains(state, `"type": "agent_state"`) || !strings.Contains(state, `"ib_connected": true`) {
		t.Errorf("frame after SetTWSConnected(true) = %s, want an agent_state with ib_connected true", state)
	}

	rc.request("r2", "ib_status", "{}")
	var status struct {
		Connected     bool     `json:"connected"`
		Message       string   `json:"message"`
		LastConnected *float64 `json:"last_connected"`
	}
	if err := json.Unmarshal(rc.nextResponse().Data, &status); err != nil {
		t.Fatalf("decode ib_status data: %v", err)
	}
	if !status.Connected {
		t.Error("ib_status connected = false after SetTWSConnected(true)")
	}
	if status.Message != "IB TWS connected" {
		t.Errorf("ib_status message = %q, want %q", status.Message, "IB TWS connected")
	}
	if status.LastConnected == nil {
		t.Error("ib_status last_connected = null after SetTWSConnected(true)")
	}
}

func TestUnknownRequestType(t *testing.T) {
	relay := newFakeRelay(t)
	startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()
	rc.skipStartup()

	rc.request("r1", "place_rocket", `{"x": 1}`)
	resp := rc.nextResponse()
	want := `{"type": "response", "request_id": "r1", "success": false, "data": null, "error": "Unknown request type: place_rocket"}`
	if string(resp.frame) != want {
		t.Errorf("response\n got %s\nwant %s", resp.frame, want)
	}
}

func TestEchoReturnsPayload(t *testing.T) {
	relay := newFakeRelay(t)
	startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()
	rc.skipStartup()

	payload := `{"nested":{"list":[1,2.5,"x"]},"unicode":"é"}`
	rc.request("r1", "echo", payload)
	resp := rc.nextResponse()
	if !resp.Success {
		t.Errorf("echo success = false, error %v", resp.Error)
	}
	if string(resp.Data) != payload {
		t.Errorf("echo data = %s, want %s", resp.Data, payload)
	}
}

// chainData is the part of a fetch_chain response the tests check.
type chainData struct {
	Ticker          string    `json:"ticker"`
	UnderlyingPrice float64   `json:"underlying_price"`
	Expirations     []string  `json:"expirations"`
	Strikes         []float64 `json:"strikes"`
	Calls           []struct {
		Symbol     string  `json:"symbol"`
		Expiration string  `json:"expiration"`
		Strike     float64 `json:"strike"`
		Right      string  `json:"right"`
		Bid        float64 `json:"bid"`
		Ask        float64 `json:"ask"`
		IV         float64 `json:"iv"`
		Delta      float64 `json:"delta"`
	} `json:"calls"`
	Puts []struct {
		Right string  `json:"right"`
		Delta float64 `json:"delta"`
	} `json:"puts"`
}

func TestFetchChainSize(t *testing.T) {
	sizes := map[string]int{
		"default": 0,
		"small":   5_000,
		"3 MB":    3_000_000,
	}
	for name, chainBytes := range sizes {
		t.Run(name, func(t *testing.T) {
			relay := newFakeRelay(t)
			cfg := quietConfig(relay.url())
			cfg.ChainBytes = chainBytes
			startAgent(t, cfg)
			rc := relay.nextConn()
			rc.skipStartup()

			rc.request("r1", "fetch_chain", `{"ticker": "spy"}`)
			resp := rc.nextResponse()
			if !resp.Success {
				t.Fatalf("fetch_chain success = false, error %v", resp.Error)
			}

			want := chainBytes
			if want == 0 {
				want = DefaultChainBytes
			}
			if len(resp.Data) < want {
				t.Errorf("fetch_chain data is %d bytes, want at least %d", len(resp.Data), want)
			}
			if len(resp.Data) > want+want/10+2_000 {
				t.Errorf("fetch_chain data is %d bytes, want about %d", len(resp.Data), want)
			}

			var chain chainData
			if err := json.Unmarshal(resp.Data, &chain); err != nil {
				t.Fatalf("fetch_chain data is not valid JSON: %v", err)
			}
			checkChain(t, chain, "SPY")
		})
	}
}

func checkChain(t *testing.T, chain chainData, ticker string) {
	t.Helper()
	if chain.Ticker != ticker {
		t.Errorf("ticker = %q, want %q", chain.Ticker, ticker)
	}
	if chain.UnderlyingPrice <= 0 {
		t.Errorf("underlying_price = %v, want > 0", chain.UnderlyingPrice)
	}
	if len(chain.Expirations) == 0 || len(chain.Strikes) == 0 {
		t.Fatalf("chain has %d expirations and %d strikes, want some of each", len(chain.Expirations), len(chain.Strikes))
	}
	if len(chain.Calls) == 0 || len(chain.Calls) != len(chain.Puts) {
		t.Fatalf("chain has %d calls and %d puts, want the same number > 0", len(chain.Calls), len(chain.Puts))
	}
	for _, c := range chain.Calls {
		if c.Right != "C" || c.Symbol != ticker {
			t.Fatalf("call row %+v has the wrong right or symbol", c)
		}
		if c.Bid < 0 || c.Ask < c.Bid {
			t.Fatalf("call row %+v has a negative bid or bid > ask", c)
		}
		if c.Delta < 0 || c.Delta > 1 || c.IV <= 0 {
			t.Fatalf("call row %+v has an impossible delta or iv", c)
		}
	}
	for _, p := range chain.Puts {
		if p.Right != "P" || p.Delta > 0 || p.Delta < -1 {
			t.Fatalf("put row %+v has the wrong right or delta", p)
		}
	}
}

func TestFetchChainWithoutTicker(t *testing.T) {
	relay := newFakeRelay(t)
	startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()
	rc.skipStartup()

	rc.request("r1", "fetch_chain", `{}`)
	resp := rc.nextResponse()
	if resp.Success {
		t.Error("fetch_chain without a ticker succeeded")
	}
	if string(resp.Data) != "null" {
		t.Errorf("data = %s, want null", resp.Data)
	}
	if resp.Error == nil || *resp.Error == "" {
		t.Error("error is empty, want a message")
	}
}

func TestSleepRespondsOutOfOrder(t *testing.T) {
	relay := newFakeRelay(t)
	startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()
	rc.skipStartup()

	rc.request("slow", "sleep", `{"ms": 300}`)
	rc.request("fast", "sleep", `{"ms": 0}`)
	rc.request("echo", "echo", `{}`)

	var order []string
	for range 3 {
		resp := rc.nextResponse()
		if !resp.Success {
			t.Errorf("response to %s failed: %v", resp.RequestID, resp.Error)
		}
		order = append(order, resp.RequestID)
		if resp.RequestID == "slow" && string(resp.Data) != `{"slept_ms": 300}` {
			t.Errorf("sleep data = %s, want {\"slept_ms\": 300}", resp.Data)
		}
	}
	if order[2] != "slow" {
		t.Errorf("response order = %v, want the 300 ms sleep last", order)
	}
}

func TestSleepRejectsInvalidPayload(t *testing.T) {
	relay := newFakeRelay(t)
	startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()
	rc.skipStartup()

	for i, payload := range []string{`{}`, `{"ms": -1}`, `{"ms": "ten"}`} {
		rc.request(fmt.Sprint(i), "sleep", payload)
		if resp := rc.nextResponse(); resp.Success {
			t.Errorf("sleep with payload %s succeeded", payload)
		}
	}
}

func TestResponseDelayIsConcurrent(t *testing.T) {
	relay := newFakeRelay(t)
	cfg := quietConfig(relay.url())
	const delay = 200 * time.Millisecond
	cfg.ResponseDelay = delay
	startAgent(t, cfg)
	rc := relay.nextConn()
	rc.skipStartup()

	start := time.Now()
	for i := range 5 {
		rc.request(fmt.Sprint(i), "echo", `{}`)
	}
	for range 5 {
		rc.nextResponse()
	}
	elapsed := time.Since(start)
	if elapsed < delay {
		t.Errorf("5 responses took %v, want at least the response delay %v", elapsed, delay)
	}
	// Delayed one after another, the five responses would take 1 s.
	if elapsed > 3*delay {
		t.Errorf("5 responses took %v, want them delayed concurrently (about %v)", elapsed, delay)
	}
}

func TestSilentAgent(t *testing.T) {
	relay := newFakeRelay(t)
	cfg := quietConfig(relay.url())
	cfg.Silent = true
	agent := startAgent(t, cfg)
	rc := relay.nextConn()
	rc.skipStartup()

	rc.request("ignored", "ib_status", "{}")
	rc.expectNoResponse(300 * time.Millisecond)

	agent.SetSilent(false)
	rc.request("answered", "ib_status", "{}")
	if resp := rc.nextResponse(); resp.RequestID != "answered" {
		t.Errorf("response to %q, want to %q", resp.RequestID, "answered")
	}

	// The agent counts a response after writing it, so the relay can
	// receive it before the count changes.
	stats := waitForStats(t, agent, func(s Stats) bool { return s.RequestsAnswered >= 1 })
	if stats.RequestsReceived != 2 {
		t.Errorf("RequestsReceived = %d, want 2", stats.RequestsReceived)
	}
	if stats.RequestsAnswered != 1 {
		t.Errorf("RequestsAnswered = %d, want 1", stats.RequestsAnswered)
	}
}

// waitForStats returns the agent's Stats once done reports true for them,
// and fails the test if that takes longer than waitTimeout.
func waitForStats(t *testing.T, agent *Agent, done func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		stats := agent.Stats()
		if done(stats) {
			return stats
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v did not reach the expected values in %v", stats, waitTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSetSilentDropsDelayedResponses(t *testing.T) {
	relay := newFakeRelay(t)
	cfg := quietConfig(relay.url())
	cfg.ResponseDelay = 200 * time.Millisecond
	agent := startAgent(t, cfg)
	rc := relay.nextConn()
	rc.skipStartup()

	rc.request("r1", "echo", "{}")
	time.Sleep(50 * time.Millisecond)
	agent.SetSilent(true)
	rc.expectNoResponse(400 * time.Millisecond)

	agent.SetSilent(false)
	agent.SetResponseDelay(0)
	rc.request("r2", "echo", "{}")
	if resp := rc.nextResponse(); resp.RequestID != "r2" {
		t.Errorf("response to %q, want to %q", resp.RequestID, "r2")
	}
}

func TestReconnectAfterRelayCloses(t *testing.T) {
	relay := newFakeRelay(t)
	agent := startAgent(t, quietConfig(relay.url()))
	first := relay.nextConn()
	first.skipStartup()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}
	if got := agent.ProviderID(); got != "provider-1" {
		t.Errorf("ProviderID = %q, want provider-1", got)
	}

	first.ws.Close(websocket.StatusServiceRestart, "restarting")

	second := relay.nextConn()
	if string(second.auth) != string(first.auth) {
		t.Errorf("auth after reconnect = %s, want %s", second.auth, first.auth)
	}
	second.skipStartup()
	second.request("r1", "ib_status", "{}")
	if resp := second.nextResponse(); !resp.Success {
		t.Errorf("ib_status after reconnect failed: %v", resp.Error)
	}

	stats := agent.Stats()
	if stats.Connects != 2 {
		t.Errorf("Connects = %d, want 2", stats.Connects)
	}
	if stats.LastCloseCode != websocket.StatusServiceRestart {
		t.Errorf("LastCloseCode = %d, want %d", stats.LastCloseCode, websocket.StatusServiceRestart)
	}
	if got := agent.ProviderID(); got != "provider-2" {
		t.Errorf("ProviderID = %q, want provider-2", got)
	}
}

func TestReconnectWaitsReconnectDelay(t *testing.T) {
	relay := newFakeRelay(t)
	cfg := quietConfig(relay.url())
	const delay = 300 * time.Millisecond
	cfg.ReconnectDelay = delay
	startAgent(t, cfg)
	first := relay.nextConn()
	first.skipStartup()

	closed := time.Now()
	first.ws.Close(websocket.StatusGoingAway, "")
	relay.nextConn()
	if elapsed := time.Since(closed); elapsed < delay {
		t.Errorf("agent reconnected after %v, want at least %v", elapsed, delay)
	}
}

func TestAuthFailureThenReconnect(t *testing.T) {
	relay := newFakeRelay(t)
	relay.accept = func(n int, key string) string {
		if n == 1 {
			return ""
		}
		return "provider-ok"
	}
	agent := startAgent(t, quietConfig(relay.url()))

	rc := relay.nextConn()
	rc.skipStartup()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}

	stats := agent.Stats()
	if stats.AuthFailures != 1 {
		t.Errorf("AuthFailures = %d, want 1", stats.AuthFailures)
	}
	if stats.Connects != 1 {
		t.Errorf("Connects = %d, want 1", stats.Connects)
	}
	if stats.Dials != 2 {
		t.Errorf("Dials = %d, want 2", stats.Dials)
	}
	if stats.LastCloseCode != websocket.StatusPolicyViolation {
		t.Errorf("LastCloseCode = %d, want the relay's %d", stats.LastCloseCode, websocket.StatusPolicyViolation)
	}
	if got := agent.ProviderID(); got != "provider-ok" {
		t.Errorf("ProviderID = %q, want provider-ok", got)
	}
}

func TestRejectedAgentKeepsRetrying(t *testing.T) {
	relay := newFakeRelay(t)
	relay.accept = func(int, string) string { return "" }
	agent := startAgent(t, quietConfig(relay.url()))

	waitForStats(t, agent, func(s Stats) bool { return s.AuthFailures >= 3 })
	if agent.Connected() {
		t.Error("Connected = true for a rejected key")
	}
	if got := agent.ProviderID(); got != "" {
		t.Errorf("ProviderID = %q for a rejected key, want empty", got)
	}
}

func TestDisconnectClosesNormally(t *testing.T) {
	relay := newFakeRelay(t)
	agent := startAgent(t, quietConfig(relay.url()))
	first := relay.nextConn()
	first.skipStartup()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}

	agent.Disconnect()
	if code := first.waitClosed(); code != websocket.StatusNormalClosure {
		t.Errorf("close status = %d, want %d", code, websocket.StatusNormalClosure)
	}
	relay.nextConn()
}

func TestRunStopsOnCancel(t *testing.T) {
	relay := newFakeRelay(t)
	agent := New(quietConfig(relay.url()))
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx) }()

	rc := relay.nextConn()
	rc.skipStartup()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}

	cancel()
	if code := rc.waitClosed(); code != websocket.StatusNormalClosure {
		t.Errorf("close status = %d, want %d", code, websocket.StatusNormalClosure)
	}
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run did not return after cancel")
	}
	if agent.Connected() {
		t.Error("Connected = true after Run returned")
	}
}

func TestRunTwiceFails(t *testing.T) {
	relay := newFakeRelay(t)
	agent := startAgent(t, quietConfig(relay.url()))
	relay.nextConn()
	if err := agent.Run(t.Context()); err == nil {
		t.Error("second Run returned nil, want an error")
	}
}

func TestAuthVersion(t *testing.T) {
	tests := map[string]struct {
		version string
		omit    bool
		want    string
	}{
		"default": {"", false, `{"type": "auth", "api_key": "k", "version": "1.39.1"}`},
		"custom":  {"1.33.0", false, `{"type": "auth", "api_key": "k", "version": "1.33.0"}`},
		"omitted": {"", true, `{"type": "auth", "api_key": "k"}`},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			relay := newFakeRelay(t)
			cfg := quietConfig(relay.url())
			cfg.APIKey = "k"
			cfg.Version = tc.version
			cfg.OmitVersion = tc.omit
			startAgent(t, cfg)
			if got := string(relay.nextConn().auth); got != tc.want {
				t.Errorf("auth frame = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestDefaultAccountsDifferByKey(t *testing.T) {
	pattern := regexp.MustCompile(`^DU[0-9]{7}$`)
	first := New(Config{APIKey: "user0"}).cfg.Accounts
	second := New(Config{APIKey: "user1"}).cfg.Accounts
	if len(first) != 1 || !pattern.MatchString(first[0]) {
		t.Fatalf("default accounts = %v, want one DU and 7 digits", first)
	}
	if first[0] == second[0] {
		t.Errorf("keys user0 and user1 share the default account %s", first[0])
	}
	if again := New(Config{APIKey: "user0"}).cfg.Accounts; again[0] != first[0] {
		t.Errorf("default account for user0 changed from %s to %s", first[0], again[0])
	}
}

func TestSendAccountEvent(t *testing.T) {
	relay := newFakeRelay(t)
	agent := startAgent(t, quietConfig(relay.url()))
	rc := relay.nextConn()
	rc.skipStartup()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}

	err := agent.SendAccountEvent("order_filled", map[string]any{"symbol": "SPY", "qty": 5, "avg_price": 450.0})
	if err != nil {
		t.Fatalf("SendAccountEvent: %v", err)
	}
	want := `{"type": "account_event", "event": "order_filled", "avg_price": 450.0, "qty": 5, "symbol": "SPY"}`
	if got := string(rc.nextOfType(protocol.TypeAccountEvent)); got != want {
		t.Errorf("account_event frame\n got %s\nwant %s", got, want)
	}

	if err := agent.SendAccountEvent("x", map[string]any{"type": "y"}); err == nil {
		t.Error("SendAccountEvent with a type field returned nil, want an error")
	}
}

func TestSendRaw(t *testing.T) {
	relay := newFakeRelay(t)
	agent := New(quietConfig(relay.url()))
	if err := agent.SendRaw(t.Context(), []byte(`{}`)); !errors.Is(err, ErrNotConnected) {
		t.Errorf("SendRaw before Run = %v, want ErrNotConnected", err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go agent.Run(ctx)
	rc := relay.nextConn()
	rc.skipStartup()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}

	frame := `{"type":"execution_telemetry","raw":true}`
	if err := agent.SendRaw(t.Context(), []byte(frame)); err != nil {
		t.Fatalf("SendRaw: %v", err)
	}
	if got := string(rc.next()); got != frame {
		t.Errorf("frame = %s, want %s", got, frame)
	}
}

func TestPingsEveryInterval(t *testing.T) {
	relay := newFakeRelay(t)
	cfg := quietConfig(relay.url())
	cfg.PingInterval = 20 * time.Millisecond
	agent := startAgent(t, cfg)
	relay.nextConn().skipStartup()

	deadline := time.Now().Add(waitTimeout)
	for relay.pings.Load() < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("relay received %d pings in %v, want 5", relay.pings.Load(), waitTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !agent.Connected() {
		t.Error("Connected = false while the relay returns pongs")
	}
	if got := agent.Stats().Connects; got != 1 {
		t.Errorf("Connects = %d, want 1", got)
	}
}

func TestMissingPongClosesConnection(t *testing.T) {
	oldTimeout := pongTimeout
	pongTimeout = 100 * time.Millisecond
	t.Cleanup(func() { pongTimeout = oldTimeout })

	relay := newFakeRelay(t)
	relay.ignorePings.Store(true)
	cfg := quietConfig(relay.url())
	cfg.PingInterval = 20 * time.Millisecond
	agent := startAgent(t, cfg)
	first := relay.nextConn()

	if code := first.waitClosed(); code != websocket.StatusInternalError {
		t.Errorf("close status = %d, want %d after a ping timeout", code, websocket.StatusInternalError)
	}
	relay.ignorePings.Store(false)
	relay.nextConn()
	if err := agent.WaitConnected(t.Context()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}
}

func TestWaitConnectedHonorsContext(t *testing.T) {
	agent := New(Config{URL: "ws://127.0.0.1:1/ws/data-provider", APIKey: "k"})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	if err := agent.WaitConnected(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitConnected = %v, want context.DeadlineExceeded", err)
	}
}
