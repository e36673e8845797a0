package auth

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
)

// hashedKeyPrefix marks a keys-file key given as the hex SHA-256 digest of the
// real key, so that the file need not contain the key in clear.
const hashedKeyPrefix = "sha256:"

// KeySet is an immutable set of API keys, each mapped to a user id. Keys are
// stored as SHA-256 digests only.
type KeySet struct {
	users map[digest]string
}

// ParseError reports an invalid line of a keys file. Its message names the
// line number but never contains the line's text, because the line may
// contain a key.
type ParseError struct {
	Path   string // file name, empty when the keys did not come from a file
	Line   int    // 1-based line number
	Reason string
}

func (e *ParseError) Error() string {
	if e.Path != "" {
		return fmt.Sprintf("auth: keys file %s line %d: %s", e.Path, e.Line, e.Reason)
	}
	return fmt.Sprintf("auth: keys line %d: %s", e.Line, e.Reason)
}

// ParseKeys reads keys in the keys-file format: one "KEY USER_ID" pair per
// line, separated by spaces or tabs. Blank lines and lines whose first
// non-blank character is '#' are ignored, so a key cannot start with '#'.
// A key written as "sha256:" followed by 64 hex digits (either case) is the
// SHA-256 digest of the real key, so a clear-text key cannot start with
// "sha256:".
//
// A line with other than two fields, an invalid digest, or a key that an
// earlier line already defines (in clear or hashed form) makes ParseKeys
// return a *ParseError. A key may map to one user only, but a user may have
// several keys.
func ParseKeys(r io.Reader) (*KeySet, error) {
	set := &KeySet{users: make(map[digest]string)}
	definedOn := make(map[digest]int) // line that defined each key, for duplicate errors

	scanner := bufio.NewScanner(r)
	lineNumber := 0
	for scanner.Scan() {
		lineNumber++
		line := scanner.Bytes()
		if lineNumber == 1 {
			line = bytes.TrimPrefix(line, []byte("\uFEFF")) // byte order mark written by some editors
		}

		fields := strings.Fields(string(line))
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if len(fields) != 2 {
			return nil, &ParseError{
				Line:   lineNumber,
				Reason: fmt.Sprintf("expected 2 fields (KEY USER_ID) separated by whitespace, found %d", len(fields)),
			}
		}

		keyDigest, err := parseKeyField(fields[0])
		if err != nil {
			return nil, &ParseError{Line: lineNumber, Reason: err.Error()}
		}
		if first, ok := definedOn[keyDigest]; ok {
			return nil, &ParseError{
				Line:   lineNumber,
				Reason: fmt.Sprintf("duplicate key, already defined on line %d", first),
			}
		}
		definedOn[keyDigest] = lineNumber
		set.users[keyDigest] = fields[1]
	}

	if err := scanner.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, &ParseError{
				Line:   lineNumber + 1,
				Reason: fmt.Sprintf("line is longer than %d bytes", bufio.MaxScanTokenSize),
			}
		}
		return nil, fmt.Errorf("auth: read keys: %w", err)
	}
	return set, nil
}

// parseKeyField returns the digest of a key field. Its errors never contain
// the field.
func parseKeyField(field string) (digest, error) {
	hexDigest, hashed := strings.CutPrefix(field, hashedKeyPrefix)
	if !hashed {
		return digestOf(field), nil
	}

	var d digest
	if len(hexDigest) != hex.EncodedLen(len(d)) {
		return d, fmt.Errorf("invalid %s key: expected 64 hex digits after %q, found %d characters",
			hashedKeyPrefix, hashedKeyPrefix, len(hexDigest))
	}
	if _, err := hex.Decode(d[:], []byte(hexDigest)); err != nil {
		return d, fmt.Errorf("invalid %s key: expected 64 hex digits after %q, found a non-hex character",
			hashedKeyPrefix, hashedKeyPrefix)
	}
	return d, nil
}

// Validate returns the user id for key, or ErrInvalidKey. It compares the
// key's SHA-256 digest through a map lookup, so its timing depends on the
// digest of the guess and not on how much of a real key the guess matches.
func (s *KeySet) Validate(_ context.Context, key string) (string, error) {
	if key == "" {
		return "", ErrInvalidKey
	}
	userID, ok := s.users[digestOf(key)]
	if !ok {
		return "", ErrInvalidKey
	}
	return userID, nil
}

// Len returns the number of keys in the set.
func (s *KeySet) Len() int {
	return len(s.users)
}
