package relay

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/go-redis/v9"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/protocol"
	"github.com/relay-project/relay/store"
)

// Benchmarks of the relay's hot paths. The routed benchmarks run the relay,
// the HTTP client and the simulated agent in one process, so a CPU profile
// of them shows all three. Focus the profile on this package's functions:
//
//	go test ./relay -run '^$' -bench RoutedRequest -cpuprofile cpu.out
//	go tool pprof -top -focus 'relay\.' relay.test cpu.out

// jsonBody returns a JSON object of about size bytes: {"blob":"<base64>"}.
func jsonBody(size int) []byte {
	raw := make([]byte, max(size-len(`{"blob":""}`), 0)*3/4)
	rand.Read(raw)
	return []byte(`{"blob":"` + base64.StdEncoding.EncodeToString(raw) + `"}`)
}

var benchSizes = []struct {
	name string
	size int
}{{"1KiB", 1 << 10}, {"1MiB", 1 << 20}}

func BenchmarkPeerMessageEncode(b *testing.B) {
	for _, sz := range benchSizes {
		b.Run(sz.name, func(b *testing.B) {
			body := jsonBody(sz.size)
			h := peerMessage{V: peerVersion, Kind: "resp", ID: "r0-abcd-1z", Provider: "0123456789abcdef", OK: true}
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				encodePeerMessage(h, body)
			}
		})
	}
}

func BenchmarkPeerMessageDecode(b *testing.B) {
	for _, sz := range benchSizes {
		b.Run(sz.name, func(b *testing.B) {
			body := jsonBody(sz.size)
			msg := encodePeerMessage(peerMessage{V: peerVersion, Kind: "resp", ID: "r0-abcd-1z", Provider: "0123456789abcdef", OK: true}, body)
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				if _, got, err := decodePeerMessage(msg); err != nil || len(got) != len(body) {
					b.Fatalf("decode: %d body bytes, err %v", len(got), err)
				}
			}
		})
	}
}

// responseFrame returns an agent's response frame carrying data, spaced as
// the production agent (Python's json.dumps) writes it.
func responseFrame(data []byte) []byte {
	return []byte(`{"type": "response", "request_id": "r0-abcd-1z", "success": true, "data": ` + string(data) + `, "error": null}`)
}

// BenchmarkResponseFrameDecode measures the decoding of an agent's response
// frame. "two-pass" is what agentConn.handleFrame does: protocol.PeekType,
// then protocol.Decode, each a json.Unmarshal over the whole frame.
// "one-pass" decodes the type and the response fields in one
// json.Unmarshal, for comparison.
func BenchmarkResponseFrameDecode(b *testing.B) {
	for _, sz := range benchSizes {
		frame := responseFrame(jsonBody(sz.size))
		b.Run(sz.name+"/two-pass", func(b *testing.B) {
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				typ, err := protocol.PeekType(frame)
				if err != nil || typ != protocol.TypeResponse {
					b.Fatalf("PeekType: %q, %v", typ, err)
				}
				var msg protocol.Response
				if err := protocol.Decode(frame, typ, &msg); err != nil || len(msg.Data) == 0 {
					b.Fatalf("Decode: %d data bytes, %v", len(msg.Data), err)
				}
			}
		})
		b.Run(sz.name+"/one-pass", func(b *testing.B) {
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				var msg struct {
					Type string `json:"type"`
					protocol.Response
				}
				if err := json.Unmarshal(frame, &msg); err != nil || msg.Type != protocol.TypeResponse || len(msg.Data) == 0 {
					b.Fatalf("Unmarshal: type %q, %d data bytes, %v", msg.Type, len(msg.Data), err)
				}
			}
		})
	}
}

// discardWriter is an http.ResponseWriter that drops the body, so that
// BenchmarkWriteAnswer measures writeAnswer and not a recorder's buffer.
type discardWriter struct{ header http.Header }

func (w *discardWriter) Header() http.Header         { return w.header }
func (w *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *discardWriter) WriteHeader(int)             {}

