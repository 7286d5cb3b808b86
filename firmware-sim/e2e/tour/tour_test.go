// Package tour runs the README's tour as written: make run's setup
// (scripts/run.sh, on its fixed ports), then every command of the tour's
// code blocks, in order, in a shell.
package tour

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/internal/syncbuf"
)

// tourCommands are the shell commands of the README's "A short tour",
// continuation lines joined.
func tourCommands(t *testing.T, readme string) []string {
	b, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "## A short tour")
	if i < 0 {
		t.Fatal("README has no tour")
	}
	s = s[i+3:]
	if j := strings.Index(s, "\n## "); j >= 0 {
		s = s[:j]
	}
	var cmds []string
	in := false
	cur := ""
	for _, line := range strings.Split(s, "\n") {
		l := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(l, "```sh"):
			in = true
			continue
		case strings.HasPrefix(l, "```"):
			in = false
			continue
		}
		if !in || l == "" {
			continue
		}
		if strings.HasSuffix(l, "\\") {
			cur += strings.TrimSuffix(l, "\\") + " "
			continue
		}
		cmds = append(cmds, cur+l)
		cur = ""
	}
	return cmds
}

// skipped: commands the tour shows that this test does not run, and why.
func skipped(cmd string) string {
	switch {
	case strings.Contains(cmd, "./bin/hangar-agent "):
		return "runs a real agent until stopped (the e2e tests run real agents)"
	case strings.Contains(cmd, "my-drone"):
		return "needs that real agent"
	case strings.Contains(cmd, "hangar-sim run "):
		return "a scenario of minutes (TestScenarios plays every shipped scenario)"
	case strings.HasPrefix(cmd, "go build -o bin/ "):
		return "run in the repository: the tour built the same binaries into its bin/ above"
	}
	return ""
}

func TestReadmeTour(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	for _, addr := range []string{"127.0.0.1:8080", "127.0.0.1:1883"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("the tour's address %s is taken: %v", addr, err)
			}
			t.Skipf("the tour's address %s is taken (make run still running?): %v", addr, err)
		}
		ln.Close()
	}
	repo, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "scripts"), 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) {
		cmd := exec.Command(name, args...)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	run("go", "build", "-o", filepath.Join(root, "bin")+"/", "./controlplane/cmd/hangar", "./agent/cmd/hangar-agent", "./firmware-sim/cmd/hangar-sim",
		"github.com/nats-io/nats-server/v2")
	run("cp", "scripts/run.sh", filepath.Join(root, "scripts", "run.sh"))

	// make run, with fewer drones.
	var log syncbuf.Buffer
	mk := exec.Command("bash", "scripts/run.sh")
	mk.Dir = root
	mk.Env = append(os.Environ(), "SIM_DEVICES=24")
	mk.Stdout, mk.Stderr = &log, &log
	mk.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := mk.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { mk.Wait(); close(exited) }()
	t.Cleanup(func() {
		syscall.Kill(-mk.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			syscall.Kill(-mk.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			t.Logf("make run's output:\n%s", log.String())
		}
	})
	env := append(os.Environ(), "HANGAR_TOKEN=", "HANGAR_SERVER=", "HANGAR_CA_FILE=")
	shell := func(cmd string, timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c := exec.CommandContext(ctx, "bash", "-c", cmd)
		c.Dir, c.Env = root, env
		out, err := c.CombinedOutput()
		if ctx.Err() != nil {
			return string(out), ctx.Err()
		}
		return string(out), err
	}
	wait := func(what string, timeout time.Duration, cond func() bool) {
		deadline := time.Now().Add(timeout)
		for !cond() {
			select {
			case <-exited:
				t.Fatalf("make run exited while waiting for %s", what)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	wait("hangar is running", 2*time.Minute, func() bool { return strings.Contains(log.String(), "hangar is running") })
	auth := "HANGAR_TOKEN=$(cat data/admin.token) HANGAR_SERVER=https://127.0.0.1:8080 HANGAR_CA_FILE=data/tls/ca.pem "
	wait("24 drones online", 2*time.Minute, func() bool {
		out, err := shell(auth+"./bin/hangar device ls --online true -o json | grep -c '\"id\"'", 20*time.Second)
		return err == nil && strings.TrimSpace(out) == "24"
	})

	cmds := tourCommands(t, filepath.Join(repo, "README.md"))
	if len(cmds) < 20 {
		t.Fatalf("only %d tour commands found", len(cmds))
	}
	var exports []string
	ran := 0
	for _, cmd := range cmds {
		if why := skipped(cmd); why != "" {
			t.Logf("not run: %s (%s)", cmd, why)
			continue
		}
		if strings.HasPrefix(cmd, "export ") {
			exports = append(exports, cmd)
			continue
		}
		script := strings.Join(append(exports, cmd), "\n")
		timeout := 2 * time.Minute
		if strings.Contains(cmd, "rollout watch") {
			// It runs until the rollout ends (its soak is minutes):
			// a few reports are enough.
			timeout = 8 * time.Second
		}
		out, err := shell(script, timeout)
		ran++
		switch {
		case err == context.DeadlineExceeded && strings.Contains(cmd, "rollout watch"):
			if !strings.Contains(out, "stage") {
				t.Errorf("%s printed no report:\n%s", cmd, out)
			}
		case err != nil:
			t.Errorf("%s: %v\n%s", cmd, err, out)
		default:
			t.Logf("$ %s\n%s", cmd, firstLines(out, 6))
		}
		// The drone runs the factory build the tour signed a delta from:
		// it is offered the patch, and commits the build it makes.
		if strings.Contains(cmd, "device update sim-00007 --release 1.1.0") {
			if !strings.Contains(out, "delta") {
				t.Errorf("%s did not offer the delta:\n%s", cmd, out)
			}
			wait("sim-00007 committed 1.1.0 from the delta", 2*time.Minute, func() bool {
				out, err := shell(auth+"./bin/hangar device updates sim-00007", 20*time.Second)
				return err == nil && strings.Contains(out, "committed") && strings.Contains(out, "delta")
			})
		}
		// The bad build is stopped at the canary.
		if strings.Contains(cmd, "--release 1.2.0") && strings.Contains(cmd, "--start") {
			wait("the bad build stopped at the canary", 3*time.Minute, func() bool {
				out, err := shell(auth+"./bin/hangar rollout status latest -o json", 20*time.Second)
				return err == nil && strings.Contains(out, `"status": "paused"`)
			})
		}
	}
	if ran < 20 {
		t.Errorf("ran %d tour commands", ran)
	}
	// The console is served where the tour says.
	out, err := shell("curl -fsS --cacert data/tls/ca.pem https://127.0.0.1:8080/", 20*time.Second)
	if err != nil || !strings.Contains(out, "<title>hangar</title>") {
		t.Errorf("console: %v %s", err, firstLines(out, 3))
	}
	// A clean stop logs no ERROR.
	syscall.Kill(-mk.Process.Pid, syscall.SIGINT)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("make run did not stop on Ctrl-C")
	}
	if strings.Contains(log.String(), "level=ERROR") {
		t.Errorf("ERROR in make run's output:\n%s", log.String())
	}
	if n := strings.Count(log.String(), "device enrolled"); n > 5 {
		t.Errorf("%d enrollment lines: a summary was expected", n)
	}
	fmt.Fprint(os.Stderr)
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = append(lines[:n], "…")
	}
	return strings.Join(lines, "\n")
}
