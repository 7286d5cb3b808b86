package e2e

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// releaseKit holds offline keys and signs releases as a release engineer
// would, with the real CLI.
type releaseKit struct {
	dir      string
	rootPub  string // PEM file
	keysFile string
	relKey   string
}

func newReleaseKit(t testing.TB) *releaseKit {
	t.Helper()
	k := &releaseKit{dir: t.TempDir()}
	for _, name := range []string{"root", "release"} {
		pub, priv, _ := ed25519.GenerateKey(rand.Reader)
		privPEM, _ := proto.EncodePrivateKey(priv)
		pubPEM, _ := proto.EncodePublicKey(pub)
		os.WriteFile(filepath.Join(k.dir, name+".key"), privPEM, 0o600)
		os.WriteFile(filepath.Join(k.dir, name+".pub"), pubPEM, 0o644)
	}
	k.rootPub, k.relKey = filepath.Join(k.dir, "root.pub"), filepath.Join(k.dir, "release.key")
	k.keysFile = filepath.Join(k.dir, "keys.cose")
	k.cli(t, "", "release", "keys", "--root-key", filepath.Join(k.dir, "root.key"), "--add", filepath.Join(k.dir, "release.pub"), "--out", k.keysFile)
	return k
}

func (k *releaseKit) cli(t testing.TB, server string, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	env := map[string]string{}
	if server != "" {
		env["HANGAR_SERVER"] = server
	}
	if err := cli.Run(context.Background(), args, cli.Env{Stdout: &out, Stderr: &errb, Getenv: func(s string) string { return env[s] }}); err != nil {
		t.Fatalf("hangar %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

func (k *releaseKit) rootKey(t testing.TB) ed25519.PublicKey {
	b, _ := os.ReadFile(k.rootPub)
	pub, err := proto.ParsePublicKey(b)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

// release signs and pushes an artifact, as the release engineer and the
// operator would.
func (k *releaseKit) release(t testing.TB, cp endpoint, artifact, version string, counter uint64) {
	k.releaseFor(t, cp, artifact, version, counter, "rev-b")
}

func (k *releaseKit) releaseFor(t testing.TB, cp endpoint, artifact, version string, counter uint64, hardware string) {
	t.Helper()
	manifest := artifact + ".manifest"
	k.cli(t, "", "release", "sign", "--key", k.relKey, "--artifact", artifact, "--version", version, "--hardware", hardware,
		"--arch", "amd64,arm64,arm", "--counter", fmt.Sprint(counter), "--out", manifest)
	k.cli(t, cp.URL(), "release", "push", "--manifest", manifest, "--keys", k.keysFile, "--artifact", artifact,
		"--token-file", adminTokenFile(cp))
}

// supervisor runs a binary and starts it again whenever it exits, as
// systemd's Restart=always does.
type supervisor struct {
	path   string
	args   []string
	env    []string
	mu     sync.Mutex
	cmd    *exec.Cmd
	log    bytes.Buffer
	stop   chan struct{}
	done   chan struct{}
	starts int
}

func supervise(t *testing.T, path string, args, env []string) *supervisor {
	s := &supervisor{path: path, args: args, env: env, stop: make(chan struct{}), done: make(chan struct{})}
	go s.loop()
	t.Cleanup(func() {
		close(s.stop)
		s.signal(syscall.SIGKILL)
		<-s.done
		if t.Failed() {
			s.mu.Lock()
			t.Logf("agent log:\n%s", s.log.String())
			s.mu.Unlock()
		}
	})
	return s
}

type lockedWriter struct{ s *supervisor }

func (w lockedWriter) Write(p []byte) (int, error) {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	return w.s.log.Write(p)
}

func (s *supervisor) loop() {
	defer close(s.done)
	for {
		cmd := exec.Command(s.path, s.args...)
		cmd.Env = append(os.Environ(), s.env...)
		cmd.Stdout, cmd.Stderr = lockedWriter{s}, lockedWriter{s}
		s.mu.Lock()
		err := cmd.Start()
		if err == nil {
			s.cmd = cmd
			s.starts++
		}
		s.mu.Unlock()
		if err == nil {
			cmd.Wait()
		}
		select {
		case <-s.stop:
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (s *supervisor) signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Signal(sig)
	}
}

func (s *supervisor) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

func copyExe(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Dir(dst), 0o755)
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}

func updateState(cp *controlPlane, device string, counter uint64) (store.DeviceUpdate, bool) {
	us, _ := cp.Store().DeviceUpdates(context.Background(), device, "", counter)
	if len(us) == 0 {
		return store.DeviceUpdate{}, false
	}
	return us[0], true
}

func vmKB(pid int, field string) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			var kb int
			fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(v), " kB"), &kb)
			return kb
		}
	}
	return 0
}

