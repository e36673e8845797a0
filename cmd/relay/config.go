package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// config is the relay's configuration, read from environment variables.
type config struct {
	Addr              string
	RedisURL          string
	RedisPrefix       string
	RedisCAFile       string
	ReplicaID         string
	KeysFile          string
	KeysReload        time.Duration
	APIBaseURL        string
	KeyCacheTTL       time.Duration
	KeyNegativeTTL    time.Duration
	KeyConcurrency    int
	APIToken          string
	TrustProxyHeaders bool
	TrustedProxies    string
	LogLevel          string
	LogFormat         string

	AuthTimeout       time.Duration
	ValidateTimeout   time.Duration
	MaxMessageBytes   int
	WriteTimeout      time.Duration
	SendQueue         int
	PingInterval      time.Duration
	PongTimeout       time.Duration
	RequestTimeout    time.Duration
	MaxRequestTimeout time.Duration
	StatusTimeout     time.Duration
	StateMaxAge       time.Duration
	DrainTimeout      time.Duration
	MaxBodyBytes      int
	AuthFailureLimit  int
	AuthFailureWindow time.Duration

	RegistryTTL      time.Duration
	BeatInterval     time.Duration
	ResyncInterval   time.Duration
	RedisTimeout     time.Duration
	MaxAccountEvents int
}

// setting is one environment variable: its name, default and meaning.
type setting struct {
	name, def, help string
	parse           func(string) error
}

func (c *config) settings() []setting {
	return []setting{
		str(&c.Addr, "RELAY_ADDR", ":8000", "listen address of the WebSocket endpoint and the HTTP API"),
		str(&c.RedisURL, "REDIS_URL", "", "redis:// or rediss:// URL; unset runs a single replica with an in-process registry"),
		str(&c.RedisCAFile, "RELAY_REDIS_CA_FILE", "", "PEM file of the CA that signed the Redis server's certificate, for rediss:// with a private CA"),
		str(&c.RedisPrefix, "RELAY_REDIS_PREFIX", "relay", "prefix of every Redis key and channel; clusters sharing one Redis need distinct prefixes"),
		str(&c.ReplicaID, "RELAY_REPLICA_ID", "", "identity of this replica; unset means the host name plus a random suffix"),
		str(&c.KeysFile, "RELAY_KEYS_FILE", "", "agent keys file: one `KEY USER_ID` pair per line; re-read on change and on SIGHUP"),
		dur(&c.KeysReload, "RELAY_KEYS_RELOAD_INTERVAL", "2s", "how often the keys file is checked for changes"),
		str(&c.APIBaseURL, "API_BASE_URL", "", "web app base URL; agent keys are checked at {API_BASE_URL}/api/ma-options/validate-agent-key"),
		dur(&c.KeyCacheTTL, "RELAY_KEY_CACHE_TTL", "5m", "how long a valid key check from the web app is cached"),
		dur(&c.KeyNegativeTTL, "RELAY_KEY_NEGATIVE_TTL", "30s", "how long an invalid key check from the web app is cached"),
		num(&c.KeyConcurrency, "RELAY_KEY_VALIDATION_CONCURRENCY", "16", "maximum key checks in flight to the web app"),
		str(&c.APIToken, "RELAY_API_TOKEN", "", "bearer token the backend API requires; unset leaves the API open"),
		boolean(&c.TrustProxyHeaders, "RELAY_TRUST_PROXY_HEADERS", "false", "take client addresses from X-Forwarded-For (only behind a proxy that sets it)"),
		str(&c.TrustedProxies, "RELAY_TRUSTED_PROXIES", "", "comma-separated networks (CIDR) of the proxies whose X-Forwarded-For is trusted; unset means loopback and private networks"),
		str(&c.LogLevel, "RELAY_LOG_LEVEL", "info", "debug, info, warn or error"),
		str(&c.LogFormat, "RELAY_LOG_FORMAT", "json", "json or text"),
		dur(&c.AuthTimeout, "RELAY_AUTH_TIMEOUT", "10s", "time an agent has to send auth after connecting"),
		dur(&c.ValidateTimeout, "RELAY_VALIDATE_TIMEOUT", "10s", "maximum time of one agent key check"),
		num(&c.MaxMessageBytes, "RELAY_MAX_MESSAGE_BYTES", "16777216", "largest agent WebSocket message, in bytes"),
		dur(&c.WriteTimeout, "RELAY_WRITE_TIMEOUT", "10s", "maximum time of one write to an agent before it is disconnected"),
		num(&c.SendQueue, "RELAY_SEND_QUEUE", "64", "frames that may wait for one agent before it is disconnected as too slow"),
		dur(&c.PingInterval, "RELAY_PING_INTERVAL", "20s", "how often the relay pings each agent"),
		dur(&c.PongTimeout, "RELAY_PONG_TIMEOUT", "10s", "time a ping waits for its pong before the agent is dropped"),
		dur(&c.RequestTimeout, "RELAY_REQUEST_TIMEOUT", "30s", "wait for an agent's answer when a request has no timeout_ms"),
		dur(&c.MaxRequestTimeout, "RELAY_MAX_REQUEST_TIMEOUT", "10m", "largest timeout_ms accepted"),
		dur(&c.StatusTimeout, "RELAY_STATUS_TIMEOUT", "5s", "ib-status wait when timeout_ms is absent"),
		dur(&c.StateMaxAge, "RELAY_STATE_MAX_AGE", "30s", "how old an agent's last agent_state may be for ib-status to report it (source=cache, or when the agent does not answer)"),
		dur(&c.DrainTimeout, "RELAY_DRAIN_TIMEOUT", "30s", "on SIGTERM, how long requests in flight may take before agents are closed"),
		num(&c.MaxBodyBytes, "RELAY_MAX_BODY_BYTES", "16777216", "largest backend request body, in bytes"),
		num(&c.AuthFailureLimit, "RELAY_AUTH_FAILURE_LIMIT", "20", "failed agent authentications per address and window before the address is turned away"),
		dur(&c.AuthFailureWindow, "RELAY_AUTH_FAILURE_WINDOW", "1m", "window of RELAY_AUTH_FAILURE_LIMIT"),
		dur(&c.RegistryTTL, "RELAY_REGISTRY_TTL", "5s", "how long a replica's registry entries outlive its last beat; also when other replicas treat it as dead"),
		dur(&c.BeatInterval, "RELAY_BEAT_INTERVAL", "1s", "how often a replica refreshes its registry entries and publishes state changes"),
		dur(&c.ResyncInterval, "RELAY_RESYNC_INTERVAL", "30s", "how often the full registry is reloaded from Redis as a safety net"),
		dur(&c.RedisTimeout, "RELAY_REDIS_TIMEOUT", "2s", "timeout of one Redis call"),
		num(&c.MaxAccountEvents, "RELAY_MAX_ACCOUNT_EVENTS", "500", "account events kept per user"),
	}
}

