package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/relay-project/relay/store"
)

// report is the doctor's output, printed as text or as JSON.
type report struct {
	URL    string `json:"url"`
	UserID string `json:"user_id,omitempty"`
	// RelayTime is the relay's clock when the report was made, the
	// reference of every age in the report.
	RelayTime time.Time `json:"relay_time"`
	Samples   int       `json:"samples"`
	Calls     int       `json:"calls"`
	// FailedCalls describes each call without a usable response, relay
	// error objects such as registry_unavailable included.
	FailedCalls []string        `json:"failed_calls"`
	Replicas    []replicaReport `json:"replicas"`
	// ProvidersTotal counts the distinct providers of every user that any
	// registry response listed.
	ProvidersTotal int `json:"providers_total"`
	// RegistryResponses counts the registry calls that returned a listing.
	RegistryResponses int `json:"registry_responses"`
	// Providers are the user's providers, or every provider without -user.
	Providers    []providerReport    `json:"providers"`
	Live         *liveReport         `json:"live_status,omitempty"`
	AuthFailures []store.AuthFailure `json:"auth_failures"`
	Verdict      verdict             `json:"verdict"`
}

// replicaReport is one replica that responded to a cluster call or that another
// replica listed.
type replicaReport struct {
	ID string `json:"id"`
	// Responses counts the cluster calls this replica responded to. Zero
	// means that only other replicas listed it.
	Responses int           `json:"responses"`
	Store     *store.Health `json:"store,omitempty"`
	Draining  bool          `json:"draining"`
	// Sees lists the live replicas in this replica's view.
	Sees      []string `json:"sees"`
	Providers int      `json:"providers"`
	// LastSeenAge is the smallest age, in seconds, of this replica's last
	// beat as the other replicas list it. It is absent when no other
	// replica lists it.
	LastSeenAge *float64 `json:"last_seen_age_s,omitempty"`
}

// providerReport is one provider with its ages in seconds.
type providerReport struct {
	ID           string           `json:"id"`
	UserID       string           `json:"user_id"`
	InstanceID   string           `json:"instance_id"`
	AgentVersion string           `json:"agent_version"`
	ConnectedAt  time.Time        `json:"connected_at"`
	HeartbeatAge float64          `json:"heartbeat_age_s"`
	IBConnected  *bool            `json:"ib_connected"`
	StateAge     *float64         `json:"state_age_s,omitempty"`
	BootPhase    *store.BootPhase `json:"boot_phase,omitempty"`
	// ListedIn counts the registry responses that listed this provider.
	ListedIn int `json:"listed_in"`
}

// liveReport is the live ib-status response, or why the call failed.
type liveReport struct {
	Error            string           `json:"error,omitempty"`
	Connected        bool             `json:"connected"`
	AgentConnected   bool             `json:"agent_connected"`
	Message          string           `json:"message"`
	ProviderStatuses []providerStatus `json:"provider_statuses"`
	BootPhase        *store.BootPhase `json:"boot_phase,omitempty"`
}

