package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
	"github.com/relay-project/relay/auth"
	"github.com/relay-project/relay/relay"
)

// Each test below produces its verdict's condition with real relay servers,
// agents and, where needed, Redis servers, and runs the doctor against them.

func TestDoctorOK(t *testing.T) {
	r := startMemoryRelay(t, nil)
	alice := startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-alice", TWSConnected: true})

	code, rep := runDoctorJSON(t, "-url", r.url, "-user", "alice")
	checkVerdict(t, code, rep, verdictOK, alice.ProviderID(), r.srv.ReplicaID(), "IB TWS connected")
	if rep.Verdict.ProviderID != alice.ProviderID() {
		t.Errorf("verdict provider %q, want %q", rep.Verdict.ProviderID, alice.ProviderID())
	}
	if len(rep.Providers) != 1 || rep.Providers[0].InstanceID != r.srv.ReplicaID() {
		t.Fatalf("providers %+v, want alice's one provider on %s", rep.Providers, r.srv.ReplicaID())
	}
	p := rep.Providers[0]
	if p.AgentVersion != agentsim.DefaultVersion {
		t.Errorf("provider version %q, want %q", p.AgentVersion, agentsim.DefaultVersion)
	}
	if p.ListedIn != rep.RegistryResponses {
		t.Errorf("provider listed in %d of %d registry responses, want all", p.ListedIn, rep.RegistryResponses)
	}
	if rep.Calls != 6*3+1 {
		t.Errorf("calls %d, want 19: 6 samples of 3 calls and the live ib-status", rep.Calls)
	}
}

func TestDoctorTextEndsWithVerdict(t *testing.T) {
	r := startMemoryRelay(t, nil)
	alice := startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-alice", TWSConnected: true})

	code, out, _ := runDoctorText(t, "-url", r.url, "-user", "alice", "-samples", "2")
	if code != exitOK {
		t.Errorf("exit status %d, want 0", code)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "verdict: ok: ") {
		t.Errorf("last line %q, want the verdict line", last)
	}
	if !strings.Contains(out, alice.ProviderID()+"  user alice  replica "+r.srv.ReplicaID()+"  version 1.39.1") {
		t.Errorf("report does not list alice's provider with replica and version:\n%s", out)
	}
	if strings.Count(out, "verdict:") != 1 {
		t.Errorf("report has more than one verdict line:\n%s", out)
	}
}

func TestDoctorTokenRequired(t *testing.T) {
	const token = "backend-token-1"
	r := startMemoryRelay(t, func(c *relay.Config) { c.APIToken = token })
	startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-alice", TWSConnected: true})
	t.Setenv(tokenEnv, "")

	code, rep := runDoctorJSON(t, "-url", r.url, "-user", "alice")
	checkVerdict(t, code, rep, verdictUnauthorized, "rejected the bearer token")

	code, rep = runDoctorJSON(t, "-url", r.url, "-user", "alice", "-token", token)
	checkVerdict(t, code, rep, verdictOK)

	t.Setenv(tokenEnv, token)
	code, rep = runDoctorJSON(t, "-url", r.url, "-user", "alice")
	checkVerdict(t, code, rep, verdictOK)
}

func TestDoctorRelayUnreachable(t *testing.T) {
	target := closedURL(t)
	start := time.Now()
	code, rep := runDoctorJSON(t, "-url", target, "-user", "alice", "-timeout", "2s")
	checkVerdict(t, code, rep, verdictUnreachable, "Cannot reach the relay at "+target, "connection refused")
	if rep.Samples != 1 {
		t.Errorf("samples %d, want 1: sampling stops when the first sample reaches nothing", rep.Samples)
	}
	if rep.Live != nil {
		t.Errorf("live status %+v, want none without a reachable relay", rep.Live)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("doctor took %v against a closed port", took)
	}
}

func TestDoctorReplicaBehindBalancerDown(t *testing.T) {
	r := startMemoryRelay(t, nil)
	startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-alice", TWSConnected: true})
	front := roundRobin(t, r.url, closedURL(t))

	code, rep := runDoctorJSON(t, "-url", front, "-user", "alice")
	checkVerdict(t, code, rep, verdictUnreachable, "calls to the relay at "+front+" failed", "502 Bad Gateway")
	if !strings.Contains(rep.Verdict.Fix, "load balancer's backends") {
		t.Errorf("fix %q does not point at the load balancer's backends", rep.Verdict.Fix)
	}
}

