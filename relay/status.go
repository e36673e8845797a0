package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/relay-project/relay/store"
)

// providerStatus is one checked provider in an ib-status response.
type providerStatus struct {
	ProviderID string `json:"provider_id"`
	UserID     string `json:"user_id"`
	InstanceID string `json:"instance_id"`
	Connected  bool   `json:"connected"`
	Source     string `json:"source"` // "agent" or "heartbeat_cache"
	Error      string `json:"error,omitempty"`
	Message    string `json:"message,omitempty"`
}

// ibStatus is the response of GET /options/relay/ib-status.
type ibStatus struct {
	Connected         bool             `json:"connected"`
	AgentConnected    bool             `json:"agent_connected"`
	Source            string           `json:"source"`
	ConnectedProvider *string          `json:"connected_provider"`
	ProviderStatuses  []providerStatus `json:"provider_statuses"`
	Message           string           `json:"message"`
	Providers         []store.Provider `json:"providers"`
	// Only with user_id: the version of the provider routing would choose,
	// and its start-up phase while it boots.
	AgentVersion *string          `json:"agent_version,omitempty"`
	BootPhase    *store.BootPhase `json:"boot_phase,omitempty"`
}

// Messages of an ib-status response, one per cause.
const (
	msgTWSConnected    = "IB TWS connected"
	msgTWSNotConnected = "IB TWS not connected"
	msgNoProvider      = "No IB data provider connected"
)

// agentStatusData is the part of an agent's ib_status answer the relay reads.
type agentStatusData struct {
	Connected *bool  `json:"connected"`
	Message   string `json:"message"`
}

func (s *Server) handleIBStatus(c echo.Context) error {
	userID := c.QueryParam("user_id")
	source := c.QueryParam("source")
	if source != "" && source != "cache" && source != "live" && source != "agent" {
		return invalid("source must be \"cache\" or absent, got %q.", source)
	}
	var timeoutMS *float64
	if v := c.QueryParam("timeout_ms"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return invalid("timeout_ms must be a number of milliseconds, got %q.", v)
		}
		timeoutMS = &f
	}
	timeout, err := parseTimeout(timeoutMS, s.cfg.StatusTimeout, s.cfg.MaxRequestTimeout)
	if err != nil {
		return err
	}

	ctx := c.Request().Context()
	checked, complete := s.providers(ctx, userID)
	if userID != "" {
		sortByPreference(checked)
	} else {
		sortForListing(checked)
	}
	if len(checked) == 0 && !complete {
		return errRegistryUnavailable
	}

	var statuses []providerStatus
	if source == "cache" {
		statuses = s.cachedStatuses(checked)
	} else {
		statuses = s.liveStatuses(ctx, checked, timeout)
	}
	answer := summarize(checked, statuses, source == "cache", timeout)
	if userID != "" && len(checked) > 0 {
		answer.AgentVersion = &checked[0].AgentVersion
		answer.BootPhase = checked[0].BootPhase
	}
	s.log.Debug("ib-status", "user", userID, "connected", answer.Connected, "providers", len(checked), "message", answer.Message)
	return c.JSON(http.StatusOK, answer)
}

func (s *Server) cachedStatuses(checked []store.Provider) []providerStatus {
	out := make([]providerStatus, len(checked))
	for i, p := range checked {
		out[i] = providerStatus{ProviderID: p.ID, UserID: p.UserID, InstanceID: p.InstanceID, Source: "heartbeat_cache"}
		out[i].Connected, out[i].Message = s.cachedTWS(p)
	}
	return out
}

// cachedTWS returns the TWS state of the provider's last agent_state, and
// why it is not usable: none arrived yet, or it is older than StateMaxAge,
// which a hung agent's state soon is.
func (s *Server) cachedTWS(p store.Provider) (connected bool, problem string) {
	switch {
	case p.IBConnected == nil || p.StateAt.IsZero():
		return false, "The agent has not reported its TWS state yet."
	case time.Since(p.StateAt) > s.cfg.StateMaxAge:
		return false, fmt.Sprintf("The agent's last state report is %s old.", time.Since(p.StateAt).Round(time.Second))
	}
	return *p.IBConnected, ""
}