// TestRealAgentUpdate: the real agent binary, run under a supervisor,
// takes a signed update of itself (swap, trial, commit), then refuses to
// keep a build that fails its health check and one that crash-loops: each
// rolls back by itself and says why.
func TestRealAgentUpdate(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	v1 := buildAgent(t, "1.0.0")
	v2 := buildAgent(t, "1.1.0")
	bad := buildProgram(t, "github.com/hangarfleet/hangar/firmware-sim/e2e/testdata/badagent", "1.2.0", "-X main.mode=nolink")
	crash := buildProgram(t, "github.com/hangarfleet/hangar/firmware-sim/e2e/testdata/badagent", "1.3.0", "-X main.mode=crash")
	installed := filepath.Join(t.TempDir(), "opt", "hangar-agent")
	copyExe(t, v1, installed)
	state := t.TempDir()
	sup := supervise(t, installed, []string{"--server", cp.URL(), "--enroll-token", cp.enrollToken(t), "--device-id", "drone-1",
		"--hardware", "rev-b", "--state-dir", state, "--flight-input", "", "--root-key", kit.rootPub,
		"--install-when-flight-unknown", "--trial-deadline", "8s", "--trial-soak", "3s", "--sample-interval", "200ms", "--heartbeat", "2s", "--log-level", "info"},
		nil)
	ctx := context.Background()
	version := func() string {
		d, _ := cp.Store().Device(ctx, "drone-1")
		if !d.Online {
			return "offline"
		}
		return d.Version
	}
	waitFor(t, 30*time.Second, "agent 1.0.0 online", func() (bool, string) { return version() == "1.0.0", version() })

	// A good release: swapped in, trial-booted, committed.
	kit.release(t, cp, v2, "1.1.0", 110)
	size := fileSize(t, v2)
	start := time.Now()
	var peakKB int
	stopSampling := sampleRSS(sup, &peakKB)
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.1.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	waitFor(t, 60*time.Second, "1.1.0 committed", func() (bool, string) {
		u, _ := updateState(cp, "drone-1", 110)
		return u.State == "committed" && version() == "1.1.0", u.State + " " + version()
	})
	stopSampling()
	t.Logf("offer to committed for a %.1f MB artifact on loopback: %v; agent peak RSS during the update: %.1f MB",
		float64(size)/1e6, time.Since(start).Round(time.Millisecond), float64(peakKB)/1024)
	if !sameFile(t, installed, v2) {
		t.Fatal("the installed binary is not 1.1.0")
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(installed), ".hangar-agent.prev")); !os.IsNotExist(err) {
		t.Fatalf("previous binary kept after commit: %v", err)
	}
	// The same release offered again is acknowledged without reinstalling.
	sup.mu.Lock()
	starts := sup.starts
	sup.mu.Unlock()
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.1.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	waitFor(t, 30*time.Second, "re-offer of 1.1.0 acknowledged as already installed", func() (bool, string) {
		u, _ := updateState(cp, "drone-1", 110)
		return u.State == "committed" && u.Reason == "already installed", u.State + " " + u.Reason
	})
	sup.mu.Lock()
	restarted := sup.starts != starts
	sup.mu.Unlock()
	if restarted || version() != "1.1.0" || !sameFile(t, installed, v2) {
		t.Fatalf("the re-offer of 1.1.0 reinstalled it (agent restarted: %v, version %s)", restarted, version())
	}

	// A build that cannot reach the broker fails its trial and rolls back.
	kit.release(t, cp, bad, "1.2.0", 120)
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.2.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	var u store.DeviceUpdate
	waitFor(t, 90*time.Second, "1.2.0 rolled back", func() (bool, string) {
		u, _ = updateState(cp, "drone-1", 120)
		return u.State == "rolled_back" && version() == "1.1.0", u.State + " " + version()
	})
	if !strings.Contains(u.Reason, "health check not passed") {
		t.Errorf("rollback reason %q", u.Reason)
	}
	if !sameFile(t, installed, v2) {
		t.Fatal("after the rollback the installed binary is not 1.1.0")
	}

	// A build that crashes after starting: a crash loop, rolled back after
	// a few starts.
	kit.release(t, cp, crash, "1.3.0", 130)
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.3.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	waitFor(t, 90*time.Second, "1.3.0 rolled back", func() (bool, string) {
		u, _ = updateState(cp, "drone-1", 130)
		return u.State == "rolled_back" && version() == "1.1.0", u.State + " " + version()
	})
	if !strings.Contains(u.Reason, "crash loop") {
		t.Errorf("rollback reason %q", u.Reason)
	}
	if !sameFile(t, installed, v2) {
		t.Fatal("after the crash loop the installed binary is not 1.1.0")
	}
	// A rolled-back release is not installed again.
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.2.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	waitFor(t, 30*time.Second, "re-offer of 1.2.0 refused", func() (bool, string) {
		evs, _ := cp.Store().Events(ctx, "drone-1", 0, 10000)
		for _, e := range evs {
			if e.Update != nil && e.Update.Counter == 120 && e.Update.State == proto.UpdateRejected && e.Update.Check == string(proto.CheckCounter) {
				return true, ""
			}
		}
		return false, "no rejection"
	})
}