func TestDoctorNoAgent(t *testing.T) {
	r := startMemoryRelay(t, nil)

	// An agent with a wrong key tries once, so the relay records the failure.
	wrong := agentsim.New(agentsim.Config{URL: r.ws, APIKey: "key-wrong", ReconnectDelay: time.Hour, Logger: discardLogger()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		wrong.Run(ctx)
	}()
	waitFor(t, 5*time.Second, func() bool { return wrong.Stats().AuthFailures > 0 }, "agent with a wrong key never failed to authenticate")
	cancel()
	<-done

	code, rep := runDoctorJSON(t, "-url", r.url, "-user", "alice")
	fingerprint := auth.Fingerprint("key-wrong")
	checkVerdict(t, code, rep, verdictNoAgent, "No agent of user alice", "fingerprint "+fingerprint, "from 127.0.0.1")
	if len(rep.AuthFailures) != 1 {
		t.Fatalf("auth failures %+v, want the one failure", rep.AuthFailures)
	}
	f := rep.AuthFailures[0]
	if f.KeyFingerprint != fingerprint {
		t.Errorf("auth failure fingerprint %q, want %q", f.KeyFingerprint, fingerprint)
	}
	if f.IP != "127.0.0.1" {
		t.Errorf("auth failure address %q, want 127.0.0.1", f.IP)
	}
	if f.ReplicaID != r.srv.ReplicaID() {
		t.Errorf("auth failure replica %q, want %q", f.ReplicaID, r.srv.ReplicaID())
	}

	_, out, _ := runDoctorText(t, "-url", r.url, "-user", "alice", "-samples", "1")
	if !strings.Contains(out, "key "+fingerprint+"  from 127.0.0.1") {
		t.Errorf("text report does not show the failed key and address:\n%s", out)
	}
}

func TestDoctorAgentTimeout(t *testing.T) {
	r := startMemoryRelay(t, nil)
	alice := startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-alice", TWSConnected: true, Silent: true})

	code, rep := runDoctorJSON(t, "-url", r.url, "-user", "alice", "-timeout", "1s")
	checkVerdict(t, code, rep, verdictAgentTimeout, "on replica "+r.srv.ReplicaID(), "last heartbeat", "did not respond to ib_status within 750ms")
	if rep.Verdict.Replica != r.srv.ReplicaID() {
		t.Errorf("verdict names replica %q, want %q", rep.Verdict.Replica, r.srv.ReplicaID())
	}
	if rep.Verdict.ProviderID != alice.ProviderID() {
		t.Errorf("verdict names provider %q, want %q", rep.Verdict.ProviderID, alice.ProviderID())
	}
	if rep.Live == nil || len(rep.Live.ProviderStatuses) != 1 {
		t.Fatalf("live status %+v, want one provider status", rep.Live)
	}
	if got := rep.Live.ProviderStatuses[0].Error; got != codeTimeout {
		t.Errorf("live status error %q, want %q", got, codeTimeout)
	}
}

func TestDoctorTWSDisconnected(t *testing.T) {
	r := startMemoryRelay(t, nil)
	alice := startAgent(t, agentsim.Config{URL: r.ws, APIKey: "key-alice", TWSConnected: false})

	code, rep := runDoctorJSON(t, "-url", r.url, "-user", "alice")
	checkVerdict(t, code, rep, verdictTWSDisconnected, alice.ProviderID(), `"IB TWS not connected"`)
	if !strings.Contains(rep.Verdict.Fix, "IB Gateway") {
		t.Errorf("fix %q does not mention TWS or IB Gateway", rep.Verdict.Fix)
	}
}

func TestDoctorStale(t *testing.T) {
	r := startMemoryRelay(t, nil)
	providerID := startHungAgent(t, r.ws, "key-alice")

	// With the default threshold of 30 s the fresh registration is not
	// stale yet, so the agent's silence reads as a timeout.
	code, rep := runDoctorJSON(t, "-url", r.url, "-user", "alice", "-timeout", "1s", "-samples", "2")
	checkVerdict(t, code, rep, verdictAgentTimeout)

	time.Sleep(400 * time.Millisecond)
	code, rep = runDoctorJSON(t, "-url", r.url, "-user", "alice", "-timeout", "1s", "-samples", "2", "-stale-after", "300ms")
	checkVerdict(t, code, rep, verdictStale, providerID, "last heartbeat", "more than 300ms")
	if rep.Verdict.Replica != r.srv.ReplicaID() {
		t.Errorf("verdict names replica %q, want %q", rep.Verdict.Replica, r.srv.ReplicaID())
	}
	if len(rep.Providers) != 1 {
		t.Fatalf("providers %+v, want 1", rep.Providers)
	}
	if age := rep.Providers[0].HeartbeatAge; age < 0.3 {
		t.Errorf("heartbeat age %.3f s, want above 0.3 s", age)
	}
}

func TestDoctorTwoReplicasAgree(t *testing.T) {
	prefix := "relayctl-test-" + randomHex(6)
	client := sharedRedis(t, prefix)
	a := startRelay(t, newRedisStore(t, client, prefix, "a-"+randomHex(2)), nil)
	b := startRelay(t, newRedisStore(t, client, prefix, "b-"+randomHex(2)), nil)
	alice := startAgent(t, agentsim.Config{URL: a.ws, APIKey: "key-alice", TWSConnected: true})
	waitFor(t, 5*time.Second, func() bool {
		list, err := b.store.Providers(context.Background())
		return err == nil && len(list) == 1
	}, "replica %s never saw alice's provider", b.srv.ReplicaID())
	front := roundRobin(t, a.url, b.url)

	code, rep := runDoctorJSON(t, "-url", front, "-user", "alice")
	checkVerdict(t, code, rep, verdictOK, alice.ProviderID(), a.srv.ReplicaID())
	if len(rep.Replicas) != 2 {
		t.Fatalf("replicas %+v, want 2", rep.Replicas)
	}
	for _, replica := range rep.Replicas {
		if replica.Responses == 0 {
			t.Errorf("replica %s never reached through the balancer", replica.ID)
		}
	}
}

func TestDoctorSplitRegistry(t *testing.T) {
	prefix := "relayctl-test-" + randomHex(6)
	shared := sharedRedis(t, prefix)
	private := startPrivateRedis(t)
	a := startRelay(t, newRedisStore(t, shared, prefix, "a-"+randomHex(2)), nil)
	b := startRelay(t, newRedisStore(t, private.client, prefix, "b-"+randomHex(2)), nil)
	startAgent(t, agentsim.Config{URL: a.ws, APIKey: "key-alice", TWSConnected: true})
	front := roundRobin(t, a.url, b.url)

	// The replicas use different Redis servers, so neither sees the other.
	code, rep := runDoctorJSON(t, "-url", front, "-user", "alice", "-timeout", "2s")
	checkVerdict(t, code, rep, verdictSplitRegistry, "disagree about the live replicas",
		a.srv.ReplicaID()+" sees ["+a.srv.ReplicaID()+"]", b.srv.ReplicaID()+" sees ["+b.srv.ReplicaID()+"]")

	// Then replica B loses its Redis.
	private.stop()
	waitFor(t, 5*time.Second, func() bool { return !b.store.Health().OK() },
		"replica %s still reports a healthy store after its Redis stopped", b.srv.ReplicaID())
	start := time.Now()
	code, rep = runDoctorJSON(t, "-url", front, "-user", "alice")
	t.Logf("doctor took %v with replica B's Redis down", time.Since(start))
	checkVerdict(t, code, rep, verdictSplitRegistry, "Replica "+b.srv.ReplicaID()+" reports registry_ok=false pubsub_ok=")
	if rep.Verdict.Replica != b.srv.ReplicaID() {
		t.Errorf("verdict names replica %q, want %q", rep.Verdict.Replica, b.srv.ReplicaID())
	}
	if !strings.Contains(rep.Verdict.Fix, "Redis connectivity of replica "+b.srv.ReplicaID()) {
		t.Errorf("fix %q does not name replica %s", rep.Verdict.Fix, b.srv.ReplicaID())
	}
}

func TestDoctorUsageErrors(t *testing.T) {
	cases := map[string][]string{
		"no command":       {},
		"unknown command":  {"cure"},
		"unknown flag":     {"doctor", "-color"},
		"zero samples":     {"doctor", "-samples", "0"},
		"too many samples": {"doctor", "-samples", "101"},
		"non-http URL":     {"doctor", "-url", "ftp://relay"},
		"URL without host": {"doctor", "-url", "http://"},
		"zero timeout":     {"doctor", "-timeout", "0s"},
		"zero stale-after": {"doctor", "-stale-after", "0s"},
		"positional user":  {"doctor", "alice"},
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			var stdout, stderr strings.Builder
			if code := run(context.Background(), args, &stdout, &stderr); code != exitUsage {
				t.Errorf("exit status %d, want %d", code, exitUsage)
			}
			if stderr.Len() == 0 {
				t.Error("no message on stderr")
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q, want nothing", stdout.String())
			}
		})
	}
}

func TestDoctorHelp(t *testing.T) {
	var stdout, stderr strings.Builder
	if code := run(context.Background(), []string{"doctor", "-h"}, &stdout, &stderr); code != exitOK {
		t.Errorf("exit status %d, want 0", code)
	}
	if !strings.Contains(stderr.String(), "-stale-after") {
		t.Errorf("help does not list -stale-after:\n%s", stderr.String())
	}
}
