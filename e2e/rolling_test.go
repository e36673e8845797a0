package e2e

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// TestRollingRestart restarts the three replicas of a cluster one after the
// other, as a rolling deploy does. Six agents dial through a round-robin
// proxy, and a backend polls ib-status every 100 ms through the replicas that
// are not being restarted. A user's status may drop to disconnected only
// while that user's agent reconnects after its replica closed it with status
// 1012. So the share of polls that report TWS connected must be at least
// what the agents' reconnections allow.
func TestRollingRestart(t *testing.T) {
	const (
		userCount          = 6
		statusPollInterval = 100 * time.Millisecond
		// pollTimeoutMS is the ib-status timeout_ms of each poll. An agent
		// responds to ib_status in milliseconds, so a poll that waits this
		// long has found an agent that is gone.
		pollTimeoutMS = 2000
		// settleTime is the pause after a restarted replica is ready and
		// before the next replica is stopped.
		settleTime = time.Second
		// rounds is the number of times each replica is restarted.
		rounds = 2
		// maxPolls bounds the poller. The test polls for about 7 s.
		maxPolls = 600
		// slowPoll is the response time from which a poll counts as having
		// waited on a gone agent instead of failing at once. It is half of
		// pollTimeoutMS, and far above the few milliseconds that a poll
		// takes.
		slowPoll = pollTimeoutMS * time.Millisecond / 2
	)
	// The production agent waits 5 s before it reconnects. The test agents
	// wait reconnectDelay, so that the test is short.
	const reconnectDelay = 200 * time.Millisecond
	// maxOutagePerMove is the time for which one agent that its replica
	// closed may be missing from the registry. It is reconnectDelay, plus one
	// more when the proxy sends the first new connection to the draining
	// replica, which rejects it. Another 300 ms covers the dial,
	// authentication and registration on a loaded machine.
	const maxOutagePerMove = 2*reconnectDelay + 300*time.Millisecond

	c := newCluster(t)
	users := make([]string, userCount)
	keys := make(map[string]string, userCount)
	for i := range users {
		users[i] = fmt.Sprintf("rolling-user-%d", i)
		keys[fmt.Sprintf("rolling-key-%d", i)] = users[i]
	}
	c.keysFile = writeUserKeysFile(t, keys)

	replicas := []*replica{
		c.startReplicaAt("relay-a", ""),
		c.startReplicaAt("relay-b", ""),
		c.startReplicaAt("relay-c", ""),
	}
	proxy := startProxy(t, replicas[0].addr, replicas[1].addr, replicas[2].addr)

	agents := make([]*runningAgent, userCount)
	for i, user := range users {
		key := fmt.Sprintf("rolling-key-%d", i)
		cfg := agentsim.Config{TWSConnected: true, ReconnectDelay: reconnectDelay}
		agents[i] = c.runAgentWithKey(user, key, proxy.wsURL(), cfg, slog.LevelDebug)
		t.Cleanup(agents[i].stop)
	}
	waitFor(t, 5*time.Second, "every agent to connect through the proxy", func() (bool, string) {
		for _, a := range agents {
			if !a.Connected() {
				return false, fmt.Sprintf("%s's agent is not connected (stats %+v)", a.user, a.Stats())
			}
		}
		return true, ""
	})
	waitRegistryIDs(t, replicas, currentProviderIDs(agents)...)
	t.Logf("agents per replica before the restarts: %s", agentsPerReplica(t, replicas[0]))
	connectsBefore := totalConnects(agents)

	rotation := &replicaRotation{replicas: slices.Clone(replicas)}
	poller := startStatusPoller(rotation, users, statusPollInterval, pollTimeoutMS, maxPolls)
	t.Cleanup(func() { poller.stop() })
	pollStart := time.Now()

	// A short stretch without restarts shows that the poller itself works.
	time.Sleep(500 * time.Millisecond)
	names := []string{"relay-a", "relay-b", "relay-c"}
	for round := 2; round <= rounds+1; round++ {
		for i, old := range replicas {
			rest := slices.Delete(slices.Clone(replicas), i, i+1)
			rotation.set(rest...)
			// The agents on the other replicas stay where they are, so the
			// restarted replica must list them as soon as it is ready.
			var staying []provider
			for _, p := range rest[0].registry(t).Providers {
				if p.InstanceID != old.id {
					staying = append(staying, p)
				}
			}

			stopped := time.Now()
			old.signal(t, syscall.SIGTERM)
			if !old.waitExit(10 * time.Second) {
				t.Fatalf("replica %s did not exit within 10 s of SIGTERM", old.id)
			}
			if old.waitErr != nil {
				t.Errorf("replica %s exited with %v after SIGTERM, expected status 0", old.id, old.waitErr)
			}
			exited := time.Since(stopped)

			// A new replica id keeps the registry entries of the old process
			// and the new one apart.
			restarted := c.startReplicaAt(fmt.Sprintf("%s-%d", names[i], round), old.addr)
			replicas[i] = restarted
			listed := restarted.registry(t).Providers
			for _, p := range staying {
				if findProvider(listed, p.ID) == nil {
					t.Errorf("replica %s returned 200 from /readyz, but its registry does not list provider %s of %s on %s, "+
						"which stayed connected; expected the cluster-wide view", restarted.id, p.ID, p.UserID, p.InstanceID)
				}
			}
			t.Logf("+%v: SIGTERM to replica %s, which exited %v later; %s was ready on the same address %v after SIGTERM",
				stopped.Sub(pollStart).Round(time.Millisecond), old.id, exited.Round(time.Millisecond),
				restarted.id, time.Since(stopped).Round(time.Millisecond))
			rotation.set(replicas...)
			time.Sleep(settleTime)
		}
	}
	results := poller.stop()
	moves := totalConnects(agents) - connectsBefore

	// Every agent ends up connected to one of the new replicas, and no
	// replica lists an entry of a stopped one.
	waitFor(t, 5*time.Second, "every agent to be connected after the restarts", func() (bool, string) {
		for _, a := range agents {
			if !a.Connected() {
				return false, fmt.Sprintf("%s's agent is not connected (stats %+v)", a.user, a.Stats())
			}
		}
		return true, ""
	})
	waitRegistryIDs(t, replicas, currentProviderIDs(agents)...)
	newIDs := []string{replicas[0].id, replicas[1].id, replicas[2].id}
	for _, p := range replicas[0].registry(t).Providers {
		if !slices.Contains(newIDs, p.InstanceID) {
			t.Errorf("after the restarts, provider %s of %s is listed on %q, expected one of %v", p.ID, p.UserID, p.InstanceID, newIDs)
		}
	}
	t.Logf("agents per replica after the restarts: %s", agentsPerReplica(t, replicas[0]))

	// Each poll samples one user at one moment, and the users take turns,
	// so the share of failed polls estimates the share of user time without
	// a registered agent. Every reconnection costs at most maxOutagePerMove
	// of one user's time.
	if len(results) < 2 {
		t.Fatalf("the poller sent %d polls, expected many more", len(results))
	}
	span := results[len(results)-1].at.Sub(results[0].at)
	connected := 0
	failures := map[string]int{}
	var serverErrors, transportErrors []string
	var slowest time.Duration
	var slowPolls, failedPolls []string
	for _, r := range results {
		slowest = max(slowest, r.elapsed)
		if r.elapsed >= slowPoll {
			slowPolls = append(slowPolls, fmt.Sprintf("%s through %s at +%v: %v",
				r.user, r.replicaID, r.at.Sub(results[0].at).Round(time.Millisecond), r.elapsed.Round(time.Millisecond)))
		}
		switch {
		case r.err != nil:
			transportErrors = append(transportErrors, fmt.Sprintf("%s through %s: %v", r.user, r.replicaID, r.err))
			failures["transport error"]++
		case r.status >= 500:
			serverErrors = append(serverErrors, fmt.Sprintf("%s through %s at +%v: status %d: %s",
				r.user, r.replicaID, r.at.Sub(results[0].at).Round(time.Millisecond), r.status, truncate(r.body, 300)))
			failures[fmt.Sprintf("status %d", r.status)]++
		case r.status != http.StatusOK:
			failures[fmt.Sprintf("status %d", r.status)]++
		case r.connected:
			connected++
		default:
			failures["connected false: "+r.message]++
		}
		if r.err != nil || r.status != http.StatusOK || !r.connected {
			failedPolls = append(failedPolls, fmt.Sprintf("+%v %s through %s", r.at.Sub(results[0].at).Round(time.Millisecond), r.user, r.replicaID))
		}
	}
	share := float64(connected) / float64(len(results))
	minShare := 1 - float64(moves)*maxOutagePerMove.Seconds()/(float64(userCount)*span.Seconds())
	meanOutage := time.Duration((1 - share) * float64(userCount) * float64(span) / float64(max(moves, 1)))

	t.Logf("%d ib-status polls over %v: %d (%.1f%%) returned connected:true; slowest poll %v",
		len(results), span.Round(time.Millisecond), connected, 100*share, slowest.Round(time.Millisecond))
	for _, failure := range slices.Sorted(maps.Keys(failures)) {
		t.Logf("  %d polls: %s", failures[failure], failure)
	}
	if len(failedPolls) > 0 {
		t.Logf("failed polls, by time since the first poll: %s", strings.Join(failedPolls[:min(len(failedPolls), 30)], "; "))
	}
	t.Logf("%d agent reconnections; estimated time without a registered agent per reconnection %v (agent reconnect delay %v, 5 s in the production agent)",
		moves, meanOutage.Round(time.Millisecond), reconnectDelay)
	t.Logf("expected share of connected:true at least %.1f%%, from %v per reconnection", 100*minShare, maxOutagePerMove)

	if share < minShare {
		t.Errorf("%.1f%% of ib-status polls returned connected:true, expected at least %.1f%%: "+
			"with %d reconnections over %v and %d users, an outage of up to %v per reconnection allows no more failures",
			100*share, 100*minShare, moves, span.Round(time.Millisecond), userCount, maxOutagePerMove)
	}
	if len(serverErrors) > 0 {
		t.Errorf("%d polls through live replicas returned a 5xx status, expected none: %s",
			len(serverErrors), strings.Join(serverErrors[:min(len(serverErrors), 10)], "; "))
	}
	if len(transportErrors) > 0 {
		t.Errorf("%d polls through live replicas failed without a response, expected none: %s",
			len(transportErrors), strings.Join(transportErrors[:min(len(transportErrors), 10)], "; "))
	}
	if len(slowPolls) > 0 {
		t.Errorf("%d polls took %v or longer, expected a poll for an agent that went away to fail at once: %s",
			len(slowPolls), slowPoll, strings.Join(slowPolls[:min(len(slowPolls), 10)], "; "))
	}
	if moves < 1 {
		t.Errorf("no agent reconnected during the restarts, so the test did not move any agent")
	}
}