// liveStatuses sends ib_status to every checked provider in parallel. A
// provider that fails to answer falls back to its last reported state.
func (s *Server) liveStatuses(ctx context.Context, checked []store.Provider, timeout time.Duration) []providerStatus {
	out := make([]providerStatus, len(checked))
	var wg sync.WaitGroup
	for i, p := range checked {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = s.liveStatus(ctx, p, timeout)
		}()
	}
	wg.Wait()
	return out
}

func (s *Server) liveStatus(ctx context.Context, p store.Provider, timeout time.Duration) providerStatus {
	st := providerStatus{ProviderID: p.ID, UserID: p.UserID, InstanceID: p.InstanceID, Source: "agent"}
	_, res := s.roundTrip(ctx, p, "ib_status", nil, timeout)
	var data agentStatusData
	switch {
	case res.Failure != "":
		st.Error = res.Failure
		st.Message = res.Message
	case !res.Success:
		st.Error = "agent_error"
		if res.Error != nil {
			st.Message = *res.Error
		}
	case json.Unmarshal(res.Data, &data) != nil || data.Connected == nil:
		st.Error = "invalid_response"
		st.Message = "The agent's ib_status response has no boolean \"connected\" field."
	default:
		st.Connected = *data.Connected
		st.Message = data.Message
		return st
	}
	// No usable answer: report the state from the agent's last agent_state,
	// unless the agent is known to be gone.
	st.Source = "heartbeat_cache"
	if st.Error != codeProviderDisconnected {
		st.Connected, _ = s.cachedTWS(p)
	}
	return st
}

// summarize builds the ib-status answer. Its message names the cause, so the
// dashboard can tell an operator what to fix.
func summarize(checked []store.Provider, statuses []providerStatus, cached bool, timeout time.Duration) ibStatus {
	answer := ibStatus{
		AgentConnected:   len(checked) > 0,
		Source:           "relay",
		ProviderStatuses: statuses,
		Providers:        checked,
	}
	if answer.ProviderStatuses == nil {
		answer.ProviderStatuses = []providerStatus{}
	}
	if answer.Providers == nil {
		answer.Providers = []store.Provider{}
	}
	if len(checked) == 0 {
		answer.Message = msgNoProvider
		return answer
	}
	for i := range statuses {
		if statuses[i].Connected {
			answer.Connected = true
			answer.ConnectedProvider = &statuses[i].ProviderID
			answer.Message = connectedMessage(statuses[i])
			return answer
		}
	}
	answer.Message = notConnectedMessage(checked[0], statuses, cached, timeout)
	return answer
}

func connectedMessage(st providerStatus) string {
	if st.Source == "agent" {
		if st.Message != "" {
			return st.Message
		}
		return msgTWSConnected
	}
	if st.Error != "" {
		return fmt.Sprintf("IB TWS connected, as of the agent's last state report; the agent did not respond to the status request (%s).", st.Error)
	}
	return msgTWSConnected
}

// notConnectedMessage explains why no checked provider reports TWS
// connected, from the most to the least specific cause.
func notConnectedMessage(first store.Provider, statuses []providerStatus, cached bool, timeout time.Duration) string {
	if first.BootPhase != nil {
		return fmt.Sprintf("Agent is starting up (%s): %s", first.BootPhase.Phase, first.BootPhase.Detail)
	}
	counts := map[string]int{}
	for _, st := range statuses {
		if st.Source == "agent" {
			// An agent answered: its own words are the best explanation.
			if st.Message != "" {
				return st.Message
			}
			return msgTWSNotConnected
		}
		counts[st.Error]++
	}
	switch {
	case cached && statuses[0].Message != "":
		// The first provider's cached state is missing or too old.
		return "Agent connected, but its TWS state is unknown: " + statuses[0].Message
	case cached:
		return msgTWSNotConnected
	case counts[codeTimeout] > 0:
		return fmt.Sprintf("Agent connected, but it did not respond to the status request within %d ms.", timeout.Milliseconds())
	case counts[codeProviderDisconnected] > 0:
		return "Agent disconnected while its status was being checked; it usually reconnects within seconds."
	case counts[codeRegistryUnavailable] > 0:
		return "Agent connected to another relay replica, which cannot be reached while Redis is unavailable."
	case counts["agent_error"] > 0:
		return "Agent connected, but it failed to report its TWS status."
	}
	return msgTWSNotConnected
}
