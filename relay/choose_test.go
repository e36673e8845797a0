package relay

import (
	"bytes"
	"testing"
	"time"

	"github.com/relay-project/relay/store"
)

func TestChooseProvider(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	yes, no := true, false
	p := func(id, user, version string, connectedAt int, tws *bool) store.Provider {
		return store.Provider{ID: id, UserID: user, AgentVersion: version, ConnectedAt: t0.Add(time.Duration(connectedAt) * time.Second), IBConnected: tws}
	}
	cases := map[string]struct {
		providers []store.Provider
		user      string
		reqType   string
		fallback  bool
		want      string // "" means none
	}{
		"highest version as numbers": {
			[]store.Provider{p("a", "u", "1.9.0", 2, nil), p("b", "u", "1.10.0", 1, nil)}, "u", "echo", false, "b",
		},
		"tie goes to most recent": {
			[]store.Provider{p("a", "u", "1.2.0", 1, nil), p("b", "u", "1.2.0", 5, nil), p("c", "u", "1.2.0", 3, nil)}, "u", "echo", false, "b",
		},
		"own provider beats a newer one of another user": {
			[]store.Provider{p("mine", "u", "0.0.0", 1, nil), p("theirs", "v", "9.0.0", 2, &yes)}, "u", "fetch_chain", true, "mine",
		},
		"no fallback without the flag": {
			[]store.Provider{p("theirs", "v", "1.0.0", 1, &yes)}, "u", "fetch_chain", false, "",
		},
		"fallback prefers TWS connected": {
			[]store.Provider{p("new", "v", "2.0.0", 1, &no), p("old", "w", "1.0.0", 1, &yes)}, "u", "fetch_chain", true, "old",
		},
		"fallback then highest version": {
			[]store.Provider{p("a", "v", "1.0.0", 1, &yes), p("b", "w", "1.1.0", 1, &yes)}, "u", "fetch_chain", true, "b",
		},
		"account request never falls back": {
			[]store.Provider{p("theirs", "v", "1.0.0", 1, &yes)}, "u", "get_positions", true, "",
		},
		"execution request never falls back": {
			[]store.Provider{p("theirs", "v", "1.0.0", 1, &yes)}, "u", "execution_start", true, "",
		},
		"agent_restart never falls back": {
			[]store.Provider{p("theirs", "v", "1.0.0", 1, &yes)}, "u", "agent_restart", true, "",
		},
		"nobody connected": {nil, "u", "echo", true, ""},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			got, ok := chooseProvider(tc.providers, tc.user, tc.reqType, tc.fallback)
			if tc.want == "" {
				if ok {
					t.Errorf("chose %s, want none", got.ID)
				}
				return
			}
			if !ok || got.ID != tc.want {
				t.Errorf("chose %q (ok %v), want %q", got.ID, ok, tc.want)
			}
		})
	}
}

func TestPeerMessageRoundTrip(t *testing.T) {
	errText := "boom\nline"
	h := peerMessage{V: peerVersion, Kind: "resp", ID: "r1-9", Provider: "p1", OK: false, Err: &errText}
	body := []byte("{\"a\":\"x\\ny\"}\n")
	got, gotBody, err := decodePeerMessage(encodePeerMessage(h, body))
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != h.ID || got.Kind != h.Kind || got.Err == nil || *got.Err != errText {
		t.Errorf("header %+v, want %+v", got, h)
	}
	if string(gotBody) != string(body) {
		t.Errorf("body %q, want %q", gotBody, body)
	}
	for _, bad := range []string{"", "no newline", "{bad json\n{}"} {
		if _, _, err := decodePeerMessage([]byte(bad)); err == nil {
			t.Errorf("decode %q: no error", bad)
		}
	}
}

func TestWriteEventWithTime(t *testing.T) {
	cases := map[string]string{
		`{"type":"account_event","event":"fill"}`: `{"type":"account_event","event":"fill","received_at":12.500000}`,
		`{}`:    `{"received_at":12.500000}`,
		` { } `: `{"received_at":12.500000}`,
		`[1]`:   `{"received_at":12.500000}`,
	}
	for in, want := range cases {
		var buf bytes.Buffer
		writeEventWithTime(&buf, store.AccountEvent{Message: []byte(in), ReceivedAt: 12.5})
		if buf.String() != want {
			t.Errorf("%s: got %s, want %s", in, buf.String(), want)
		}
	}
}