// buildReport gathers the sections of the report from obs. v is the
// diagnosis of obs.
func buildReport(obs observations, v verdict) report {
	rep := report{
		URL: obs.URL, UserID: obs.UserID, RelayTime: obs.RelayNow.UTC(),
		Samples: len(obs.Samples), FailedCalls: []string{}, Verdict: v,
	}
	for _, c := range obs.calls() {
		rep.Calls++
		if f := c.failure(); f != "" {
			rep.FailedCalls = append(rep.FailedCalls, f)
		} else if c.APIErr != nil {
			rep.FailedCalls = append(rep.FailedCalls, fmt.Sprintf("%s: HTTP %d %s: %s", c.Path, c.Status, c.APIErr.Code, c.APIErr.Message))
		}
	}
	rep.Replicas = replicaReports(obs)

	listed := map[string]int{}
	for _, s := range obs.Samples {
		if a := s.Registry.Response; a != nil {
			rep.RegistryResponses++
			for _, p := range a.Providers {
				listed[p.ID]++
			}
		}
	}
	rep.ProvidersTotal = len(listed)
	rep.Providers = []providerReport{}
	for _, p := range latestProviders(obs, obs.UserID) {
		pr := providerReport{
			ID: p.ID, UserID: p.UserID, InstanceID: p.InstanceID, AgentVersion: p.AgentVersion,
			ConnectedAt: p.ConnectedAt, HeartbeatAge: seconds(obs.RelayNow.Sub(p.LastHeartbeat)),
			IBConnected: p.IBConnected, BootPhase: p.BootPhase, ListedIn: listed[p.ID],
		}
		if !p.StateAt.IsZero() {
			age := seconds(obs.RelayNow.Sub(p.StateAt))
			pr.StateAge = &age
		}
		rep.Providers = append(rep.Providers, pr)
	}

	if obs.Live != nil {
		rep.Live = &liveReport{ProviderStatuses: []providerStatus{}}
		if a := obs.Live.Response; a != nil {
			rep.Live.Connected, rep.Live.AgentConnected, rep.Live.Message = a.Connected, a.AgentConnected, a.Message
			rep.Live.BootPhase = a.BootPhase
			if a.ProviderStatuses != nil {
				rep.Live.ProviderStatuses = a.ProviderStatuses
			}
		} else if f := obs.Live.failure(); f != "" {
			rep.Live.Error = f
		} else if e := obs.Live.APIErr; e != nil {
			rep.Live.Error = e.Code + ": " + e.Message
		}
	}

	rep.AuthFailures = authFailures(obs)
	if rep.AuthFailures == nil {
		rep.AuthFailures = []store.AuthFailure{}
	}
	return rep
}

// replicaReports lists the replicas that responded, then the replicas only
// listed by others, each group by id.
func replicaReports(obs observations) []replicaReport {
	views := clusterViews(obs)
	responses := map[string]int{}
	for _, s := range obs.Samples {
		if a := s.Cluster.Response; a != nil {
			responses[a.Replica]++
		}
	}

	lastSeen := map[string]time.Duration{}
	providers := map[string]int{}
	for viewer, view := range views {
		for _, r := range view.Replicas {
			if r.ID == viewer {
				continue
			}
			age := obs.RelayNow.Sub(r.LastSeen)
			if old, ok := lastSeen[r.ID]; !ok || age < old {
				lastSeen[r.ID] = age
			}
			providers[r.ID] = r.Providers
		}
	}

	var out []replicaReport
	for _, id := range sortedKeys(views) {
		view := views[id]
		health := view.Store
		rr := replicaReport{ID: id, Responses: responses[id], Store: &health, Draining: view.Draining,
			Sees: replicaIDs(view.Replicas), Providers: view.Providers}
		if age, ok := lastSeen[id]; ok {
			s := seconds(age)
			rr.LastSeenAge = &s
		}
		out = append(out, rr)
	}
	for _, id := range sortedKeys(lastSeen) {
		if _, ok := views[id]; ok {
			continue
		}
		s := seconds(lastSeen[id])
		out = append(out, replicaReport{ID: id, Sees: []string{}, Providers: providers[id], LastSeenAge: &s})
	}
	if out == nil {
		out = []replicaReport{}
	}
	return out
}

func seconds(d time.Duration) float64 {
	return float64(d.Round(time.Millisecond)) / float64(time.Second)
}

