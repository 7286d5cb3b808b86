package e2e

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/scenario"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// childControlPlane is `hangar serve` as a child process (the simulator's
// own), counting the kills.
type childControlPlane struct {
	*scenario.ControlPlane
	t     *testing.T
	kills int
}

// buildServer builds the hangar binary (cgo: SQLite), with -race when the
// tests run with it.
func buildServer(t *testing.T) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	if p, ok := binCache["hangar"]; ok {
		return p
	}
	if binDir == "" {
		d, err := os.MkdirTemp("", "hangar-e2e-bin-")
		if err != nil {
			t.Fatal(err)
		}
		binDir = d
	}
	out := filepath.Join(binDir, "hangar")
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, "github.com/hangarfleet/hangar/controlplane/cmd/hangar")...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build hangar: %v\n%s", err, b)
	}
	binCache["hangar"] = out
	return out
}

func startChildControlPlane(t *testing.T, args ...string) *childControlPlane {
	cp, err := scenario.NewControlPlane(buildServer(t), t.TempDir(), args...)
	if err != nil {
		t.Fatal(err)
	}
	c := &childControlPlane{ControlPlane: cp, t: t}
	c.start()
	t.Cleanup(func() {
		cp.Stop()
		if t.Failed() {
			t.Logf("last control plane log:\n%s", tail(cp.Log(), 4000))
		}
	})
	return c
}

func (c *childControlPlane) start() {
	c.t.Helper()
	if err := c.Start(context.Background()); err != nil {
		c.t.Fatal(err)
	}
}

