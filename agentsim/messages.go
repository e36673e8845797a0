package agentsim

import (
	"encoding/json"
	"time"

	"github.com/relay-project/relay/protocol"
)

// Boot phases the production agent reports right after authentication, in
// this order, each with progress 0.0.
var bootPhases = []struct{ phase, detail string }{
	{"relay_connected", "Connected to relay"},
	{"auto_restart_loading", "Checking saved config..."},
	{protocol.BootPhaseComplete, "Ready"},
}

// Frames whose content never changes.
var (
	heartbeatFrame = mustMarshalPython(object{{"type", protocol.TypeHeartbeat}})

	agentStateTWSConnected    = mustMarshalPython(agentState(true))
	agentStateTWSDisconnected = mustMarshalPython(agentState(false))
)

func mustMarshalPython(v any) []byte {
	frame, err := marshalPython(v)
	if err != nil {
		panic("agentsim: encode fixed frame: " + err.Error())
	}
	return frame
}

// unixSeconds returns t as the float that Python's time.time() returns.
func unixSeconds(t time.Time) float64 {
	return float64(t.UnixMicro()) / 1e6
}

func authFrame(apiKey, version string) []byte {
	msg := object{{"type", protocol.TypeAuth}, {"api_key", apiKey}}
	if version != "" {
		msg = append(msg, member{"version", version})
	}
	return mustMarshalPython(msg)
}

func bootPhaseFrame(phase, detail string, now time.Time) []byte {
	return mustMarshalPython(object{
		{"type", protocol.TypeBootPhase},
		{"phase", phase},
		{"detail", detail},
		{"progress", 0.0},
		{"timestamp", unixSeconds(now)},
	})
}

func ibAccountsFrame(accounts []string) []byte {
	return mustMarshalPython(object{{"type", protocol.TypeIBAccounts}, {"accounts", accounts}})
}

// farmStatus returns the market data farms the production agent reports,
// all up while TWS is connected.
//
// NOTE: the recorded session shows only a connected TWS. Reporting every
// farm as down and data as unavailable while TWS is not connected is a guess
// at the production agent's output.
func farmStatus(twsConnected bool) object {
	return object{
		{"usfarm", twsConnected},
		{"ushmds", twsConnected},
		{"secdefnj", twsConnected},
	}
}

func agentState(twsConnected bool) object {
	return object{
		{"type", protocol.TypeAgentState},
		{"execution_active", false},
		{"execution_lines_held", 0},
		{"available_scan_lines", 90},
		{"accept_external_scans", true},
		{"scan_batch_size", 50},
		{"max_lines", 100},
		{"safety_buffer", 10},
		{"ib_connected", twsConnected},
		{"ib_farms", farmStatus(twsConnected)},
		{"ib_data_available", twsConnected},
	}
}

func agentStateFrame(twsConnected bool) []byte {
	if twsConnected {
		return agentStateTWSConnected
	}
	return agentStateTWSDisconnected
}

// responseFrame returns a response message carrying data, already encoded,
// on success, or data null and errMessage on failure.
func responseFrame(requestID string, data json.RawMessage, errMessage string) []byte {
	success := errMessage == ""
	var errValue any
	if !success {
		data = nil
		errValue = errMessage
	}

	prefix := mustMarshalPython(object{
		{"type", protocol.TypeResponse},
		{"request_id", requestID},
		{"success", success},
	})
	// The prefix ends with '}'. The data is copied once into the frame
	// instead of being re-encoded, because a chain response can be several MB.
	frame := make([]byte, 0, len(prefix)+len(data)+64)
	frame = append(frame, prefix[:len(prefix)-1]...)
	frame = append(frame, `, "data": `...)
	frame, _ = appendPython(frame, data)
	frame = append(frame, `, "error": `...)
	frame, _ = appendPython(frame, errValue)
	return append(frame, '}')
}
