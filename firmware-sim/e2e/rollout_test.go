package e2e

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// simRelease builds a simulated firmware artifact, signs and pushes it.
func (k *releaseKit) simRelease(t testing.TB, cp endpoint, fw sim.Firmware, counter uint64) {
	t.Helper()
	k.simReleaseDelta(t, cp, fw, counter)
}

// simReleaseDelta is simRelease with deltas from each base build (its
// artifact bytes), signed and pushed beside it.
func (k *releaseKit) simReleaseDelta(t testing.TB, cp endpoint, fw sim.Firmware, counter uint64, bases ...[]byte) {
	t.Helper()
	if fw.Size == 0 {
		fw.Size = 16 << 10
	}
	p := filepath.Join(k.dir, "fw-"+fw.Version+".bin")
	if err := os.WriteFile(p, fw.Artifact(), 0o644); err != nil {
		t.Fatal(err)
	}
	sign := []string{"release", "sign", "--key", k.relKey, "--artifact", p, "--version", fw.Version, "--hardware", "rev-a,rev-b,rev-c",
		"--arch", "amd64,arm64,arm", "--counter", fmt.Sprint(counter), "--out", p + ".manifest"}
	for i, b := range bases {
		bp := filepath.Join(k.dir, fmt.Sprintf("base-%s-%d.bin", fw.Version, i))
		if err := os.WriteFile(bp, b, 0o644); err != nil {
			t.Fatal(err)
		}
		sign = append(sign, "--delta-from", bp)
	}
	k.cli(t, "", sign...)
	push := []string{"release", "push", "--manifest", p + ".manifest", "--keys", k.keysFile, "--artifact", p, "--token-file", adminTokenFile(cp)}
	patches, _ := filepath.Glob(p + ".from-*.patch")
	if len(patches) != len(bases) {
		t.Fatalf("%d patches for %d bases", len(patches), len(bases))
	}
	for _, pp := range patches {
		push = append(push, "--delta", pp)
	}
	k.cli(t, cp.URL(), push...)
}

