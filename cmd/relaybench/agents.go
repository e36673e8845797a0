package main

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// Agent groups, each with its own keys and users in the keys file.
const (
	groupMain  = "user"  // user0..userA-1, the agents of the load scenarios
	groupLarge = "large" // the agents that return the large responses
	groupIdle  = "idle"  // the idle agents of the memory and Redis measurements
)

// agentKey returns the API key of agent i of a group.
func agentKey(group string, i int) string { return fmt.Sprintf("bench-%s-%d", group, i) }

// agentUser returns the user id of agent i of a group, such as "user7".
func agentUser(group string, i int) string { return fmt.Sprintf("%s%d", group, i) }

// writeKeysFile writes a relay keys file with one `KEY USER_ID` line for every
// agent of every group, for the replicas this tool starts or for -write-keys.
func writeKeysFile(path string, counts map[string]int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	fmt.Fprintln(w, "# relaybench agent keys: KEY USER_ID")
	for _, group := range []string{groupMain, groupLarge, groupIdle} {
		for i := range counts[group] {
			fmt.Fprintf(w, "%s %s\n", agentKey(group, i), agentUser(group, i))
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// agentSpec describes one simulated agent to connect.
type agentSpec struct {
	group      string
	index      int
	replica    int // index into the replicas it connects to
	chainBytes int
}

// agentGroup is a set of running simulated agents.
type agentGroup struct {
	specs  []agentSpec
	agents []*agentsim.Agent
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// connectParallel is how many agents dial and authenticate at once.
const connectParallel = 64

// connectAgents starts one agentsim agent per spec, connected to
// replicas[spec.replica], and returns once every agent has authenticated.
// The agents run until stop is called.
func connectAgents(ctx context.Context, replicas []*replicaProc, specs []agentSpec, heartbeat time.Duration, logger *slog.Logger, timeout time.Duration) (*agentGroup, error) {
	runCtx, cancel := context.WithCancel(context.Background())
	g := &agentGroup{specs: specs, agents: make([]*agentsim.Agent, len(specs)), cancel: cancel}

	waitCtx, waitCancel := context.WithTimeout(ctx, timeout)
	defer waitCancel()
	sem := make(chan struct{}, connectParallel)
	errs := make(chan error, len(specs))
	var connecting sync.WaitGroup
	for i, spec := range specs {
		a := agentsim.New(agentsim.Config{
			URL:               replicas[spec.replica].ws,
			APIKey:            agentKey(spec.group, spec.index),
			TWSConnected:      true,
			ChainBytes:        spec.chainBytes,
			HeartbeatInterval: heartbeat,
			ReconnectDelay:    time.Second,
			Logger:            logger,
		})
		g.agents[i] = a
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			a.Run(runCtx)
		}()

		select {
		case sem <- struct{}{}:
		case <-waitCtx.Done():
		}
		connecting.Add(1)
		go func() {
			defer connecting.Done()
			defer func() { <-sem }()
			if err := a.WaitConnected(waitCtx); err != nil {
				errs <- fmt.Errorf("agent %s did not connect to replica %s within %v (see agents.log and the replica logs in the work directory)",
					agentUser(spec.group, spec.index), replicas[spec.replica].name, timeout)
			}
		}()
	}
	connecting.Wait()
	close(errs)
	if err, ok := <-errs; ok {
		g.stop()
		return nil, fmt.Errorf("%w (%d agents failed in all)", err, len(errs)+1)
	}
	return g, nil
}

// stop closes every agent's socket and waits, at most 30 s, for them to end.
func (g *agentGroup) stop() {
	if g == nil {
		return
	}
	g.cancel()
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
	}
}

// users returns the user id of every agent, in spec order.
func (g *agentGroup) users() []string {
	out := make([]string, len(g.specs))
	for i, s := range g.specs {
		out[i] = agentUser(s.group, s.index)
	}
	return out
}

// replicaOf returns the replica index of every agent, in spec order.
func (g *agentGroup) replicaOf() []int {
	out := make([]int, len(g.specs))
	for i, s := range g.specs {
		out[i] = s.replica
	}
	return out
}

// spreadSpecs returns n agents of a group spread evenly over replicas:
// agent i connects to replica i mod replicas.
func spreadSpecs(group string, n, replicas, chainBytes int) []agentSpec {
	specs := make([]agentSpec, n)
	for i := range specs {
		specs[i] = agentSpec{group: group, index: i, replica: i % replicas, chainBytes: chainBytes}
	}
	return specs
}
