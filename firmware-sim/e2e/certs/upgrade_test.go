package certs

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/transport"
	"github.com/hangarfleet/hangar/agent/transport/mqttlite"
	"github.com/hangarfleet/hangar/controlplane/devca"
)

// The addresses the previous release's control plane gave its drones
// (testdata/README.md): the upgraded one must serve them.
const (
	prevHTTP = "127.0.0.77:18080"
	prevMQTT = "127.0.0.77:18883"
)

func build(t *testing.T, pkg, out string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), out)
	cmd := exec.Command("go", "build", "-o", path, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	return path
}

// proc is a child process with its output kept.
type proc struct {
	cmd *exec.Cmd
	mu  sync.Mutex
	out bytes.Buffer
}

func (p *proc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func (p *proc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func startProc(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(bin, args...)}
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", filepath.Base(bin), p.log())
		}
	})
	return p
}

// TestUpgradeFromPasswords: a control plane and drones from the release
// before device certificates (their data directory and state directories)
// are upgraded in place. The drones keep connecting at the addresses they
// were given, with their passwords; a drone running the new agent moves
// to a certificate by itself over its connection, and its password stops
// working; the operator sees who still uses a password and turns
// passwords off; a drone still on its password is then refused, and the
// migrated drone is not.
func TestUpgradeFromPasswords(t *testing.T) {
	root := t.TempDir()
	if b, err := exec.Command("tar", "xzf", "testdata/prev-release.tar.gz", "-C", root).CombinedOutput(); err != nil {
		t.Fatalf("unpack: %v %s", err, b)
	}
	for _, addr := range []string{prevHTTP, prevMQTT} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("the previous release's address %s is not free: %v", addr, err)
		}
		ln.Close()
	}
	hangarBin := build(t, "github.com/hangarfleet/hangar/controlplane/cmd/hangar", "hangar")
	agentBin := build(t, "github.com/hangarfleet/hangar/agent/cmd/hangar-agent", "hangar-agent")
	data := filepath.Join(root, "cp")
	serve := startProc(t, hangarBin, "serve", "--data", data, "--http", prevHTTP, "--mqtt", prevMQTT, "--log-level", "debug")
	pool, err := devca.Pool(filepath.Join(data, "tls", devca.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	roots := &tls.Config{RootCAs: pool}
	cli := func(args ...string) (string, error) {
		cmd := exec.Command(hangarBin, append(args, "--server", "https://"+prevHTTP, "--ca-file", filepath.Join(data, "tls", devca.CAFile),
			"--token-file", filepath.Join(data, "admin.token"))...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	waitFor(t, 30*time.Second, "the upgraded control plane", func() (bool, string) {
		out, err := cli("device", "ls")
		return err == nil && strings.Contains(out, "old-1") && strings.Contains(out, "old-2"), out + serve.log()
	})
	out, err := cli("device", "passwords")
	if err != nil || !strings.Contains(out, "password authentication: on") {
		t.Fatalf("after the upgrade, passwords must stay on for the drones that have them: %v\n%s", err, out)
	}

	// old-2 stays on its password, as a drone still running the previous
	// agent does.
	passwordOf := func(state string) (url, password string) {
		var c struct {
			MQTTURL  string `json:"mqtt_url"`
			Password string `json:"password"`
		}
		if err := json.Unmarshal(readFile(t, filepath.Join(root, state, "credential.json")), &c); err != nil {
			t.Fatal(err)
		}
		return c.MQTTURL, c.Password
	}
	url2, pw2 := passwordOf("agent-2")
	url1, pw1 := passwordOf("agent-1")
	if url1 != "tls://"+prevMQTT {
		t.Fatalf("the previous release gave old-1 %q", url1)
	}
	passwordConnect := func(id, url, pw string) error {
		c, err := (&mqttlite.Transport{}).Connect(context.Background(), transport.ConnectParams{
			URL: url, ClientID: id, Username: id, Password: pw, KeepAlive: 30 * time.Second, TLS: roots,
			OnMessage: func(string, []byte) {}})
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := passwordConnect("old-2", url2, pw2); err != nil {
		t.Fatalf("a previous-release drone's password after the upgrade: %v", err)
	}

	// old-1 gets the new agent, with the flags it always had.
	agentArgs := []string{"--server", "https://" + prevHTTP, "--ca-file", filepath.Join(data, "tls", devca.CAFile),
		"--enroll-token-file", filepath.Join(data, "enroll.token"), "--device-id", "old-1", "--state-dir", filepath.Join(root, "agent-1"),
		"--flight-input", "", "--hardware", "rev-b", "--heartbeat", "1s", "--sample-interval", "500ms"}
	a1 := startProc(t, agentBin, agentArgs...)
	waitFor(t, 60*time.Second, "old-1 on a certificate", func() (bool, string) {
		out, _ := cli("device", "ls", "--auth", "certificate")
		return strings.Contains(out, "old-1"), out + a1.log()
	})
	if err := passwordConnect("old-1", url1, pw1); !errors.Is(err, transport.ErrNotAuthorized) {
		t.Fatalf("old-1's old password after its move to a certificate: %v", err)
	}
	out, err = cli("device", "passwords")
	if err != nil || !strings.Contains(out, "1 device last authenticated with a password: old-2") {
		t.Fatalf("who still uses passwords: %v\n%s", err, out)
	}
	if out, err := cli("device", "passwords", "off", "--reason", "all drones upgraded"); err != nil || !strings.Contains(out, "password authentication: off") {
		t.Fatalf("passwords off: %v\n%s", err, out)
	}
	if err := passwordConnect("old-2", url2, pw2); !errors.Is(err, transport.ErrNotAuthorized) {
		t.Fatalf("a password with passwords off: %v", err)
	}
	// old-1 keeps working, across a restart of its agent.
	a1.cmd.Process.Signal(syscall.SIGTERM)
	a1.cmd.Process.Wait()
	startProc(t, agentBin, agentArgs...)
	waitFor(t, 60*time.Second, "old-1 back online", func() (bool, string) {
		out, _ := cli("device", "show", "old-1", "-o", "json")
		return strings.Contains(out, `"online": true`) && strings.Contains(out, `"auth": "certificate"`), out
	})
	out, _ = cli("audit")
	for _, want := range []string{"device.cert-renewed", "device.passwords-off"} {
		if !strings.Contains(out, want) {
			t.Errorf("audit lacks %s:\n%s", want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "agent-1", "identity.pem")); err != nil {
		t.Errorf("old-1 keeps no identity: %v", err)
	}
}
