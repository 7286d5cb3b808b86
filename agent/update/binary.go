package update

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/agent/guard"
	"github.com/hangarfleet/hangar/agent/safefs"
	"github.com/hangarfleet/hangar/proto"
)

// RestartMode says how the agent starts a new build of itself.
type RestartMode string

// Restart modes.
const (
	// RestartExec replaces the process with the new binary (same PID, so a
	// supervisor such as systemd sees no exit).
	RestartExec RestartMode = "exec"
	// RestartExit exits with ExitRestart and lets the supervisor start the
	// binary again.
	RestartExit RestartMode = "exit"
)

// ExitRestart is the exit status of an agent leaving for a new build in
// RestartExit mode.
const ExitRestart = 75

// ErrRestart is returned by Activate in RestartExit mode: the caller stops
// cleanly and exits with ExitRestart.
var ErrRestart = errors.New("restart into the new build")

// Guard is what the agent knows of the trial guard (package guard) that
// its unit starts it through.
type Guard struct {
	// Path is the guard's executable; empty when the agent runs without
	// one. In RestartExec mode the agent restarts through it, so that the
	// new build starts under its watch.
	Path    string
	Version string
	// Notify is set when this process is a new build that the guard runs
	// as its child during a trial: the build says there that its own trial
	// code runs, and exits with ExitRestart rather than exec.
	Notify io.Writer
}

// Binary installs the agent's own executable, power-safely: at every
// instant Path holds a complete binary, old or new.
//
//  1. copy the verified artifact to .NAME.new beside Path and fsync it;
//  2. run ".NAME.new --check-config ARGS" with this agent's arguments and
//     environment: it must accept this device's configuration and print
//     the manifest's version;
//  3. hard-link Path to .NAME.prev (the rollback copy);
//  4. write the trial record .NAME.trial for the guard, durably;
//  5. rename .NAME.new over Path (atomic) and fsync the directory.
//
// A cut anywhere leaves Path as it was before step 5 or as it is after.
// From step 5 on, the trial guard (when the unit starts the agent through
// it) restores .NAME.prev if the new build keeps dying before it commits,
// whether or not its own code ever runs.
type Binary struct {
	Path    string // the executable (default: os.Executable)
	Version string // version of the running build
	Mode    RestartMode
	FS      FS
	Guard   Guard
	// MaxStarts and TrialTime go into the trial record: the guard restores
	// the previous build after MaxStarts starts, or TrialTime of run time,
	// without a commit (defaults: DefaultMaxTrialBoots, and
	// DefaultTrialDeadline plus GuardGrace).
	MaxStarts int
	TrialTime time.Duration
	// Args and Env are the command line and environment to restart with
	// (default: this process's).
	Args []string
	Env  []string
	// SmokeTimeout bounds the --check-config run (default 10 s).
	SmokeTimeout time.Duration
	// Smoke replaces the --check-config run (tests on a simulated file
	// system).
	Smoke func(ctx context.Context, path, version string) error
	// exec replaces the process; tests swap it.
	exec func(argv0 string, argv, env []string) error
}

// GuardGrace is added to the trial deadline for the guard's budget: a new
// build whose own code runs rolls back by itself at its deadline, with
// its own reason; the guard acts only when it cannot.
func GuardGrace(deadline time.Duration) time.Duration {
	return min(max(deadline/4, 5*time.Second), time.Minute)
}

var _ Installer = (*Binary)(nil)

func (b *Binary) fs() FS {
	if b.FS == nil {
		return OSFS{}
	}
	return b.FS
}

func (b *Binary) args() []string {
	if b.Args == nil {
		return os.Args
	}
	return b.Args
}

