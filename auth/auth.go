// Package auth maps the API key that an agent sends in its "auth" message to
// the id of the user who owns the agent.
//
// Two Validator implementations exist: KeysFile reads the keys from a local
// file and HTTPValidator calls the web app's validate-agent-key endpoint. Both
// handle keys only as SHA-256 digests after the first step, and no error or
// log line they produce contains a key. Fingerprint gives a short digest
// prefix that is safe to log in place of a key.
package auth

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
)

// Validator maps an agent API key to the id of the user who owns it.
// Implementations are safe for concurrent use.
type Validator interface {
	// Validate returns the user id for key. It returns ErrInvalidKey when
	// the key is unknown, and an error wrapping ErrUnavailable when the
	// key's validity could not be determined.
	Validate(ctx context.Context, key string) (userID string, err error)
}

var (
	// ErrInvalidKey is returned for a key that is empty or unknown. The
	// agent should get an auth failure.
	ErrInvalidKey = errors.New("auth: invalid API key")

	// ErrUnavailable is wrapped by errors that leave a key's validity
	// unknown: a timeout, a network error, an unexpected HTTP status or a
	// canceled context. The agent's auth should fail with a retryable
	// error, not with "invalid key".
	ErrUnavailable = errors.New("auth: key validation unavailable")
)

// Compile-time checks that each key source implements Validator.
var (
	_ Validator = (*KeySet)(nil)
	_ Validator = (*KeysFile)(nil)
	_ Validator = (*HTTPValidator)(nil)
)

// fingerprintLen is the number of hex digits in a fingerprint (48 bits).
const fingerprintLen = 12

// Fingerprint returns the first 12 hex digits of the SHA-256 digest of key.
// It identifies a key in logs without revealing it, provided the key is a
// random secret. A short or guessable key could be found from its
// fingerprint by trying candidates.
func Fingerprint(key string) string {
	return digestOf(key).fingerprint()
}

// digest is the SHA-256 digest of an API key. Keys are held in this form
// wherever they are stored.
type digest [sha256.Size]byte

func digestOf(key string) digest {
	return sha256.Sum256([]byte(key))
}

func (d digest) fingerprint() string {
	return hex.EncodeToString(d[:fingerprintLen/2])
}
