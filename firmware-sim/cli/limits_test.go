package cli

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/firmware-sim/scenario"
)

// The real entry point refuses a fleet above the descriptor limit before
// it starts anything: no drone (plain mode), no control plane (run mode:
// the hangar binary given does not exist, and the error is not about it).
func TestRunRefusesFleetAboveDescriptorLimit(t *testing.T) {
	_, hard, ok := fileLimit()
	if !ok {
		t.Skip("no RLIMIT_NOFILE here")
	}
	if hard > 1<<30 {
		t.Skipf("descriptor limit %d: no fleet is above it", hard)
	}
	devices := strconv.FormatUint(hard+1, 10) // one descriptor per drone at least
	for _, c := range []struct {
		name string
		args []string
		want []string
	}{
		{"plain", []string{"--devices", devices, "--memory-outbox", "--server", "http://127.0.0.1:1", "--enroll-token", "x", "--state-dir", t.TempDir()},
			[]string{"drones do not fit in one hangar-sim process", "File descriptors", "ulimit -n", "--prefix"}},
		{"disk outbox", []string{"--devices", devices, "--server", "http://127.0.0.1:1", "--enroll-token", "x", "--state-dir", t.TempDir()},
			[]string{"drones do not fit in one hangar-sim process", "6 per drone with the on-disk outbox", "--memory-outbox: 1 descriptor per drone instead of 6"}},
		{"scenario", []string{"run", "../scenarios/broker-restart.yaml", "--devices", devices, "--hangar", "/nonexistent/hangar",
			"--work-dir", t.TempDir(), "--out", t.TempDir()},
			[]string{"drones do not fit in one hangar-sim process", "the control plane (a child process, same limit)", "ulimit -n", "--devices"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Bounded, should the check let the fleet through.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var stdout, stderr bytes.Buffer
			err := Run(ctx, c.args, &stdout, &stderr)
			if err == nil {
				t.Fatalf("Run accepted %s drones; stdout:\n%s", devices, stdout.String())
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if stdout.Len() > 0 {
				t.Errorf("something started:\n%s", stdout.String())
			}
		})
	}
}

func TestScenarioLoad(t *testing.T) {
	for _, c := range []struct {
		file      string
		downloads int
		proxied   bool
	}{
		{"broker-restart.yaml", 0, false},
		{"good-release.yaml", 300, false},
		{"auto-revert.yaml", 200, false}, // the default 100 in flight, twice: its revert
		{"link-loss-and-power-cuts.yaml", 300, true},
	} {
		s, err := scenario.Load("../scenarios/" + c.file)
		if err != nil {
			t.Fatal(err)
		}
		l := scenarioLoad(s, scenario.Options{})
		if l.Downloads != c.downloads || l.Proxied != c.proxied || !l.ControlPlane || !l.Scenario || l.Devices != s.Fleet.Devices {
			t.Errorf("%s: %+v; want %d downloads, proxied %v", c.file, l, c.downloads, c.proxied)
		}
	}
	s, err := scenario.Load("../scenarios/link-loss-and-power-cuts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	o := scenario.Options{Server: "http://127.0.0.1:8080", Devices: 50, SourceAddrs: []string{"127.0.0.2", "127.0.0.3"}}
	if l := scenarioLoad(s, o); l.Proxied || l.ControlPlane || l.Devices != 50 || l.SourceAddrs != 2 {
		t.Errorf("with --server, --devices and --source-addrs: %+v", l)
	}
}