// env is the environment to start a build with: the guard's pipe belongs
// to this process only.
func (b *Binary) env() []string {
	env := b.Env
	if env == nil {
		env = os.Environ()
	}
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if !strings.HasPrefix(kv, guard.EnvNotify+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// Install puts the artifact in place of the running binary, keeping it.
func (b *Binary) Install(ctx context.Context, m proto.Manifest, artifact string) error {
	fsys := b.fs()
	dir, next, prev := siblings(b.Path)
	if b.Installed(m) {
		// Already swapped (an install cut after its rename): installing
		// again would replace the rollback copy with the new build.
		return fsys.SyncDir(dir)
	}
	_ = fsys.Remove(next)
	if err := safefs.CopyFile(fsys, artifact, next, 0o755); err != nil {
		return fmt.Errorf("install: stage beside %s: %w", b.Path, err)
	}
	if err := fileHasDigest(fsys, next, m.SHA256); err != nil {
		_ = fsys.Remove(next)
		return err
	}
	smoke := b.Smoke
	if smoke == nil {
		smoke = b.smoke
	}
	if err := smoke(ctx, next, m.Version); err != nil {
		_ = fsys.Remove(next)
		return err
	}
	_ = fsys.Remove(prev)
	if err := fsys.Link(b.Path, prev); err != nil {
		return fmt.Errorf("install: keep the previous binary: %w", err)
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	prevSum, err := safefs.Digest(fsys, prev)
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	maxStarts, trialTime := b.MaxStarts, b.TrialTime
	if maxStarts <= 0 {
		maxStarts = DefaultMaxTrialBoots
	}
	if trialTime <= 0 {
		trialTime = DefaultTrialDeadline + GuardGrace(DefaultTrialDeadline)
	}
	rec := &guard.Record{Version: m.Version, SHA256: m.SHA256, PrevSHA256: prevSum, MaxStarts: maxStarts, Budget: trialTime}
	if err := guard.Save(fsys, b.Path, rec); err != nil {
		return fmt.Errorf("install: trial record: %w", err)
	}
	if err := fsys.Rename(next, b.Path); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	return nil
}

// smoke runs the new binary against this device's configuration: the same
// arguments and environment, with --check-config, which parses and checks
// them, prints the version and exits. A build that would not start here
// (it rejects a setting of the config file, cannot read the root key, is
// built for another CPU) is refused before it replaces anything.
func (b *Binary) smoke(ctx context.Context, path, version string) error {
	timeout := b.SmokeTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	run := func(args ...string) (string, string, error) {
		var out, errb bytes.Buffer
		cmd := exec.CommandContext(ctx, path, args...)
		cmd.Env, cmd.Stdout, cmd.Stderr = b.env(), &out, &errb
		err := cmd.Run()
		return strings.TrimSpace(out.String()), lastLines(errb.String(), 3), err
	}
	args := b.args()
	out, stderr, err := run(append([]string{"--check-config"}, args[min(1, len(args)):]...)...)
	if err != nil && strings.Contains(stderr, "flag provided but not defined: -check-config") {
		// A build from before --check-config (a re-release of an old
		// version): it can only say its version.
		out, stderr, err = run("--version")
	}
	if err != nil {
		if stderr != "" {
			err = fmt.Errorf("%v: %s", err, stderr)
		}
		return &proto.VerifyError{Check: proto.CheckSmoke, Err: fmt.Errorf("the new build refuses this device's configuration (%s --check-config): %v", path, err)}
	}
	if out != version {
		return &proto.VerifyError{Check: proto.CheckSmoke, Err: fmt.Errorf("the new build says it is %q, the manifest says %q", out, version)}
	}
	return nil
}

// lastLines keeps the end of a program's error output, on one line.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	out := strings.Join(lines, " / ")
	if len(out) > 512 {
		out = out[len(out)-512:]
	}
	return out
}

// Activate starts the installed binary: through the guard when there is
// one, so that the new build runs under its watch.
func (b *Binary) Activate(ctx context.Context, m proto.Manifest) error {
	if b.Mode == RestartExit || b.Guard.Notify != nil {
		// Under the guard's watch, the guard starts the next build.
		return ErrRestart
	}
	args, env := b.args(), b.env()
	path := b.Path
	if b.Guard.Path != "" {
		path = b.Guard.Path
		args = append([]string{b.Guard.Path, b.Path}, args[min(1, len(args)):]...)
	}
	do := b.exec
	if do == nil {
		do = syscall.Exec
	}
	if err := do(path, args, env); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}

// Check has nothing to add for the agent: its trial checks are the
// updater's (broker, control plane, self-tests).
func (b *Binary) Check(ctx context.Context, m proto.Manifest) error { return nil }

// Commit ends the guard's watch, then forgets the previous binary.
func (b *Binary) Commit(ctx context.Context, m proto.Manifest) error {
	dir, _, prev := siblings(b.Path)
	if err := guard.Remove(b.fs(), b.Path); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if err := b.fs().Remove(prev); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("commit: %w", err)
	}
	return b.fs().SyncDir(dir)
}

// Rollback puts the previous binary back and starts it.
func (b *Binary) Rollback(ctx context.Context, m proto.Manifest) error {
	fsys := b.fs()
	dir, _, prev := siblings(b.Path)
	// A restore done before a crash may not be durable yet.
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	if _, err := fsys.Stat(prev); err == nil {
		if err := fsys.Rename(prev, b.Path); err != nil {
			return fmt.Errorf("rollback: %w", err)
		}
		if err := fsys.SyncDir(dir); err != nil {
			return fmt.Errorf("rollback: %w", err)
		}
	} else if b.Installed(m) {
		return fmt.Errorf("rollback: the previous binary %s is gone", prev)
	}
	// The previous build is back, durably: the guard has nothing to watch.
	if err := guard.Remove(fsys, b.Path); err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	if b.Version == m.Version {
		// The new build is running: start the old one.
		return b.Activate(ctx, m)
	}
	return nil
}

// TrialRunning tells the guard, when this process is the new build it
// watches, that the build's own trial code runs.
func (b *Binary) TrialRunning(m proto.Manifest) {
	if b.Guard.Notify != nil && b.Running(m) {
		_, _ = io.WriteString(b.Guard.Notify, "trial\n")
	}
}

// Verdict is the guard's reason for restoring the previous build instead
// of m ("" when it did not).
func (b *Binary) Verdict(m proto.Manifest) string {
	r, err := guard.Load(b.fs(), b.Path)
	if err != nil || r == nil || !bytes.Equal(r.SHA256, m.SHA256) {
		return ""
	}
	return r.Verdict
}

// EndWatch removes the trial record: the new build passed its trial.
func (b *Binary) EndWatch() error { return guard.Remove(b.fs(), b.Path) }

// Settle drops a trial record that no longer watches the binary in place
// (a guard's verdict, once reported; a record of a build that was never
// swapped in). A record still live for the binary in place, with the
// previous build kept, stays: only the guard ends that trial.
func (b *Binary) Settle() error {
	fsys := b.fs()
	r, err := guard.Load(fsys, b.Path)
	if err == nil && r != nil {
		sum, derr := safefs.Digest(fsys, b.Path)
		_, perr := fsys.Stat(guard.PrevPath(b.Path))
		if derr == nil && r.Live(sum) && perr == nil && r.Verdict == "" {
			return nil
		}
	}
	return guard.Remove(fsys, b.Path)
}

// Base opens the binary in place: the base of a delta.
func (b *Binary) Base() (io.ReadCloser, error) { return b.fs().Open(b.Path) }

// BaseStamp changes when the binary in place may have: its digest is
// taken again then.
func (b *Binary) BaseStamp() string {
	fi, err := b.fs().Stat(b.Path)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
}

var _ Patchable = (*Binary)(nil)

// Running reports whether this process is the build of m.
func (b *Binary) Running(m proto.Manifest) bool { return b.Version == m.Version }

// Installed reports whether Path holds the build of m.
func (b *Binary) Installed(m proto.Manifest) bool {
	return fileHasDigest(b.fs(), b.Path, m.SHA256) == nil
}

// fileHasDigest checks a file's SHA-256.
func fileHasDigest(fsys FS, path string, want []byte) error {
	f, err := fsys.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if got := h.Sum(nil); !bytes.Equal(got, want) {
		return &proto.VerifyError{Check: proto.CheckHash, Err: fmt.Errorf("%s has sha256 %x, the manifest says %x", path, got, want)}
	}
	return nil
}
