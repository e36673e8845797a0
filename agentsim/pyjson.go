package agentsim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"unicode/utf8"
)

// The production agent is a Python program, and its recorded frames have the
// format of json.dumps(message) with the default options. The encoder in this
// file reproduces that format byte for byte for the values the simulator
// sends:
//   - ", " between members and items, ": " between a key and its value;
//   - keys in insertion order, which object keeps;
//   - floats in Python's repr form, so 0.0 stays "0.0" and never becomes "0";
//   - ensure_ascii escaping: every character outside printable ASCII becomes
//     \uXXXX with lower-case hex digits, and '<', '>' and '&' are not escaped.

// object is a JSON object whose members keep their insertion order, as a
// Python dict does.
type object []member

type member struct {
	key   string
	value any
}

// marshalPython returns v encoded as Python's json.dumps would encode it.
func marshalPython(v any) ([]byte, error) {
	return appendPython(make([]byte, 0, 256), v)
}

// appendPython appends the Python json.dumps encoding of v to buf.
//
// Supported types are nil, bool, string, int, int32, int64, uint32, uint64,
// float64, []string, []any, object, map[string]any (written with sorted
// keys, because a Go map has no order), json.RawMessage (copied as is) and
// json.Number. Any other value is encoded with encoding/json, decoded again
// and written from the decoded form, so struct fields come out with sorted
// keys and integral floats lose their ".0".
func appendPython(buf []byte, v any) ([]byte, error) {
	switch v := v.(type) {
	case nil:
		return append(buf, "null"...), nil
	case bool:
		return strconv.AppendBool(buf, v), nil
	case string:
		return appendPythonString(buf, v), nil
	case int:
		return strconv.AppendInt(buf, int64(v), 10), nil
	case int32:
		return strconv.AppendInt(buf, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(buf, v, 10), nil
	case uint32:
		return strconv.AppendUint(buf, uint64(v), 10), nil
	case uint64:
		return strconv.AppendUint(buf, v, 10), nil
	case float64:
		return appendPythonFloat(buf, v), nil
	case json.Number:
		return append(buf, v...), nil
	case json.RawMessage:
		if len(v) == 0 {
			return append(buf, "null"...), nil
		}
		return append(buf, v...), nil
	case []string:
		buf = append(buf, '[')
		for i, s := range v {
			if i > 0 {
				buf = append(buf, ", "...)
			}
			buf = appendPythonString(buf, s)
		}
		return append(buf, ']'), nil
	case []any:
		buf = append(buf, '[')
		for i, item := range v {
			if i > 0 {
				buf = append(buf, ", "...)
			}
			var err error
			if buf, err = appendPython(buf, item); err != nil {
				return nil, err
			}
		}
		return append(buf, ']'), nil
	case object:
		buf = append(buf, '{')
		for i, m := range v {
			if i > 0 {
				buf = append(buf, ", "...)
			}
			buf = appendPythonString(buf, m.key)
			buf = append(buf, ": "...)
			var err error
			if buf, err = appendPython(buf, m.value); err != nil {
				return nil, err
			}
		}
		return append(buf, '}'), nil
	case map[string]any:
		return appendPython(buf, sortedObject(v))
	}
	return appendPythonFallback(buf, v)
}

func sortedObject(m map[string]any) object {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	obj := make(object, 0, len(keys))
	for _, k := range keys {
		obj = append(obj, member{k, m[k]})
	}
	return obj
}

// appendPythonFallback encodes a value of a type appendPython does not handle
// by a round trip through encoding/json.
func appendPythonFallback(buf []byte, v any) ([]byte, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("agentsim: encode %T: %w", v, err)
	}
	var decoded any
	if err := decodeJSONNumbers(raw, &decoded); err != nil {
		return nil, fmt.Errorf("agentsim: re-decode %T: %w", v, err)
	}
	return appendPython(buf, normalizeDecoded(decoded))
}

func decodeJSONNumbers(raw []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	return dec.Decode(v)
}

// normalizeDecoded turns the map[string]any and []any trees from
// encoding/json into values appendPython handles without another fallback.
func normalizeDecoded(v any) any {
	switch v := v.(type) {
	case map[string]any:
		obj := sortedObject(v)
		for i := range obj {
			obj[i].value = normalizeDecoded(obj[i].value)
		}
		return obj
	case []any:
		for i := range v {
			v[i] = normalizeDecoded(v[i])
		}
		return v
	}
	return v
}

// appendPythonFloat appends f as Python's float.__repr__ writes it: the
// shortest digits that round-trip, in positional form for exponents from -4
// to 15 with at least one digit after the point, and in exponent form
// otherwise. NaN and the infinities use json.dumps' non-standard names.
func appendPythonFloat(buf []byte, f float64) []byte {
	switch {
	case math.IsNaN(f):
		return append(buf, "NaN"...)
	case math.IsInf(f, 1):
		return append(buf, "Infinity"...)
	case math.IsInf(f, -1):
		return append(buf, "-Infinity"...)
	}

	abs := math.Abs(f)
	if abs != 0 && (abs < 1e-4 || abs >= 1e16) {
		// Go's 'e' form matches Python's here: "1e-05", "1.5e+16".
		return strconv.AppendFloat(buf, f, 'e', -1, 64)
	}

	start := len(buf)
	buf = strconv.AppendFloat(buf, f, 'f', -1, 64)
	if slices.Index(buf[start:], '.') < 0 {
		buf = append(buf, ".0"...)
	}
	return buf
}

const lowerHex = "0123456789abcdef"

// appendPythonString appends s as a JSON string with ensure_ascii escaping.
// Invalid UTF-8 bytes are written as \ufffd.
func appendPythonString(buf []byte, s string) []byte {
	buf = append(buf, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c <= 0x7e && c != '"' && c != '\\' {
			buf = append(buf, c)
			i++
			continue
		}
		switch c {
		case '"':
			buf = append(buf, `\"`...)
			i++
			continue
		case '\\':
			buf = append(buf, `\\`...)
			i++
			continue
		case '\n':
			buf = append(buf, `\n`...)
			i++
			continue
		case '\r':
			buf = append(buf, `\r`...)
			i++
			continue
		case '\t':
			buf = append(buf, `\t`...)
			i++
			continue
		case '\b':
			buf = append(buf, `\b`...)
			i++
			continue
		case '\f':
			buf = append(buf, `\f`...)
			i++
			continue
		}

		r, size := utf8.DecodeRuneInString(s[i:])
		i += size
		if r > 0xffff {
			// Characters outside the Basic Multilingual Plane are written as a
			// UTF-16 surrogate pair.
			r -= 0x10000
			buf = appendUnicodeEscape(buf, 0xd800+(r>>10))
			buf = appendUnicodeEscape(buf, 0xdc00+(r&0x3ff))
			continue
		}
		buf = appendUnicodeEscape(buf, r)
	}
	return append(buf, '"')
}

func appendUnicodeEscape(buf []byte, r rune) []byte {
	return append(buf, '\\', 'u',
		lowerHex[(r>>12)&0xf], lowerHex[(r>>8)&0xf], lowerHex[(r>>4)&0xf], lowerHex[r&0xf])
}
