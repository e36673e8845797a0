package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// largeTimeout bounds each large call. Sixteen 4 MB responses through one
// Redis on two cores take seconds, not minutes.
const largeTimeout = 60 * time.Second

// largeResult is the outcome of one set of large responses sent at once.
type largeResult struct {
	Variant      string   `json:"variant"`
	Calls        int      `json:"calls"`
	Whole        int      `json:"whole"` // responses that arrived complete and intact
	ResponseSize int      `json:"response_bytes"`
	WallMs       float64  `json:"wall_ms"` // from the first call sent to the last response read
	MaxMs        float64  `json:"max_ms"`
	Quiet        bool     `json:"quiet"` // see scenarioResult.Quiet
	Failures     []string `json:"failures,omitempty"`
}

// largeCall is one call of a large check and how to verify its response.
type largeCall struct {
	url    string
	body   []byte
	verify func(data json.RawMessage) error
}

// runLarge sends opts.largeCount requests with responses of opts.largeBytes at
// once, in three variants: fetch_chain with callers spread over the
// replicas, fetch_chain with every caller on replica 0, and echo of a
// distinct random payload with callers spread.
func (b *bench) runLarge(ctx context.Context, agents *agentGroup) []largeResult {
	o := b.opts
	replicas := b.cluster.replicas
	users, replicaOf := agents.users(), agents.replicaOf()
	n := len(replicas)
	callerOf := func(agent int) int { return (replicaOf[agent] + 1) % n } // another replica, when there is one

	// Every large agent builds the same chain, so the responses must be equal:
	// the first intact one sets the hash that the others must match.
	var hashMu sync.Mutex
	var chainHash [sha256.Size]byte
	var haveHash bool
	verifyChain := func(data json.RawMessage) error {
		if len(data) < o.largeBytes {
			return fmt.Errorf("fetch_chain data of %d bytes, expected at least %d", len(data), o.largeBytes)
		}
		if !json.Valid(data) {
			return fmt.Errorf("fetch_chain data of %d bytes is not valid JSON", len(data))
		}
		sum := sha256.Sum256(data)
		hashMu.Lock()
		defer hashMu.Unlock()
		if !haveHash {
			chainHash, haveHash = sum, true
			return nil
		}
		if sum != chainHash {
			return fmt.Errorf("fetch_chain data of %d bytes differs from the other responses", len(data))
		}
		return nil
	}
	chainBody := func(user string) []byte {
		return []byte(`{"user_id":"` + user + `","request_type":"fetch_chain","timeout_ms":60000,"payload":{"ticker":"SPY"}}`)
	}

	var spread, oneReplica, echo []largeCall
	var others []int // agents not on replica 0
	for i := range users {
		if replicaOf[i] != 0 || n == 1 {
			others = append(others, i)
		}
	}
	for i := range o.largeCount {
		agent := i % len(users)
		spread = append(spread, largeCall{url: replicas[callerOf(agent)].base + "/options/relay/request", body: chainBody(users[agent]), verify: verifyChain})

		agent = others[i%len(others)]
		oneReplica = append(oneReplica, largeCall{url: replicas[0].base + "/options/relay/request", body: chainBody(users[agent]), verify: verifyChain})

		agent = i % len(users)
		body, verify := echoLargeCall(users[agent], o.largeBytes)
		echo = append(echo, largeCall{url: replicas[callerOf(agent)].base + "/options/relay/request", body: body, verify: verify})
	}

	client := newHTTPClient(o.largeCount, largeTimeout)
	defer client.CloseIdleConnections()
	var results []largeResult
	for _, v := range []struct {
		name  string
		calls []largeCall
	}{
		{"fetch_chain, callers spread over the replicas", spread},
		{"fetch_chain, every caller on replica 0", oneReplica},
		{"echo of distinct payloads, callers spread", echo},
	} {
		if ctx.Err() != nil {
			break
		}
		_, quiet := b.waitQuiet(ctx, b.cluster.replicaPIDs())
		r := sendLarge(ctx, client, v.calls)
		r.Variant, r.ResponseSize, r.Quiet = v.name, o.largeBytes, quiet
		results = append(results, r)
		b.log.Info("large responses done", "variant", r.Variant, "whole", r.Whole, "calls", r.Calls, "wall_ms", int(r.WallMs))
		for _, f := range r.Failures {
			b.log.Warn("large response failed", "variant", r.Variant, "error", f)
		}
	}
	return results
}

// echoLargeCall returns an echo request whose payload carries about size
// bytes of random base64 text, and a check that the response carries the
// same text.
func echoLargeCall(user string, size int) ([]byte, func(json.RawMessage) error) {
	raw := make([]byte, size*3/4)
	rand.Read(raw)
	blob := base64.StdEncoding.EncodeToString(raw)
	body := []byte(`{"user_id":"` + user + `","request_type":"echo","timeout_ms":60000,"payload":{"blob":"` + blob + `"}}`)
	verify := func(data json.RawMessage) error {
		var got struct {
			Blob string `json:"blob"`
		}
		if err := json.Unmarshal(data, &got); err != nil {
			return fmt.Errorf("echo data of %d bytes is not the payload object: %v", len(data), err)
		}
		if got.Blob != blob {
			return fmt.Errorf("echo data differs from the payload: %d bytes back for %d sent", len(got.Blob), len(blob))
		}
		return nil
	}
	return body, verify
}

// sendLarge starts every call at once and verifies each response.
func sendLarge(ctx context.Context, client *http.Client, calls []largeCall) largeResult {
	r := largeResult{Calls: len(calls)}
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := make(chan struct{})
	for _, c := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			began := time.Now()
			err := doLargeCall(ctx, client, c)
			took := time.Since(began)
			mu.Lock()
			defer mu.Unlock()
			r.MaxMs = max(r.MaxMs, float64(took)/float64(time.Millisecond))
			if err != nil {
				r.Failures = append(r.Failures, err.Error())
				return
			}
			r.Whole++
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	r.WallMs = float64(time.Since(t0)) / float64(time.Millisecond)
	return r
}

func doLargeCall(ctx context.Context, client *http.Client, c largeCall) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(c.body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()

	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("read response after %d bytes: %w", len(body), err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %.300s", resp.StatusCode, body)
	}
	if resp.ContentLength >= 0 && int64(len(body)) != resp.ContentLength {
		return fmt.Errorf("response of %d bytes, Content-Length %d", len(body), resp.ContentLength)
	}

	var response struct {
		Success bool            `json:"success"`
		Data    json.RawMessage `json:"data"`
		Error   *string         `json:"error"`
	}
	if err := json.Unmarshal(body, &response); err != nil {
		return fmt.Errorf("response of %d bytes is not valid JSON: %v", len(body), err)
	}
	if !response.Success {
		msg := "null"
		if response.Error != nil {
			msg = *response.Error
		}
		return fmt.Errorf("agent returned success false: %s", msg)
	}
	return c.verify(response.Data)
}
