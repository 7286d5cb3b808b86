package update

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// The crash tests cut the agent's self-install (and its rollback and
// commit) at every step, in both crash modes of memFS, and check that the
// executable is always a complete old or new binary and that the next
// start finishes the job.

const (
	crashDir     = "/opt/hangar"
	crashTarget  = "/opt/hangar/hangar-agent"
	crashNext    = "/opt/hangar/.hangar-agent.new"
	crashPrev    = "/opt/hangar/.hangar-agent.prev"
	crashStaging = "/var/lib/hangar/staging"
	crashOldVer  = "1.4.0"
	crashNewVer  = "1.5.0" // prototest.Manifest's
)

// crashOld and crashNew share a long prefix, so that a partly written or
// mixed file is caught only byte for byte. crashNew is written in four
// chunks of memFS's reads.
var (
	crashOld = crashBinaryBytes("old "+crashOldVer, 2600)
	crashNew = crashBinaryBytes("new "+crashNewVer, 3300)
)

func crashBinaryBytes(tail string, n int) []byte {
	b := bytes.Repeat([]byte("\x7fELF hangar-agent common text "), n/30+1)[:n-len(tail)]
	return append(b, tail...)
}

var crashModes = []crashMode{crashProcess, crashPower}

func crashManifest() proto.Manifest { return prototest.Manifest(crashNew) }

// crashExecs records the exec calls that would replace the process.
type crashExecs struct {
	mu    sync.Mutex
	paths []string
}

func (e *crashExecs) exec(argv0 string, argv, env []string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.paths = append(e.paths, argv0)
	return nil
}

func (e *crashExecs) calls() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.paths...)
}

// crashFS is the device before the install: the old binary in place and
// the verified artifact staged, both durable.
func crashFS(staging string) *memFS {
	m := newMemFS()
	m.mkdir(crashDir)
	m.mkdir(staging)
	m.put(crashTarget, crashOld, 0o755)
	m.put(crashStagedPath(staging), crashNew, 0o600)
	return m
}

func crashStagedPath(staging string) string {
	return filepath.Join(staging, fmt.Sprintf("%x.bin", crashManifest().SHA256))
}

// crashBinary is the installer of a process running version, on fsys. Its
// smoke test runs nothing: it checks that the file it would run is the
// whole new build.
func crashBinary(fsys *memFS, version string, execs *crashExecs) *Binary {
	return &Binary{
		Path: crashTarget, Version: version, Mode: RestartExec, FS: fsys,
		Args: []string{crashTarget}, Env: []string{},
		Smoke: func(ctx context.Context, path, v string) error {
			if got, _ := fsys.read(path); !bytes.Equal(got, crashNew) || v != crashNewVer {
				return fmt.Errorf("smoke test of %s (%d bytes, version %s): not the whole new build", path, len(got), v)
			}
			return nil
		},
		exec: execs.exec,
	}
}

// crashRunning is the version a start after the crash runs: the
// supervisor starts whatever the executable's path holds.
func crashRunning(t *testing.T, m *memFS) string {
	t.Helper()
	got, _ := m.read(crashTarget)
	switch {
	case bytes.Equal(got, crashOld):
		return crashOldVer
	case bytes.Equal(got, crashNew):
		return crashNewVer
	}
	t.Fatalf("%s holds %d bytes, neither the old nor the new binary", crashTarget, len(got))
	return ""
}

// crashCheckBinary checks the invariant after a crash: the executable is
// exactly the old or the new binary, and executable; a .prev that exists
// is exactly the old one; the new binary is never in place without the
// old one kept beside it (as long as keepPrev: Commit drops it).
func crashCheckBinary(t *testing.T, m *memFS, label string, keepPrev bool) {
	t.Helper()
	got, ok := m.read(crashTarget)
	isOld, isNew := bytes.Equal(got, crashOld), bytes.Equal(got, crashNew)
	switch {
	case !ok:
		t.Errorf("%s: %s is missing (entries: %v)", label, crashTarget, m.names(crashDir))
	case !isOld && !isNew:
		t.Errorf("%s: %s holds %d bytes, neither the old (%d) nor the new (%d) binary", label, crashTarget, len(got), len(crashOld), len(crashNew))
	}
	if ok && m.perm(crashTarget)&0o111 == 0 {
		t.Errorf("%s: %s is not executable (mode %v)", label, crashTarget, m.perm(crashTarget))
	}
	prev, hasPrev := m.read(crashPrev)
	if hasPrev && !bytes.Equal(prev, crashOld) {
		t.Errorf("%s: %s holds %d bytes, not the old binary", label, crashPrev, len(prev))
	}
	if isNew && keepPrev && !hasPrev {
		t.Errorf("%s: the new binary is in place but %s is missing: no rollback possible", label, crashPrev)
	}
}

