package client

import (
	"flag"
	"fmt"
	"strings"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/wire"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// RolloutFlags declares the flags of a rollout (hangar rollout create's,
// and a scenario's rollout step's args) on fs; the function it returns
// makes the request from them once fs is parsed.
func RolloutFlags(fs *flag.FlagSet) func() (wire.CreateRollout, error) {
	var req wire.CreateRollout
	var budgets, windows, from listFlag
	d := rollout.DefaultGates
	fs.StringVar(&req.Release, "release", "", "release to roll out: VERSION or TARGET@VERSION")
	fs.StringVar(&req.RevertRelease, "revert-release", "", "signed re-release of the previous build (higher counter), offered to updated devices on revert")
	fs.StringVar(&req.Selector, "selector", "", "target devices with these labels, e.g. hw=rev-b,base=zurich")
	fs.Var(&from, "from-version", "only devices running this version (repeat)")
	fs.StringVar(&req.Stages, "stages", "1%,10%,50%,100%", "cumulative stages: percentages or device counts")
	fs.IntVar(&req.MinCanary, "min-canary", rollout.DefaultMinCanary, "smallest first stage")
	fs.Float64Var(&req.Gates.MinCommitted, "min-committed", d.MinCommitted, "share of a stage's devices that must commit")
	fs.Float64Var(&req.Gates.MaxFailed, "max-failed", d.MaxFailed, "share of finished devices that may fail or roll back")
	fs.IntVar(&req.Gates.MinFinished, "min-finished", d.MinFinished, "finished devices before failures are judged")
	soak := fs.Duration("soak", d.Soak.D(), "time a stage runs, healthy, before the next starts")
	fs.Float64Var(&req.Gates.HealthMargin, "health-margin", d.HealthMargin, "how much worse (0.5 = 50%) the updated devices may be than the others")
	fs.BoolVar(&req.Gates.HealthOff, "no-health", false, "do not compare health")
	timeout := fs.Duration("device-timeout", d.DeviceTimeout.D(), "a device silent this long after acknowledging the offer (no report) counts as failed (timed out)")
	replace := fs.Duration("replace-after", d.ReplaceAfter.D(), "a canary member unreachable this long is replaced by a reachable device of its stratum")
	offline := fs.Duration("offline-deadline", rollout.DefaultLimits.OfflineDeadline.D(), "after completing, go on offering the release to members that come back for this long")
	fs.IntVar(&req.MaxInFlight, "max-in-flight", rollout.DefaultLimits.MaxInFlight, "devices updating at once, at most")
	fs.Var(&budgets, "budget", "keep devices of each value of a label ready: label:N or label:P% (repeat)")
	fs.Var(&windows, "window", "offer only in this UTC window, HH:MM-HH:MM (repeat)")
	deferred := fs.Duration("deferred-deadline", rollout.DefaultLimits.DeferredDeadline.D(), "after this, a deferred device counts as not done")
	fs.StringVar(&req.OnFailure, "on-failure", rollout.OnFailurePause, "pause or abort when a gate fails")
	fs.BoolVar(&req.AutoRevert, "auto-revert", false, "on failure, offer --revert-release to the devices that took the release")
	fs.BoolVar(&req.Full, "full", false, "offer full artifacts only, even to devices that could take a delta")
	fs.BoolVar(&req.DryRun, "dry-run", false, "show which devices each stage would take, create nothing")
	fs.BoolVar(&req.Start, "start", false, "start at once")
	fs.StringVar(&req.Reason, "reason", "", "why (recorded)")
	return func() (wire.CreateRollout, error) {
		if req.Release == "" {
			return req, fmt.Errorf("--release is required")
		}
		req.Gates.Soak, req.Gates.DeviceTimeout, req.DeferredDeadline = rollout.Duration(*soak), rollout.Duration(*timeout), rollout.Duration(*deferred)
		req.Gates.ReplaceAfter, req.OfflineDeadline = rollout.Duration(*replace), rollout.Duration(*offline)
		req.Budgets, req.Windows, req.FromVersions = budgets, windows, from
		return req, nil
	}
}

// RolloutArgs parses rollout flags given as arguments (a scenario's).
func RolloutArgs(args []string) (wire.CreateRollout, error) {
	fs := flag.NewFlagSet("rollout", flag.ContinueOnError)
	fs.SetOutput(new(strings.Builder))
	done := RolloutFlags(fs)
	if err := fs.Parse(args); err != nil {
		return wire.CreateRollout{}, err
	}
	if fs.NArg() > 0 {
		return wire.CreateRollout{}, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return done()
}
