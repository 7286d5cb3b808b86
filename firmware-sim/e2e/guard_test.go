package e2e

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/guard"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/proto"
)

// TestTrialGuard: real agent binaries started through the real trial guard
// under a supervisor that restarts on exit (systemd's Restart=always), in
// both restart modes, take bad releases that die before their own trial
// code runs (or, once, in it). Each time the previous build is restored
// and running, the device reports rolled_back with how the new build died,
// the release is never installed again, and a good release still goes in
// through the guard afterwards.
func TestTrialGuard(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	v1 := buildAgent(t, "1.0.0")
	good := buildAgent(t, "1.1.0")
	guardBin := buildProgram(t, "github.com/hangarfleet/hangar/agent/cmd/hangar-guard", "guard")
	kit.release(t, cp, good, "1.1.0", 200) // above every bad release

	cases := []struct {
		mode    string // badagent's
		state   proto.UpdateState
		reasons []string
	}{
		// (a) exits 1 at start, before any agent code runs.
		{"exit1", proto.UpdateRolledBack, []string{"trial guard", "started 3 times", "never reached its trial", "exited with status 1"}},
		// (b) rejects the config file this device has: the smoke test runs
		// it against that file and refuses it before the swap...
		{"strictconfig", proto.UpdateRejected, []string{"refuses this device's configuration", `unknown setting "heartbeat"`}},
		// ... and a build too old to be asked so is rolled back by the guard.
		{"oldconfig", proto.UpdateRolledBack, []string{"trial guard", "never reached its trial", "exited with status 1"}},
		// (c) dies of SIGSEGV at start.
		{"segv", proto.UpdateRolledBack, []string{"trial guard", "never reached its trial", "killed by SIGSEGV"}},
		// (d) hangs before its trial code.
		{"hang", proto.UpdateRolledBack, []string{"trial guard", "did not commit within", "never reached its trial", "hung"}},
		// (e) runs its trial, crashes before committing.
		{"crash", proto.UpdateRolledBack, []string{"trial guard", "started 3 times", "exited with status 2"}},
	}
	bad := map[string]string{}
	for i, c := range cases {
		version := fmt.Sprintf("1.2.%d", i+1)
		bad[c.mode] = version
		build := buildProgram(t, "github.com/hangarfleet/hangar/firmware-sim/e2e/testdata/badagent", version, "-X main.mode="+c.mode)
		kit.release(t, cp, build, version, uint64(120+i+1))
	}
	rel := func(version string) uint64 {
		r, err := cp.Store().Release(context.Background(), proto.TargetAgent, version)
		if err != nil {
			t.Fatal(err)
		}
		return r.Counter
	}
	token := filepath.Join(cp.dataDir, server.AdminTokenFile)
	for _, c := range cases {
		for _, mode := range []string{"exec", "exit"} {
			t.Run(c.mode+"/"+mode, func(t *testing.T) {
				t.Parallel()
				device := "guard-" + c.mode + "-" + mode
				root := t.TempDir()
				installed := filepath.Join(root, "bin", "hangar-agent")
				copyExe(t, v1, installed)
				g := filepath.Join(root, "libexec", "hangar-guard")
				copyExe(t, guardBin, g)
				conf := filepath.Join(root, "agent.conf")
				settings := []string{
					"server = " + cp.URL(), "enroll-token = " + cp.enrollToken(t), "device-id = " + device, "hardware = rev-b",
					"state-dir = " + filepath.Join(root, "state"), "flight-input =", "root-key = " + kit.rootPub,
					"install-when-flight-unknown = true", "trial-deadline = 8s", "trial-soak = 2s", "sample-interval = 200ms",
					"heartbeat = 2s", "restart-mode = " + mode, "log-level = info",
				}
				if err := os.WriteFile(conf, []byte(strings.Join(settings, "\n")+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				// The unit's command line: the guard, then the agent.
				supervise(t, g, []string{installed, "--config", conf}, nil)
				ctx := context.Background()
				version := func() string {
					d, _ := cp.Store().Device(ctx, device)
					if !d.Online {
						return "offline"
					}
					return d.Version
				}
				waitFor(t, 60*time.Second, "agent 1.0.0 online", func() (bool, string) { return version() == "1.0.0", version() })
				// Operators see which devices run under the guard.
				if out := kit.cli(t, cp.URL(), "device", "show", device, "--token-file", token); !strings.Contains(out, agent.PayloadGuard+"="+guard.Version) {
					t.Errorf("device show does not list %s=%s:\n%s", agent.PayloadGuard, guard.Version, out)
				}

				counter := rel(bad[c.mode])
				kit.cli(t, cp.URL(), "device", "update", device, "--release", bad[c.mode], "--token-file", token)
				var reason string
				waitFor(t, 90*time.Second, string(c.state)+" and 1.0.0 back online", func() (bool, string) {
					u, _ := updateState(cp, device, counter)
					reason = u.Reason
					return u.State == string(c.state) && version() == "1.0.0", u.State + " " + version()
				})
				for _, w := range c.reasons {
					if !strings.Contains(reason, w) {
						t.Errorf("%s reason %q does not say %q", c.state, reason, w)
					}
				}
				if c.mode == "crash" && strings.Contains(reason, "never reached") {
					t.Errorf("the build ran its trial; the reason says %q", reason)
				}
				if !sameFile(t, installed, v1) {
					t.Fatal("the installed binary is not the previous build")
				}
				for _, leftover := range []string{guard.PrevPath(installed), guard.NextPath(installed), guard.TrialPath(installed)} {
					if _, err := os.Stat(leftover); !os.IsNotExist(err) {
						t.Errorf("%s left behind: %v", leftover, err)
					}
				}
				t.Logf("%s, restart mode %s: install report to %s report %v; reason: %s",
					c.mode, mode, c.state, reportGap(t, cp, device, counter, proto.UpdateInstalling, c.state), reason)

				// The release is spent: offered again, it is refused.
				kit.cli(t, cp.URL(), "device", "update", device, "--release", bad[c.mode], "--token-file", token)
				waitFor(t, 30*time.Second, "re-offer refused", func() (bool, string) {
					evs, _ := cp.Store().Events(ctx, device, 0, 10000)
					for _, e := range evs {
						if e.Update != nil && e.Update.Counter == counter && e.Update.State == proto.UpdateRejected && e.Update.Check == string(proto.CheckCounter) {
							return true, ""
						}
					}
					return false, "no rejection on the counter"
				})
				if !sameFile(t, installed, v1) {
					t.Fatal("the re-offer replaced the binary")
				}

				// The device still takes updates: a good build goes in
				// through the guard and commits.
				kit.cli(t, cp.URL(), "device", "update", device, "--release", "1.1.0", "--token-file", token)
				waitFor(t, 90*time.Second, "1.1.0 committed", func() (bool, string) {
					u, _ := updateState(cp, device, 200)
					return u.State == "committed" && version() == "1.1.0", u.State + " " + version()
				})
				if !sameFile(t, installed, good) {
					t.Fatal("the installed binary is not 1.1.0")
				}
				if _, err := os.Stat(guard.TrialPath(installed)); !os.IsNotExist(err) {
					t.Errorf("trial record left after the commit: %v", err)
				}
			})
		}
	}
}

// reportGap is the time between two update reports of a release, by the
// device's clock (the same machine's here).
func reportGap(t *testing.T, cp *controlPlane, device string, counter uint64, from, to proto.UpdateState) time.Duration {
	evs, err := cp.Store().Events(context.Background(), device, 0, 10000)
	if err != nil {
		t.Fatal(err)
	}
	var start, end time.Time
	for _, e := range evs {
		if e.Update == nil || e.Update.Counter != counter {
			continue
		}
		switch e.Update.State {
		case from:
			if start.IsZero() {
				start = e.Time
			}
		case to:
			end = e.Time
		}
	}
	if start.IsZero() || end.IsZero() {
		return 0
	}
	return end.Sub(start).Round(time.Millisecond)
}
