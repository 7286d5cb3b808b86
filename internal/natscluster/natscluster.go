// Package natscluster runs a cluster of real nats-server processes:
// JetStream and the MQTT listener on every node, routes between them, and
// device authentication delegated to hangar's auth callout (the
// configuration of hangar broker-config nats). Tests (internal/natstest)
// and the scenario runner use it.
package natscluster

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/controlplane/brokerconfig"
	"github.com/hangarfleet/hangar/internal/freeport"
)

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

// Start runs a cluster of nats-server bin in dir and waits until every
// node is healthy with JetStream.
func Start(dir, bin string, opts Options) (*Cluster, error) {
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	c := &Cluster{opts: opts}
	for i := range opts.Nodes {
		n := &Node{Name: fmt.Sprintf("n%d", i+1), bin: bin}
		for _, p := range []*int{&n.Client, &n.MQTT, &n.Route, &n.HTTP} {
			port, err := freeport.Port()
			if err != nil {
				return nil, err
			}
			*p = port
		}
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
			return nil, err
		}
		n.conf = filepath.Join(n.dir, "nats.conf")
		if err := os.WriteFile(n.conf, []byte(brokerconfig.NATSConfig(cluster, i)), 0o600); err != nil {
			return nil, err
		}
		if err := n.Start(); err != nil {
			c.Stop()
			return nil, err
		}
	}
	for _, n := range c.Nodes {
		if err := n.WaitHealthy(60 * time.Second); err != nil {
			c.Stop()
			return nil, fmt.Errorf("nats %s: %v\n%s", n.Name, err, n.Log(3000))
		}
	}
	return c, nil
}

// Stop kills every node.
func (c *Cluster) Stop() {
	for _, n := range c.Nodes {
		n.Kill()
	}
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
