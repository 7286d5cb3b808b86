// Package natstest runs a cluster of real nats-server processes for tests:
// JetStream and the MQTT listener on every node, routes between them, and
// device authentication delegated to an auth callout service (the control
// plane's). The server is built from the version go.mod pins as a tool.
//
// Without a Go toolchain able to build it, tests skip; under CI
// (CI=true) they fail.
package natstest

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/brokerconfig"
	"github.com/hangarfleet/hangar/internal/freeport"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds nats-server once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hangar-nats-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "nats-server")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/nats-io/nats-server/v2").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("build nats-server: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("nats-server needed under CI: %v", buildErr)
		}
		t.Skip(buildErr)
	}
	return binPath
}

// Options configure a cluster.
type Options struct {
	Nodes int // default 3
	// User and Password are the control plane's account; it answers the
	// auth callout for every other connection.
	User, Password string
	// CalloutIssuer is the public account key the callout's responses
	// are signed with.
	CalloutIssuer string
}

// Cluster is a running cluster.
type Cluster struct {
	t     testing.TB
	opts  Options
	Nodes []*Node
}

// Node is one server.
type Node struct {
	Name                      string
	Client, MQTT, Route, HTTP int
	conf, dir                 string
	bin                       string
	mu                        sync.Mutex
	cmd                       *exec.Cmd
	log                       *os.File
}

// Start runs the cluster until the end of the test and waits until every
// node is healthy with JetStream.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	bin := Binary(t)
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	dir := t.TempDir()
	c := &Cluster{t: t, opts: opts}
	port := func() int {
		p, err := freeport.Port()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for i := range opts.Nodes {
		n := &Node{Name: fmt.Sprintf("n%d", i+1), Client: port(), MQTT: port(), Route: port(), HTTP: port(), bin: bin}
		n.dir = filepath.Join(dir, n.Name)
		c.Nodes = append(c.Nodes, n)
	}
	cluster := brokerconfig.NATSCluster{User: opts.User, Password: opts.Password, CalloutIssuer: opts.CalloutIssuer, MaxFileStore: "4GB"}
	for _, n := range c.Nodes {
		cluster.Nodes = append(cluster.Nodes, brokerconfig.NATSNode{Name: n.Name, Host: "127.0.0.1", ClientPort: n.Client,
			MQTTPort: n.MQTT, RoutePort: n.Route, HTTPPort: n.HTTP, StoreDir: filepath.Join(n.dir, "js")})
	}
	for i, n := range c.Nodes {
		if err := os.MkdirAll(n.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		conf := brokerconfig.NATSConfig(cluster, i)
		n.conf = filepath.Join(n.dir, "nats.conf")
		if err := os.WriteFile(n.conf, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, n := range c.Nodes {
			n.Kill()
			if t.Failed() {
				t.Logf("nats %s log:\n%s", n.Name, n.Log(3000))
			}
		}
	})
	for _, n := range c.Nodes {
		if err := n.WaitHealthy(60 * time.Second); err != nil {
			t.Fatalf("nats %s: %v\n%s", n.Name, err, n.Log(3000))
		}
	}
	return c
}

// URLs are the nodes' client URLs, comma-separated (nats.go's form).
func (c *Cluster) URLs() string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, fmt.Sprintf("nats://127.0.0.1:%d", n.Client))
	}
	return strings.Join(out, ",")
}

// MQTTURLs are the nodes' MQTT URLs, comma-separated (what devices are
// given: they connect to any).
func (c *Cluster) MQTTURLs() string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, fmt.Sprintf("tcp://127.0.0.1:%d", n.MQTT))
	}
	return strings.Join(out, ",")
}

// Start starts the node (again).
func (n *Node) Start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		return nil
	}
	logf, err := os.OpenFile(filepath.Join(n.dir, "nats.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(n.bin, "-c", n.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	n.cmd, n.log = cmd, logf
	return nil
}

// Kill stops the node with SIGKILL.
func (n *Node) Kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Kill()
	_ = n.cmd.Wait()
	n.log.Close()
	n.cmd = nil
}

// WaitHealthy waits until the node reports itself healthy, JetStream
// included.
func (n *Node) WaitHealthy(within time.Duration) error {
	deadline := time.Now().Add(within)
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", n.HTTP)
	var last string
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("not healthy within %v: %s", within, last)
}

// Log returns the end of the node's log.
func (n *Node) Log(max int) string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "nats.log"))
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}