// currentProviderIDs returns the provider id of each agent's last authentication.
func currentProviderIDs(agents []*runningAgent) []string {
	ids := make([]string, len(agents))
	for i, a := range agents {
		ids[i] = a.ProviderID()
	}
	return ids
}

// totalConnects returns the number of successful authentications of all agents.
func totalConnects(agents []*runningAgent) int {
	total := 0
	for _, a := range agents {
		total += int(a.Stats().Connects)
	}
	return total
}

// agentsPerReplica describes how many providers the registry of r lists on
// each replica.
func agentsPerReplica(t *testing.T, r *replica) string {
	t.Helper()
	counts := map[string]int{}
	for _, p := range r.registry(t).Providers {
		counts[p.InstanceID]++
	}
	var parts []string
	for _, id := range slices.Sorted(maps.Keys(counts)) {
		parts = append(parts, fmt.Sprintf("%s %d", id, counts[id]))
	}
	return strings.Join(parts, ", ")
}

// replicaRotation hands out replicas round robin from a set that the test
// changes while a poller uses it.
type replicaRotation struct {
	mu       sync.Mutex
	replicas []*replica // guarded by mu
	next     int        // guarded by mu
}

func (r *replicaRotation) set(replicas ...*replica) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.replicas = slices.Clone(replicas)
}

