package relay

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/relay-project/relay/agentsim"
)

// lockedBuffer is a bytes.Buffer safe for concurrent writes from loggers.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestSecretsNeverExposed drives successful and failed agent
// authentications and backend calls with a wrong token, with debug logging
// captured, then searches the logs, metrics, registry, cluster view and
// error answers for the API keys and the token.
func TestSecretsNeverExposed(t *testing.T) {
	const token = "tok-4f9b1c77e2"
	secrets := []string{"key-alice", "key-bob", "wrong-key-9d2e", token}
	var logs lockedBuffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			rs := newCluster(t, backend, 2, func(c *Config) {
				c.APIToken = token
				c.Logger = logger
			})
			startAgent(t, agentsim.Config{URL: rs[0].ws, APIKey: "key-alice", TWSConnected: true, Logger: logger})
			startAgent(t, agentsim.Config{URL: rs[1].ws, APIKey: "key-bob", Logger: logger})
			bad := dialRaw(t, rs[0])
			bad.send(`{"type":"auth","api_key":"wrong-key-9d2e","version":"1.0.0"}`)
			answer := bad.read()

			var seen strings.Builder
			seen.WriteString(logs.String())
			for _, v := range answer {
				seen.WriteString(strings.TrimSpace(strings.ReplaceAll(strings.ToLower(toString(v)), "\n", " ")))
			}
			get := func(path, auth string) {
				req, _ := http.NewRequest(http.MethodGet, rs[1].base+path, nil)
				if auth != "" {
					req.Header.Set("Authorization", auth)
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				seen.Write(body)
				for _, vs := range resp.Header {
					seen.WriteString(strings.Join(vs, " "))
				}
			}
			get("/options/relay/registry", "Bearer "+token)
			get("/options/relay/cluster", "Bearer "+token)
			get("/options/relay/ib-status?user_id=alice", "Bearer "+token)
			get("/options/relay/registry", "Bearer wrong-"+token)
			get("/metrics", "")
			get("/readyz", "")

			for _, secret := range secrets {
				if strings.Contains(seen.String(), secret) {
					t.Errorf("%q appears in the logs, metrics or answers", secret)
				}
			}
			if !strings.Contains(seen.String(), "agent authentication failed") {
				t.Error("the failed authentication was not logged at all; the search proves nothing")
			}
		})
	}
}

func toString(v any) string {
	s, _ := v.(string)
	return s
}
