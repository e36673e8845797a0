// Package protocol defines the messages that agents and the relay exchange over
// the agent WebSocket, and the version order used to choose between agents.
//
// Every frame is a text frame carrying one JSON object with a "type" field.
// Decoding is tolerant of unknown fields, because agents add fields over time.
package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Message types sent by agents.
const (
	TypeAuth         = "auth"
	TypeHeartbeat    = "heartbeat"
	TypeAgentState   = "agent_state"
	TypeIBAccounts   = "ib_accounts"
	TypeBootPhase    = "boot_phase"
	TypeResponse     = "response"
	TypeAccountEvent = "account_event"
)

// Message types sent by the relay.
const (
	TypeAuthResponse = "auth_response"
	TypeHeartbeatAck = "heartbeat_ack"
	TypeRequest      = "request"
)

// BootPhaseComplete is the boot phase that ends an agent's start-up.
const BootPhaseComplete = "boot_complete"

// DefaultAgentVersion is the version assumed for an agent whose auth message has none.
const DefaultAgentVersion = "0.0.0"

// ErrMissingType is returned for a frame whose JSON object has no "type" string.
var ErrMissingType = errors.New("protocol: message has no \"type\" field")

// Envelope is the part of every agent frame that is read before the frame is
// decoded by type.
type Envelope struct {
	Type string `json:"type"`
}

// Auth is the first message of every agent connection.
type Auth struct {
	APIKey  string `json:"api_key"`
	Version string `json:"version"`
}

// AgentState is the periodic state report of an agent. IBConnected is nil for
// old agents that do not report it.
type AgentState struct {
	IBConnected         *bool           `json:"ib_connected"`
	ExecutionActive     bool            `json:"execution_active"`
	ExecutionLinesHeld  int             `json:"execution_lines_held"`
	AvailableScanLines  int             `json:"available_scan_lines"`
	AcceptExternalScans bool            `json:"accept_external_scans"`
	IBFarms             json.RawMessage `json:"ib_farms,omitempty"`
	IBDataAvailable     *bool           `json:"ib_data_available,omitempty"`
}

// IBAccounts lists the Interactive Brokers accounts an agent's TWS session can reach.
type IBAccounts struct {
	Accounts []string `json:"accounts"`
}

// BootPhase reports an agent's progress through start-up.
type BootPhase struct {
	Phase     string  `json:"phase"`
	Detail    string  `json:"detail"`
	Progress  float64 `json:"progress"`
	Timestamp float64 `json:"timestamp"`
}

// Response is an agent's response to one request. Data is kept as raw JSON
// so that large responses pass through the relay without being decoded.
type Response struct {
	RequestID string          `json:"request_id"`
	Success   bool            `json:"success"`
	Data      json.RawMessage `json:"data"`
	Error     *string         `json:"error"`
}

// AuthResponse is the relay's response to Auth.
type AuthResponse struct {
	Type       string `json:"type"`
	Success    bool   `json:"success"`
	ProviderID string `json:"provider_id,omitempty"`
	Error      string `json:"error,omitempty"`
}

// Request is a request the relay forwards to an agent.
type Request struct {
	Type        string          `json:"type"`
	RequestID   string          `json:"request_id"`
	RequestType string          `json:"request_type"`
	Payload     json.RawMessage `json:"payload"`
}

// PeekType returns the "type" field of an agent frame. It fails on invalid
// JSON, on a value that is not an object, and on a missing or empty type.
func PeekType(frame []byte) (string, error) {
	var env Envelope
	if err := json.Unmarshal(frame, &env); err != nil {
		return "", fmt.Errorf("protocol: invalid JSON frame: %w", err)
	}
	if env.Type == "" {
		return "", ErrMissingType
	}
	return env.Type, nil
}

// responsePrefixes are the openings of a response frame whose type comes
// first, as the production agent (Python's json.dumps) writes it.
var responsePrefixes = [][]byte{[]byte(`{"type": "response"`), []byte(`{"type":"response"`)}

// IsResponse reports whether frame starts as a response frame does. It does
// not validate the frame: it spares large responses the full parse of
// PeekType, and Decode validates them afterwards.
func IsResponse(frame []byte) bool {
	for _, prefix := range responsePrefixes {
		if bytes.HasPrefix(frame, prefix) && len(frame) > len(prefix) {
			switch frame[len(prefix)] {
			case ',', '}', ' ':
				return true
			}
		}
	}
	return false
}

// Decode decodes a frame into v, wrapping errors with the message type.
func Decode(frame []byte, msgType string, v any) error {
	if err := json.Unmarshal(frame, v); err != nil {
		return fmt.Errorf("protocol: invalid %q message: %w", msgType, err)
	}
	return nil
}

// EncodeRequest returns the frame that carries a request to an agent. A nil or
// empty payload is sent as an empty object, as agents expect an object.
func EncodeRequest(requestID, requestType string, payload json.RawMessage) ([]byte, error) {
	if len(payload) == 0 || string(payload) == "null" {
		payload = json.RawMessage("{}")
	}
	return json.Marshal(Request{Type: TypeRequest, RequestID: requestID, RequestType: requestType, Payload: payload})
}