func (k *releaseKit) rollout(t *testing.T, cp *controlPlane, args ...string) string {
	t.Helper()
	out := k.cli(t, cp.URL(), append(append([]string{"rollout", "create"}, args...),
		"--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile), "-o", "json")...)
	var res api.CreateResult
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Rollout == nil {
		t.Fatalf("rollout create: %v\n%s", err, out)
	}
	r := res.Rollout
	// One active rollout per device: a subtest that stops early must not
	// hold the fleet for the next one.
	t.Cleanup(func() {
		if rep, err := cp.Rollouts().Status(context.Background(), r.Spec.ID); err == nil && !rep.State.Status.Final() {
			if _, err := cp.Rollouts().Act(context.Background(), r.Spec.ID, rollout.OpAbort, "test", "subtest ended"); err != nil {
				t.Errorf("abort %s: %v", r.Spec.ID, err)
			}
		}
	})
	return r.Spec.ID
}

func (k *releaseKit) act(t *testing.T, cp *controlPlane, op, id string) {
	t.Helper()
	k.cli(t, cp.URL(), "rollout", op, id, "--reason", "test", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
}

func rolloutStatus(t *testing.T, cp *controlPlane, id string) rollout.StatusReport {
	t.Helper()
	rep, err := cp.Rollouts().Status(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// offeredOutsideCanary lists the members of stages after the first that
// were offered the rollout's release.
func offeredOutsideCanary(t *testing.T, cp *controlPlane, id string) []string {
	t.Helper()
	ms, err := cp.Store().Members(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		if m.Stage > 0 && m.Offered > 0 {
			out = append(out, m.Device)
		}
	}
	return out
}

func canaryOf(t *testing.T, cp *controlPlane, id string) []string {
	ms, _ := cp.Store().Members(context.Background(), id)
	var out []string
	for _, m := range ms {
		if m.Stage == 0 {
			out = append(out, m.Device)
		}
	}
	return out
}

// TestRollouts: 500 simulated drones running the real agent code. A good
// release goes from canary to everyone; a release that fails its health
// check on the device rolls back on the canary and the rollout stops
// there; one that installs fine but raises errors is stopped by the
// health gate at the canary; and with automatic revert the canary ends on
// the previous build.
func TestRollouts(t *testing.T) {
	n := 500
	if v := os.Getenv("HANGAR_TEST_ROLLOUT_DRONES"); v != "" {
		fmt.Sscan(v, &n)
	}
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}, RolloutInterval: 500 * time.Millisecond})
	fleet := newTestFleet(t, cp, n, func(o *sim.FleetOptions) {
		o.Roots = []ed25519.PublicKey{kit.rootKey(t)}
		o.Grounded = true
		o.TrialSoak = 500 * time.Millisecond
		o.TrialDeadline = 30 * time.Second // the trial waits for the control plane's confirmation: slow under CI load
		o.SampleInterval, o.BatchSize = 200*time.Millisecond, 5
		o.StartRate = 500
	})
	ctx := context.Background()
	waitFor(t, 60*time.Second, "fleet online", func() (bool, string) {
		on := true
		ds, _ := cp.Store().Devices(ctx, store.DeviceFilter{Online: &on})
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	})
	kit.simRelease(t, cp, sim.Firmware{Version: "1.1.0", Behaviour: sim.Good}, 110)
	kit.simRelease(t, cp, sim.Firmware{Version: "1.2.0", Behaviour: sim.FailHealth}, 120)
	kit.simRelease(t, cp, sim.Firmware{Version: "1.3.0", Behaviour: sim.Errors, ErrorsPerMinute: 600}, 130)
	kit.simRelease(t, cp, sim.Firmware{Version: "1.4.0", Behaviour: sim.Errors, ErrorsPerMinute: 600}, 140)
	kit.simRelease(t, cp, sim.Firmware{Version: "1.1.0+revert.1", Behaviour: sim.Good}, 150)
	versions := func() map[string]int {
		out := map[string]int{}
		for _, d := range fleet.Drones() {
			out[d.Firmware().Version]++
		}
		return out
	}
	gates := []string{"--stages", "2%,10%,50%,100%", "--min-canary", "6", "--soak", "3s", "--max-in-flight", "150",
		"--device-timeout", "2m", "--health-margin", "1"}

	t.Run("good release reaches everyone", func(t *testing.T) {
		start := time.Now()
		id := kit.rollout(t, cp, append([]string{"--release", "1.1.0", "--start"}, gates...)...)
		waitFor(t, 3*time.Minute, "rollout completed", func() (bool, string) {
			rep := rolloutStatus(t, cp, id)
			if rep.State.Status == rollout.StatusPaused || rep.State.Status == rollout.StatusAborted {
				b, _ := json.MarshalIndent(rep, "", " ")
				t.Fatalf("good release stopped: %s", b)
			}
			return rep.State.Status == rollout.StatusCompleted, fmt.Sprintf("%s stage %d %v %s", rep.State.Status, rep.State.Stage+1, rep.Counts, rep.State.Reason)
		})
		waitFor(t, 30*time.Second, "every drone on 1.1.0", func() (bool, string) {
			ds, _ := cp.Store().Devices(ctx, store.DeviceFilter{Version: "1.1.0"})
			if len(ds) == n {
				return true, ""
			}
			// Say which members are not there and what they reported.
			ms, _ := cp.Rollouts().Devices(ctx, id, "")
			var behind []string
			for _, m := range ms {
				if m.State != rollout.MCommitted {
					b, _ := json.Marshal(m)
					behind = append(behind, string(b))
				}
			}
			return false, fmt.Sprintf("%d on 1.1.0, drones: %v; members not committed: %v", len(ds), versions(), behind)
		})
		evs, _ := cp.Store().AuditLog(ctx, id, 100)
		var transitions []string
		for i := len(evs) - 1; i >= 0; i-- {
			if evs[i].Action == "rollout.transition" {
				transitions = append(transitions, evs[i].Attrs["to"])
			}
		}
		if got := strings.Join(transitions, ","); got != "stage 2,stage 3,stage 4,completed" {
			t.Errorf("transitions %s", got)
		}
		// The per-device view: every member committed; a state that does
		// not exist is refused, not answered with an empty list.
		var ms []rollout.MemberReport
		out := kit.cli(t, cp.URL(), "rollout", "devices", id, "--state", "committed", "-o", "json", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
		if err := json.Unmarshal([]byte(out), &ms); err != nil || len(ms) != n {
			t.Errorf("rollout devices --state committed: %d devices (want %d), %v", len(ms), n, err)
		}
		req, _ := http.NewRequest(http.MethodGet, cp.URL()+"/api/v1/rollouts/"+id+"/devices?state=comitted", nil)
		req.Header.Set("Authorization", "Bearer "+cp.adminToken(t))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("devices?state=comitted: %s, want 400", resp.Status)
		}
		t.Logf("%d drones from canary to 100%% in %v", n, time.Since(start).Round(time.Second))
	})

	t.Run("build failing its health check stops at the canary", func(t *testing.T) {
		id := kit.rollout(t, cp, append([]string{"--release", "1.2.0", "--start", "--on-failure", "abort"}, gates...)...)
		waitFor(t, 2*time.Minute, "rollout aborted", func() (bool, string) {
			rep := rolloutStatus(t, cp, id)
			return rep.State.Status == rollout.StatusAborted, fmt.Sprintf("%s %v", rep.State.Status, rep.Counts)
		})
		if out := offeredOutsideCanary(t, cp, id); len(out) > 0 {
			t.Fatalf("%d devices outside the canary offered the bad build: %v%s", len(out), out[:min(len(out), 5)], story(t, cp, id))
		}
		canary := canaryOf(t, cp, id)
		// The version (in the device's hello) and the final report (an
		// event) arrive separately: wait for both. A canary device still
		// downloading when the rollout aborted was cancelled (failed,
		// "cancelled"); every other rolled back.
		final := func(u store.DeviceUpdate) bool {
			return u.State == "rolled_back" || (u.State == "failed" && strings.Contains(u.Reason, "cancelled"))
		}
		waitFor(t, time.Minute, "canary rolled back to 1.1.0 and reported it", func() (bool, string) {
			for _, dev := range canary {
				d, _ := cp.Store().Device(ctx, dev)
				if d.Version != "1.1.0" {
					return false, dev + " on " + d.Version
				}
			}
			us, _ := cp.Store().DeviceUpdates(ctx, "", "agent", 120)
			for _, u := range us {
				if !final(u) {
					return false, u.Device + " reported " + u.State
				}
			}
			return true, ""
		})
		us, _ := cp.Store().DeviceUpdates(ctx, "", "agent", 120)
		rolledBack := 0
		for _, u := range us {
			if !contains(canary, u.Device) {
				t.Errorf("%s, outside the canary, reported on 1.2.0: %s", u.Device, u.State)
			}
			if !final(u) {
				t.Errorf("%s: 1.2.0 %s (%s), want rolled_back", u.Device, u.State, u.Reason)
			}
			if u.State == "rolled_back" {
				rolledBack++
			}
		}
		if rolledBack < 3 {
			t.Errorf("%d canary devices rolled back, want at least --min-finished (3)", rolledBack)
		}
	})

	t.Run("unhealthy build stopped by the health gate", func(t *testing.T) {
		id := kit.rollout(t, cp, append([]string{"--release", "1.3.0", "--start"}, gates...)...)
		waitFor(t, 2*time.Minute, "rollout paused by the health gate", func() (bool, string) {
			rep := rolloutStatus(t, cp, id)
			return rep.State.Status == rollout.StatusPaused, fmt.Sprintf("%s %v %s", rep.State.Status, rep.Counts, rep.State.Reason)
		})
		rep := rolloutStatus(t, cp, id)
		if !strings.Contains(rep.State.Reason, "health:errors") {
			t.Errorf("paused for %q, want the errors health gate", rep.State.Reason)
		}
		if out := offeredOutsideCanary(t, cp, id); len(out) > 0 {
			t.Fatalf("%d devices outside the canary offered the unhealthy build: %v%s", len(out), out[:min(len(out), 5)], story(t, cp, id))
		}
		kit.act(t, cp, "abort", id)
	})

	t.Run("automatic revert puts the canary back on the previous build", func(t *testing.T) {
		id := kit.rollout(t, cp, append([]string{"--release", "1.4.0", "--revert-release", "1.1.0+revert.1", "--auto-revert", "--start"}, gates...)...)
		waitFor(t, 2*time.Minute, "rollout paused and reverting", func() (bool, string) {
			rep := rolloutStatus(t, cp, id)
			return rep.State.Status == rollout.StatusPaused && rep.State.Reverting, fmt.Sprintf("%s %v", rep.State.Status, rep.Counts)
		})
		canary := canaryOf(t, cp, id)
		waitFor(t, time.Minute, "canary on the previous build", func() (bool, string) {
			for _, d := range fleet.Drones() {
				if contains(canary, d.ID) && d.Firmware().Behaviour != sim.Good {
					return false, d.ID + " runs " + d.Firmware().Version
				}
			}
			return true, ""
		})
		if out := offeredOutsideCanary(t, cp, id); len(out) > 0 {
			t.Fatalf("%d devices outside the canary offered 1.4.0: %v%s", len(out), out[:min(len(out), 5)], story(t, cp, id))
		}
		// Every canary device that committed 1.4.0 was offered the revert
		// and now runs it.
		took, _ := cp.Store().DeviceUpdates(ctx, "", "agent", 140)
		ms, _ := cp.Store().Members(ctx, id)
		reverted := map[string]bool{}
		for _, m := range ms {
			if m.Reverted > 0 {
				reverted[m.Device] = true
			}
		}
		n := 0
		for _, u := range took {
			if u.State != "committed" {
				continue
			}
			n++
			if !reverted[u.Device] {
				t.Errorf("%s committed 1.4.0 but was not offered the revert", u.Device)
			}
		}
		if n == 0 {
			t.Fatal("no device committed 1.4.0: the revert was not exercised")
		}
		waitFor(t, time.Minute, "reverted devices on 1.1.0+revert.1", func() (bool, string) {
			for dev := range reverted {
				if d, _ := cp.Store().Device(ctx, dev); d.Version != "1.1.0+revert.1" {
					return false, dev + " on " + d.Version
				}
			}
			return true, ""
		})
		t.Logf("%d canary devices committed 1.4.0 and were reverted", n)
	})
}

// story is the rollout's audit log, oldest first, for failure messages.
func story(t *testing.T, cp *controlPlane, id string) string {
	evs, _ := cp.Store().AuditLog(context.Background(), id, 200)
	var b strings.Builder
	for i := len(evs) - 1; i >= 0; i-- {
		e := evs[i]
		fmt.Fprintf(&b, "\n  %s %s %s %v %s", e.Time.Format("15:04:05.000"), e.Actor, e.Action, e.Attrs, e.Reason)
	}
	return b.String()
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}
