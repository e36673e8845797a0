package auth

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// testWatchInterval is the Watch interval in tests, short so that a change is
// seen within milliseconds.
const testWatchInterval = 5 * time.Millisecond

// logBuffer collects log output for checks. It is safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newTestLogger(t *testing.T) (*slog.Logger, *logBuffer) {
	t.Helper()
	buf := &logBuffer{}
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}

// quietLogger discards log output in tests that do not check it.
var quietLogger = slog.New(slog.DiscardHandler)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}

// replaceFile writes content to a new file and renames it over path, the way
// deployment tools replace a file atomically.
func replaceFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	writeFile(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatalf("rename %s: %v", tmp, err)
	}
}

// waitFor polls condition until it is true or two seconds have passed.
func waitFor(t *testing.T, what string, condition func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !condition() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// startWatch runs Watch until the test ends and waits for it to return.
func startWatch(t *testing.T, keys *KeysFile) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		keys.Watch(ctx, testWatchInterval)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

func validUser(keys Validator, key string) string {
	user, err := keys.Validate(context.Background(), key)
	if err != nil {
		return ""
	}
	return user
}

func TestLoadKeysFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "# keys\nclear-key user-1\nsha256:"+sha256Hex("hashed-key")+" user-2\n")
	logger, logs := newTestLogger(t)

	keys, err := LoadKeysFile(path, logger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}
	if keys.Len() != 2 {
		t.Errorf("Len = %d, want 2", keys.Len())
	}
	if user := validUser(keys, "clear-key"); user != "user-1" {
		t.Errorf("clear key maps to %q, want user-1", user)
	}
	if user := validUser(keys, "hashed-key"); user != "user-2" {
		t.Errorf("hashed key maps to %q, want user-2", user)
	}
	if _, err := keys.Validate(context.Background(), "unknown"); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("unknown key: error = %v, want ErrInvalidKey", err)
	}
	if strings.Contains(logs.String(), "clear-key") {
		t.Errorf("log contains a key:\n%s", logs)
	}
}

func TestLoadKeysFileErrors(t *testing.T) {
	dir := t.TempDir()
	invalid := filepath.Join(dir, "invalid")
	writeFile(t, invalid, "good-key user-1\nsecret-key-text\n")

	t.Run("missing file", func(t *testing.T) {
		_, err := LoadKeysFile(filepath.Join(dir, "missing"), nil)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("error = %v, want fs.ErrNotExist", err)
		}
	})

	t.Run("invalid line", func(t *testing.T) {
		_, err := LoadKeysFile(invalid, nil)
		parseErr, ok := errors.AsType[*ParseError](err)
		if !ok {
			t.Fatalf("error = %v, want a *ParseError", err)
		}
		if parseErr.Path != invalid || parseErr.Line != 2 {
			t.Errorf("error at %s line %d, want %s line 2", parseErr.Path, parseErr.Line, invalid)
		}
		if strings.Contains(err.Error(), "secret-key-text") {
			t.Errorf("error %q contains the key", err)
		}
	})

	t.Run("directory", func(t *testing.T) {
		if _, err := LoadKeysFile(dir, nil); err == nil {
			t.Error("LoadKeysFile of a directory returned no error")
		}
	})
}

func TestLoadKeysFileEmptyWarns(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "# no keys yet\n")
	logger, logs := newTestLogger(t)

	keys, err := LoadKeysFile(path, logger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}
	if keys.Len() != 0 {
		t.Errorf("Len = %d, want 0", keys.Len())
	}
	if !strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("no warning logged for an empty keys file:\n%s", logs)
	}
}

func TestKeysFileReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "old-key user-1\n")
	keys, err := LoadKeysFile(path, quietLogger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}

	writeFile(t, path, "new-key user-2\n")
	if err := keys.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if user := validUser(keys, "new-key"); user != "user-2" {
		t.Errorf("new key maps to %q, want user-2", user)
	}
	if user := validUser(keys, "old-key"); user != "" {
		t.Errorf("removed key still maps to %q", user)
	}
}

func TestKeysFileReloadInvalidKeepsKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "old-key user-1\n")
	logger, logs := newTestLogger(t)
	keys, err := LoadKeysFile(path, logger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}

	writeFile(t, path, "new-key user-2\nbroken-secret-line\n")
	err = keys.Reload()
	if _, ok := errors.AsType[*ParseError](err); !ok {
		t.Fatalf("Reload error = %v, want a *ParseError", err)
	}
	if user := validUser(keys, "old-key"); user != "user-1" {
		t.Errorf("old key maps to %q after a failed reload, want user-1", user)
	}
	if user := validUser(keys, "new-key"); user != "" {
		t.Errorf("key from the invalid file maps to %q", user)
	}
	if !strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("failed reload logged no warning:\n%s", logs)
	}
	if strings.Contains(logs.String(), "broken-secret-line") {
		t.Errorf("log contains key text:\n%s", logs)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := keys.Reload(); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Reload of a removed file: error = %v, want fs.ErrNotExist", err)
	}
	if user := validUser(keys, "old-key"); user != "user-1" {
		t.Errorf("old key maps to %q after the file was removed, want user-1", user)
	}
}

func TestKeysFileWatchReloads(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "key-1 user-1\n")
	keys, err := LoadKeysFile(path, quietLogger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}
	startWatch(t, keys)

	// Rewritten in place.
	writeFile(t, path, "key-1 user-1\nkey-2 user-2\n")
	waitFor(t, "key-2 is loaded", func() bool { return validUser(keys, "key-2") == "user-2" })

	// Replaced by rename.
	replaceFile(t, path, "key-3 user-3\n")
	waitFor(t, "key-3 is loaded", func() bool { return validUser(keys, "key-3") == "user-3" })
	if user := validUser(keys, "key-1"); user != "" {
		t.Errorf("removed key-1 still maps to %q", user)
	}

	// Same size, new modification time.
	writeFile(t, path, "key-4 user-4\n")
	future := time.Now().Add(time.Hour)
	if err := os.Chtimes(path, future, future); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "key-4 is loaded", func() bool { return validUser(keys, "key-4") == "user-4" })
}

func TestKeysFileWatchInvalidKeepsKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "old-key user-1\n")
	logger, logs := newTestLogger(t)
	keys, err := LoadKeysFile(path, logger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}
	startWatch(t, keys)

	writeFile(t, path, "new-key user-2 extra-field\n")
	waitFor(t, "the failed reload is logged", func() bool {
		return strings.Contains(logs.String(), "reload failed")
	})
	// Several more polls of the unchanged invalid file.
	time.Sleep(10 * testWatchInterval)

	if user := validUser(keys, "old-key"); user != "user-1" {
		t.Errorf("old key maps to %q after an invalid file, want user-1", user)
	}
	if count := strings.Count(logs.String(), "reload failed"); count != 1 {
		t.Errorf("an unchanged invalid file was reported %d times, want once", count)
	}

	writeFile(t, path, "new-key user-2\n")
	waitFor(t, "the fixed file is loaded", func() bool { return validUser(keys, "new-key") == "user-2" })
}

func TestKeysFileWatchMissingFileKeepsKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "old-key user-1\n")
	logger, logs := newTestLogger(t)
	keys, err := LoadKeysFile(path, logger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}
	startWatch(t, keys)

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the missing file is logged", func() bool {
		return strings.Contains(logs.String(), "cannot be checked")
	})
	if user := validUser(keys, "old-key"); user != "user-1" {
		t.Errorf("old key maps to %q while the file is missing, want user-1", user)
	}

	writeFile(t, path, "new-key user-2\n")
	waitFor(t, "the restored file is loaded", func() bool { return validUser(keys, "new-key") == "user-2" })
}

func TestKeysFileWatchStops(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "key user\n")
	keys, err := LoadKeysFile(path, quietLogger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		keys.Watch(ctx, 0) // the default interval is far longer than this test
	}()
	cancel()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("Watch did not return after its context was canceled")
	}
}

func TestKeysFileConcurrentValidateAndReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	writeFile(t, path, "stable-key user-1\n")
	keys, err := LoadKeysFile(path, quietLogger)
	if err != nil {
		t.Fatalf("LoadKeysFile: %v", err)
	}

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if user := validUser(keys, "stable-key"); user != "user-1" {
					t.Errorf("stable key maps to %q during reloads", user)
					return
				}
			}
		})
	}
	for i := range 50 {
		writeFile(t, path, "stable-key user-1\nextra-"+strings.Repeat("x", i)+" user-2\n")
		if err := keys.Reload(); err != nil {
			t.Errorf("Reload %d: %v", i, err)
		}
	}
	close(stop)
	wg.Wait()
}
