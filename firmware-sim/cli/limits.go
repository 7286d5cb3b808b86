package cli

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/firmware-sim/scenario"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// systemLimits reads the descriptor limit and the ephemeral port range
// (what cannot be read is left 0: not checked).
func systemLimits() sim.Limits {
	var lim sim.Limits
	if soft, hard, ok := fileLimit(); ok {
		lim.FilesSoft, lim.FilesHard = soft, hard
	}
	if ports, text, err := sim.ReadPortRange(); err == nil {
		lim.Ports, lim.PortRange = ports, text
	}
	return lim
}

// checkLimits refuses a fleet the process cannot hold (descriptors,
// ephemeral ports), before anything starts; it raises the soft descriptor
// limit to the hard one when that is enough.
func checkLimits(load sim.Load) error {
	raise, err := sim.CheckLimits(systemLimits(), load)
	if err != nil {
		return err
	}
	if raise > 0 {
		if err := raiseFileLimit(); err != nil {
			return fmt.Errorf("raise the descriptor limit to %d: %w", raise, err)
		}
	}
	return nil
}

// scenarioLoad is what `hangar-sim run` starts in this process for s.
func scenarioLoad(s scenario.Scenario, o scenario.Options) sim.Load {
	l := sim.Load{Devices: s.Fleet.Devices, MemoryOutbox: s.Fleet.MemoryOutbox, SourceAddrs: len(o.SourceAddrs),
		ControlPlane: o.Server == "", Scenario: true}
	if o.Devices > 0 {
		l.Devices = o.Devices
	}
	// The runner puts its link proxies between the drones and a control
	// plane it started when the timeline has link faults (scenario's
	// linkFaults).
	for _, st := range s.Timeline {
		if o.Server == "" && (st.LinkLoss != nil || st.SlowLink != nil) {
			l.Proxied = true
		}
	}
	l.Downloads = scenarioDownloads(s)
	return l
}

// scenarioDownloads bounds the downloads in flight: each rollout offers an
// update to at most its --max-in-flight drones at a time (counted twice
// when it may be reverted: the revert is a rollout too).
func scenarioDownloads(s scenario.Scenario) int {
	reverted := map[string]bool{}
	for _, st := range s.Timeline {
		if st.Revert != "" {
			reverted[st.Revert] = true
		}
	}
	n := 0
	for _, st := range s.Timeline {
		r := st.Rollout
		if r == nil {
			continue
		}
		inFlight := rollout.DefaultLimits.MaxInFlight
		for i, a := range r.Args {
			name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
			if name != "max-in-flight" {
				continue
			}
			if !hasVal && i+1 < len(r.Args) {
				val = r.Args[i+1]
			}
			if v, err := strconv.Atoi(val); err == nil && v > 0 {
				inFlight = v
			}
		}
		if reverted[r.Name] || r.RevertRelease != "" || slices.ContainsFunc(r.Args, func(a string) bool { return strings.TrimLeft(a, "-") == "auto-revert" }) {
			inFlight *= 2
		}
		n += inFlight
	}
	return n
}
