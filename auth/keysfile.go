package auth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultWatchInterval is how often Watch checks the keys file when given no
// interval.
const DefaultWatchInterval = 2 * time.Second

// KeysFile is a Validator that reads its keys from a file in the ParseKeys
// format (RELAY_KEYS_FILE). Reload and Watch replace the keys while
// Validate runs, and connected agents are not affected. All methods are safe
// for concurrent use.
type KeysFile struct {
	// Static after construction.
	path   string
	logger *slog.Logger

	// keys is the current set. A reload swaps in a whole new set, so
	// Validate never reads a partly loaded file.
	keys atomic.Pointer[KeySet]

	mu sync.Mutex // serializes reloads and guards the fields below

	// lastRead describes the file as it was opened by the last load
	// attempt, successful or not. Watch reloads when the file differs from
	// it, so an invalid file is reported once and not on every poll.
	lastRead os.FileInfo
}

// LoadKeysFile reads the keys file at path. It fails if the file is missing,
// unreadable or invalid. A file with no keys is accepted with a warning,
// because every agent will then be rejected. A nil logger means
// slog.Default().
func LoadKeysFile(path string, logger *slog.Logger) (*KeysFile, error) {
	if logger == nil {
		logger = slog.Default()
	}
	k := &KeysFile{
		path:   path,
		logger: logger.With("keys_file", path),
	}

	set, info, err := readKeysFile(path)
	if err != nil {
		return nil, err
	}
	k.keys.Store(set)
	k.lastRead = info

	if set.Len() == 0 {
		k.logger.Warn("keys file contains no keys, every agent will be rejected")
	} else {
		k.logger.Info("keys file loaded", "keys", set.Len())
	}
	return k, nil
}

// Validate returns the user id for key from the keys loaded last, or
// ErrInvalidKey.
func (k *KeysFile) Validate(ctx context.Context, key string) (string, error) {
	return k.keys.Load().Validate(ctx, key)
}

// Len returns the number of keys loaded.
func (k *KeysFile) Len() int {
	return k.keys.Load().Len()
}

// Reload reads the file again and replaces the keys. On error it keeps the
// previous keys, logs a warning and returns the error. The caller decides
// when to call it, for example on SIGHUP.
func (k *KeysFile) Reload() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.reloadLocked()
}

func (k *KeysFile) reloadLocked() error {
	set, info, err := readKeysFile(k.path)
	if info != nil {
		k.lastRead = info
	}
	if err != nil {
		k.logger.Warn("keys file reload failed, keeping the previous keys",
			"error", err, "keys", k.Len())
		return err
	}

	previous := k.keys.Swap(set)
	if set.Len() == 0 {
		k.logger.Warn("keys file reloaded with no keys, every new agent will be rejected",
			"previous_keys", previous.Len())
		return nil
	}
	k.logger.Info("keys file reloaded", "keys", set.Len(), "previous_keys", previous.Len())
	return nil
}

// Watch checks the file's identity, size and modification time every
// interval and reloads it when any of them changes. It blocks until ctx is
// done. An interval of zero or less means DefaultWatchInterval.
//
// A change is loaded once two checks in a row see the file the same, so up
// to two intervals after it was made. The wait keeps Watch from loading a
// file that an editor or a copy is still writing, which could parse as
// valid with keys missing. A file replaced by rename is detected too. While
// the file is missing the loaded keys stay in use.
//
// NOTE: a rewrite that keeps the same size within the file system's
// timestamp resolution (one second on some file systems) is missed. Reload
// on SIGHUP covers that case.
func (k *KeysFile) Watch(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultWatchInterval
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()

	statFailing := false
	var pending os.FileInfo // a change seen at the previous check, not loaded yet
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}

		info, err := os.Stat(k.path)
		if err != nil {
			if !statFailing {
				k.logger.Warn("keys file cannot be checked, keeping the previous keys",
					"error", err, "keys", k.Len())
			}
			statFailing = true
			pending = nil
			continue
		}
		if statFailing {
			k.logger.Info("keys file can be checked again")
			statFailing = false
		}

		k.mu.Lock()
		switch {
		case !fileChanged(k.lastRead, info):
			pending = nil
		case pending != nil && !fileChanged(pending, info):
			pending = nil
			_ = k.reloadLocked() // reloadLocked logs the error
		default:
			pending = info
		}
		k.mu.Unlock()
	}
}

func fileChanged(previous, current os.FileInfo) bool {
	if previous == nil {
		return true
	}
	return !os.SameFile(previous, current) ||
		previous.Size() != current.Size() ||
		!previous.ModTime().Equal(current.ModTime())
}

// readKeysFile parses the file at path. It returns the file's details from
// the open file descriptor whenever the file could be opened, even if parsing
// failed, so that a change after this read is detected by Watch.
func readKeysFile(path string) (*KeySet, os.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("auth: open keys file: %w", err)
	}
	defer f.Close()

	info, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("auth: stat keys file: %w", err)
	}
	if info.IsDir() {
		return nil, info, fmt.Errorf("auth: keys file %s is a directory", path)
	}

	set, err := ParseKeys(f)
	if err != nil {
		if parseErr, ok := errors.AsType[*ParseError](err); ok {
			parseErr.Path = path
			return nil, info, parseErr
		}
		return nil, info, fmt.Errorf("auth: keys file %s: %w", path, err)
	}
	return set, info, nil
}