func BenchmarkWriteAnswer(b *testing.B) {
	e := echo.New()
	data := jsonBody(1 << 20)
	p := store.Provider{ID: "0123456789abcdef", InstanceID: "r0-abcd"}
	res := callResult{Success: true, Data: data}
	req := httptest.NewRequest(http.MethodPost, "/options/relay/request", nil)
	w := &discardWriter{header: make(http.Header)}
	c := e.NewContext(req, w)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		clear(w.header)
		c.Reset(req, w)
		if err := writeAnswer(c, "r0-abcd-1z", p, res); err != nil {
			b.Fatal(err)
		}
	}
}

// newBenchCluster starts n replicas sharing one store backend, as
// newCluster does for tests. The Redis stores keep the production beat
// interval and TTL.
func newBenchCluster(b *testing.B, backend string, n int) []*replica {
	b.Helper()
	keys, err := auth.ParseKeys(strings.NewReader(testKeys))
	if err != nil {
		b.Fatal(err)
	}
	var hub *store.MemoryHub
	var client *redis.Client
	prefix := "bench-" + randomHex(6)
	switch backend {
	case "memory":
		hub = store.NewMemoryHub(0)
	case "redis":
		client = redisClient(b)
	default:
		b.Fatalf("unknown backend %q", backend)
	}

	replicas := make([]*replica, n)
	for i := range replicas {
		id := fmt.Sprintf("r%d-%s", i, randomHex(2))
		var st store.Store
		if hub != nil {
			st = hub.Node(id)
		} else {
			st, err = store.NewRedis(store.RedisConfig{Client: client, Prefix: prefix, ReplicaID: id, Logger: testLogger(b)})
			if err != nil {
				b.Fatal(err)
			}
		}
		srv, err := New(Config{Store: st, Auth: keys, Logger: testLogger(b).With("replica", id)})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = srv.Start(ctx)
		cancel()
		if err != nil {
			b.Fatalf("start replica %s: %v", id, err)
		}
		ts := httptest.NewServer(srv.Handler())
		replicas[i] = &replica{srv: srv, ts: ts, base: ts.URL, ws: "ws" + strings.TrimPrefix(ts.URL, "http") + "/ws/data-provider"}
		b.Cleanup(func() {
			srv.Close()
			ts.Close()
		})
	}
	return replicas
}

// startBenchAgent runs a simulated agent of alice on r until the benchmark
// ends, and waits until every replica in all lists it with TWS connected.
func startBenchAgent(b *testing.B, r *replica, chainBytes int, all ...*replica) {
	b.Helper()
	a := agentsim.New(agentsim.Config{
		URL: r.ws, APIKey: "key-alice", TWSConnected: true, ChainBytes: chainBytes,
		ReconnectDelay: 100 * time.Millisecond, Logger: testLogger(b),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx)
	}()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	if err := a.WaitConnected(wctx); err != nil {
		b.Fatalf("agent did not connect: %v", err)
	}
	for _, other := range all {
		eventually(b, 5*time.Second, func() bool { return other.hasTWSConnected(b, a.ProviderID()) },
			"provider %s never appeared with TWS connected in the registry of %s", a.ProviderID(), other.srv.ReplicaID())
	}
}

// hasTWSConnected reports whether r's registry lists provider id with the
// TWS state of its first agent_state, connected.
func (r *replica) hasTWSConnected(b *testing.B, id string) bool {
	for _, p := range r.registry(b).Providers {
		if p.ID == id && p.IBConnected != nil && *p.IBConnected {
			return true
		}
	}
	return false
}

// routedCall is one backend call of the routed benchmarks.
type routedCall struct {
	name   string
	method string
	path   string
	body   []byte
	expect string // a fragment every response contains
}

var routedCalls = []routedCall{
	{"ib-status", http.MethodGet, "/options/relay/ib-status?user_id=alice", nil, `"source":"agent"`},
	{"echo-200B", http.MethodPost, "/options/relay/request",
		[]byte(`{"user_id":"alice","request_type":"echo","timeout_ms":5000,"payload":` + string(jsonBody(200)) + `}`), `"success":true`},
	{"chain-1MiB", http.MethodPost, "/options/relay/request",
		[]byte(`{"user_id":"alice","request_type":"fetch_chain","timeout_ms":5000,"payload":{"ticker":"SPY"}}`), `"success":true`},
}

