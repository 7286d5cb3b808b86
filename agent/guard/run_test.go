package guard

import (
	"bytes"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/guard/guardtest"
	"github.com/hangarfleet/hangar/agent/safefs"
)

// The guard's tests run real processes: the test binary, copied beside a
// "previous build", plays the new build; GUARD_TEST_BUILD says how it
// behaves when the guard starts it.
const envBuild = "GUARD_TEST_BUILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(envBuild); mode != "" && os.Getenv(EnvNotify) != "" {
		newBuild(mode)
		return
	}
	os.Exit(m.Run())
}

func notifyTrial() {
	f := os.NewFile(3, "guard")
	if _, err := f.WriteString("trial\n"); err != nil {
		os.Exit(98)
	}
}

// newBuild is the new build started by the guard.
func newBuild(mode string) {
	switch mode {
	case "exit1": // a flag the config file sets is gone: exits at start
		os.Exit(1)
	case "segv":
		guardtest.DieBySignal(syscall.SIGSEGV)
	case "hang": // hangs before its trial code, ignoring SIGTERM
		signalIgnore(syscall.SIGTERM)
		guardtest.Hang()
	case "hang-quietly": // hangs before its trial code; SIGTERM ends it
		guardtest.Hang()
	case "trial-crash": // runs its trial, crashes before committing
		notifyTrial()
		os.Exit(2)
	case "commit": // runs its trial and commits: the record goes
		notifyTrial()
		exe, _ := os.Executable()
		if err := Remove(safefs.OS{}, exe); err != nil {
			os.Exit(97)
		}
		os.Exit(0)
	case "wait": // runs its trial and waits to be stopped
		notifyTrial()
		guardtest.Hang()
	}
	os.Exit(96)
}

// rig is an agent binary (the new build, on trial) and its previous build.
type rig struct {
	t          *testing.T
	agent      string
	prev       []byte
	next       []byte
	mu         sync.Mutex
	execs      [][]string
	log        bytes.Buffer
	logMu      sync.Mutex
	maxStarts  int
	budget     time.Duration
	killGrace  time.Duration
	guardStart time.Time
}

func newRig(t *testing.T, mode string) *rig {
	t.Setenv(envBuild, mode)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	next, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, agent: filepath.Join(t.TempDir(), "hangar-agent"), next: next, prev: append(bytes.Clone(next), "previous build"...),
		maxStarts: 3, budget: time.Minute, killGrace: 200 * time.Millisecond}
	if err := os.WriteFile(r.agent, next, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(PrevPath(r.agent), r.prev, 0o755); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rig) record() {
	sum, prev := sha256.Sum256(r.next), sha256.Sum256(r.prev)
	rec := &Record{Version: "1.2.0", SHA256: sum[:], PrevSHA256: prev[:], MaxStarts: r.maxStarts, Budget: r.budget}
	if err := Save(safefs.OS{}, r.agent, rec); err != nil {
		r.t.Fatal(err)
	}
}

type logWriter struct{ r *rig }

func (w logWriter) Write(p []byte) (int, error) {
	w.r.logMu.Lock()
	defer w.r.logMu.Unlock()
	return w.r.log.Write(p)
}

func (r *rig) run(args ...string) int {
	r.guardStart = time.Now()
	status := Run(append([]string{r.agent}, args...), Options{
		Self: "/usr/libexec/hangar-guard", Stderr: logWriter{r}, Pause: 10 * time.Millisecond, KillGrace: r.killGrace,
		Exec: func(path string, argv, env []string) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.execs = append(r.execs, append([]string{path}, argv...))
			for _, kv := range env {
				if strings.HasPrefix(kv, EnvNotify+"=") {
					r.t.Errorf("exec with %s", kv)
				}
			}
			if !slices.Contains(env, EnvGuard+"=/usr/libexec/hangar-guard") || !slices.Contains(env, EnvVersion+"="+Version) {
				r.t.Errorf("the agent is not told of its guard: env %q", env)
			}
			return nil
		},
	})
	r.t.Cleanup(func() {
		if r.t.Failed() {
			r.logMu.Lock()
			r.t.Logf("guard log:\n%s", r.log.String())
			r.logMu.Unlock()
		}
	})
	return status
}

