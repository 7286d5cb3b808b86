package e2e

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/mavlink"
	"github.com/hangarfleet/hangar/agent/mavlink/mavlinktest"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// TestRealAgentMAVLink: the real agent reads a flight controller over
// MAVLink (a simulated PX4 at 50 Hz). Its telemetry follows the vehicle
// (battery, position, flight state) and it reports the flight
// controller's firmware; an update offered while the vehicle flies
// defers, saying why, through take-off, flight and landing, and installs
// once the vehicle has landed and disarmed; when the flight controller
// goes silent, the next update defers as "flight state unknown".
func TestRealAgentMAVLink(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	v1 := buildAgent(t, "1.0.0")
	v2 := buildAgent(t, "1.1.0")
	v3 := buildAgent(t, "1.2.0")
	fc, err := mavlinktest.Start(mavlinktest.Options{Autopilot: mavlinktest.AutopilotPX4, Type: mavlinktest.TypeQuadrotor})
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	installed := filepath.Join(t.TempDir(), "opt", "hangar-agent")
	copyExe(t, v1, installed)
	sup := supervise(t, installed, []string{"--server", cp.URL(), "--enroll-token", cp.enrollToken(t), "--device-id", "drone-1",
		"--hardware", "rev-b", "--state-dir", t.TempDir(), "--flight-input", "", "--root-key", kit.rootPub,
		"--mavlink", "udp-client://" + fc.Addr(), "--mavlink-heartbeat-timeout", "2s", "--min-battery", "20",
		"--trial-deadline", "20s", "--trial-soak", "2s", "--sample-interval", "200ms", "--heartbeat", "1s", "--log-level", "info"},
		nil)
	ctx := context.Background()
	device := func() store.Device { d, _ := cp.Store().Device(ctx, "drone-1"); return d }
	waitFor(t, 30*time.Second, "telemetry from the vehicle, and its firmware", func() (bool, string) {
		d := device()
		l := d.Latest
		return d.Online && l != nil && l.Flight == "landed" && l.BatteryPct != nil && *l.BatteryPct == 95 && l.Lat != nil &&
			d.Payloads["fc-firmware"] == mavlinktest.Firmware, fmt.Sprintf("%+v payloads %v", l, d.Payloads)
	})

	// Armed, then in the air: the offer waits, and says why.
	kit.release(t, cp, v2, "1.1.0", 110)
	fc.Set(func(s *mavlinktest.State) { s.Armed = true })
	waitFor(t, 10*time.Second, "armed in the telemetry", func() (bool, string) {
		l := device().Latest
		return l != nil && l.Flight == "armed", fmt.Sprintf("%+v", l)
	})
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.1.0", "--token-file", adminTokenFile(cp))
	deferred := func(counter uint64, why string) {
		t.Helper()
		waitFor(t, 30*time.Second, "deferred: "+why, func() (bool, string) {
			u, _ := updateState(cp, "drone-1", counter)
			return u.State == "deferred" && strings.Contains(u.Reason, why), u.State + " " + u.Reason
		})
	}
	deferred(110, "armed")
	for _, step := range []struct {
		landed uint64
		why    string
	}{{mavlink.LandedTakeoff, "taking off"}, {mavlink.LandedInAir, "in the air"}, {mavlink.LandedLanding, "landing"}} {
		fc.Set(func(s *mavlinktest.State) { s.Landed, s.Battery = step.landed, s.Battery-15 })
		deferred(110, step.why)
	}
	waitFor(t, 10*time.Second, "the battery drained in the telemetry", func() (bool, string) {
		l := device().Latest
		return l != nil && l.BatteryPct != nil && *l.BatteryPct == 50 && l.Flight == "flying", fmt.Sprintf("%+v", l)
	})
	// Landed and disarmed: it installs.
	fc.Set(func(s *mavlinktest.State) { s.Landed = mavlink.LandedOnGround })
	deferred(110, "armed")
	landedAt := time.Now()
	fc.Set(func(s *mavlinktest.State) { s.Armed = false })
	var installStart time.Duration
	waitFor(t, 90*time.Second, "1.1.0 committed after landing", func() (bool, string) {
		u, _ := updateState(cp, "drone-1", 110)
		if installStart == 0 && (u.State == "installing" || u.State == "trial" || u.State == "committed") {
			installStart = time.Since(landedAt)
		}
		return u.State == "committed" && device().Version == "1.1.0", u.State + " " + u.Reason
	})
	t.Logf("disarmed and landed to install started (as the control plane heard it): %v", installStart.Round(time.Millisecond))
	if !sameFile(t, installed, v2) {
		t.Fatal("the installed binary is not 1.1.0")
	}

	// The flight controller goes silent: the flight state is unknown, and
	// the next update waits for it.
	fc.Set(func(s *mavlinktest.State) { s.Beat = false })
	waitFor(t, 10*time.Second, "the link loss in the telemetry", func() (bool, string) {
		l := device().Latest
		return l != nil && l.Flight == "unknown" && l.Ext["fc_link_losses"] >= 1, fmt.Sprintf("%+v", l)
	})
	kit.release(t, cp, v3, "1.2.0", 120)
	kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", "1.2.0", "--token-file", adminTokenFile(cp))
	deferred(120, "flight state unknown: no heartbeat from the flight controller")
	if !sameFile(t, installed, v2) {
		t.Fatal("1.2.0 installed without a flight controller")
	}
	evs, _ := cp.Store().Events(ctx, "drone-1", 0, 10000)
	lost := false
	for _, e := range evs {
		if e.Code == "fc_link_lost" {
			lost = true
		}
	}
	if !lost {
		t.Error("the loss of the flight controller is not among the device's events")
	}
	_ = sup
}