// BenchmarkRoutedRequest measures one backend call at a time, through HTTP,
// from the caller to the agent and back. "memory" is one replica with the
// memory store. "redis-cross" is two replicas that share Redis, with the
// agent on the first and the caller on the second.
func BenchmarkRoutedRequest(b *testing.B) {
	for _, setup := range []struct {
		name     string
		backend  string
		replicas int
	}{{"memory", "memory", 1}, {"redis-cross", "redis", 2}} {
		b.Run(setup.name, func(b *testing.B) {
			replicas := newBenchCluster(b, setup.backend, setup.replicas)
			startBenchAgent(b, replicas[0], 1<<20, replicas...)
			caller := replicas[len(replicas)-1]
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
			b.Cleanup(client.CloseIdleConnections)
			for _, rc := range routedCalls {
				b.Run(rc.name, func(b *testing.B) {
					benchmarkCall(b, client, caller.base, rc)
				})
			}
		})
	}
}

func benchmarkCall(b *testing.B, client *http.Client, base string, rc routedCall) {
	var buf bytes.Buffer
	b.ReportAllocs()
	for b.Loop() {
		if err := sendCall(client, base, rc, &buf); err != nil {
			b.Fatal(err)
		}
	}
}

// sendCall sends one call and checks its response, read into buf.
func sendCall(client *http.Client, base string, rc routedCall, buf *bytes.Buffer) error {
	var body io.Reader
	if rc.body != nil {
		body = bytes.NewReader(rc.body)
	}
	req, err := http.NewRequest(rc.method, base+rc.path, body)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	buf.Reset()
	_, err = buf.ReadFrom(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Contains(buf.Bytes(), []byte(rc.expect)) {
		return fmt.Errorf("%s: status %d, err %v, response %.200s", rc.name, resp.StatusCode, err, buf.Bytes())
	}
	return nil
}

// BenchmarkRoutedRequestParallel is BenchmarkRoutedRequest for the small
// calls with 16 callers at once, so that ns/op is the inverse of
// throughput and a CPU profile shows where a busy replica spends its time.
func BenchmarkRoutedRequestParallel(b *testing.B) {
	const callers = 16
	for _, setup := range []struct {
		name     string
		backend  string
		replicas int
	}{{"memory", "memory", 1}, {"redis-cross", "redis", 2}} {
		b.Run(setup.name, func(b *testing.B) {
			replicas := newBenchCluster(b, setup.backend, setup.replicas)
			startBenchAgent(b, replicas[0], 1<<20, replicas...)
			caller := replicas[len(replicas)-1]
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: callers}}
			b.Cleanup(client.CloseIdleConnections)
			for _, rc := range routedCalls[:2] {
				b.Run(rc.name, func(b *testing.B) {
					b.SetParallelism((callers + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
					b.ReportAllocs()
					b.RunParallel(func(pb *testing.PB) {
						var buf bytes.Buffer
						for pb.Next() {
							if err := sendCall(client, caller.base, rc, &buf); err != nil {
								b.Error(err)
								return
							}
						}
					})
				})
			}
		})
	}
}

// BenchmarkStatusRegistrySize measures a cached ib-status call for one user
// while the registry holds other users' providers, 16 callers at once, to
// show how the provider lookup grows with the registry.
func BenchmarkStatusRegistrySize(b *testing.B) {
	for _, others := range []int{0, 1_000, 10_000} {
		b.Run(fmt.Sprintf("providers-%d", others), func(b *testing.B) {
			replicas := newBenchCluster(b, "memory", 1)
			startBenchAgent(b, replicas[0], 1, replicas...)
			srv := replicas[0].srv
			ctx := context.Background()
			now := time.Now().UTC()
			for i := range others {
				p := store.Provider{
					ID: fmt.Sprintf("fake%012d", i), UserID: fmt.Sprintf("other%d", i), AgentVersion: "1.39.1",
					IBAccounts: []string{"DU0000001"}, ConnectedAt: now, LastHeartbeat: now, IsActive: true, InstanceID: srv.ReplicaID(),
				}
				if err := srv.store.Register(ctx, p); err != nil {
					b.Fatalf("register provider %d: %v", i, err)
				}
			}
			rc := routedCall{"ib-status-cache", http.MethodGet, "/options/relay/ib-status?user_id=alice&source=cache", nil, `"connected":true`}
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
			b.Cleanup(client.CloseIdleConnections)
			b.SetParallelism((16 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				var buf bytes.Buffer
				for pb.Next() {
					if err := sendCall(client, replicas[0].base, rc, &buf); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkIdleAgents connects b.N hand-driven agents to one replica with the
// memory store and keeps them connected, and reports the heap, goroutine
// stacks and goroutines that each one adds to the process. Both ends of
// every socket live in this process, so the figures include the client's
// share. With RELAY_BENCH_HEAP_PROFILE set to a path, it writes a heap
// profile there while the agents are connected, which separates the
// server's share:
//
//	RELAY_BENCH_HEAP_PROFILE=heap.out go test ./relay -run '^$' -bench IdleAgents -benchtime 2000x -memprofilerate 512
//	go tool pprof -sample_index inuse_space -focus 'handleAgent|net/http.\(\*conn\)' -top heap.out
func BenchmarkIdleAgents(b *testing.B) {
	replicas := newBenchCluster(b, "memory", 1)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	goroutines := runtime.NumGoroutine()

	agents := make([]*rawAgent, 0, b.N)
	for range b.N {
		a := dialRaw(b, replicas[0])
		a.auth("key-bob")
		agents = append(agents, a)
	}
	eventually(b, 10*time.Second, func() bool { return replicas[0].srv.agentCount() == b.N },
		"%d agents registered, want %d", replicas[0].srv.agentCount(), b.N)

	b.StopTimer()
	runtime.GC()
	runtime.ReadMemStats(&after)
	n := float64(len(agents))
	b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/n, "heap-B/agent")
	b.ReportMetric(float64(after.StackInuse-before.StackInuse)/n, "stack-B/agent")
	b.ReportMetric(float64(runtime.NumGoroutine()-goroutines)/n, "goroutines/agent")

	if path := os.Getenv("RELAY_BENCH_HEAP_PROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.WriteHeapProfile(f); err != nil {
			b.Fatalf("write heap profile: %v", err)
		}
	}
}

// BenchmarkRoundTrip measures Server.roundTrip alone, without the HTTP
// layer: the request to the agent, its response and, across replicas, the two
// Redis messages.
func BenchmarkRoundTrip(b *testing.B) {
	for _, setup := range []struct {
		name     string
		backend  string
		replicas int
	}{{"memory", "memory", 1}, {"redis-cross", "redis", 2}} {
		b.Run(setup.name, func(b *testing.B) {
			replicas := newBenchCluster(b, setup.backend, setup.replicas)
			startBenchAgent(b, replicas[0], 1<<20, replicas...)
			srv := replicas[len(replicas)-1].srv
			list, complete := srv.providers(context.Background(), "alice")
			if !complete || len(list) != 1 {
				b.Fatalf("registry of %s: %d providers of alice, complete %v", srv.ReplicaID(), len(list), complete)
			}
			p := list[0]
			for _, rt := range []struct {
				name, requestType string
				payload           []byte
			}{
				{"ib-status", "ib_status", nil},
				{"echo-200B", "echo", jsonBody(200)},
				{"chain-1MiB", "fetch_chain", []byte(`{"ticker":"SPY"}`)},
			} {
				b.Run(rt.name, func(b *testing.B) {
					ctx := context.Background()
					b.ReportAllocs()
					for b.Loop() {
						if _, res := srv.roundTrip(ctx, p, rt.requestType, rt.payload, 5*time.Second); res.Failure != "" || !res.Success {
							b.Fatalf("%s: failure %q (%s), success %v", rt.requestType, res.Failure, res.Message, res.Success)
						}
					}
				})
			}
		})
	}
}
