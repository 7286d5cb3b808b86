package scenario

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/internal/freeport"
)

// ControlPlane is `hangar serve` run as a child process on
// fixed ports, so that it can be killed and started again on its data.
type ControlPlane struct {
	name       string // the replica's (clustered runs)
	bin, dir   string
	http, mqtt string
	args       []string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	log    bytes.Buffer
	starts int
}

// FindHangar finds the hangar binary: next to this executable, then in
// PATH.
func FindHangar() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "hangar")
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	p, err := exec.LookPath("hangar")
	if err != nil {
		return "", fmt.Errorf("no hangar binary next to hangar-sim or in PATH (make build puts both in bin/), or pass --hangar")
	}
	return p, nil
}

// NewControlPlane picks free loopback ports for a control plane on dir;
// Start starts it (and starts it again after Kill or Stop, on the same
// ports and data).
func NewControlPlane(bin, dir string, args ...string) (*ControlPlane, error) {
	c := &ControlPlane{bin: bin, dir: dir, args: args}
	return c, c.pickPorts()
}

func (c *ControlPlane) pickPorts() error {
	var err error
	if c.http, err = freeport.Addr(); err != nil {
		return err
	}
	c.mqtt, err = freeport.Addr()
	return err
}

func (c *ControlPlane) URL() string { return "http://" + c.http }

// DataDir is its data directory (database, token files).
func (c *ControlPlane) DataDir() string { return c.dir }

// Starts counts its starts.
func (c *ControlPlane) Starts() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.starts
}

// Start runs the control plane and waits until its API answers; on a
// failure the process is gone. A first start whose port was taken between
// choosing and binding it starts again on other ports; later starts keep
// theirs (drones know them).
func (c *ControlPlane) Start(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		err := c.start(ctx)
		if err == nil || attempt == 5 || c.Starts() != 1 || !strings.Contains(err.Error(), "address already in use") {
			return err
		}
		c.mu.Lock()
		c.log.Reset()
		c.starts--
		perr := c.pickPorts()
		c.mu.Unlock()
		if perr != nil {
			return perr
		}
	}
}

func (c *ControlPlane) start(ctx context.Context) error {
	c.mu.Lock()
	cmd := exec.Command(c.bin, append([]string{"serve", "--data", c.dir, "--http", c.http, "--mqtt", c.mqtt,
		// A whole simulated fleet enrolls from this one address, on
		// loopback: no per-address limit, no TLS.
		"--log-level", "warn", "--rollout-interval", "500ms", "--enroll-rate", "0", "--insecure"}, c.args...)...)
	cmd.Stdout, cmd.Stderr = &lockedWriter{c}, &lockedWriter{c}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.mu.Unlock()
		return fmt.Errorf("start control plane: %w", err)
	}
	exited := make(chan struct{})
	c.cmd, c.exited = cmd, exited
	c.starts++
	c.mu.Unlock()
	go func() { cmd.Wait(); close(exited) }()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := client.Get(c.URL() + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			return fmt.Errorf("control plane exited at start:\n%s", c.Log())
		case <-ctx.Done():
			c.Kill()
			return ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.Kill()
			return fmt.Errorf("control plane not answering after 30 s:\n%s", c.Log())
		}
	}
}

// Kill sends SIGKILL and waits for the process to be gone.
func (c *ControlPlane) Kill() {
	c.mu.Lock()
	cmd, exited := c.cmd, c.exited
	c.cmd = nil
	c.mu.Unlock()
	if cmd != nil {
		cmd.Process.Kill()
		<-exited
	}
}

// Stop asks the control plane to stop (SIGTERM) and waits.
func (c *ControlPlane) Stop() {
	c.mu.Lock()
	cmd, exited := c.cmd, c.exited
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
}

// Log is the control plane's output (the last MiB).
func (c *ControlPlane) Log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.log.String()
}

type lockedWriter struct{ c *ControlPlane }

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.c.mu.Lock()
	defer w.c.mu.Unlock()
	if w.c.log.Len() > 1<<20 { // keep the newest half
		tail := append([]byte(nil), w.c.log.Bytes()[w.c.log.Len()-512<<10:]...)
		w.c.log.Reset()
		w.c.log.Write(tail)
	}
	return w.c.log.Write(p)
}