func fileSize(t *testing.T, p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// sampleRSS records the agent's highest RSS until the returned func is
// called.
func sampleRSS(s *supervisor, peakKB *int) func() {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if kb := vmKB(s.pid(), "VmRSS"); kb > *peakKB {
				*peakKB = kb
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return func() { close(stop); <-done }
}

var _ = io.EOF

// TestAgentKilledAtEachUpdateState: the real agent is killed with SIGKILL
// while downloading, while its install is deferred, and while its new build
// is in trial; each time it starts again from its state directory and the
// update completes, with the download resumed rather than restarted.
func TestAgentKilledAtEachUpdateState(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	up, _ := url.Parse(cp.URL())
	proxy := &cuttingProxy{upstream: up, rp: httputil.NewSingleHostReverseProxy(up), rate: 2 << 20}
	ps := httptest.NewServer(proxy)
	t.Cleanup(ps.Close)
	v1 := buildAgent(t, "1.0.0")
	v2 := buildAgent(t, "1.1.0")
	installed := filepath.Join(t.TempDir(), "opt", "hangar-agent")
	copyExe(t, v1, installed)
	lock := filepath.Join(t.TempDir(), "maintenance.lock")
	os.WriteFile(lock, nil, 0o644)
	sup := supervise(t, installed, []string{"--server", ps.URL, "--enroll-token", cp.enrollToken(t), "--device-id", "drone-k",
		"--hardware", "rev-b", "--state-dir", t.TempDir(), "--flight-input", "", "--root-key", kit.rootPub,
		"--install-when-flight-unknown", "--maintenance-lock", lock, "--trial-deadline", "30s", "--trial-soak", "4s",
		"--sample-interval", "200ms", "--heartbeat", "2s"}, nil)
	ctx := context.Background()
	waitFor(t, 30*time.Second, "agent online", func() (bool, string) {
		d, _ := cp.Store().Device(ctx, "drone-k")
		return d.Online && d.Version == "1.0.0", d.Version
	})
	kit.release(t, cp, v2, "1.1.0", 110)
	kit.cli(t, cp.URL(), "device", "update", "drone-k", "--release", "1.1.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	kill := func(state string) {
		t.Helper()
		before := sup.pid()
		sup.signal(syscall.SIGKILL)
		waitFor(t, 10*time.Second, "agent restarted after SIGKILL in "+state, func() (bool, string) {
			return sup.pid() != before && sup.pid() != 0, "not restarted"
		})
	}
	size := fileSize(t, v2)
	waitFor(t, 30*time.Second, "download under way", func() (bool, string) {
		n := proxy.served.Load()
		return n > size/4 && n < size*3/4, fmt.Sprint(n)
	})
	kill("downloading")
	var u store.DeviceUpdate
	waitFor(t, 60*time.Second, "install deferred by the maintenance lock", func() (bool, string) {
		u, _ = updateState(cp, "drone-k", 110)
		return u.State == "deferred", u.State
	})
	if !strings.Contains(u.Reason, "maintenance lock") {
		t.Errorf("deferred because %q", u.Reason)
	}
	d, _ := cp.Store().Device(ctx, "drone-k")
	kill("deferred")
	// The lock goes only once the new process runs (it is online with a
	// new boot epoch): it must resume the deferred install, not have it
	// done before it started.
	waitFor(t, 30*time.Second, "agent back online after the kill while deferred", func() (bool, string) {
		now, _ := cp.Store().Device(ctx, "drone-k")
		return now.Online && now.Boot > d.Boot, fmt.Sprintf("online %v, boot %d (was %d)", now.Online, now.Boot, d.Boot)
	})
	if u, _ := updateState(cp, "drone-k", 110); u.State != "deferred" {
		t.Fatalf("after the restart with the maintenance lock held: %s %q, want still deferred", u.State, u.Reason)
	}
	os.Remove(lock)
	waitFor(t, 60*time.Second, "new build in trial", func() (bool, string) {
		u, _ := updateState(cp, "drone-k", 110)
		return u.State == "trial", u.State
	})
	kill("trial")
	waitFor(t, 60*time.Second, "1.1.0 committed", func() (bool, string) {
		u, _ := updateState(cp, "drone-k", 110)
		d, _ := cp.Store().Device(ctx, "drone-k")
		return u.State == "committed" && d.Version == "1.1.0", u.State + " " + d.Version
	})
	if !sameFile(t, installed, v2) {
		t.Fatal("the installed binary is not 1.1.0")
	}
	proxy.waitIdle(t)
	fetched := proxy.served.Load()
	t.Logf("killed while downloading, deferred and in trial: %d artifact bytes fetched for %d (%.3fx)", fetched, size, float64(fetched)/float64(size))
	if fetched > size+size/10 {
		t.Errorf("fetched %d bytes for a %d byte artifact: the download did not resume", fetched, size)
	}
}
