package store_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-project/relay/store"
)

// BenchmarkRedisSend measures the round trip of one message from one replica
// to the handler of another: Send, then wait until the handler has it.
func BenchmarkRedisSend(b *testing.B) {
	for _, size := range []int{1 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			options := sharedRedis(b)
			prefix := uniquePrefix()
			deleteKeysOnCleanup(b, options, prefix)
			cfg := store.RedisConfig{Prefix: prefix}
			cfg.ReplicaID = "sender-" + randomHex(4)
			sender, _ := startRedisStore(b, options, cfg, &recordingHandler{})
			receiverHandler := &signalHandler{size: size, delivered: make(chan struct{}, 1)}
			cfg.ReplicaID = "receiver-" + randomHex(4)
			receiver, _ := startRedisStore(b, options, cfg, receiverHandler)

			msg := make([]byte, size)
			if _, err := rand.Read(msg); err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			timeout := time.NewTimer(0)
			<-timeout.C
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				if err := sender.Send(ctx, receiver.ReplicaID(), msg); err != nil {
					b.Fatalf("Send: %v", err)
				}
				timeout.Reset(5 * time.Second)
				select {
				case <-receiverHandler.delivered:
					timeout.Stop()
				case <-timeout.C:
					b.Fatal("message not delivered within 5 s")
				}
			}
			if n := receiverHandler.wrongSize.Load(); n != 0 {
				b.Errorf("%d messages arrived with a size other than %d bytes", n, size)
			}
		})
	}
}

// signalHandler signals each delivered message on a channel with a buffer of
// one, which never blocks while the sender waits for every message in turn.
type signalHandler struct {
	size      int
	delivered chan struct{}
	wrongSize atomic.Int64
}

func (h *signalHandler) HandleMessage(msg []byte) {
	if len(msg) != h.size {
		h.wrongSize.Add(1)
	}
	select {
	case h.delivered <- struct{}{}:
	default:
	}
}

func (h *signalHandler) HandleReplicaDown(string) {}

// BenchmarkProviders measures a read of the registry view on one replica while
// another replica has registered 10,000 providers.
func BenchmarkProviders(b *testing.B) {
	const providers = 10_000
	b.Run("memory", func(b *testing.B) {
		hub := store.NewMemoryHub(0)
		holder, reader := hub.Node("holder"), hub.Node("reader")
		for _, s := range []*store.Memory{holder, reader} {
			if err := s.Start(context.Background(), &recordingHandler{}); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = s.Close(context.Background()) })
		}
		registerProviders(b, holder, providers)
		benchmarkProviders(b, reader, providers)
	})
	b.Run("redis", func(b *testing.B) {
		options := sharedRedis(b)
		prefix := uniquePrefix()
		deleteKeysOnCleanup(b, options, prefix)
		cfg := store.RedisConfig{Prefix: prefix}
		cfg.ReplicaID = "holder-" + randomHex(4)
		holder, _ := startRedisStore(b, options, cfg, &recordingHandler{})
		cfg.ReplicaID = "reader-" + randomHex(4)
		reader, _ := startRedisStore(b, options, cfg, &recordingHandler{})
		registerProviders(b, holder, providers)
		waitFor(b, 30*time.Second, "providers visible on the reader", func() error {
			ps, err := reader.Providers(context.Background())
			if err != nil {
				return err
			}
			if len(ps) != providers {
				return fmt.Errorf("reader lists %d providers, want %d", len(ps), providers)
			}
			return nil
		})
		benchmarkProviders(b, reader, providers)
	})
}

// registerProviders registers n providers on s from 32 goroutines, so that
// the Redis store can batch the writes.
func registerProviders(b *testing.B, s store.Store, n int) {
	b.Helper()
	const workers = 32
	var wg sync.WaitGroup
	var failures atomic.Int64
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				p := sampleProvider(fmt.Sprintf("%08x", i), fmt.Sprintf("user-%d", i%500))
				if err := s.Register(context.Background(), p); err != nil {
					failures.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed := failures.Load(); failed != 0 {
		b.Fatalf("%d of %d registrations failed", failed, n)
	}
}

func benchmarkProviders(b *testing.B, s store.Store, want int) {
	b.Helper()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		ps, err := s.Providers(ctx)
		if err != nil {
			b.Fatalf("Providers: %v", err)
		}
		if len(ps) != want {
			b.Fatalf("Providers returned %d providers, want %d", len(ps), want)
		}
	}
}