// loadConfig reads the environment through getenv. Every invalid value is
// reported, not only the first.
func loadConfig(getenv func(string) string) (config, error) {
	var c config
	var problems []string
	for _, s := range c.settings() {
		v := getenv(s.name)
		if v == "" {
			v = s.def
		}
		if err := s.parse(v); err != nil {
			problems = append(problems, fmt.Sprintf("%s=%q: %v", s.name, v, err))
		}
	}
	if strings.ContainsAny(c.ReplicaID, "{} ") {
		problems = append(problems, fmt.Sprintf("RELAY_REPLICA_ID=%q: must not contain braces or spaces", c.ReplicaID))
	}
	if _, err := parseNetworks(c.TrustedProxies); err != nil {
		problems = append(problems, fmt.Sprintf("RELAY_TRUSTED_PROXIES=%q: %v", c.TrustedProxies, err))
	}
	if len(problems) > 0 {
		return c, fmt.Errorf("invalid configuration:\n  %s", strings.Join(problems, "\n  "))
	}
	return c, nil
}

// printSettings writes the configuration table for -help.
func printSettings() {
	var c config
	w := tabwriter.NewWriter(os.Stderr, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VARIABLE\tDEFAULT\tMEANING")
	for _, s := range c.settings() {
		def := s.def
		if def == "" {
			def = "(unset)"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", s.name, def, s.help)
	}
	w.Flush()
}

func str(p *string, name, def, help string) setting {
	return setting{name, def, help, func(v string) error { *p = v; return nil }}
}

func dur(p *time.Duration, name, def, help string) setting {
	return setting{name, def, help, func(v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("not a duration such as 500ms, 10s or 5m")
		}
		if d <= 0 {
			return fmt.Errorf("must be positive")
		}
		*p = d
		return nil
	}}
}

func num(p *int, name, def, help string) setting {
	return setting{name, def, help, func(v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("not a positive whole number")
		}
		*p = n
		return nil
	}}
}

func boolean(p *bool, name, def, help string) setting {
	return setting{name, def, help, func(v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("not true or false")
		}
		*p = b
		return nil
	}}
}

// parseNetworks parses a comma-separated list of CIDR networks; a bare
// address counts as a single-address network.
func parseNetworks(list string) ([]*net.IPNet, error) {
	var out []*net.IPNet
	for _, item := range strings.Split(list, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if !strings.Contains(item, "/") {
			if ip := net.ParseIP(item); ip != nil && ip.To4() != nil {
				item += "/32"
			} else {
				item += "/128"
			}
		}
		_, n, err := net.ParseCIDR(item)
		if err != nil {
			return nil, fmt.Errorf("%q is not a network such as 10.0.0.0/8", item)
		}
		out = append(out, n)
	}
	return out, nil
}
