package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relay-project/relay/agentsim"
)

// TestNginxRoundRobin runs a real nginx with the repository's configuration
// in front of three replicas, connects agents through it, and polls
// ib-status through it 500 times: every poll must answer correctly, however
// nginx spreads the agents and the polls. This is the "sometimes connected,
// sometimes not" failure of a relay that keeps agents in one process.
func TestNginxRoundRobin(t *testing.T) {
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		if _, statErr := os.Stat("/usr/sbin/nginx"); statErr != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("nginx is not installed: %v", err)
			}
			t.Skipf("nginx is not installed: %v", err)
		}
		nginx = "/usr/sbin/nginx"
	}
	c := newCluster(t)
	replicas := c.startReplicas("relay-a", "relay-b", "relay-c")
	front := startNginx(t, nginx, replicas)

	// Four agents through nginx: round-robin spreads them over the replicas.
	alice := c.startAgent("alice", "ws://"+front+"/ws/data-provider", agentsim.Config{TWSConnected: true})
	c.startAgent("bob", "ws://"+front+"/ws/data-provider", agentsim.Config{TWSConnected: false})
	c.startAgent("dave", "ws://"+front+"/ws/data-provider", agentsim.Config{TWSConnected: true})
	c.startAgent("dave", "ws://"+front+"/ws/data-provider", agentsim.Config{TWSConnected: true})
	for _, r := range replicas {
		waitFor(t, 5*time.Second, "every agent registered on "+r.id, func() (bool, string) {
			n := len(r.registry(t).Providers)
			return n == 4, fmt.Sprintf("%d providers", n)
		})
	}

	instances := map[string]bool{}
	for _, p := range replicas[0].registry(t).Providers {
		instances[p.InstanceID] = true
	}
	t.Logf("agents spread over %d replicas through nginx", len(instances))
	if len(instances) < 2 {
		t.Errorf("nginx put every agent on one replica (%v), want round-robin", instances)
	}

	users := []string{"alice", "bob", "carol", "dave"}
	servedBy := map[string]int{}
	wrong := 0
	for i := range 500 {
		user := users[i%len(users)]
		res, err := doHTTP(http.MethodGet, "http://"+front+"/options/relay/ib-status?user_id="+user, nil)
		if err != nil {
			t.Fatalf("poll %d: %v", i, err)
		}
		servedBy[res.header.Get("X-Relay-Replica")]++
		var st ibStatusResponse
		checkAndDecode(t, fmt.Sprintf("poll %d (%s)", i, user), res, http.StatusOK, &st)
		ok := false
		switch user {
		case "alice", "dave":
			ok = st.Connected && st.AgentConnected
		case "bob":
			ok = !st.Connected && st.AgentConnected && st.Message == "IB TWS not connected"
		case "carol":
			ok = !st.Connected && !st.AgentConnected && st.Message == "No IB data provider connected"
		}
		if !ok {
			wrong++
			if wrong <= 5 {
				t.Errorf("poll %d for %s through %s: connected %v, agent_connected %v, %q", i, user, res.header.Get("X-Relay-Replica"), st.Connected, st.AgentConnected, st.Message)
			}
		}
	}
	t.Logf("500 polls through nginx: %d wrong; served by %v", wrong, servedBy)
	if len(servedBy) != 3 {
		t.Errorf("polls were served by %v, want all three replicas", servedBy)
	}

	// A request crosses replicas behind nginx too.
	res, err := doHTTP(http.MethodPost, "http://"+front+"/options/relay/request", relayRequest{UserID: "alice", RequestType: "get_positions", TimeoutMS: 3000})
	if err != nil {
		t.Fatal(err)
	}
	var answer agentResponse
	checkAndDecode(t, "request through nginx", res, http.StatusOK, &answer)
	if answer.ProviderID != alice.ProviderID() || !answer.Success {
		t.Errorf("request through nginx: %+v", answer)
	}
}

// startNginx renders the test template of deploy/nginx for the replicas,
// starts nginx in the foreground on a free loopback port, and stops it when
// the test ends. It returns the address nginx listens on.
func startNginx(t *testing.T, nginx string, replicas []*replica) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	confDir := filepath.Join(root, "deploy", "nginx")
	template, err := os.ReadFile(filepath.Join(confDir, "relay.test.conf.template"))
	if err != nil {
		t.Fatalf("read the nginx template: %v", err)
	}
	runDir := t.TempDir()
	if err := os.Chmod(runDir, 0o777); err != nil {
		t.Fatal(err)
	}
	listen := freeLoopbackAddr(t)
	conf := strings.NewReplacer(
		"@LISTEN_ADDR@", listen,
		"@RELAY_ADDR_1@", replicas[0].addr,
		"@RELAY_ADDR_2@", replicas[1].addr,
		"@RELAY_ADDR_3@", replicas[2].addr,
		"@CONF_DIR@", confDir,
		"@RUN_DIR@", runDir,
	).Replace(string(template))
	confFile := filepath.Join(runDir, "nginx.conf")
	if err := os.WriteFile(confFile, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}

	// nginx's output goes to a file, not a pipe: its workers would hold a
	// pipe open after the master is killed, and Wait would wait for them.
	logFile, err := os.Create(filepath.Join(runDir, "stderr.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(nginx, "-e", "stderr", "-p", runDir, "-c", confFile)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nginx: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	output := func() string {
		data, _ := os.ReadFile(filepath.Join(runDir, "stderr.log"))
		errorLog, _ := os.ReadFile(filepath.Join(runDir, "error.log"))
		return string(data) + string(errorLog)
	}
	t.Cleanup(func() {
		// The master and its workers share the process group nginx leads.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		if t.Failed() {
			t.Logf("nginx output and error.log:\n%s", output())
		}
	})

	deadline := time.Now().Add(5 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", listen, 100*time.Millisecond)
		if err == nil {
			conn.Close()
			return listen
		}
		select {
		case <-exited:
			t.Fatalf("nginx exited at start:\n%s", output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx did not listen on %s: %v\n%s", listen, err, output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
