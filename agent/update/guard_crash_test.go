package update

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/agent/guard"
	"github.com/hangarfleet/hangar/proto"
)

// The trial guard's part of an update, on the same simulated file system
// as the install: it must see every swap (a record is live whenever the
// new build is in place and on trial), and its restore must leave a
// complete binary at every step, in both crash modes, and converge at the
// next start to the previous build, which then reports the guard's verdict.

const crashTrial = crashDir + "/.hangar-agent.trial"

func guardLog(t *testing.T) func(string, ...any) {
	return func(format string, a ...any) { t.Logf("guard: "+format, a...) }
}

// TestCrashInstallThenGuard: an install cut at any step, then the guard's
// decision at the next start. The guard never restores a build that was
// not on trial, and watches every build that was swapped in.
func TestCrashInstallThenGuard(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	staged := crashStagedPath(crashStaging)
	fresh := func(*testing.T) *memFS { return crashFS(crashStaging) }
	install := func(fsys *memFS) error {
		return crashBinary(fsys, crashOldVer, &crashExecs{}).Install(ctx, m, staged)
	}
	n, _ := crashSteps(t, fresh, install)
	for _, mode := range crashModes {
		for k := 0; k <= n; k++ {
			t.Run(crashCase(mode, k), func(t *testing.T) {
				fsys := fresh(t)
				fsys.setCut(k, mode)
				_ = install(fsys)
				label := crashLabel(mode, k, n, fsys, 0)
				after := fsys.reboot()
				running := crashRunning(t, after)
				action, r := guard.Prepare(after, crashTarget, guardLog(t))
				switch {
				case running == crashOldVer && action != guard.Exec:
					t.Errorf("%s: the old build is in place, and the guard would %v", label, action)
				case running == crashNewVer && action != guard.Start:
					t.Errorf("%s: the new build is in place, and the guard would %v it (no live trial record)", label, action)
				case action == guard.Start && (r.Starts != 0 || r.MaxStarts != DefaultMaxTrialBoots || r.Version != crashNewVer):
					t.Errorf("%s: the record of the trial: %+v", label, r)
				}
				if got := crashRunning(t, after); got != running {
					t.Errorf("%s: the guard's decision changed the binary in place from %s to %s", label, running, got)
				}
			})
		}
	}
}

// crashGuardDevice is a device whose new build has failed every start the
// record allows: the next start of the guard restores the previous build.
func crashGuardDevice(t *testing.T) *crashDevice {
	t.Helper()
	d := crashTrialDevice(t)
	r, err := guard.Load(d.fs, crashTarget)
	if err != nil || r == nil {
		t.Fatalf("no trial record after the install: %v", err)
	}
	r.Starts, r.Last = r.MaxStarts, "exited with status 1 after 12ms"
	if err := guard.Save(d.fs, crashTarget, r); err != nil {
		t.Fatal(err)
	}
	// The new build died; the next start finds this on disk.
	return d.restart(t, crashNewVer)
}

func TestCrashGuardRestore(t *testing.T) {
	m := crashManifest()
	prepare := func(t *testing.T, d *crashDevice) error {
		if action, _ := guard.Prepare(d.fs, crashTarget, guardLog(t)); action != guard.Exec {
			t.Errorf("the guard would %v, want exec after its restore", action)
		}
		return d.fs.alive()
	}
	crashCut(t, "guard restore", crashGuardDevice, prepare, func(t *testing.T, label string, crashed *crashDevice) {
		// Whatever start comes next runs the guard first.
		d := crashed.restart(t, crashOldVer) // running: fixed below, once the guard is done
		crashCheckBinary(t, d.fs, label, true)
		if action, _ := guard.Prepare(d.fs, crashTarget, guardLog(t)); action != guard.Exec {
			t.Errorf("%s: at the next start the guard would %v, want exec", label, action)
		}
		crashCheckDone(t, d.fs, label+", guard run again", crashOld)
		if t.Failed() {
			return
		}
		// A power loss now keeps the restore.
		d = d.powerLossRestart(t)
		crashCheckDone(t, d.fs, label+", then a power loss", crashOld)
		if d.bin.Version != crashOldVer {
			t.Fatalf("%s: %s runs after the restore", label, d.bin.Version)
		}
		if err := d.u.Boot(t.Context()); err != nil {
			t.Fatalf("%s: boot of the previous build: %v", label, err)
		}
		st := d.store.state(t)
		if st.Job != nil || st.Installed[proto.TargetAgent].Version != crashOldVer {
			t.Errorf("%s: after the previous build's boot: job %+v, installed %+v", label, st.Job, st.Installed[proto.TargetAgent])
		}
		if spent := st.target(m.Target).Spent; spent < m.Counter {
			t.Errorf("%s: the release's counter %d is not spent (%d): it would be installed again", label, m.Counter, spent)
		}
		d.mu.Lock()
		reports := append([]proto.UpdateReport(nil), d.reports...)
		d.mu.Unlock()
		if len(reports) != 1 || reports[0].State != proto.UpdateRolledBack ||
			!strings.Contains(reports[0].Reason, "started 3 times") || !strings.Contains(reports[0].Reason, "status 1") {
			t.Errorf("%s: reports %+v, want one rolled_back with the guard's verdict", label, reports)
		}
		if _, ok := d.fs.read(crashTrial); ok {
			t.Errorf("%s: the trial record outlives the reported rollback", label)
		}
	})
}

