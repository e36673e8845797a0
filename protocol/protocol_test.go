package protocol

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"testing"
)

func TestCompareVersions(t *testing.T) {
	cases := []struct {
		a, b string
		want int
	}{
		{"1.10.0", "1.9.0", 1},
		{"1.9.0", "1.10.0", -1},
		{"1.2", "1.2.0", 0},
		{"v1.2.3", "1.2.3", 0},
		{"2.0.0", "1.99.99", 1},
		{"0.0.0", "", 0},
		{"1.2.0rc1", "1.2.0", 1},
		{"1.2.0rc2", "1.2.0rc1", 1},
		{"1.39.1", "1.39.1", 0},
		{"99999999999999999999999.0", "1.0", -1},
	}
	for _, tc := range cases {
		if got := CompareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestPeekType(t *testing.T) {
	cases := map[string]struct {
		frame string
		want  string
		err   bool
	}{
		"heartbeat":      {`{"type":"heartbeat"}`, "heartbeat", false},
		"extra fields":   {`{"x":1,"type":"agent_state"}`, "agent_state", false},
		"invalid JSON":   {`{"type":`, "", true},
		"array":          {`[]`, "", true},
		"no type":        {`{"kind":"x"}`, "", true},
		"type is number": {`{"type":1}`, "", true},
		"empty type":     {`{"type":""}`, "", true},
	}
	for name, tc := range cases {
		got, err := PeekType([]byte(tc.frame))
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("%s: PeekType = %q, %v; want %q, error %v", name, got, err, tc.want, tc.err)
		}
	}
	if _, err := PeekType([]byte(`{}`)); !errors.Is(err, ErrMissingType) {
		t.Errorf("PeekType({}) error = %v, want ErrMissingType", err)
	}
}

// TestDecodeFixture decodes every agent message of the recorded production
// session into its type.
func TestDecodeFixture(t *testing.T) {
	f, err := os.Open("../../shared/fixtures/agent-1.39.1-session.jsonl")
	if err != nil {
		t.Skipf("fixture not available: %v", err)
	}
	defer f.Close()
	counts := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var line struct {
			Dir string          `json:"dir"`
			Msg json.RawMessage `json:"msg"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatal(err)
		}
		typ, err := PeekType(line.Msg)
		if err != nil {
			t.Fatalf("%s: %v", line.Msg, err)
		}
		counts[typ]++
		var v any
		switch typ {
		case TypeAuth:
			v = &Auth{}
		case TypeAgentState:
			v = &AgentState{}
		case TypeIBAccounts:
			v = &IBAccounts{}
		case TypeBootPhase:
			v = &BootPhase{}
		case TypeResponse:
			v = &Response{}
		case TypeRequest:
			v = &Request{}
		case TypeAuthResponse:
			v = &AuthResponse{}
		default:
			continue
		}
		if err := Decode(line.Msg, typ, v); err != nil {
			t.Errorf("decode %s: %v", line.Msg, err)
		}
		if st, ok := v.(*AgentState); ok && (st.IBConnected == nil || !*st.IBConnected || st.AvailableScanLines != 90) {
			t.Errorf("agent_state decoded as %+v", st)
		}
		if r, ok := v.(*Response); ok && r.RequestID == "" {
			t.Errorf("response without request_id: %s", line.Msg)
		}
	}
	for _, typ := range []string{TypeAuth, TypeHeartbeat, TypeAgentState, TypeIBAccounts, TypeBootPhase, TypeResponse, TypeRequest} {
		if counts[typ] == 0 {
			t.Errorf("fixture has no %s message", typ)
		}
	}
}

func TestEncodeRequestEmptyPayload(t *testing.T) {
	for _, p := range []json.RawMessage{nil, json.RawMessage("null")} {
		frame, err := EncodeRequest("id1", "ib_status", p)
		if err != nil {
			t.Fatal(err)
		}
		if string(frame) != `{"type":"request","request_id":"id1","request_type":"ib_status","payload":{}}` {
			t.Errorf("frame %s", frame)
		}
	}
}

func TestIsResponse(t *testing.T) {
	cases := map[string]bool{
		`{"type": "response", "request_id": "r1"}`: true,
		`{"type":"response","request_id":"r1"}`:    true,
		`{"type": "response"}`:                     true,
		`{"type": "responses"}`:                    false,
		`{"type": "heartbeat"}`:                    false,
		`{"request_id": "r1", "type": "response"}`: false, // decoded by PeekType instead
		`{"type": "response"`:                      false,
	}
	for frame, want := range cases {
		if got := IsResponse([]byte(frame)); got != want {
			t.Errorf("IsResponse(%s) = %v, want %v", frame, got, want)
		}
	}
}