func (r *replicaRotation) pick() *replica {
	r.mu.Lock()
	defer r.mu.Unlock()
	picked := r.replicas[r.next%len(r.replicas)]
	r.next++
	return picked
}

// statusPoll is the outcome of one ib-status call.
type statusPoll struct {
	at        time.Time // when the call was sent
	user      string
	replicaID string
	elapsed   time.Duration

	err       error // set when there was no response
	status    int
	body      []byte
	connected bool
	message   string
}

// statusPoller calls ib-status on a fixed interval, each call in its own
// goroutine so that a slow call does not delay the next ones.
type statusPoller struct {
	stopCh chan struct{}
	done   chan struct{}

	mu      sync.Mutex
	results []statusPoll // guarded by mu
}

// startStatusPoller calls GET /options/relay/ib-status every interval, for
// the users in turn, each call through the next replica of rotation, until
// stop is called or maxPolls calls were sent.
func startStatusPoller(rotation *replicaRotation, users []string, interval time.Duration, timeoutMS, maxPolls int) *statusPoller {
	p := &statusPoller{stopCh: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		var calls sync.WaitGroup
		defer calls.Wait()
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for n := range maxPolls {
			user := users[n%len(users)]
			r := rotation.pick()
			calls.Go(func() { p.record(pollStatus(r, user, timeoutMS)) })

			select {
			case <-p.stopCh:
				return
			case <-ticker.C:
			}
		}
	}()
	return p
}

// pollStatus sends one ib-status call for user through r.
func pollStatus(r *replica, user string, timeoutMS int) statusPoll {
	poll := statusPoll{at: time.Now(), user: user, replicaID: r.id}
	url := r.url(fmt.Sprintf("/options/relay/ib-status?user_id=%s&timeout_ms=%d", user, timeoutMS))
	res, err := doHTTP(http.MethodGet, url, nil)
	poll.elapsed = time.Since(poll.at)
	if err != nil {
		poll.err = err
		return poll
	}
	poll.status = res.status
	poll.body = res.body
	if res.status != http.StatusOK {
		return poll
	}
	var answer ibStatusResponse
	if err := json.Unmarshal(res.body, &answer); err != nil {
		poll.err = fmt.Errorf("response is not the expected JSON: %w; body: %s", err, truncate(res.body, 300))
		return poll
	}
	poll.connected = answer.Connected
	poll.message = answer.Message
	return poll
}

func (p *statusPoller) record(poll statusPoll) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.results = append(p.results, poll)
}

// stop ends the poller, waits for the calls in flight and returns every
// outcome in the order the calls were sent.
func (p *statusPoller) stop() []statusPoll {
	select {
	case <-p.stopCh:
	default:
		close(p.stopCh)
	}
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	slices.SortFunc(p.results, func(a, b statusPoll) int { return a.at.Compare(b.at) })
	return slices.Clone(p.results)
}