// crashCheckDone checks a completed install (want crashNew: .prev is the
// old binary) or rollback (want crashOld: no .prev), with no .new left.
func crashCheckDone(t *testing.T, m *memFS, label string, want []byte) {
	t.Helper()
	if got, _ := m.read(crashTarget); !bytes.Equal(got, want) {
		t.Errorf("%s: %s holds %d bytes, want the %s binary", label, crashTarget, len(got), map[bool]string{true: "new", false: "old"}[bytes.Equal(want, crashNew)])
	}
	prev, hasPrev := m.read(crashPrev)
	switch {
	case bytes.Equal(want, crashNew) && !bytes.Equal(prev, crashOld):
		t.Errorf("%s: %s is not the old binary (present: %v, %d bytes)", label, crashPrev, hasPrev, len(prev))
	case bytes.Equal(want, crashOld) && hasPrev:
		t.Errorf("%s: %s is still there", label, crashPrev)
	}
	if _, ok := m.read(crashNext); ok {
		t.Errorf("%s: %s left behind", label, crashNext)
	}
}

// crashInstalled is a device on which Install completed (and was made
// durable), rebooted into a working file system.
func crashInstalled(t *testing.T) *memFS {
	t.Helper()
	m := crashFS(crashStaging)
	if err := crashBinary(m, crashOldVer, &crashExecs{}).Install(t.Context(), crashManifest(), crashStagedPath(crashStaging)); err != nil {
		t.Fatalf("install: %v", err)
	}
	m.setCut(m.stepCount(), crashPower)
	r := m.reboot()
	if got, _ := r.read(crashTarget); !bytes.Equal(got, crashNew) {
		t.Fatal("a completed install did not survive a power loss")
	}
	return r
}

// crashSteps counts the steps of an uncut run of do on a fresh file system.
func crashSteps(t *testing.T, fresh func(*testing.T) *memFS, do func(*memFS) error) (int, string) {
	t.Helper()
	m := fresh(t)
	if err := do(m); err != nil {
		t.Fatalf("uncut run: %v", err)
	}
	return m.stepCount(), m.trace()
}

// crashCase names the subtest of a cut at step k.
func crashCase(mode crashMode, k int) string {
	return fmt.Sprintf("%s/step_%02d", strings.ReplaceAll(mode.String(), " ", "_"), k)
}

// crashLabel names a cut at step k of n (counted from base, the steps of
// the setup).
func crashLabel(mode crashMode, k, n int, m *memFS, base int) string {
	if k >= n {
		return fmt.Sprintf("%v after the last of %d steps", mode, n)
	}
	return fmt.Sprintf("%v at step %d of %d (%s)", mode, k, n, m.stepName(base+k))
}

func TestCrashBinaryInstall(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	staged := crashStagedPath(crashStaging)
	fresh := func(*testing.T) *memFS { return crashFS(crashStaging) }
	install := func(fsys *memFS) error {
		return crashBinary(fsys, crashOldVer, &crashExecs{}).Install(ctx, m, staged)
	}
	n, trace := crashSteps(t, fresh, install)
	t.Logf("Install: %d steps:%s", n, trace)
	for _, mode := range crashModes {
		for k := 0; k <= n; k++ {
			t.Run(crashCase(mode, k), func(t *testing.T) {
				fsys := fresh(t)
				fsys.setCut(k, mode)
				err := install(fsys)
				label := crashLabel(mode, k, n, fsys, 0)
				if k < n && err == nil {
					t.Errorf("%s: Install succeeded through a cut", label)
				}
				if k == n && err != nil {
					t.Fatalf("%s: %v", label, err)
				}
				after := fsys.reboot()
				crashCheckBinary(t, after, label, true)
				if k == n {
					// Install returned: it must be durable.
					crashCheckDone(t, after, label, crashNew)
				}
				if t.Failed() {
					return
				}

				// The next start redoes the install unless the new binary is
				// already in place (Boot checks Installed first).
				execs := &crashExecs{}
				b := crashBinary(after, crashRunning(t, after), execs)
				if !b.Installed(m) {
					if err := b.Install(ctx, m, staged); err != nil {
						t.Errorf("%s: install again after reboot: %v", label, err)
						return
					}
				}
				crashCheckDone(t, after, label+", install redone", crashNew)
				// A power loss now still leaves a complete binary.
				crashCheckBinary(t, after.powerLoss(), label+", install redone, then a power loss", true)
				// And a rollback from there restores the old binary exactly,
				// and starts it.
				if err := crashBinary(after, crashNewVer, execs).Rollback(ctx, m); err != nil {
					t.Errorf("%s: rollback after the redone install: %v", label, err)
					return
				}
				if got, _ := after.read(crashTarget); !bytes.Equal(got, crashOld) {
					t.Errorf("%s: rollback did not restore the old binary", label)
				}
				if got := execs.calls(); len(got) != 1 || got[0] != crashTarget {
					t.Errorf("%s: rollback exec calls %v, want [%s]", label, got, crashTarget)
				}
			})
		}
	}
}

