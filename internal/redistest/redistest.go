// Package redistest runs private redis-server processes for tests that stop,
// restart or reconfigure Redis, so they never disturb a shared instance.
package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is a redis-server child process on a loopback port.
type Server struct {
	t    testing.TB
	args []string
	cmd  *exec.Cmd
	// Port is the loopback port the server listens on, kept across restarts.
	Port int
	// TLS is set when the server listens with TLS only.
	TLS bool
}

// Start runs redis-server on a free loopback port with no persistence and
// the extra arguments given, and stops it when the test ends. The test fails
// if redis-server is not on PATH.
func Start(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server is not on PATH: %v", err)
	}
	s := &Server{t: t, Port: freePort(t), args: extraArgs}
	for _, a := range extraArgs {
		if a == "--tls-port" {
			s.TLS = true
		}
	}
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// Addr returns host:port of the server.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// URL returns a redis:// URL of the server, or rediss:// with TLS.
func (s *Server) URL() string {
	if s.TLS {
		return "rediss://" + s.Addr() + "/0"
	}
	return "redis://" + s.Addr() + "/0"
}

// Stop kills the server with SIGKILL, losing all its data, and waits for it.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Restart starts the server again on the same port, empty, and waits until
// it accepts connections.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	args := []string{"--bind", "127.0.0.1", "--save", "", "--appendonly", "no"}
	if s.TLS {
		args = append(args, "--port", "0", "--tls-port", strconv.Itoa(s.Port))
		args = append(args, withoutFlagValue(s.args, "--tls-port")...)
	} else {
		args = append(args, "--port", strconv.Itoa(s.Port))
		args = append(args, s.args...)
	}
	cmd := exec.Command("redis-server", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if testing.Verbose() == false {
		cmd.Stdout, cmd.Stderr = nil, nil
	}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start redis-server: %v", err)
	}
	s.cmd = cmd
	deadline := time.Now().Add(5 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", s.Addr(), 100*time.Millisecond)
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on %s did not start: %v", s.Addr(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Client returns a client of the server, without TLS or password options;
// it is closed when the test ends.
func (s *Server) Client(opts *redis.Options) *redis.Client {
	if opts == nil {
		opts = &redis.Options{}
	}
	opts.Addr = s.Addr()
	c := redis.NewClient(opts)
	s.t.Cleanup(func() { c.Close() })
	return c
}

// Ping reports whether the server answers PING through c.
func Ping(c redis.UniversalClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return c.Ping(ctx).Err()
}

func withoutFlagValue(args []string, flag string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if args[i] == flag {
			i++
			continue
		}
		out = append(out, args[i])
	}
	return out
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(fmt.Errorf("find a free port: %w", err))
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
