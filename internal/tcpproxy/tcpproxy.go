// Package tcpproxy is a TCP forwarder for fault tests: it can freeze all
// traffic without closing (a half-open connection), cut every connection
// and refuse new ones (an unreachable server), or stall only the connections
// that subscribed to Redis pub/sub (a subscription that stops delivering).
package tcpproxy

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy forwards connections from Addr to a target address.
type Proxy struct {
	// Addr is the proxy's loopback listen address.
	Addr   string
	target string

	frozen atomic.Bool // hold all traffic
	cut    atomic.Bool // close connections and refuse new ones

	mu    sync.Mutex
	pairs []*pair
}

type pair struct {
	client, server net.Conn
	subscriber     atomic.Bool // the client sent SUBSCRIBE
	stalled        atomic.Bool // hold server-to-client traffic
}

// New starts a proxy to target that closes with the test.
func New(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target}
	t.Cleanup(func() {
		ln.Close()
		p.closeAll()
	})
	go p.accept(ln)
	return p
}

func (p *Proxy) accept(ln net.Listener) {
	for {
		client, err := ln.Accept()
		if err != nil {
			return
		}
		if p.cut.Load() {
			client.Close()
			continue
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		pr := &pair{client: client, server: server}
		p.mu.Lock()
		p.pairs = append(p.pairs, pr)
		p.mu.Unlock()
		go p.pipe(pr, client, server, true)
		go p.pipe(pr, server, client, false)
	}
}

// Freeze holds all traffic in both directions, without closing anything.
func (p *Proxy) Freeze() { p.frozen.Store(true) }

// Cut closes every connection and refuses new ones until Restore.
func (p *Proxy) Cut() {
	p.cut.Store(true)
	p.closeAll()
}

// StallSubscribers holds the server-to-client traffic of every connection
// that has sent SUBSCRIBE so far. Later connections are not affected.
func (p *Proxy) StallSubscribers() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, pr := range p.pairs {
		if pr.subscriber.Load() {
			pr.stalled.Store(true)
			n++
		}
	}
	return n
}

// Restore ends Freeze and Cut; stalled connections stay stalled.
func (p *Proxy) Restore() {
	p.frozen.Store(false)
	p.cut.Store(false)
}

func (p *Proxy) closeAll() {
	p.mu.Lock()
	pairs := p.pairs
	p.pairs = nil
	p.mu.Unlock()
	for _, pr := range pairs {
		pr.client.Close()
		pr.server.Close()
	}
}

var subscribeCommand = []byte("SUBSCRIBE")

// pipe copies src to dst until either side fails.
func (p *Proxy) pipe(pr *pair, src, dst net.Conn, fromClient bool) {
	defer src.Close()
	defer dst.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if fromClient && n > 0 && bytes.Contains(bytes.ToUpper(buf[:n]), subscribeCommand) {
			pr.subscriber.Store(true)
		}
		for p.frozen.Load() || (!fromClient && pr.stalled.Load()) {
			if p.cut.Load() {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
