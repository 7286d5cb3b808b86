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

// Binary installs the agent's own executable, power-safely: at every
// instant Path holds a complete binary, old or new.
//
//  1. copy the verified artifact to .NAME.new beside Path and fsync it;
//  2. run ".NAME.new --version": it must print the manifest's version;
//  3. hard-link Path to .NAME.prev (the rollback copy);
//  4. rename .NAME.new over Path (atomic) and fsync the directory.
//
// A cut anywhere leaves Path as it was before step 4 or as it is after.
type Binary struct {
	Path    string // the executable (default: os.Executable)
	Version string // version of the running build
	Mode    RestartMode
	FS      FS
	// Args and Env are the command line and environment to restart with
	// (default: this process's).
	Args []string
	Env  []string
	// SmokeTimeout bounds the --version run (default 10 s).
	SmokeTimeout time.Duration
	// Smoke replaces the --version run (tests on a simulated file system).
	Smoke func(ctx context.Context, path, version string) error
	// exec replaces the process; tests swap it.
	exec func(argv0 string, argv, env []string) error
}

var _ Installer = (*Binary)(nil)

func (b *Binary) fs() FS {
	if b.FS == nil {
		return OSFS{}
	}
	return b.FS
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
	if err := copyFile(fsys, artifact, next, 0o755); err != nil {
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
	if err := fsys.Rename(next, b.Path); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	return nil
}

// smoke runs the new binary with --version: a build that cannot even start
// on this device is refused before it replaces anything.
func (b *Binary) smoke(ctx context.Context, path, version string) error {
	timeout := b.SmokeTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return &proto.VerifyError{Check: proto.CheckSmoke, Err: fmt.Errorf("%s --version: %v", path, err)}
	}
	if got := strings.TrimSpace(string(out)); got != version {
		return &proto.VerifyError{Check: proto.CheckSmoke, Err: fmt.Errorf("--version printed %q, the manifest says %q", got, version)}
	}
	return nil
}

// Activate starts the installed binary.
func (b *Binary) Activate(ctx context.Context, m proto.Manifest) error {
	if b.Mode == RestartExit {
		return ErrRestart
	}
	args, env := b.Args, b.Env
	if args == nil {
		args = os.Args
	}
	if env == nil {
		env = os.Environ()
	}
	do := b.exec
	if do == nil {
		do = syscall.Exec
	}
	if err := do(b.Path, args, env); err != nil {
		return fmt.Errorf("exec %s: %w", b.Path, err)
	}
	return nil
}

// Check has nothing to add for the agent: its trial checks are the
// updater's (broker, control plane, self-tests).
func (b *Binary) Check(ctx context.Context, m proto.Manifest) error { return nil }

// Commit forgets the previous binary.
func (b *Binary) Commit(ctx context.Context, m proto.Manifest) error {
	dir, _, prev := siblings(b.Path)
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
	if b.Version == m.Version {
		// The new build is running: start the old one.
		return b.Activate(ctx, m)
	}
	return nil
}

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
