package agentsim

import (
	"encoding/json"
	"math"
	"testing"
)

// The expected strings below are the output of Python 3's json.dumps for the
// same values.

func TestAppendPythonFloat(t *testing.T) {
	tests := map[string]struct {
		in   float64
		want string
	}{
		"zero":                 {0.0, "0.0"},
		"negative zero":        {math.Copysign(0, -1), "-0.0"},
		"unix timestamp":       {1796413970.8498619, "1796413970.8498619"},
		"integral":             {100, "100.0"},
		"fraction":             {1.5, "1.5"},
		"rounding noise":       {0.30000000000000004, "0.30000000000000004"},
		"largest positional":   {1234567890123456, "1234567890123456.0"},
		"large exponent":       {1e16, "1e+16"},
		"large with fraction":  {123456789012345680, "1.2345678901234568e+17"},
		"smallest positional":  {0.0001, "0.0001"},
		"small exponent":       {1e-5, "1e-05"},
		"not a number":         {math.NaN(), "NaN"},
		"positive infinity":    {math.Inf(1), "Infinity"},
		"negative infinity":    {math.Inf(-1), "-Infinity"},
		"negative fraction":    {-0.2311, "-0.2311"},
		"two decimals rounded": {roundTo(18.345, 2), "18.35"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got := string(appendPythonFloat(nil, tc.in))
			if got != tc.want {
				t.Errorf("appendPythonFloat(%v) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestAppendPythonString(t *testing.T) {
	tests := map[string]struct {
		in   string
		want string
	}{
		"plain":             {"IB TWS connected", `"IB TWS connected"`},
		"quote and slash":   {`a"b\c/d`, `"a\"b\\c/d"`},
		"html characters":   {"<&>", `"<&>"`},
		"short escapes":     {"\t\n\r\b\f", `"\t\n\r\b\f"`},
		"control character": {"\x01", `"\u0001"`},
		"delete":            {"\x7f", `"\u007f"`},
		"latin letter":      {"é", `"\u00e9"`},
		"line separator":    {"\u2028", `"\u2028"`},
		"emoji":             {"😀", `"\ud83d\ude00"`},
		"invalid utf-8":     {"a\xffb", `"a\ufffdb"`},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got := string(appendPythonString(nil, tc.in))
			if got != tc.want {
				t.Errorf("appendPythonString(%q) = %s, want %s", tc.in, got, tc.want)
			}
		})
	}
}

func TestMarshalPythonValues(t *testing.T) {
	tests := map[string]struct {
		in   any
		want string
	}{
		"ordered object": {
			object{{"a", []any{1, 2.0, "x"}}, {"b", nil}, {"c", true}},
			`{"a": [1, 2.0, "x"], "b": null, "c": true}`,
		},
		"map sorted by key": {
			map[string]any{"z": 1, "a": "b"},
			`{"a": "b", "z": 1}`,
		},
		"string list": {[]string{"DU1", "DU2"}, `["DU1", "DU2"]`},
		"empty list":  {[]any{}, `[]`},
		"raw message": {json.RawMessage(`{"x":1}`), `{"x":1}`},
		"empty raw":   {json.RawMessage(nil), `null`},
		"struct fallback": {
			struct {
				B int     `json:"b"`
				A float64 `json:"a"`
			}{B: 1, A: 2.5},
			`{"a": 2.5, "b": 1}`,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := marshalPython(tc.in)
			if err != nil {
				t.Fatalf("marshalPython: %v", err)
			}
			if string(got) != tc.want {
				t.Errorf("marshalPython = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestMarshalPythonRejectsUnsupportedValue(t *testing.T) {
	if _, err := marshalPython(make(chan int)); err == nil {
		t.Error("marshalPython(chan) returned no error")
	}
}
