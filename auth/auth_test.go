package auth

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
)

func TestFingerprint(t *testing.T) {
	const key = "agent-key-0123456789"
	sum := sha256.Sum256([]byte(key))
	want := hex.EncodeToString(sum[:])[:12]

	got := Fingerprint(key)
	if got != want {
		t.Errorf("Fingerprint = %q, want %q", got, want)
	}
	if strings.Contains(got, key) {
		t.Errorf("Fingerprint %q contains the key", got)
	}
	if other := Fingerprint(key + "x"); other == got {
		t.Errorf("Fingerprint of two different keys is the same: %q", got)
	}
}