func TestCrashBinaryRollback(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	fresh := func(t *testing.T) *memFS { return crashInstalled(t) }
	rollback := func(fsys *memFS) error {
		return crashBinary(fsys, crashNewVer, &crashExecs{}).Rollback(ctx, m)
	}
	n, trace := crashSteps(t, fresh, rollback)
	t.Logf("Rollback: %d steps:%s", n, trace)
	for _, mode := range crashModes {
		for k := 0; k <= n; k++ {
			t.Run(crashCase(mode, k), func(t *testing.T) {
				fsys := fresh(t)
				fsys.setCut(k, mode)
				execs := &crashExecs{}
				err := crashBinary(fsys, crashNewVer, execs).Rollback(ctx, m)
				label := crashLabel(mode, k, n, fsys, 0)
				if k < n && err == nil {
					t.Errorf("%s: Rollback succeeded through a cut", label)
				}
				if k < n && len(execs.calls()) != 0 {
					t.Errorf("%s: the old binary was started before the rollback was durable", label)
				}
				after := fsys.reboot()
				crashCheckBinary(t, after, label, true)
				if k == n {
					// Rollback returned (and started the old build): it must be
					// durable.
					crashCheckDone(t, after, label, crashOld)
				}
				if t.Failed() {
					return
				}
				// The next start (of whichever build is in place) finishes it.
				running := crashRunning(t, after)
				execs = &crashExecs{}
				if err := crashBinary(after, running, execs).Rollback(ctx, m); err != nil {
					t.Errorf("%s: rollback again after reboot (running %s): %v", label, running, err)
					return
				}
				crashCheckDone(t, after, label+", rollback redone", crashOld)
				crashCheckBinary(t, after.powerLoss(), label+", rollback redone, then a power loss", true)
				wantExec := running == crashNewVer
				if got := execs.calls(); wantExec != (len(got) == 1) {
					t.Errorf("%s: running %s, the redone rollback exec'd %v", label, running, got)
				}
			})
		}
	}
}

func TestCrashBinaryCommit(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	fresh := func(t *testing.T) *memFS { return crashInstalled(t) }
	commit := func(fsys *memFS) error {
		return crashBinary(fsys, crashNewVer, &crashExecs{}).Commit(ctx, m)
	}
	n, trace := crashSteps(t, fresh, commit)
	t.Logf("Commit: %d steps:%s", n, trace)
	for _, mode := range crashModes {
		for k := 0; k <= n; k++ {
			t.Run(crashCase(mode, k), func(t *testing.T) {
				fsys := fresh(t)
				fsys.setCut(k, mode)
				err := commit(fsys)
				label := crashLabel(mode, k, n, fsys, 0)
				if k < n && err == nil {
					t.Errorf("%s: Commit succeeded through a cut", label)
				}
				after := fsys.reboot()
				crashCheckBinary(t, after, label, false)
				if got, _ := after.read(crashTarget); !bytes.Equal(got, crashNew) {
					t.Errorf("%s: commit changed %s", label, crashTarget)
				}
				if _, ok := after.read(crashPrev); k == n && ok {
					t.Errorf("%s: Commit returned, but %s is back after the crash", label, crashPrev)
				}
				if err := commit(after); err != nil {
					t.Errorf("%s: commit again after reboot: %v", label, err)
					return
				}
				done := after.powerLoss()
				if _, ok := done.read(crashPrev); ok {
					t.Errorf("%s: %s survives a redone commit and a power loss", label, crashPrev)
				}
				if got, _ := done.read(crashTarget); !bytes.Equal(got, crashNew) {
					t.Errorf("%s: %s is not the new binary after the commit", label, crashTarget)
				}
			})
		}
	}
}

// crashStore is the updater's Store on the same device: a Save is a step
// of the device's memFS (it fails at the cut and after), and is durable
// at once (it is atomic and fsynced in production), so a power loss does
// not undo it.
type crashStore struct {
	fs    *memFS
	mu    sync.Mutex
	files map[string][]byte
}