// TestGuardRestoreRefusesAnotherPrevious: a kept previous build that is
// not the one the record names is not put in place; the guard lets the
// new build run rather than leave a binary nobody verified.
func TestGuardRestoreRefusesAnotherPrevious(t *testing.T) {
	d := crashGuardDevice(t)
	d.fs.put(crashPrev, append(bytes.Clone(crashOld), "tampered"...), 0o755)
	action, _ := guard.Prepare(d.fs, crashTarget, guardLog(t))
	if action != guard.Exec {
		t.Fatalf("the guard would %v", action)
	}
	if got := crashRunning(t, d.fs); got != crashNewVer {
		t.Fatalf("the guard put a previous build it could not verify in place (%s)", got)
	}
	r, _ := guard.Load(d.fs, crashTarget)
	if r == nil || !r.GaveUp || !strings.Contains(r.Verdict, "cannot restore") {
		t.Fatalf("record %+v, want a verdict that says it cannot restore", r)
	}
	// And it does not try again at every start.
	if action, _ := guard.Prepare(d.fs, crashTarget, guardLog(t)); action != guard.Exec {
		t.Fatalf("second start: the guard would %v", action)
	}
}

// TestCrashCommitThenGuard: a commit cut at any step, on the start the
// guard would count last, then the guard's decision at the next start and
// the agent's boot. The guard never restores over a build recorded as
// committed, and whatever runs after agrees with the state.
func TestCrashCommitThenGuard(t *testing.T) {
	ctx := t.Context()
	lastStart := func(t *testing.T) *crashDevice {
		d := crashTrialDevice(t)
		r, err := guard.Load(d.fs, crashTarget)
		if err != nil || r == nil {
			t.Fatalf("no trial record: %v", err)
		}
		r.Starts = r.MaxStarts
		if err := guard.Save(d.fs, crashTarget, r); err != nil {
			t.Fatal(err)
		}
		return d
	}
	crashCut(t, "commit on the last start", lastStart,
		func(t *testing.T, d *crashDevice) error { return d.u.commit(ctx, d.u.job()) },
		func(t *testing.T, label string, crashed *crashDevice) {
			committed := crashed.store.state(t).Job == nil
			d := crashed.restart(t, crashNewVer)
			guard.Prepare(d.fs, crashTarget, guardLog(t))
			running := crashRunning(t, d.fs)
			if committed && running != crashNewVer {
				t.Fatalf("%s: the commit was recorded, and the guard restored the previous build over it", label)
			}
			// The start runs what the guard left in place.
			d = newCrashDevice(t, d.fs, d.store, d.staging, d.clk, running)
			if err := d.u.Boot(ctx); err != nil {
				t.Fatalf("%s: Boot: %v", label, err)
			}
			st := d.store.state(t)
			switch {
			case st.Job == nil && st.Installed[proto.TargetAgent].Version != crashRunning(t, d.fs):
				t.Errorf("%s: no job, %s recorded as installed, %s in place", label, st.Installed[proto.TargetAgent].Version, crashRunning(t, d.fs))
			case st.Job != nil && (st.Job.Phase != phaseTrial || crashRunning(t, d.fs) != crashNewVer):
				t.Errorf("%s: job in phase %s with %s in place", label, st.Job.Phase, crashRunning(t, d.fs))
			}
		}, 3)
}
