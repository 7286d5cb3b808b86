package sim

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// firmwareState is a simulated drone's flash: the build it boots, and the
// previous one kept for rollback. It lives in the drone's state directory,
// so it survives simulated power cuts.
type firmwareState struct {
	Current  Firmware  `json:"current"`
	Previous *Firmware `json:"previous,omitempty"`
}

// installer is the simulated drone's update.Installer for the agent
// target: the real update sequence runs (verification, download, trial,
// commit, rollback); only the swap and the reboot are simulated.
type installer struct {
	path string // firmware state file
	mu   sync.Mutex
	st   firmwareState
	// running is the build this agent instance runs.
	running Firmware
	hw      string // the drone's hardware: a build may misbehave on one revision only
	// rot: the flash decays once its build's digest was taken (the first
	// read): later reads see a flipped byte.
	rot   bool
	reads int
}

var (
	_ update.Installer = (*installer)(nil)
	_ update.Patchable = (*installer)(nil)
)

// Base is the artifact of the build in flash: what a delta patches.
func (in *installer) Base() (io.ReadCloser, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	b := in.st.Current.Artifact()
	if in.rot && in.reads > 0 && len(b) > 0 {
		b[len(b)/2] ^= 0x10
	}
	in.reads++
	return io.NopCloser(bytes.NewReader(b)), nil
}

// BaseStamp names the build in flash (decay does not change it).
func (in *installer) BaseStamp() string { return in.current().Version }

func loadFirmware(dir string, factory Firmware) (*installer, error) {
	in := &installer{path: filepath.Join(dir, "sim-firmware.json"), st: firmwareState{Current: factory}}
	b, err := os.ReadFile(in.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		if err := in.save(); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	default:
		if err := json.Unmarshal(b, &in.st); err != nil {
			return nil, fmt.Errorf("simulated flash: %w", err)
		}
	}
	in.running = in.st.Current
	return in, nil
}

func (in *installer) save() error {
	b, _ := json.Marshal(in.st)
	tmp := in.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, in.path)
}

// current is the build the drone boots.
func (in *installer) current() Firmware {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.st.Current
}

func (in *installer) Install(ctx context.Context, m proto.Manifest, artifact string) error {
	b, err := os.ReadFile(artifact)
	if err != nil {
		return err
	}
	fw, err := ParseArtifact(b)
	if err != nil {
		return &proto.VerifyError{Check: proto.CheckSmoke, Err: err}
	}
	if fw.Version != m.Version {
		return &proto.VerifyError{Check: proto.CheckSmoke, Err: fmt.Errorf("the build says it is %s, the manifest %s", fw.Version, m.Version)}
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	prev := in.st.Current
	in.st.Previous, in.st.Current = &prev, fw
	return in.save()
}

// Activate "reboots" into the installed build: the agent stops and the
// drone starts it again with what is now in flash.
func (in *installer) Activate(ctx context.Context, m proto.Manifest) error { return update.ErrRestart }

func (in *installer) Check(ctx context.Context, m proto.Manifest) error {
	if in.running.On(in.hw).Behaviour == FailHealth {
		return errors.New("simulated build fails its health check")
	}
	return nil
}

func (in *installer) Commit(ctx context.Context, m proto.Manifest) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.st.Previous = nil
	return in.save()
}

func (in *installer) Rollback(ctx context.Context, m proto.Manifest) error {
	in.mu.Lock()
	if in.st.Previous != nil {
		in.st.Current, in.st.Previous = *in.st.Previous, nil
		if err := in.save(); err != nil {
			in.mu.Unlock()
			return err
		}
	}
	running := in.running.Version
	in.mu.Unlock()
	if running == m.Version {
		return update.ErrRestart // reboot into the restored build
	}
	return nil
}

func (in *installer) Running(m proto.Manifest) bool { return in.running.Version == m.Version }

func (in *installer) Installed(m proto.Manifest) bool { return in.current().Version == m.Version }
