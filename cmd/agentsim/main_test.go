package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/relay-project/relay/protocol"
)

func TestRampAuto(t *testing.T) {
	tests := map[string]struct {
		n    int
		want time.Duration
	}{
		"one agent":    {1, 0},
		"fifty agents": {50, 0},
		"many agents":  {51, 102 * time.Millisecond},
		"2000 agents":  {2000, 4 * time.Second},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			opts, err := parseFlags([]string{"-key", "k", "-n", fmt.Sprint(tc.n)}, io.Discard)
			if err != nil {
				t.Fatalf("parseFlags: %v", err)
			}
			if opts.ramp != tc.want {
				t.Errorf("ramp for %d agents = %v, want %v", tc.n, opts.ramp, tc.want)
			}
		})
	}
}

func TestParseFlagsDefaults(t *testing.T) {
	t.Setenv(keyEnv, "")
	opts, err := parseFlags([]string{"-key", "k"}, io.Discard)
	if err != nil {
		t.Fatalf("parseFlags: %v", err)
	}

	checks := map[string]struct{ got, want any }{
		"url":        {opts.url, "ws://127.0.0.1:8000/ws/data-provider"},
		"agents":     {opts.agents, 1},
		"tws":        {opts.tws, true},
		"version":    {opts.version, "1.39.1"},
		"heartbeat":  {opts.heartbeat, 10 * time.Second},
		"ping":       {opts.ping, 30 * time.Second},
		"reconnect":  {opts.reconnect, 5 * time.Second},
		"ramp":       {opts.ramp, time.Duration(0)},
		"duration":   {opts.duration, time.Duration(0)},
		"chainBytes": {opts.chainBytes, 200_000},
		"silent":     {opts.silent, false},
	}
	for name, c := range checks {
		if c.got != c.want {
			t.Errorf("default %s = %v, want %v", name, c.got, c.want)
		}
	}
}

func TestParseFlagsKeyFromEnvironment(t *testing.T) {
	t.Setenv(keyEnv, "env-key")
	opts, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatalf("parseFlags: %v", err)
	}
	if opts.keyTemplate != "env-key" {
		t.Errorf("key = %q, want the value of %s", opts.keyTemplate, keyEnv)
	}
}

func TestParseFlagsRejectsInvalidValues(t *testing.T) {
	t.Setenv(keyEnv, "")
	tests := map[string][]string{
		"no key":            {},
		"http url":          {"-key", "k", "-url", "http://127.0.0.1:8000/ws/data-provider"},
		"zero agents":       {"-key", "k", "-n", "0"},
		"zero heartbeat":    {"-key", "k", "-heartbeat", "0s"},
		"negative delay":    {"-key", "k", "-delay", "-1s"},
		"negative ramp":     {"-key", "k", "-ramp", "-1s"},
		"unknown log level": {"-key", "k", "-log-level", "loud"},
		"extra argument":    {"-key", "k", "extra"},
		"zero chain bytes":  {"-key", "k", "-chain-bytes", "0"},
		"unknown flag":      {"-key", "k", "-bogus"},
	}
	for name, args := range tests {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			_, err := parseFlags(args, &out)
			if !errors.Is(err, errUsage) {
				t.Errorf("parseFlags(%q) = %v, want errUsage", args, err)
			}
			if out.Len() == 0 {
				t.Errorf("parseFlags(%q) wrote no message", args)
			}
		})
	}
}

func TestParseFlagsHelp(t *testing.T) {
	_, err := parseFlags([]string{"-h"}, io.Discard)
	if !errors.Is(err, flag.ErrHelp) {
		t.Errorf("parseFlags(-h) = %v, want flag.ErrHelp", err)
	}
}

func TestAgentKey(t *testing.T) {
	if got := agentKey("user%d", 7); got != "user7" {
		t.Errorf("agentKey(user%%d, 7) = %q, want user7", got)
	}
	if got := agentKey("fixed", 7); got != "fixed" {
		t.Errorf("agentKey(fixed, 7) = %q, want fixed", got)
	}
}

// keyRecorder is a relay that accepts every key, records the keys, sends one
// ib_status request per connection and counts the responses.
type keyRecorder struct {
	mu        sync.Mutex
	keys      []string
	responses int
}

func (k *keyRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ws, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer ws.CloseNow()
	ctx := context.Background()

	_, frame, err := ws.Read(ctx)
	if err != nil {
		return
	}
	var auth protocol.Auth
	json.Unmarshal(frame, &auth)
	k.mu.Lock()
	k.keys = append(k.keys, auth.APIKey)
	k.mu.Unlock()

	ws.Write(ctx, websocket.MessageText, []byte(`{"type":"auth_response","success":true,"provider_id":"p"}`))
	ws.Write(ctx, websocket.MessageText, []byte(`{"type":"request","request_id":"r1","request_type":"ib_status","payload":{}}`))
	for {
		_, frame, err := ws.Read(ctx)
		if err != nil {
			return
		}
		if typ, _ := protocol.PeekType(frame); typ == protocol.TypeResponse {
			k.mu.Lock()
			k.responses++
			k.mu.Unlock()
		}
	}
}

func TestRunConnectsAllAgents(t *testing.T) {
	oldPoll, oldSummary := pollInterval, summaryInterval
	pollInterval, summaryInterval = 10*time.Millisecond, 100*time.Millisecond
	t.Cleanup(func() { pollInterval, summaryInterval = oldPoll, oldSummary })

	relay := &keyRecorder{}
	srv := httptest.NewServer(relay)
	defer srv.Close()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws/data-provider"

	var logs bytes.Buffer
	args := []string{"-url", url, "-key", "user%d", "-n", "3", "-duration", "500ms", "-ramp", "30ms"}
	start := time.Now()
	if err := run(t.Context(), args, &logs); err != nil {
		t.Fatalf("run: %v", err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("run took %v with -duration 500ms, want under 5s", elapsed)
	}

	out := logs.String()
	if !strings.Contains(out, `msg="all agents connected" agents=3`) {
		t.Errorf("log has no line for all 3 agents connected:\n%s", out)
	}
	if !strings.Contains(out, `msg="agentsim summary"`) {
		t.Errorf("log has no summary line:\n%s", out)
	}
	if !strings.Contains(out, `msg="agentsim stopped" connected=0 agents=3 connects=3 auth_failures=0 requests_received=3 requests_answered=3`) {
		t.Errorf("log has no final summary with 3 responses:\n%s", out)
	}
	for _, key := range []string{"user0", "user1", "user2"} {
		if strings.Contains(out, key) {
			t.Errorf("log contains the API key %q", key)
		}
	}

	relay.mu.Lock()
	defer relay.mu.Unlock()
	keys := slices.Sorted(slices.Values(relay.keys))
	if !slices.Equal(keys, []string{"user0", "user1", "user2"}) {
		t.Errorf("relay received keys %v, want user0, user1, user2", keys)
	}
	if relay.responses != 3 {
		t.Errorf("relay received %d responses, want 3", relay.responses)
	}
}
