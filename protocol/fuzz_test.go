package protocol

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// sessionFixturePath is a recorded session of the production agent 1.39.1,
// one {"dir": ..., "msg": {...}} object per line.
const sessionFixturePath = "../../shared/fixtures/agent-1.39.1-session.jsonl"

// fixtureFrames returns the frames of the recorded session in both
// directions, or nil when the fixture is not present. Fuzz targets then run
// on their hand-written seeds only.
func fixtureFrames(tb testing.TB) [][]byte {
	tb.Helper()
	f, err := os.Open(sessionFixturePath)
	if err != nil {
		tb.Logf("fixture not available, fuzzing without its frames: %v", err)
		return nil
	}
	defer f.Close()
	var frames [][]byte
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var line struct {
			Msg json.RawMessage `json:"msg"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			tb.Fatalf("fixture line %q: %v", sc.Text(), err)
		}
		frames = append(frames, line.Msg)
	}
	if err := sc.Err(); err != nil {
		tb.Fatalf("read fixture: %v", err)
	}
	return frames
}

// edgeFrames are hand-written frames for the cases that real agents rarely
// send: key casing, duplicate keys, null and wrongly typed fields, numbers
// out of range, invalid UTF-8 and nesting beyond encoding/json's depth limit.
var edgeFrames = []string{
	``,
	`null`,
	`[]`,
	`"type"`,
	`{}`,
	`{"type":""}`,
	`{"type":null}`,
	`{"type":1}`,
	`{"type":"\u0000"}`,
	`{"type":"heartbeat"}`,
	`{"type":"heartbeat"}` + "\n",
	`  {"type":"heartbeat"}  `,
	`{"type":"heartbeat"} {"type":"auth"}`,
	"\xef\xbb\xbf" + `{"type":"heartbeat"}`,
	`{"TYPE":"heartbeat"}`,
	`{"Type":"auth","API_KEY":"k","Version":"1.39.1"}`,
	`{"type":"heartbeat","Type":"response","request_id":"r1-1"}`,
	`{"type":"response","type":"heartbeat"}`,
	`{"type":"auth","api_key":"\ud800","version":"1.39.1"}`,
	`{"type":"auth","api_key":null,"version":null}`,
	`{"type":"auth","api_key":["k"]}`,
	"{\"type\":\"heart\xffbeat\"}",
	"{\"type\":\"response\",\"request_id\":\"\xc3\x28\",\"success\":true,\"data\":{\"k\":\"\xff\"},\"error\":null}",
	`{"type":"agent_state","ib_connected":null,"execution_active":null,"execution_lines_held":null}`,
	`{"type":"agent_state","ib_connected":"yes"}`,
	`{"type":"agent_state","execution_lines_held":99999999999999999999}`,
	`{"type":"agent_state","execution_lines_held":1e400}`,
	`{"type":"agent_state","execution_lines_held":1.5}`,
	`{"type":"agent_state","available_scan_lines":-9223372036854775808}`,
	`{"type":"agent_state","ib_farms":null,"ib_data_available":null}`,
	`{"type":"agent_state","ib_farms":[1,{"a":[]}],"ib_farms":"x"}`,
	`{"type":"ib_accounts","accounts":null}`,
	`{"type":"ib_accounts","accounts":[null,"DU1234567",""]}`,
	`{"type":"ib_accounts","accounts":"DU1234567"}`,
	`{"type":"boot_phase","phase":null,"detail":null,"progress":null,"timestamp":null}`,
	`{"type":"boot_phase","phase":"boot_complete","progress":1e308,"timestamp":-1e-400}`,
	`{"type":"boot_phase","progress":1e309}`,
	`{"type":"response","request_id":null,"success":null,"data":null,"error":null}`,
	`{"type":"response","request_id":5,"success":"true"}`,
	`{"type":"response","request_id":"r1-1","success":true,"data":"text","error":""}`,
	`{"type":"response","request_id":"r1-1","request_id":"r1-2","success":true,"data":{},"data":[]}`,
	`{"type":"response","request_id":"r1-1","success":true,"data":123456789012345678901234567890e-5}`,
	`{"type":"request","request_id":"r1-1","request_type":"ib_status","payload":null}`,
	`{"type":"auth_response","success":true,"provider_id":"a1b2c3d4"}`,
	`{"type":"account_event","event":"fill","data":{"qty":1}}`,
	`{"type":"execution_telemetry","lines":[1,2,3]}`,
	`{"type":"response","request_id":"r1-1","success":true,"data":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`,
	`{"type":"response","request_id":"r1-1","success":true,"data":` + strings.Repeat(`{"a":`, 500) + `1` + strings.Repeat("}", 500) + `}`,
}

// messageFor returns a pointer to the struct that a frame of msgType decodes
// into. Types without fields of their own decode into Envelope.
func messageFor(msgType string) any {
	switch msgType {
	case TypeAuth:
		return &Auth{}
	case TypeAgentState:
		return &AgentState{}
	case TypeIBAccounts:
		return &IBAccounts{}
	case TypeBootPhase:
		return &BootPhase{}
	case TypeResponse:
		return &Response{}
	case TypeAuthResponse:
		return &AuthResponse{}
	case TypeRequest:
		return &Request{}
	default:
		return &Envelope{}
	}
}

// FuzzPeekTypeAndDecode checks that PeekType accepts only JSON objects with a
// non-empty type, and that such a frame decodes into its type's struct, or
// fails with an error, without panicking. A decoded message must encode again,
// because the relay re-encodes raw fields such as Response.Data.
//
// NOTE: encoding/json matches object keys case-insensitively and keeps the
// last of duplicate keys, so {"TYPE":"auth"} peeks as "auth". This target
// seeds such frames but does not assert either behaviour.
func FuzzPeekTypeAndDecode(f *testing.F) {
	for _, frame := range fixtureFrames(f) {
		f.Add(frame)
	}
	for _, frame := range edgeFrames {
		f.Add([]byte(frame))
	}

	f.Fuzz(func(t *testing.T, frame []byte) {
		msgType, err := PeekType(frame)
		if err != nil {
			if msgType != "" {
				t.Fatalf("PeekType(%q) = %q with error %v, want an empty type with the error", frame, msgType, err)
			}
			return
		}
		if msgType == "" {
			t.Fatalf("PeekType(%q) returned an empty type without an error", frame)
		}
		if !json.Valid(frame) {
			t.Fatalf("PeekType accepted invalid JSON %q as type %q", frame, msgType)
		}
		if first := bytes.TrimLeft(frame, " \t\r\n"); first[0] != '{' {
			t.Fatalf("PeekType accepted a non-object %q as type %q", frame, msgType)
		}

		v := messageFor(msgType)
		if err := Decode(frame, msgType, v); err != nil {
			return
		}
		if env, ok := v.(*Envelope); ok && env.Type != msgType {
			t.Fatalf("Decode into Envelope gave type %q, PeekType gave %q", env.Type, msgType)
		}
		if _, err := json.Marshal(v); err != nil {
			t.Fatalf("decoded %s message %+v does not encode again: %v", msgType, v, err)
		}
	})
}

// FuzzCompareVersions checks that CompareVersions is a total preorder:
// results are -1, 0 or +1, every version equals itself, swapping the
// arguments negates the result, and the order is transitive.
func FuzzCompareVersions(f *testing.F) {
	seeds := [][3]string{
		{"1.10.0", "1.9.0", "1.39.1"},
		{"1.2", "1.2.0", "1.2.0.0"},
		{"v1.2.3", "1.2.3", " 1.2.3 "},
		{"2.0.0", "1.99.99", "0.0.0"},
		{"0.0.0", "", "v"},
		{"1.2.0rc1", "1.2.0", "1.2.0rc2"},
		{"99999999999999999999999.0", "1.0", "0"},
		{"18446744073709551615", "18446744073709551616", "0"},
		{"1..2", "1.0.2", "."},
		{"vv1", "v1", "1"},
		{"1.-1", "1.0", "1.a"},
		{"01.002", "1.2", "1.2a"},
		{"\xff", "1.0\x00", "1.0"},
		{"1.2.3.4.5.6.7.8.9", "1.2.3.4.5.6.7.8.10", "1.2.3.4.5.6.7.8"},
	}
	for _, s := range seeds {
		f.Add(s[0], s[1], s[2])
	}

	f.Fuzz(func(t *testing.T, a, b, c string) {
		ab := CompareVersions(a, b)
		if ab < -1 || ab > 1 {
			t.Fatalf("CompareVersions(%q, %q) = %d, want -1, 0 or 1", a, b, ab)
		}
		if got := CompareVersions(a, a); got != 0 {
			t.Fatalf("CompareVersions(%q, %q) = %d, want 0", a, a, got)
		}
		if ba := CompareVersions(b, a); ba != -ab {
			t.Fatalf("CompareVersions(%q, %q) = %d but CompareVersions(%q, %q) = %d", a, b, ab, b, a, ba)
		}

		bc := CompareVersions(b, c)
		ac := CompareVersions(a, c)
		if ab <= 0 && bc <= 0 && ac > 0 {
			t.Fatalf("order not transitive: %q <= %q <= %q but CompareVersions(%q, %q) = %d", a, b, c, a, c, ac)
		}
		if ab == 0 && ac != bc {
			t.Fatalf("%q equals %q, but they compare to %q as %d and %d", a, b, c, ac, bc)
		}
	})
}

// decodeWithNumbers decodes JSON keeping numbers as written, so that two
// documents compare equal only when their numbers have the same text.
func decodeWithNumbers(data []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
}

// FuzzEncodeRequest checks that EncodeRequest returns a valid JSON object
// that carries the request id, the request type and the payload, and that it
// fails, rather than sending a broken frame, on a payload that is not JSON.
func FuzzEncodeRequest(f *testing.F) {
	f.Add("req-1", "ib_status", []byte(`{}`))
	f.Add("r1-2", "check_availability", []byte(`{"ticker": "SPY"}`))
	f.Add("r1-3", "get_positions", []byte(nil))
	f.Add("r1-4", "get_positions", []byte(`null`))
	f.Add("r1-5", "fetch_chain", []byte(` null `))
	f.Add("r1-6", "fetch_chain", []byte(`[1, "two", {"3": null}]`))
	f.Add("r1-7", "x", []byte(`{"a":1,"a":2,"A":3}`))
	f.Add("r1-8", "x", []byte(`{"html":"<script>&</script>","sep":"\u2028"}`))
	f.Add("r1-9", "x", []byte(`123456789012345678901234567890e-400`))
	f.Add("\xff\xfe", "\xc3\x28", []byte("{\"k\":\"\xff\"}"))
	f.Add("quote\"back\\slash\nnewline", "\u2028", []byte(`"string payload"`))
	f.Add("", "", []byte(`{"unterminated":`))
	f.Add("r1-a", "x", []byte(`   `))
	f.Add("r1-b", "x", []byte(strings.Repeat("[", 10001)+strings.Repeat("]", 10001)))

	f.Fuzz(func(t *testing.T, requestID, requestType string, payload []byte) {
		frame, err := EncodeRequest(requestID, requestType, payload)
		defaulted := len(payload) == 0 || string(payload) == "null"
		if !defaulted && !json.Valid(payload) {
			if err == nil {
				t.Fatalf("EncodeRequest accepted invalid payload %q and sent %q", payload, frame)
			}
			return
		}
		if err != nil {
			t.Fatalf("EncodeRequest(%q, %q, %q): %v", requestID, requestType, payload, err)
		}
		if !json.Valid(frame) {
			t.Fatalf("EncodeRequest returned invalid JSON %q", frame)
		}

		var got struct {
			Type        *string         `json:"type"`
			RequestID   *string         `json:"request_id"`
			RequestType *string         `json:"request_type"`
			Payload     json.RawMessage `json:"payload"`
		}
		if err := json.Unmarshal(frame, &got); err != nil {
			t.Fatalf("frame %q is not an object: %v", frame, err)
		}
		if got.Type == nil || *got.Type != TypeRequest {
			t.Fatalf("frame %q: type is not %q", frame, TypeRequest)
		}
		// encoding/json writes each invalid UTF-8 byte as U+FFFD, as the
		// conversion to []rune does, so only valid ids arrive unchanged.
		if utf8.ValidString(requestID) {
			if got.RequestID == nil || *got.RequestID != requestID {
				t.Fatalf("frame %q: request_id is not %q", frame, requestID)
			}
		} else if got.RequestID == nil || *got.RequestID != string([]rune(requestID)) {
			t.Fatalf("frame %q: request_id is not %q with U+FFFD for invalid bytes", frame, requestID)
		}
		if got.RequestType == nil || *got.RequestType != string([]rune(requestType)) {
			t.Fatalf("frame %q: request_type is not %q", frame, requestType)
		}

		gotPayload, err := decodeWithNumbers(got.Payload)
		if err != nil {
			t.Fatalf("frame %q: payload: %v", frame, err)
		}
		want := any(map[string]any{})
		if !defaulted {
			if want, err = decodeWithNumbers(payload); err != nil {
				t.Fatalf("payload %q: %v", payload, err)
			}
		}
		if !reflect.DeepEqual(gotPayload, want) {
			t.Fatalf("frame %q: payload decodes to %#v, want %#v", frame, gotPayload, want)
		}
	})
}