func writeJSON(w io.Writer, rep report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// Limits of the text report. The JSON report has no limits.
const (
	maxProviderLines    = 20
	maxAuthFailureLines = 5
	maxFailedCallLines  = 5
)

// writeText prints the report for people: the relay, its replicas, the
// providers, the live status, then the verdict as the last line.
func writeText(w io.Writer, rep report) error {
	var b strings.Builder
	fmt.Fprintf(&b, "relay       %s  (%s, %s, %d failed)\n", rep.URL, plural(rep.Samples, "sample"), plural(rep.Calls, "call"), len(rep.FailedCalls))

	fmt.Fprintf(&b, "replicas    %d seen\n", len(rep.Replicas))
	for _, r := range rep.Replicas {
		b.WriteString("  " + replicaLine(r) + "\n")
	}

	if rep.UserID != "" {
		fmt.Fprintf(&b, "providers   %d of user %s (%d in the cluster)\n", len(rep.Providers), rep.UserID, rep.ProvidersTotal)
	} else {
		fmt.Fprintf(&b, "providers   %d in the cluster\n", rep.ProvidersTotal)
	}
	for i, p := range rep.Providers {
		if i == maxProviderLines {
			fmt.Fprintf(&b, "  … and %d more (use -json for all)\n", len(rep.Providers)-i)
			break
		}
		b.WriteString("  " + providerLine(p, rep.RegistryResponses) + "\n")
	}

	if l := rep.Live; l != nil {
		if l.Error != "" {
			fmt.Fprintf(&b, "live status call failed: %s\n", l.Error)
		} else {
			fmt.Fprintf(&b, "live status %s, %s: %q\n", connectedWord(l.Connected, "TWS connected", "TWS not connected"),
				connectedWord(l.AgentConnected, "agent connected", "no agent"), l.Message)
			for _, st := range l.ProviderStatuses {
				b.WriteString("  " + statusLine(st) + "\n")
			}
		}
	}

	fmt.Fprintf(&b, "auth fails  %d recorded\n", len(rep.AuthFailures))
	if rep.Verdict.Code == verdictNoAgent {
		for i, f := range rep.AuthFailures {
			if i == maxAuthFailureLines {
				break
			}
			fmt.Fprintf(&b, "  %s  key %s  from %s  on %s: %s\n", f.At.UTC().Format(time.RFC3339), f.KeyFingerprint, f.IP, f.ReplicaID, f.Reason)
		}
	}

	for i, f := range rep.FailedCalls {
		if i == 0 {
			b.WriteString("failed calls\n")
		}
		if i == maxFailedCallLines {
			fmt.Fprintf(&b, "  … and %d more\n", len(rep.FailedCalls)-i)
			break
		}
		b.WriteString("  " + f + "\n")
	}

	v := rep.Verdict
	fmt.Fprintf(&b, "verdict: %s: %s Fix: %s\n", v.Code, v.Message, v.Fix)
	_, err := io.WriteString(w, b.String())
	return err
}

func replicaLine(r replicaReport) string {
	if r.Responses == 0 {
		return fmt.Sprintf("%s  not reached; listed by another replica, last beat %s ago, %s",
			r.ID, formatAge(time.Duration(*r.LastSeenAge*float64(time.Second))), plural(r.Providers, "provider"))
	}
	parts := []string{r.ID, r.Store.Backend,
		"registry " + okWord(r.Store.RegistryOK),
		"pub/sub " + okWord(r.Store.PubSubOK),
		plural(r.Providers, "provider"),
	}
	if r.Store.LastError != "" {
		parts = append(parts, "last error: "+r.Store.LastError)
	}
	if r.Draining {
		parts = append(parts, "DRAINING")
	}
	sees := strings.Join(r.Sees, " ")
	if sees == "" {
		sees = "none"
	}
	parts = append(parts, "sees "+sees)
	return strings.Join(parts, "  ")
}

func providerLine(p providerReport, registryResponses int) string {
	tws := "TWS state not reported yet"
	if p.IBConnected != nil {
		tws = connectedWord(*p.IBConnected, "TWS connected", "TWS not connected")
	}
	if p.StateAge != nil {
		tws += fmt.Sprintf(" (state %s ago)", formatAge(time.Duration(*p.StateAge*float64(time.Second))))
	}
	parts := []string{p.ID}
	if p.UserID != "" {
		parts = append(parts, "user "+p.UserID)
	}
	parts = append(parts,
		"replica "+p.InstanceID,
		"version "+p.AgentVersion,
		"heartbeat "+formatAge(time.Duration(p.HeartbeatAge*float64(time.Second)))+" ago",
		tws,
		fmt.Sprintf("in %d of %d registry responses", p.ListedIn, registryResponses),
	)
	if p.BootPhase != nil {
		parts = append(parts, fmt.Sprintf("starting up (%s: %s)", p.BootPhase.Phase, p.BootPhase.Detail))
	}
	return strings.Join(parts, "  ")
}

func statusLine(st providerStatus) string {
	state := connectedWord(st.Connected, "TWS connected", "TWS not connected")
	line := fmt.Sprintf("%s  replica %s  %s from %s", st.ProviderID, st.InstanceID, state, st.Source)
	if st.Error != "" {
		line += "  error " + st.Error
	}
	if st.Message != "" {
		line += ": " + st.Message
	}
	return line
}

func okWord(ok bool) string {
	if ok {
		return "ok"
	}
	return "FAILED"
}

func connectedWord(connected bool, yes, no string) string {
	if connected {
		return yes
	}
	return no
}
