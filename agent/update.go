package agent

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// UpdateOptions turn on signed updates. Without root keys the agent
// refuses every offer.
type UpdateOptions struct {
	Roots []ed25519.PublicKey
	// BuildTime: the agent never trusts a clock that reads earlier.
	BuildTime time.Time
	// ExePath is the agent's binary (default: os.Executable).
	ExePath     string
	RestartMode update.RestartMode
	Policy      update.Policy
	// Hooks install named payloads: target -> executable (see update.Hook);
	// HookFiles name their installed files, which deltas patch.
	Hooks     map[string]string
	HookFiles map[string]string
	// NoDelta takes full artifacts only.
	NoDelta       bool
	TrialDeadline time.Duration
	TrialSoak     time.Duration
	MaxTrialBoots int
	// Installers replace the defaults (the simulator installs simulated
	// firmware); keys are targets.
	Installers map[string]update.Installer
	// Guard is the trial guard the agent runs under (the daemon reads it
	// from the environment the guard sets).
	Guard update.Guard
}

// PayloadGuard is the payload name under which the agent reports the
// version of the trial guard it runs under.
const PayloadGuard = "hangar-guard"

func (a *Agent) setupUpdater() error {
	uo := a.opts.Update
	if uo == nil || len(uo.Roots) == 0 {
		return nil
	}
	installers := map[string]update.Installer{}
	for target, hook := range uo.Hooks {
		installers[target] = &update.Hook{Path: hook, File: uo.HookFiles[target]}
	}
	if _, ok := uo.Installers[proto.TargetAgent]; !ok {
		exe := uo.ExePath
		if exe == "" {
			var err error
			if exe, err = os.Executable(); err != nil {
				return fmt.Errorf("update: %w", err)
			}
			if exe, err = filepath.EvalSymlinks(exe); err != nil {
				return fmt.Errorf("update: %w", err)
			}
		}
		deadline := uo.TrialDeadline
		if deadline <= 0 {
			deadline = update.DefaultTrialDeadline
		}
		installers[proto.TargetAgent] = &update.Binary{Path: exe, Version: a.opts.Version, Mode: uo.RestartMode, Guard: uo.Guard,
			MaxStarts: uo.MaxTrialBoots, TrialTime: deadline + update.GuardGrace(deadline)}
	}
	for t, in := range uo.Installers {
		installers[t] = in
	}
	stateDir := a.opts.StateDir
	// Downloads have no deadline of their own: a big artifact on a slow
	// link takes as long as it takes. The downloader ends an attempt that
	// receives nothing for a minute instead (and resumes it).
	dl := *a.opts.HTTPClient
	dl.Timeout = 0
	u, err := update.New(update.Options{
		Roots: uo.Roots, Hardware: a.opts.Hardware, BuildTime: uo.BuildTime, Store: a.store,
		Dir: filepath.Join(stateDir, "staging"), Clock: a.clk, HTTP: &dl, BaseURL: a.opts.ServerURL,
		Auth: a.authorize, Installers: installers, Report: a.reportUpdate, Conditions: a.conditions,
		Policy: uo.Policy, NoDelta: uo.NoDelta, SelfTest: a.selfTest, TrialDeadline: uo.TrialDeadline, TrialSoak: uo.TrialSoak, MaxTrialBoots: uo.MaxTrialBoots,
		Logger: a.opts.Logger.With("device", a.opts.DeviceID),
	})
	if err != nil {
		return err
	}
	a.updater = u
	return nil
}

// authorize adds the device's credential to artifact downloads.
func (a *Agent) authorize(r *http.Request) {
	a.mu.Lock()
	c := a.cred
	a.mu.Unlock()
	if c != nil && c.Password != "" {
		r.SetBasicAuth(c.Username, c.Password)
	}
	// A device with a certificate presents it in the TLS handshake.
}

// Hello has the agent send its state again now: what it reports of
// itself changed (a payload's version).
func (a *Agent) Hello() {
	select {
	case a.helloNow <- struct{}{}:
	default:
	}
}

func (a *Agent) reportUpdate(r proto.UpdateReport, cmd string) {
	sev := proto.SevInfo
	switch r.State {
	case proto.UpdateRejected, proto.UpdateFailed:
		sev = proto.SevWarning
	case proto.UpdateRolledBack:
		sev = proto.SevCritical
	}
	a.Emit(proto.Event{Kind: proto.EventUpdate, Severity: sev, Code: "update_" + string(r.State), Cmd: cmd, Update: &r, Message: r.Reason})
	if r.State == proto.UpdateCommitted {
		select {
		case a.helloNow <- struct{}{}:
		default:
		}
	}
}

func (a *Agent) conditions() update.Conditions {
	s := a.latest.Load()
	if fs, ok := a.opts.Sensors.(FlightSource); ok {
		if f, why, battery, ok := fs.FlightNow(a.clk.Now()); ok {
			if battery == nil && s != nil {
				battery = s.Battery // the flight controller does not know it: the board might
			}
			return update.Conditions{Flight: f, Why: why, Battery: battery}
		}
	}
	if s == nil {
		return update.Conditions{}
	}
	return update.Conditions{Flight: s.Flight, Battery: s.Battery}
}

// selfTest is the agent's part of a new build's health check: its state
// directory takes writes and its outbox works.
func (a *Agent) selfTest(ctx context.Context) error {
	probe := strconv.FormatInt(time.Now().UnixNano(), 10)
	if err := a.store.Save("selftest", []byte(probe)); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if b, err := a.store.Load("selftest"); err != nil || string(b) != probe {
		return fmt.Errorf("state directory reads back %q: %v", b, err)
	}
	if _, err := a.box.Peek(1); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	if !a.Connected() {
		return errors.New("not connected to the broker")
	}
	return nil
}

// builds are the digests of the files in place and the largest build the
// agent patches, for the state message.
func (a *Agent) builds() (map[string][]byte, uint64) {
	if a.updater == nil {
		return nil, 0
	}
	b := a.updater.Builds()
	if len(b) == 0 {
		b = nil
	}
	return b, a.updater.DeltaCap()
}

// Installed reports the installed release counter of the agent and the
// versions of payloads, for the state message.
func (a *Agent) installed() (uint64, map[string]string) {
	if a.updater == nil {
		return 0, nil
	}
	var payloads map[string]string
	for t, in := range a.updater.Installed() {
		if t == proto.TargetAgent {
			continue
		}
		if payloads == nil {
			payloads = map[string]string{}
		}
		payloads[t] = in.Version
	}
	if pr, ok := a.opts.Sensors.(PayloadReporter); ok {
		for t, v := range pr.Payloads() {
			if _, installed := payloads[t]; !installed && v != "" {
				if payloads == nil {
					payloads = map[string]string{}
				}
				payloads[t] = v
			}
		}
	}
	if v := a.opts.Update.Guard.Version; v != "" {
		if payloads == nil {
			payloads = map[string]string{}
		}
		payloads[PayloadGuard] = v
	}
	return a.updater.AgentCounter(), payloads
}
