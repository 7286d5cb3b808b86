package update

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Installer applies verified artifacts of one target. The agent's own
// binary uses Binary; other payloads (flight-controller firmware) use
// Hook; the simulator uses its own.
type Installer interface {
	// Install puts the verified artifact in place, keeping the previous
	// build, so that Activate runs it. It must be power-safe.
	Install(ctx context.Context, m proto.Manifest, artifact string) error
	// Activate starts the installed build. For the agent itself it does
	// not return on success (or returns ErrRestart).
	Activate(ctx context.Context, m proto.Manifest) error
	// Check is the build's own health check during its trial.
	Check(ctx context.Context, m proto.Manifest) error
	// Commit makes the build permanent and drops the previous one.
	Commit(ctx context.Context, m proto.Manifest) error
	// Rollback restores the previous build and starts it.
	Rollback(ctx context.Context, m proto.Manifest) error
	// Running reports whether the running build is m's.
	Running(m proto.Manifest) bool
	// Installed reports whether m's build is in place (running or not).
	Installed(m proto.Manifest) bool
}

// Hook installs a payload through an executable the integrator provides.
// It is called as
//
//	HOOK install FILE VERSION   put the verified file in place, keep the previous build, start it
//	HOOK check VERSION          exit 0 when the new build is healthy
//	HOOK commit VERSION         make it permanent
//	HOOK rollback VERSION       restore and start the previous build
//	HOOK current                print the running version
//
// and must make install and rollback power-safe itself.
type Hook struct {
	Path    string
	Timeout time.Duration // per call (default 10 min)
	// File is where the payload's installed build is, when there is one
	// file to patch (a firmware image kept on the companion computer):
	// with it, the payload takes deltas.
	File string
}

// Base opens the payload's installed file: the base of a delta.
func (h *Hook) Base() (io.ReadCloser, error) {
	if h.File == "" {
		return nil, ErrNoBase
	}
	return os.Open(h.File)
}

// BaseStamp changes when the installed file may have.
func (h *Hook) BaseStamp() string {
	fi, err := os.Stat(h.File)
	if h.File == "" || err != nil {
		return ""
	}
	return fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
}

var _ Installer = (*Hook)(nil)

func (h *Hook) run(ctx context.Context, args ...string) (string, error) {
	timeout := h.Timeout
	if timeout == 0 {
		timeout = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, h.Path, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %v: %s", h.Path, args[0], err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

func (h *Hook) Install(ctx context.Context, m proto.Manifest, artifact string) error {
	_, err := h.run(ctx, "install", artifact, m.Version)
	return err
}

// Activate: the hook's install has already started the build.
func (h *Hook) Activate(ctx context.Context, m proto.Manifest) error { return nil }

func (h *Hook) Check(ctx context.Context, m proto.Manifest) error {
	_, err := h.run(ctx, "check", m.Version)
	return err
}

func (h *Hook) Commit(ctx context.Context, m proto.Manifest) error {
	_, err := h.run(ctx, "commit", m.Version)
	return err
}

func (h *Hook) Rollback(ctx context.Context, m proto.Manifest) error {
	_, err := h.run(ctx, "rollback", m.Version)
	return err
}

// Current is the payload's running version.
func (h *Hook) Current(ctx context.Context) (string, error) { return h.run(ctx, "current") }

func (h *Hook) Running(m proto.Manifest) bool {
	v, err := h.Current(context.Background())
	return err == nil && v == m.Version
}

func (h *Hook) Installed(m proto.Manifest) bool { return h.Running(m) }