// runAndSignal runs the guard, waits until its record is ready, then
// sends sig to this process (the guard catches it, as a service's main
// process would get it) and returns the guard's status.
func (r *rig) runAndSignal(ready func(*Record) bool, sig syscall.Signal) int {
	done := make(chan int)
	go func() { done <- r.run() }()
	deadline := time.Now().Add(time.Minute)
	for rec := r.load(); rec == nil || !ready(rec); rec = r.load() {
		if time.Now().After(deadline) {
			r.t.Fatal("the guard's record never got ready for the signal")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := syscall.Kill(os.Getpid(), sig); err != nil {
		r.t.Fatal(err)
	}
	return <-done
}

func (r *rig) inPlace() string {
	b, err := os.ReadFile(r.agent)
	switch {
	case err != nil:
		r.t.Fatal(err)
	case bytes.Equal(b, r.next):
		return "new"
	case bytes.Equal(b, r.prev):
		return "previous"
	}
	r.t.Fatalf("%s is neither build", r.agent)
	return ""
}

func (r *rig) load() *Record {
	rec, err := Load(safefs.OS{}, r.agent)
	if err != nil {
		r.t.Fatal(err)
	}
	return rec
}

// restored checks the end of a failed trial: the previous build in place
// and executed, the verdict in the record for it to report.
func (r *rig) restored(status int, wants ...string) *Record {
	t := r.t
	t.Helper()
	if status != 0 {
		t.Errorf("guard status %d", status)
	}
	if got := r.inPlace(); got != "previous" {
		t.Fatalf("%s build in place after the guard", got)
	}
	if _, err := os.Stat(PrevPath(r.agent)); !os.IsNotExist(err) {
		t.Errorf("%s still there: %v", PrevPath(r.agent), err)
	}
	r.mu.Lock()
	execs := r.execs
	r.mu.Unlock()
	if len(execs) != 1 || execs[0][0] != r.agent {
		t.Errorf("execs %q, want the agent once", execs)
	}
	rec := r.load()
	if rec == nil || rec.Verdict == "" {
		t.Fatalf("record %+v, want a verdict", rec)
	}
	for _, w := range wants {
		if !strings.Contains(rec.Verdict, w) {
			t.Errorf("verdict %q does not say %q", rec.Verdict, w)
		}
	}
	t.Logf("restored %v after the guard started; verdict: %s", time.Since(r.guardStart).Round(time.Millisecond), rec.Verdict)
	return rec
}

func TestGuardExitAtStart(t *testing.T) {
	r := newRig(t, "exit1")
	r.record()
	rec := r.restored(r.run("--config", "/etc/hangar/agent.conf"),
		"started 3 times without committing", "never reached its trial", "exited with status 1")
	if rec.Starts != 3 {
		t.Errorf("starts %d, want 3", rec.Starts)
	}
	if got := r.execs[0][1:]; !slices.Contains(got, "--config") || got[0] != r.agent {
		t.Errorf("exec argv %q, want the agent's arguments", got)
	}
}

func TestGuardKilledBySignal(t *testing.T) {
	r := newRig(t, "segv")
	r.record()
	r.restored(r.run(), "never reached its trial", "killed by SIGSEGV")
}

func TestGuardHangBeforeTrial(t *testing.T) {
	r := newRig(t, "hang")
	r.budget = 500 * time.Millisecond
	r.record()
	rec := r.restored(r.run(), "did not commit within 500ms", "never reached its trial", "hung", "SIGKILL")
	if rec.Starts != 1 {
		t.Errorf("starts %d: a hang is one start", rec.Starts)
	}
}

func TestGuardCrashDuringTrial(t *testing.T) {
	r := newRig(t, "trial-crash")
	r.record()
	rec := r.restored(r.run(), "started 3 times without committing", "exited with status 2")
	if strings.Contains(rec.Verdict, "never reached") || !rec.Reached {
		t.Errorf("the build reached its trial, the verdict says %q (reached %v)", rec.Verdict, rec.Reached)
	}
}

// A build that commits is left alone: the guard exits with its status and
// restores nothing.
func TestGuardCommit(t *testing.T) {
	r := newRig(t, "commit")
	r.record()
	if status := r.run(); status != 0 {
		t.Errorf("status %d", status)
	}
	if r.inPlace() != "new" || r.load() != nil || len(r.execs) != 0 {
		t.Errorf("after a commit: %s in place, record %+v, execs %q", r.inPlace(), r.load(), r.execs)
	}
}

// A stop during the trial is passed on and does not count as a failed
// start.
func TestGuardStop(t *testing.T) {
	r := newRig(t, "wait")
	r.record()
	status := r.runAndSignal(func(rec *Record) bool { return rec.Reached }, syscall.SIGTERM)
	rec := r.load()
	if status != 0 || r.inPlace() != "new" || rec.Starts != 0 || !strings.Contains(rec.Last, "stopped by SIGTERM") {
		t.Errorf("after a stop: status %d, %s in place, record %+v", status, r.inPlace(), rec)
	}
}

// Without a live record the guard only executes the agent.
func TestGuardNoTrial(t *testing.T) {
	for name, setup := range map[string]func(r *rig){
		"no record": func(r *rig) {},
		"record of another build": func(r *rig) {
			r.record()
			if err := os.WriteFile(r.agent, r.prev, 0o755); err != nil {
				t.Fatal(err)
			}
		},
		"a FIFO in place of the record": func(r *rig) {
			if err := syscall.Mkfifo(TrialPath(r.agent), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"unreadable record": func(r *rig) {
			if err := os.WriteFile(TrialPath(r.agent), []byte("hangar-trial 99\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			r := newRig(t, "exit1")
			setup(r)
			before := r.inPlace()
			if status := r.run("-x"); status != 0 {
				t.Errorf("status %d", status)
			}
			if len(r.execs) != 1 || r.inPlace() != before {
				t.Errorf("execs %q, %s in place (was %s)", r.execs, r.inPlace(), before)
			}
		})
	}
}

func TestGuardVersion(t *testing.T) {
	old := os.Stdout
	pr, pw, _ := os.Pipe()
	os.Stdout = pw
	status := Run([]string{"--version"}, Options{Stderr: io.Discard})
	pw.Close()
	os.Stdout = old
	out, _ := io.ReadAll(pr)
	if status != 0 || strings.TrimSpace(string(out)) != Version {
		t.Errorf("--version: %d %q", status, out)
	}
	if Run(nil, Options{Stderr: io.Discard}) != 2 {
		t.Error("no agent: want status 2")
	}
}

// The supervisor's watchdog (systemd sends SIGABRT to a service that
// stopped pinging) ends the guard too, and counts as a failed start.
func TestGuardWatchdog(t *testing.T) {
	r := newRig(t, "wait")
	r.record()
	status := r.runAndSignal(func(rec *Record) bool { return rec.Reached }, syscall.SIGABRT)
	rec := r.load()
	if status == 0 || r.inPlace() != "new" || rec.Starts != 1 || !strings.Contains(rec.Last, "watchdog") {
		t.Errorf("after the watchdog: status %d, %s in place, record %+v", status, r.inPlace(), rec)
	}
}

// A stop before the build reached its trial counts as a failed start: it
// is how systemd ends a start that hangs (TimeoutStartSec=).
func TestGuardStopBeforeTrialCounts(t *testing.T) {
	r := newRig(t, "hang-quietly")
	r.record()
	status := r.runAndSignal(func(rec *Record) bool { return rec.Starts > 0 }, syscall.SIGTERM)
	rec := r.load()
	if status != 0 || rec.Starts != 1 || !strings.Contains(rec.Last, "before it reached its trial") {
		t.Errorf("after a stop before the trial: status %d, record %+v", status, rec)
	}
}