// kill sends SIGKILL: no deferred function, no flush, no goodbye.
func (c *childControlPlane) kill() {
	c.Kill()
	c.kills++
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// outcome is what a rollout ended with, as an operator would compare two
// runs.
type outcome struct {
	Status      rollout.Status
	Transitions []string // in order
	Stages      []string // "size:states" per stage
	Versions    map[string]int
	Installs    map[int]int // drones by number of installs of the release
}

func (k *releaseKit) outcome(t *testing.T, cp endpoint, fleet *testFleet, id string, bootsBefore map[string]int) outcome {
	t.Helper()
	var rep rollout.StatusReport
	if err := json.Unmarshal([]byte(k.cli(t, cp.URL(), "rollout", "status", id, "-o", "json", "--token-file", adminTokenFile(cp))), &rep); err != nil {
		t.Fatal(err)
	}
	var evs []store.Audit
	if err := json.Unmarshal([]byte(k.cli(t, cp.URL(), "rollout", "events", id, "-o", "json", "--token-file", adminTokenFile(cp))), &evs); err != nil {
		t.Fatal(err)
	}
	o := outcome{Status: rep.State.Status, Versions: map[string]int{}, Installs: map[int]int{}}
	for i := len(evs) - 1; i >= 0; i-- {
		if evs[i].Action == "rollout.transition" {
			o.Transitions = append(o.Transitions, evs[i].Attrs["to"])
		}
	}
	for _, s := range rep.Stages {
		o.Stages = append(o.Stages, fmt.Sprintf("%s:%d:%v", s.Stage, s.Devices, s.States))
	}
	for _, d := range fleet.Drones() {
		o.Versions[d.Firmware().Version]++
		// A good build restarts the agent once: when it installs.
		o.Installs[d.Boots()-bootsBefore[d.ID]]++
	}
	return o
}

func boots(f *testFleet) map[string]int {
	out := map[string]int{}
	for _, d := range f.Drones() {
		out[d.ID] = d.Boots()
	}
	return out
}

// TestRolloutSurvivesKill9: a three-stage rollout over a simulated fleet,
// with the control plane (a child process) killed with SIGKILL at random
// moments at least 20 times, ends exactly as the same rollout run without
// interruption: same status, each transition once, the same stages, every
// drone on the release and each drone installed it once.
func TestRolloutSurvivesKill9(t *testing.T) {
	n, kills := 120, 20
	if v := os.Getenv("HANGAR_TEST_KILLS"); v != "" {
		kills, _ = strconv.Atoi(v)
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("HANGAR_TEST_SEED"); v != "" {
		seed, _ = strconv.ParseUint(v, 10, 64)
	}
	t.Logf("seed %d (HANGAR_TEST_SEED to replay)", seed)
	rng := rand.New(rand.NewPCG(seed, 1))

	kit := newReleaseKit(t)
	cp := startChildControlPlane(t, "--root-key", kit.rootPub, "--rollout-interval", "250ms")
	fleet := newTestFleet(t, cp, n, func(o *sim.FleetOptions) {
		o.Roots = []ed25519.PublicKey{kit.rootKey(t)}
		o.Grounded = true
		o.TrialSoak = 300 * time.Millisecond
		o.TrialDeadline = time.Minute // the control plane may be down during a trial
		o.SampleInterval, o.BatchSize = 200*time.Millisecond, 5
		o.BackoffMax = 500 * time.Millisecond
		o.StartRate = 500
	})
	online := func() {
		waitFor(t, time.Minute, "fleet online", func() (bool, string) {
			out := k(t, kit, cp, "device", "ls", "--online", "true", "-o", "json")
			var ds []store.Device
			json.Unmarshal([]byte(out), &ds)
			return len(ds) == n, fmt.Sprintf("%d online", len(ds))
		})
	}
	online()
	// How long a kill and restart take here, with the fleet streaming
	// (not counted as the rollout's kills).
	var restart time.Duration
	for range 2 {
		t0 := time.Now()
		cp.Kill()
		cp.start()
		restart = max(restart, time.Since(t0))
		online()
	}
	kit.simRelease(t, cp, sim.Firmware{Version: "1.1.0", Behaviour: sim.Good}, 110)
	kit.simRelease(t, cp, sim.Firmware{Version: "1.2.0", Behaviour: sim.Good}, 120)
	// A kill cycle is the pauses around the kill (850 ms on average) and
	// the restart, counted twice for a machine also busy with the
	// rollout: the three stages' soaks together last at least one and a
	// half times the cycles of the kills wanted (and 1.8 s a kill), so
	// that the kills fall across all three stages however slowly the
	// machine restarts a control plane.
	cycle := 850*time.Millisecond + 2*restart
	soak := max(6*time.Second, time.Duration(kills)*600*time.Millisecond, time.Duration(kills)*cycle/2).Round(time.Second)
	t.Logf("a restart takes %v: soak %v per stage", restart.Round(time.Millisecond), soak)
	gates := []string{"--stages", "5%,30%,100%", "--min-canary", "4", "--soak", soak.String(), "--max-in-flight", "60",
		"--device-timeout", "5m", "--health-margin", "1", "--start", "-o", "json"}
	create := func(version string) string {
		var r rollout.Rollout
		out := k(t, kit, cp, append([]string{"rollout", "create", "--release", version}, gates...)...)
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		return r.Spec.ID
	}
	status := func(id string) rollout.StatusReport {
		var rep rollout.StatusReport
		json.Unmarshal([]byte(k(t, kit, cp, "rollout", "status", id, "-o", "json")), &rep)
		return rep
	}
	// over: a good release completes; paused or aborted, it went wrong.
	over := func(rep rollout.StatusReport) bool {
		return rep.State.Status.Final() || rep.State.Status == rollout.StatusPaused
	}
	finished := func(id string) func() (bool, string) {
		return func() (bool, string) {
			rep := status(id)
			if rep.State.Status == rollout.StatusPaused || rep.State.Status == rollout.StatusAborted {
				t.Fatalf("rollout %s: %s\nfailed devices:\n%s\ntimed out:\n%s", rep.State.Status, rep.State.Reason,
					k(t, kit, cp, "rollout", "devices", id, "--state", string(rollout.MFailed)),
					k(t, kit, cp, "rollout", "devices", id, "--state", string(rollout.MTimedOut)))
			}
			return over(rep), fmt.Sprintf("%s stage %d %v %s", rep.State.Status, rep.State.Stage+1, rep.Counts, rep.State.Reason)
		}
	}

	// A rollout completes once 90% of its devices committed; the last
	// reports may come later (more so after a kill). Compare when every
	// device has reported.
	settled := func(id string) {
		waitFor(t, time.Minute, "every device's report in", func() (bool, string) {
			rep := status(id)
			for _, st := range rep.Stages {
				if st.States[rollout.MOffered] > 0 || st.States[rollout.MPending] > 0 {
					return false, fmt.Sprint(rep.Stages)
				}
			}
			return true, ""
		})
	}

	// The uninterrupted run.
	before := boots(fleet)
	id := create("1.1.0")
	waitFor(t, 3*time.Minute, "uninterrupted rollout finished", finished(id))
	settled(id)
	want := kit.outcome(t, cp, fleet, id, before)
	if want.Status != rollout.StatusCompleted || want.Versions["1.1.0"] != n {
		t.Fatalf("uninterrupted run: %+v", want)
	}

	// The same rollout of the next build, killed again and again.
	before = boots(fleet)
	id = create("1.2.0")
	start := time.Now()
	// Kill until the rollout is over, at random moments: while offers
	// are stored and sent, reports ingested, gates judged, stages started.
	for {
		time.Sleep(time.Duration(rng.Int64N(int64(1200*time.Millisecond))) + 100*time.Millisecond)
		cp.kill()
		time.Sleep(time.Duration(rng.Int64N(int64(300 * time.Millisecond))))
		cp.start()
		if rep := status(id); over(rep) {
			if cp.kills < kills && rep.State.Status == rollout.StatusCompleted {
				t.Fatalf("the rollout finished (%s) after %d kills, want %d: soak longer", rep.State.Status, cp.kills, kills)
			}
			break
		}
		if time.Since(start) > 10*time.Minute {
			t.Fatalf("rollout still running after 10 minutes and %d kills", cp.kills)
		}
	}
	online()
	waitFor(t, 3*time.Minute, "rollout finished after the kills", finished(id))
	settled(id)
	got := kit.outcome(t, cp, fleet, id, before)
	t.Logf("%d kills over %v; outcome %+v", cp.kills, time.Since(start).Round(time.Second), got)
	if got.Versions["1.2.0"] != n {
		t.Errorf("versions after the kills: %v", got.Versions)
	}
	got.Versions, want.Versions = nil, nil
	if g, w := fmt.Sprintf("%+v", got), fmt.Sprintf("%+v", want); g != w {
		t.Errorf("outcome after %d kills differs from the uninterrupted run:\n got  %s\n want %s", cp.kills, g, w)
	}
	if !slices.Equal(got.Transitions, []string{"stage 2", "stage 3", "completed"}) {
		t.Errorf("transitions %v", got.Transitions)
	}
	if strings.Contains(cp.Log(), "panic") {
		t.Errorf("control plane panicked:\n%s", tail(cp.Log(), 4000))
	}
}

// k runs the operator CLI against cp with the admin token.
func k(t *testing.T, kit *releaseKit, cp endpoint, args ...string) string {
	t.Helper()
	return kit.cli(t, cp.URL(), append(args, "--token-file", adminTokenFile(cp))...)
}
