package auth

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"testing"
)

// sha256Hex returns the hex SHA-256 digest of key, as written after
// "sha256:" in a keys file.
func sha256Hex(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

func TestParseKeysValid(t *testing.T) {
	tests := map[string]struct {
		input string
		want  map[string]string // key in clear -> user id
	}{
		"empty input": {
			input: "",
			want:  map[string]string{},
		},
		"comments and blank lines": {
			input: "# relay keys\n\n   \nkey-one user-1\n  # indented comment\n\t\nkey-two user-2\n",
			want:  map[string]string{"key-one": "user-1", "key-two": "user-2"},
		},
		"tabs and repeated spaces": {
			input: "key-one\tuser-1\n  key-two \t  user-2  \n",
			want:  map[string]string{"key-one": "user-1", "key-two": "user-2"},
		},
		"CRLF line endings": {
			input: "key-one user-1\r\nkey-two user-2\r\n",
			want:  map[string]string{"key-one": "user-1", "key-two": "user-2"},
		},
		"no final newline": {
			input: "key-one user-1",
			want:  map[string]string{"key-one": "user-1"},
		},
		"byte order mark": {
			input: "\uFEFFkey-one user-1\n",
			want:  map[string]string{"key-one": "user-1"},
		},
		"sha256 lower-case hex": {
			input: "sha256:" + sha256Hex("hashed-key") + " user-3\n",
			want:  map[string]string{"hashed-key": "user-3"},
		},
		"sha256 upper-case hex": {
			input: "sha256:" + strings.ToUpper(sha256Hex("hashed-key")) + " user-3\n",
			want:  map[string]string{"hashed-key": "user-3"},
		},
		"one user with two keys": {
			input: "key-one user-1\nsha256:" + sha256Hex("key-two") + " user-1\n",
			want:  map[string]string{"key-one": "user-1", "key-two": "user-1"},
		},
	}

	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			set, err := ParseKeys(strings.NewReader(tt.input))
			if err != nil {
				t.Fatalf("ParseKeys: %v", err)
			}
			if set.Len() != len(tt.want) {
				t.Errorf("Len = %d, want %d", set.Len(), len(tt.want))
			}
			for key, wantUser := range tt.want {
				user, err := set.Validate(context.Background(), key)
				if err != nil {
					t.Errorf("Validate(%q): %v", key, err)
					continue
				}
				if user != wantUser {
					t.Errorf("Validate(%q) = %q, want %q", key, user, wantUser)
				}
			}
		})
	}
}

func TestParseKeysInvalid(t *testing.T) {
	const secret = "s3cret-key-material"
	secretDigest := sha256Hex(secret)

	tests := map[string]struct {
		input      string
		wantLine   int
		wantReason string // substring of ParseError.Reason
	}{
		"key without user": {
			input:      "# header\n" + secret + "\n",
			wantLine:   2,
			wantReason: "expected 2 fields",
		},
		"three fields": {
			input:      secret + " user-1 extra\n",
			wantLine:   1,
			wantReason: "found 3",
		},
		"trailing comment": {
			input:      secret + " user-1 # note\n",
			wantLine:   1,
			wantReason: "found 4",
		},
		"sha256 too short": {
			input:      "ok-key user-0\nsha256:" + secretDigest[:63] + " user-1\n",
			wantLine:   2,
			wantReason: "found 63 characters",
		},
		"sha256 too long": {
			input:      "sha256:" + secretDigest + "0 user-1\n",
			wantLine:   1,
			wantReason: "found 65 characters",
		},
		"sha256 empty": {
			input:      "sha256: user-1\n",
			wantLine:   1,
			wantReason: "found 0 characters",
		},
		"sha256 not hex": {
			input:      "sha256:" + secretDigest[:60] + "zzzz user-1\n",
			wantLine:   1,
			wantReason: "non-hex character",
		},
		"duplicate clear key": {
			input:      secret + " user-1\n\nother-key user-2\n" + secret + " user-3\n",
			wantLine:   4,
			wantReason: "already defined on line 1",
		},
		"duplicate clear and hashed key": {
			input:      secret + " user-1\nsha256:" + strings.ToUpper(secretDigest) + " user-1\n",
			wantLine:   2,
			wantReason: "already defined on line 1",
		},
		"line too long": {
			input:      "ok-key user-0\n" + strings.Repeat("k", 70_000) + " user-1\n",
			wantLine:   2,
			wantReason: "longer than",
		},
	}

	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			set, err := ParseKeys(strings.NewReader(tt.input))
			if err == nil {
				t.Fatalf("ParseKeys returned %d keys and no error", set.Len())
			}

			parseErr, ok := errors.AsType[*ParseError](err)
			if !ok {
				t.Fatalf("error %q (%T) is not a *ParseError", err, err)
			}
			if parseErr.Line != tt.wantLine {
				t.Errorf("Line = %d, want %d", parseErr.Line, tt.wantLine)
			}
			if !strings.Contains(parseErr.Reason, tt.wantReason) {
				t.Errorf("Reason = %q, want it to contain %q", parseErr.Reason, tt.wantReason)
			}

			message := err.Error()
			if want := "line " + strconv.Itoa(tt.wantLine); !strings.Contains(message, want) {
				t.Errorf("error %q does not contain %q", message, want)
			}
			for _, leak := range []string{secret, secretDigest[:16], strings.ToUpper(secretDigest[:16]), "kkkkkkkk"} {
				if strings.Contains(strings.ToLower(message), strings.ToLower(leak)) {
					t.Errorf("error %q contains key material %q", message, leak)
				}
			}
		})
	}
}

func TestKeySetValidate(t *testing.T) {
	input := "clear-key user-1\nsha256:" + sha256Hex("hashed-key") + " user-2\n"
	set, err := ParseKeys(strings.NewReader(input))
	if err != nil {
		t.Fatalf("ParseKeys: %v", err)
	}
	ctx := context.Background()

	tests := map[string]struct {
		key      string
		wantUser string
		wantErr  error
	}{
		"clear key":                 {key: "clear-key", wantUser: "user-1"},
		"hashed key":                {key: "hashed-key", wantUser: "user-2"},
		"unknown key":               {key: "other-key", wantErr: ErrInvalidKey},
		"empty key":                 {key: "", wantErr: ErrInvalidKey},
		"key with extra space":      {key: "clear-key ", wantErr: ErrInvalidKey},
		"digest instead of the key": {key: sha256Hex("hashed-key"), wantErr: ErrInvalidKey},
		"sha256 form as the key":    {key: "sha256:" + sha256Hex("hashed-key"), wantErr: ErrInvalidKey},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			user, err := set.Validate(ctx, tt.key)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Validate error = %v, want %v", err, tt.wantErr)
			}
			if user != tt.wantUser {
				t.Errorf("Validate = %q, want %q", user, tt.wantUser)
			}
		})
	}
}
