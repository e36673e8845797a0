package relay

import (
	"context"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/store"
)

type metrics struct {
	auth               *prometheus.CounterVec
	disconnects        *prometheus.CounterVec
	requests           *prometheus.CounterVec
	latency            *prometheus.HistogramVec
	lateResponses      *prometheus.CounterVec
	peerMessages       *prometheus.CounterVec
	peerSendErrors     prometheus.Counter
	invalidFrames      prometheus.Counter
	otherMessages      prometheus.Counter
	accountEventErrors prometheus.Counter
	unauthorized       prometheus.Counter
	draining           prometheus.Gauge
}

func newMetrics(reg *prometheus.Registry, s *Server) *metrics {
	m := &metrics{
		auth: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_agent_auth_total", Help: "Agent authentications by result.",
		}, []string{"result"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_agent_disconnects_total", Help: "Agent disconnections by reason.",
		}, []string{"reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_requests_total", Help: "Requests routed to agents by request type, outcome and route (local, remote or none).",
		}, []string{"type", "outcome", "route"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "relay_request_duration_seconds",
			Help:    "Time from routing a request to its answer or failure, by route.",
			Buckets: []float64{.0002, .0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"route"}),
		lateResponses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_dropped_responses_total", Help: "Agent answers dropped because no caller waits for them (late, repeated, or from the wrong provider).",
		}, []string{"reason"}),
		peerMessages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_peer_messages_total", Help: "Messages between replicas by direction and kind.",
		}, []string{"direction", "kind"}),
		peerSendErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_peer_send_errors_total", Help: "Answers that could not be sent back to the requesting replica.",
		}),
		invalidFrames: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_agent_invalid_frames_total", Help: "Frames from authenticated agents dropped as invalid.",
		}),
		otherMessages: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_agent_ignored_messages_total", Help: "Agent messages of types the relay does not use.",
		}),
		accountEventErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_account_event_errors_total", Help: "Account events that could not be stored.",
		}),
		unauthorized: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_api_unauthorized_total", Help: "Backend API calls rejected for a missing or wrong bearer token.",
		}),
		draining: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_draining", Help: "1 while this replica drains before it stops.",
		}),
	}
	reg.MustRegister(m.auth, m.disconnects, m.requests, m.latency, m.lateResponses, m.peerMessages,
		m.peerSendErrors, m.invalidFrames, m.otherMessages, m.accountEventErrors, m.unauthorized, m.draining)
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "relay_agents_connected", Help: "Agents connected to this replica.",
		}, func() float64 { return float64(s.agentCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "relay_registry_providers", Help: "Providers in this replica's view of the cluster registry.",
		}, func() float64 {
			list, err := s.store.Providers(context.Background())
			if err != nil {
				return 0
			}
			return float64(len(list))
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "relay_registry_healthy", Help: "1 while registry writes to the store succeed.",
		}, func() float64 { return boolGauge(s.store.Health().RegistryOK) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "relay_pubsub_healthy", Help: "1 while the store's pub/sub subscription delivers.",
		}, func() float64 { return boolGauge(s.store.Health().PubSubOK) }),
	)
	if sm := s.cfg.StoreMetrics; sm != nil {
		for name, c := range map[string]struct {
			help  string
			value func() int64
		}{
			"relay_redis_errors_total":            {"Failed Redis calls.", sm.RedisErrors.Load},
			"relay_registry_reloads_total":        {"Reloads of the registry view from Redis.", sm.Reloads.Load},
			"relay_registry_rewrites_total":       {"Full rewrites of this replica's registry hash, after Redis lost it or a write failed.", sm.Rewrites.Load},
			"relay_registry_unknown_events_total": {"Registry events or records from other replicas that could not be read (another version or corrupt).", sm.UnknownEvents.Load},
			"relay_pubsub_stalls_total":           {"Times the pub/sub subscription stopped delivering.", sm.PubSubStalls.Load},
			"relay_pubsub_resubscribes_total":     {"Pub/sub subscriptions replaced after a stall.", sm.Resubscribes.Load},
		} {
			reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: c.help}, func() float64 { return float64(c.value()) }))
		}
	}
	return m
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// knownRequestTypes bounds the type label of relay_requests_total: other
// types are counted as "other".
var knownRequestTypes = map[string]bool{
	"ib_status": true, "fetch_chain": true, "get_positions": true, "get_open_orders": true,
	"place_order": true, "modify_order": true, "cancel_order": true, "check_availability": true,
	"agent_restart": true,
}

func requestTypeLabel(t string) string {
	switch {
	case knownRequestTypes[t]:
		return t
	case strings.HasPrefix(t, "execution_"):
		return "execution"
	}
	return "other"
}

// recordAuthFailure logs a failed key check and keeps it in the store for
// operators. Failures from an address that the limiter blocks are not
// logged one by one.
func (s *Server) recordAuthFailure(ip, key, reason string) {
	if s.limiter.blocked(ip, time.Now()) {
		return
	}
	fingerprint := auth.Fingerprint(key)
	s.log.Warn("agent authentication failed", "ip", ip, "key", fingerprint, "reason", reason)
	s.storeAuthFailure(ip, fingerprint, reason)
}

// storeAuthFailure keeps a failed authentication in the store. An empty
// fingerprint means no key was checked.
func (s *Server) storeAuthFailure(ip, fingerprint, reason string) {
	f := store.AuthFailure{At: time.Now().UTC(), ReplicaID: s.id, IP: ip, KeyFingerprint: fingerprint, Reason: reason}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.WriteTimeout)
	defer cancel()
	if err := s.store.RecordAuthFailure(ctx, f); err != nil {
		s.log.Debug("auth failure not stored", "err", err)
	}
}