var _ Store = (*crashStore)(nil)

func (s *crashStore) Load(name string) ([]byte, error) {
	if err := s.fs.alive(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.files[name]
	if !ok {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return bytes.Clone(b), nil
}

func (s *crashStore) Save(name string, data []byte) error {
	if err := s.fs.step("save " + name + " " + crashPhaseOf(data)); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[name] = bytes.Clone(data)
	return nil
}

// reboot is the store as the next start finds it, on the rebooted fsys.
func (s *crashStore) reboot(fsys *memFS) *crashStore {
	s.mu.Lock()
	defer s.mu.Unlock()
	files := map[string][]byte{}
	for k, v := range s.files {
		files[k] = bytes.Clone(v)
	}
	return &crashStore{fs: fsys, files: files}
}

func (s *crashStore) state(t *testing.T) state {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var st state
	if err := json.Unmarshal(s.files[stateFile], &st); err != nil {
		t.Fatalf("state file: %v", err)
	}
	return st
}

func crashPhaseOf(data []byte) string {
	var st state
	if json.Unmarshal(data, &st) != nil || st.Job == nil {
		return "(no job)"
	}
	return "(" + st.Job.Phase + ")"
}

// crashDevice is one start of the agent on a device: its file system,
// state store and updater, running version.
type crashDevice struct {
	fs      *memFS
	store   *crashStore
	staging string // a real directory too: install re-checks the staged file through OSFS
	clk     *clock.Fake
	execs   *crashExecs
	bin     *Binary
	u       *Updater
	mu      sync.Mutex
	reports []proto.UpdateReport
}

// newCrashDevice starts the agent (version running) on fsys and store.
func newCrashDevice(t *testing.T, fsys *memFS, store *crashStore, staging string, clk *clock.Fake, running string) *crashDevice {
	t.Helper()
	d := &crashDevice{fs: fsys, store: store, staging: staging, clk: clk, execs: &crashExecs{}}
	d.bin = crashBinary(fsys, running, d.execs)
	u, err := New(Options{
		Roots: []ed25519.PublicKey{prototest.RootKey.Public().(ed25519.PublicKey)}, Hardware: "rev-b",
		Store: store, Dir: staging, Clock: clk,
		Installers: map[string]Installer{proto.TargetAgent: d.bin},
		Report: func(r proto.UpdateReport, cmd string) {
			d.mu.Lock()
			d.reports = append(d.reports, r)
			d.mu.Unlock()
		},
		Conditions: func() Conditions { return Conditions{Flight: proto.FlightLanded} },
	})
	if err != nil {
		t.Fatal(err)
	}
	d.u = u
	return d
}

func (d *crashDevice) reported() []proto.UpdateState {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []proto.UpdateState
	for _, r := range d.reports {
		out = append(out, r.State)
	}
	return out
}

// restart is the next start after a crash of d: the supervisor runs the
// binary in place (unless running says otherwise).
func (d *crashDevice) restart(t *testing.T, running string) *crashDevice {
	t.Helper()
	fsys := d.fs.reboot()
	if running == "" {
		running = crashRunning(t, fsys)
	}
	return newCrashDevice(t, fsys, d.store.reboot(fsys), d.staging, d.clk, running)
}

// powerLossRestart is the next start after a power loss now (d goes on).
func (d *crashDevice) powerLossRestart(t *testing.T) *crashDevice {
	t.Helper()
	fsys := d.fs.powerLoss()
	return newCrashDevice(t, fsys, d.store.reboot(fsys), d.staging, d.clk, crashRunning(t, fsys))
}

// crashCheckSettled checks, after Boot, that the stored state matches the
// files in place: no job means the build in place is the one recorded as
// installed; a trial means the new build in place with the old one kept;
// a verified job means the old build in place.
func crashCheckSettled(t *testing.T, label string, d *crashDevice) {
	t.Helper()
	got, _ := d.fs.read(crashTarget)
	prev, hasPrev := d.fs.read(crashPrev)
	inPlace := map[bool]string{true: crashNewVer, false: crashOldVer}[bytes.Equal(got, crashNew)]
	st := d.store.state(t)
	switch {
	case st.Job == nil:
		if rec := st.Installed[proto.TargetAgent].Version; rec != inPlace {
			t.Errorf("%s: no update job, the state records %s as installed, but %s is in place (and runs, untrialed, at every start)", label, rec, inPlace)
		}
	case st.Job.Phase == phaseTrial:
		if inPlace != crashNewVer || !bytes.Equal(prev, crashOld) {
			t.Errorf("%s: job in trial, but %s is in place and %s is present: %v", label, inPlace, crashPrev, hasPrev)
		}
	case st.Job.Phase == phaseVerified:
		if inPlace != crashOldVer {
			t.Errorf("%s: job verified (not installed), but %s is in place", label, inPlace)
		}
	case st.Job.Phase == phaseRollback:
		if inPlace != crashOldVer && !bytes.Equal(prev, crashOld) {
			t.Errorf("%s: rolling back, %s in place, and %s is not the old binary", label, inPlace, crashPrev)
		}
	default:
		t.Errorf("%s: after Boot the job is in phase %q", label, st.Job.Phase)
	}
}

// crashBootAfterPowerLoss checks that what Boot settled on d survives a
// power loss right after it: the next Boot settles consistently.
func crashBootAfterPowerLoss(t *testing.T, label string, d *crashDevice) {
	t.Helper()
	r := d.powerLossRestart(t)
	label += ", then a power loss and another Boot"
	crashCheckBinary(t, r.fs, label, true)
	if err := r.u.Boot(t.Context()); err != nil {
		t.Errorf("%s: %v", label, err)
	}
	crashCheckSettled(t, label, r)
}

// crashVerifiedDevice is a device running the old build, with a verified
// job for the new one staged (on memFS and on disk).
func crashVerifiedDevice(t *testing.T) *crashDevice {
	t.Helper()
	staging := t.TempDir()
	m := crashManifest()
	if err := os.WriteFile(crashStagedPath(staging), crashNew, 0o600); err != nil {
		t.Fatal(err)
	}
	signed, err := proto.SignManifest(prototest.ReleaseKey, m)
	if err != nil {
		t.Fatal(err)
	}
	oldSum := sha256.Sum256(crashOld)
	keys, err := proto.SignKeyList(prototest.RootKey, prototest.KeyList())
	if err != nil {
		t.Fatal(err)
	}
	st := state{
		KeyList:   keys,
		Targets:   map[string]counters{proto.TargetAgent: {Seen: m.Counter, SeenSHA: m.SHA256}},
		Installed: map[string]installed{proto.TargetAgent: {Version: crashOldVer, Counter: m.Counter - 1, SHA256: oldSum[:]}},
		Job:       &job{Manifest: signed, URL: "/api/v1/releases/1.5.0/artifact", Phase: phaseVerified},
	}
	b, err := json.Marshal(&st)
	if err != nil {
		t.Fatal(err)
	}
	fsys := crashFS(staging)
	store := &crashStore{fs: fsys, files: map[string][]byte{stateFile: b}}
	clk := clock.NewFake(time.UnixMilli(prototest.Base).Add(time.Hour))
	return newCrashDevice(t, fsys, store, staging, clk, crashOldVer)
}

// crashTrialDevice is a device on which the install completed and the new
// build started: its Boot put the job in trial.
func crashTrialDevice(t *testing.T) *crashDevice {
	t.Helper()
	d := crashVerifiedDevice(t)
	if err := d.u.install(t.Context(), d.u.job()); err != nil {
		t.Fatalf("install: %v", err)
	}
	d = d.restart(t, "")
	if err := d.u.Boot(t.Context()); err != nil {
		t.Fatalf("boot into the trial: %v", err)
	}
	if j := d.u.job(); j == nil || j.Phase != phaseTrial || d.bin.Version != crashNewVer {
		t.Fatalf("not in trial of the new build: job %+v, running %s", j, d.bin.Version)
	}
	return d
}

// crashPhase is the phase of the stored job ("" when none).
func crashPhase(t *testing.T, d *crashDevice) string {
	t.Helper()
	if j := d.store.state(t).Job; j != nil {
		return j.Phase
	}
	return ""
}

// crashCut runs do on device fresh() cut at every step, both modes, and
// hands each crashed device to check. Cuts at or after step tolerateFrom
// may return nil: by then the operation is recorded as done and what
// remains is clean-up (0: every cut must surface).
func crashCut(t *testing.T, what string, fresh func(*testing.T) *crashDevice, do func(*testing.T, *crashDevice) error, check func(t *testing.T, label string, crashed *crashDevice), tolerateFrom ...int) {
	d := fresh(t)
	base := d.fs.stepCount() // steps of the setup
	if err := do(t, d); err != nil {
		t.Fatalf("uncut %s: %v", what, err)
	}
	n := d.fs.stepCount() - base
	t.Logf("updater %s: %d steps (after %d of setup):%s", what, n, base, d.fs.trace())
	for _, mode := range crashModes {
		for k := 0; k <= n; k++ {
			t.Run(crashCase(mode, k), func(t *testing.T) {
				d := fresh(t)
				d.fs.setCut(base+k, mode)
				err := do(t, d)
				label := crashLabel(mode, k, n, d.fs, base)
				tolerated := len(tolerateFrom) > 0 && k >= tolerateFrom[0]
				if k < n && !tolerated && !errors.Is(err, errCut) {
					t.Errorf("%s: %s returned %v through a cut, want the cut error", label, what, err)
				}
				check(t, label, d)
			})
		}
	}
}

func TestCrashUpdaterInstallThenBoot(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	crashCut(t, "install", crashVerifiedDevice,
		func(t *testing.T, d *crashDevice) error {
			// The staged file is also re-checked on disk and removed from
			// there after the install: put it back for the next run.
			if err := os.WriteFile(crashStagedPath(d.staging), crashNew, 0o600); err != nil {
				t.Fatal(err)
			}
			return d.u.install(ctx, d.u.job())
		},
		func(t *testing.T, label string, crashed *crashDevice) {
			d := crashed.restart(t, "")
			crashCheckBinary(t, d.fs, label, true)
			if t.Failed() {
				return
			}
			if err := os.WriteFile(crashStagedPath(d.staging), crashNew, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := d.u.Boot(ctx); err != nil {
				t.Errorf("%s: Boot: %v", label, err)
				return
			}
			crashCheckSettled(t, label+", Boot", d)
			crashBootAfterPowerLoss(t, label+", Boot", d)
			if d.bin.Installed(m) {
				// The new build is in place, so it is the one that started:
				// its trial begins.
				if p := crashPhase(t, d); p != phaseTrial {
					t.Errorf("%s: new build in place and running, Boot left phase %q, want %q", label, p, phaseTrial)
				}
				if got := d.execs.calls(); len(got) != 0 {
					t.Errorf("%s: the new build runs, Boot exec'd %v", label, got)
				}
				// Had the old build been started instead, Boot starts the new.
				o := crashed.restart(t, crashOldVer)
				if err := o.u.Boot(ctx); err != nil {
					t.Errorf("%s: Boot of the old build: %v", label, err)
				}
				if got := o.execs.calls(); len(got) != 1 || got[0] != crashTarget {
					t.Errorf("%s: new build in place, old one running: Boot exec'd %v, want [%s]", label, got, crashTarget)
				}
				if p := crashPhase(t, o); p != phaseTrial {
					t.Errorf("%s: new build in place, old one running: stored phase %q before exec, want %q", label, p, phaseTrial)
				}
				return
			}
			// The swap did not happen: back to verified, and the install
			// runs again to completion.
			if p := crashPhase(t, d); p != phaseVerified {
				t.Errorf("%s: old build in place, Boot left phase %q, want %q", label, p, phaseVerified)
				return
			}
			if err := d.u.install(ctx, d.u.job()); err != nil {
				t.Errorf("%s: install again: %v", label, err)
				return
			}
			if p := crashPhase(t, d); p != phaseTrial {
				t.Errorf("%s: install again: stored phase %q, want %q", label, p, phaseTrial)
			}
			if got := d.execs.calls(); len(got) != 1 || got[0] != crashTarget {
				t.Errorf("%s: install again: exec'd %v, want [%s]", label, got, crashTarget)
			}
			if got, _ := d.fs.read(crashTarget); !bytes.Equal(got, crashNew) {
				t.Errorf("%s: install again: %s is not the new binary", label, crashTarget)
			}
			if got, _ := d.fs.read(crashPrev); !bytes.Equal(got, crashOld) {
				t.Errorf("%s: install again: %s is not the old binary", label, crashPrev)
			}
			crashCheckSettled(t, label+", install again", d)
		})
}

// TestCrashUpdaterInstallFault fails one step of the install (an EIO, the
// process goes on): whatever the updater then records must match what is
// in place. A job dropped as failed ("previous build kept") must leave the
// old build in place; the new build in place must be under trial.
func TestCrashUpdaterInstallFault(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	d := crashVerifiedDevice(t)
	if err := d.u.install(ctx, d.u.job()); err != nil {
		t.Fatal(err)
	}
	n := d.fs.stepCount()
	for k := 0; k < n; k++ {
		t.Run(crashCase(crashFault, k), func(t *testing.T) {
			d := crashVerifiedDevice(t)
			d.fs.setCut(k, crashFault)
			err := d.u.install(ctx, d.u.job())
			label := crashLabel(crashFault, k, n, d.fs, 0)
			newInPlace := d.bin.Installed(m)
			j := d.u.job()
			switch {
			case newInPlace && j == nil:
				t.Errorf("%s: install returned %v and dropped the job (reported %v: \"install failed, previous build kept\"), "+
					"but %s holds the new build %s: the next start runs it with no trial and no rollback, "+
					"while the state says %s is installed", label, err, d.reported(), crashTarget, crashNewVer, crashOldVer)
			case newInPlace && j.Phase != phaseTrial:
				t.Errorf("%s: the new build is in place but the job is in phase %q", label, j.Phase)
			case !newInPlace && j != nil && j.Phase == phaseTrial:
				t.Errorf("%s: the job is in trial but the old build is in place", label)
			}
			// A plain restart (no power loss) settles on a consistent state.
			r := d.restart(t, "")
			if err := r.u.Boot(ctx); err != nil {
				t.Errorf("%s: Boot after restart: %v", label, err)
				return
			}
			if r.bin.Running(m) && r.u.job() == nil && r.u.Installed()[proto.TargetAgent].Version != crashNewVer {
				t.Errorf("%s: after a restart the new build %s runs outside any job, untrialed, and the state records %s as installed",
					label, crashNewVer, r.u.Installed()[proto.TargetAgent].Version)
			}
		})
	}
}

// TestCrashUpdaterCommit cuts the commit of a passed trial: Binary.Commit
// drops .prev, then the job is finished in the state file. After a cut
// between the two, the restarted build is still "in trial" with no .prev:
// if that trial now fails (no confirmation before the deadline, a failing
// self-test, a crash loop), the rollback cannot happen. Expected: a job
// whose .prev is gone is committed (or the commit is recorded before .prev
// is removed), never left in trial.
func TestCrashUpdaterCommit(t *testing.T) {
	ctx := t.Context()
	crashCut(t, "commit", crashTrialDevice,
		func(t *testing.T, d *crashDevice) error { return d.u.commit(ctx, d.u.job()) },
		func(t *testing.T, label string, crashed *crashDevice) {
			d := crashed.restart(t, "")
			crashCheckBinary(t, d.fs, label, false)
			if err := d.u.Boot(ctx); err != nil {
				t.Errorf("%s: Boot: %v", label, err)
				return
			}
			_, hasPrev := d.fs.read(crashPrev)
			j := d.u.job()
			if j == nil {
				if got := d.u.Installed()[proto.TargetAgent]; got.Version != crashNewVer {
					t.Errorf("%s: job gone, installed record %+v, want %s", label, got, crashNewVer)
				}
				return
			}
			if !hasPrev {
				t.Errorf("%s: the job is still in phase %q after the restart, but Binary.Commit already removed %s: "+
					"the trial can still fail and roll back, and there is nothing to roll back to", label, j.Phase, crashPrev)
			}
			// The restarted build hears no confirmation before the trial's
			// deadline (2 min after the install): it rolls back.
			d.clk.Advance(DefaultTrialDeadline + time.Second)
			tick := d.clk.NewTicker(time.Second)
			defer tick.Stop()
			err := d.u.trial(ctx, j, tick)
			got, _ := d.fs.read(crashTarget)
			switch {
			case err != nil:
				t.Errorf("%s: trial past its deadline: %v; the job is stuck in phase %q with %s in place (reported %v)",
					label, err, crashPhase(t, d), map[bool]string{true: crashNewVer, false: crashOldVer}[bytes.Equal(got, crashNew)], d.reported())
				// Stuck for good: every later release is refused.
				if err := d.u.Offer(crashOffer(t, "1.6.0", 14)); err != nil {
					t.Errorf("%s: and a newer release 1.6.0 is refused: %v", label, err)
				}
			case !bytes.Equal(got, crashOld) || d.u.job() != nil:
				t.Errorf("%s: trial past its deadline: job %+v, %s is old: %v", label, d.u.job(), crashTarget, bytes.Equal(got, crashOld))
			}
		}, 3)
}

// crashOffer is an update command for another agent release.
func crashOffer(t *testing.T, version string, counter uint64) proto.Command {
	t.Helper()
	m := prototest.Manifest([]byte("hangar-agent " + version))
	m.Version, m.Counter = version, counter
	signed, err := proto.SignManifest(prototest.ReleaseKey, m)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := proto.SignKeyList(prototest.RootKey, prototest.KeyList())
	if err != nil {
		t.Fatal(err)
	}
	return proto.Command{ID: "cmd-" + version, Kind: proto.CmdUpdate,
		Update: &proto.UpdateOffer{Manifest: signed, Keys: keys, URL: "/api/v1/releases/" + version + "/artifact"}}
}

// TestCrashUpdaterRollback cuts the rollback of a failed trial of the new
// build (running): the next start, of whichever build is in place,
// finishes it, and what it settles on survives a power loss right after.
// (After a process crash between Binary.Rollback's rename and its SyncDir,
// the rename is only in the page cache: Boot sees the old build in place
// and finishes the job without making the directory durable, so a power
// loss then brings the new build back, outside any job.)
func TestCrashUpdaterRollback(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	crashCut(t, "rollback", crashTrialDevice,
		func(t *testing.T, d *crashDevice) error { return d.u.rollback(ctx, d.u.job(), "health check failed") },
		func(t *testing.T, label string, crashed *crashDevice) {
			d := crashed.restart(t, "")
			crashCheckBinary(t, d.fs, label, true)
			if t.Failed() {
				return
			}
			if err := d.u.Boot(ctx); err != nil {
				t.Errorf("%s: Boot: %v", label, err)
				return
			}
			crashCheckSettled(t, label+", Boot", d)
			crashBootAfterPowerLoss(t, label+", Boot", d)
			got, _ := d.fs.read(crashTarget)
			j := d.u.job()
			switch {
			case j == nil:
				// Rolled back: the old build is in place, and started if the
				// new one was running.
				if !bytes.Equal(got, crashOld) {
					t.Errorf("%s: job finished, %s is not the old binary", label, crashTarget)
				}
				if wantExec := d.bin.Version == crashNewVer; wantExec != (len(d.execs.calls()) == 1) {
					t.Errorf("%s: running %s, Boot exec'd %v", label, d.bin.Version, d.execs.calls())
				}
				if inst := d.u.Installed()[proto.TargetAgent]; inst.Version != crashOldVer {
					t.Errorf("%s: installed record %+v after the rollback, want %s", label, inst, crashOldVer)
				}
			case j.Phase == phaseTrial:
				// The rollback had not been recorded: still the trial of the
				// new build, which can still roll back.
				if !bytes.Equal(got, crashNew) || !d.bin.Running(m) {
					t.Errorf("%s: in trial, but the new build is not in place and running", label)
				}
			default:
				t.Errorf("%s: after Boot the job is in phase %q (%s in place)", label, j.Phase, d.bin.Version)
			}
		})
}

// TestCrashStepCounts pins the sequences the crash tests cut, so that a
// change to them is seen (and the tests above are reconsidered).
func TestCrashStepCounts(t *testing.T) {
	ctx := t.Context()
	m := crashManifest()
	want := map[string][]string{
		"install": {
			"remove " + crashNext, "create " + crashNext,
			"write " + crashNext, "write " + crashNext, "write " + crashNext, "write " + crashNext,
			"sync " + crashNext, "remove " + crashPrev, "link " + crashTarget + " -> " + crashPrev, "syncdir " + crashDir + "/",
			"create " + crashTrial + ".tmp", "write " + crashTrial + ".tmp", "sync " + crashTrial + ".tmp",
			"rename " + crashTrial + ".tmp -> " + crashTrial, "syncdir " + crashDir + "/",
			"rename " + crashNext + " -> " + crashTarget, "syncdir " + crashDir + "/",
		},
		"rollback": {"syncdir " + crashDir + "/", "rename " + crashPrev + " -> " + crashTarget, "syncdir " + crashDir + "/",
			"remove " + crashTrial, "syncdir " + crashDir + "/"},
		"commit": {"remove " + crashTrial, "syncdir " + crashDir + "/", "remove " + crashPrev, "syncdir " + crashDir + "/"},
	}
	seq := func(f *memFS) []string {
		var s []string
		for i := range f.stepCount() {
			name, _, _ := strings.Cut(f.stepName(i), " [")
			s = append(s, name)
		}
		return s
	}
	got := map[string][]string{}
	f := crashFS(crashStaging)
	if err := crashBinary(f, crashOldVer, &crashExecs{}).Install(ctx, m, crashStagedPath(crashStaging)); err != nil {
		t.Fatal(err)
	}
	got["install"] = seq(f)
	f = crashInstalled(t)
	if err := crashBinary(f, crashNewVer, &crashExecs{}).Rollback(ctx, m); err != nil {
		t.Fatal(err)
	}
	got["rollback"] = seq(f)
	f = crashInstalled(t)
	if err := crashBinary(f, crashNewVer, &crashExecs{}).Commit(ctx, m); err != nil {
		t.Fatal(err)
	}
	got["commit"] = seq(f)
	for k := range want {
		if !slices.Equal(got[k], want[k]) {
			t.Errorf("%s steps:\n got %q\nwant %q", k, got[k], want[k])
		}
	}
}
