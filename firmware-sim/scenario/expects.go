package scenario

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
)

// An expectation is one thing a scenario requires; each kind is one type
// that says itself, names the rollouts it refers to, checks itself and
// judges the run. Expectation is only its YAML envelope; kinds maps it.
type expectation interface {
	describe() string
	refs() []string
	check() error
	judge(r *runner, rep *Report, n int, res *Result)
}

// kinds are the expectations an Expectation names (exactly one in a valid
// one).
func (e Expectation) kinds() []expectation {
	var out []expectation
	add := func(set bool, x expectation) {
		if set {
			out = append(out, x)
		}
	}
	add(e.RolloutStatus != nil, rolloutStatusExp{e.RolloutStatus})
	add(e.NeverOutsideCanary != nil, neverOutsideCanaryExp{e.NeverOutsideCanary})
	add(e.AtMostRan != nil, atMostRanExp{e.AtMostRan})
	add(e.AllOn != nil, allOnExp{e.AllOn})
	add(e.CanaryBackOn != nil, canaryBackExp{e.CanaryBackOn})
	add(e.NoneBricked, noneBrickedExp{})
	add(e.ReconnectWithin != 0, reconnectExp{e.ReconnectWithin})
	add(e.ConnectRateAtMost != 0, connectRateExp{e.ConnectRateAtMost})
	add(e.HostileContained, hostileExp{})
	add(e.NoneLost, noneLostExp{})
	add(e.FakesExcluded, fakesExcludedExp{})
	add(e.NoneFailed != "", noneFailedExp{e.NoneFailed})
	add(e.Deltas != nil, deltasExp{e.Deltas})
	add(e.InstalledOnGround, onGroundExp{})
	return out
}

// String says an expectation in words.
func (e Expectation) String() string {
	if ks := e.kinds(); len(ks) == 1 {
		return ks[0].describe()
	}
	return "?"
}

type rolloutStatusExp struct {
	*RolloutStatus
}

func (x rolloutStatusExp) describe() string {
	return fmt.Sprintf("rollout %s ends %s", x.RolloutStatus.Rollout, x.RolloutStatus.Status)
}

func (x rolloutStatusExp) refs() []string { return []string{x.Rollout} }

func (x rolloutStatusExp) check() error {
	if !slices.Contains([]string{"completed", "aborted", "paused", "running"}, x.Status) {
		return fmt.Errorf("status %q", x.Status)
	}
	return nil
}

func (x rolloutStatusExp) judge(r *runner, rep *Report, n int, res *Result) {
	got := rep.Rollouts[x.RolloutStatus.Rollout]
	res.OK = got.Status == x.RolloutStatus.Status
	res.Detail = fmt.Sprintf("%s at stage %d: %s", got.Status, got.Stage, got.Reason)
}

type neverOutsideCanaryExp struct {
	*RolloutVersion
}

func (x neverOutsideCanaryExp) describe() string {
	if x.Hardware != "" {
		return fmt.Sprintf("no %s device outside the canary of %s ever runs %s", x.RolloutVersion.Hardware, x.RolloutVersion.Rollout, x.RolloutVersion.Version)
	}
	return fmt.Sprintf("no device outside the canary of %s ever runs %s", x.RolloutVersion.Rollout, x.RolloutVersion.Version)
}

func (x neverOutsideCanaryExp) refs() []string { return []string{x.Rollout} }

func (neverOutsideCanaryExp) check() error { return nil }

func (x neverOutsideCanaryExp) judge(r *runner, rep *Report, n int, res *Result) {
	canary := rep.Rollouts[x.RolloutVersion.Rollout].Canary
	want := x.RolloutVersion.Hardware
	hw := r.hardware()
	var outside []string
	ran, inCanary := 0, 0
	for dev := range r.ran[x.RolloutVersion.Version] {
		if want != "" && hw[dev] != want {
			continue
		}
		ran++
		if !slices.Contains(canary, dev) {
			outside = append(outside, dev)
		}
	}
	for _, dev := range canary {
		if want == "" || hw[dev] == want {
			inCanary++
		}
	}
	slices.Sort(outside)
	res.OK = len(outside) == 0
	what := "devices"
	if want != "" {
		what = want + " devices"
	}
	res.Detail = fmt.Sprintf("%d %s ran it; the canary holds %d %s", ran, what, inCanary, what)
	if !res.OK {
		res.Detail += fmt.Sprintf("; outside the canary: %v", outside[:min(10, len(outside))])
	}
}

type atMostRanExp struct {
	*VersionShare
}

func (x atMostRanExp) describe() string {
	return fmt.Sprintf("at most %g%% of the fleet ever runs %s", x.VersionShare.Percent, x.VersionShare.Version)
}

func (_ atMostRanExp) refs() []string { return nil }

func (atMostRanExp) check() error { return nil }

func (x atMostRanExp) judge(r *runner, rep *Report, n int, res *Result) {
	ran := len(r.ran[x.VersionShare.Version])
	pct := 100 * float64(ran) / float64(n)
	res.OK = pct <= x.VersionShare.Percent
	res.Detail = fmt.Sprintf("%d of %d drones (%.2f%%)", ran, n, pct)
}

type allOnExp struct {
	*VersionWithin
}

func (x allOnExp) describe() string {
	return fmt.Sprintf("every drone runs %s within %v", x.VersionWithin.Version, time.Duration(x.VersionWithin.Within))
}

func (_ allOnExp) refs() []string { return nil }

func (allOnExp) check() error { return nil }

func (x allOnExp) judge(r *runner, rep *Report, n int, res *Result) {
	// From some moment within the time to the end of the run.
	from := -1
	for i := len(rep.Samples) - 1; i >= 0 && rep.Samples[i].Versions[x.VersionWithin.Version] == n; i-- {
		from = i
	}
	switch {
	case from < 0 && len(rep.Samples) > 0:
		res.OK, res.Detail = false, fmt.Sprintf("not at the end: %v (at most %d of %d at once)",
			rep.Samples[len(rep.Samples)-1].Versions, maxOn(rep.Samples, x.VersionWithin.Version), n)
	case from < 0:
		res.OK, res.Detail = false, "no samples"
	default:
		at := rep.Samples[from].At
		res.OK = at <= time.Duration(x.VersionWithin.Within).Seconds()
		res.Detail = fmt.Sprintf("all %d from %.1f s to the end", n, at)
	}
}

type canaryBackExp struct {
	*CanaryBack
}

func (x canaryBackExp) describe() string {
	return fmt.Sprintf("every canary device of %s that ran %s runs %s at the end", x.CanaryBack.Rollout, x.CanaryBack.Version, x.CanaryBack.Now)
}

func (x canaryBackExp) refs() []string { return []string{x.Rollout} }

func (canaryBackExp) check() error { return nil }

func (x canaryBackExp) judge(r *runner, rep *Report, n int, res *Result) {
	canary := rep.Rollouts[x.CanaryBack.Rollout].Canary
	var wrong []string
	took := 0
	for _, d := range r.fleet.Drones() {
		if _, ran := r.ran[x.CanaryBack.Version][d.ID]; !ran || !slices.Contains(canary, d.ID) {
			continue
		}
		took++
		if v := d.Firmware().Version; v != x.CanaryBack.Now {
			wrong = append(wrong, d.ID+" on "+v)
		}
	}
	res.OK = len(wrong) == 0 && took > 0
	res.Detail = fmt.Sprintf("%d canary devices ran %s", took, x.CanaryBack.Version)
	if len(wrong) > 0 {
		res.Detail += fmt.Sprintf("; not back: %v", wrong[:min(10, len(wrong))])
	}
	if took == 0 {
		res.Detail += ": nothing to revert, the expectation tests nothing"
	}
}

type reconnectExp struct {
	within Duration
}

func (x reconnectExp) describe() string {
	return fmt.Sprintf("every drone reconnects within %v of a restart", time.Duration(x.within))
}

func (_ reconnectExp) refs() []string { return nil }

func (reconnectExp) check() error { return nil }

func (x reconnectExp) judge(r *runner, rep *Report, n int, res *Result) {
	res.OK = len(rep.Figures.Reconnects) > 0
	for _, d := range rep.Figures.Reconnects {
		if d > time.Duration(x.within).Seconds() {
			res.OK = false
		}
	}
	var took []string
	for _, d := range rep.Figures.Reconnects {
		took = append(took, fmt.Sprintf("%.1f s", d))
	}
	res.Detail = "every drone connected again after " + strings.Join(took, ", ")
	if len(rep.Figures.Reconnects) == 0 {
		res.Detail = "no restart in the timeline: nothing measured"
	}
}

type connectRateExp struct {
	limit int
}

func (x connectRateExp) describe() string {
	return fmt.Sprintf("the broker accepts at most %d connections a second", x.limit)
}

func (_ connectRateExp) refs() []string { return nil }

func (connectRateExp) check() error { return nil }

func (x connectRateExp) judge(r *runner, rep *Report, n int, res *Result) {
	// The broker counts accepts exactly; its pacing spaces them
	// 1/rate apart, so one more can fall at a window's edge.
	res.OK = len(rep.Figures.Reconnects) > 0 && rep.Figures.PeakConnectRate > 0 &&
		rep.Figures.PeakConnectRate <= x.limit+1
	res.Detail = fmt.Sprintf("at most %d connections accepted in any one second (limit %d)", rep.Figures.PeakConnectRate, x.limit)
}

type hostileExp struct{}

func (_ hostileExp) describe() string {
	return "the hostile device is contained and recorded"
}

func (_ hostileExp) refs() []string { return nil }

func (hostileExp) check() error { return nil }

func (_ hostileExp) judge(r *runner, rep *Report, n int, res *Result) {
	h := rep.Hostile
	switch {
	case h == nil:
		res.OK, res.Detail = false, "no hostile_device step ran"
	default:
		res.OK = h.Healthy && h.DecodeErrors >= 3 && h.ACLDenials >= 2 && h.AuthFailures >= 2
		res.Detail = fmt.Sprintf("healthy %v; recorded %.0f decode errors (want ≥ 3), %.0f ACL denials (≥ 2), %.0f auth failures (≥ 2) %s",
			h.Healthy, h.DecodeErrors, h.ACLDenials, h.AuthFailures, h.Detail)
	}
}

type noneLostExp struct{}

func (_ noneLostExp) describe() string {
	return "no message a drone sent is missing"
}

func (_ noneLostExp) refs() []string { return nil }

func (noneLostExp) check() error { return nil }

func (_ noneLostExp) judge(r *runner, rep *Report, n int, res *Result) {
	g := rep.Gaps
	res.OK = g != nil && g.Missing == 0 && g.Messages > 0
	if g != nil {
		res.Detail = fmt.Sprintf("%d messages stored from %d devices; %d missing on %d devices (outboxes dropped %d samples)",
			g.Messages, g.Devices, g.Missing, g.DevicesMissing, g.Dropped)
	}
}

type fakesExcludedExp struct{}

func (_ fakesExcludedExp) describe() string {
	return "no fake device is a member of a rollout or runs a build"
}

func (_ fakesExcludedExp) refs() []string { return nil }

func (fakesExcludedExp) check() error { return nil }

func (_ fakesExcludedExp) judge(r *runner, rep *Report, n int, res *Result) {
	var members []string
	for _, rr := range rep.Rollouts {
		members = append(members, rr.Fakes...)
	}
	var ran []string
	for v, devs := range r.ran {
		if v == r.s.Fleet.Version {
			continue
		}
		for dev := range devs {
			if r.isFake(dev) {
				ran = append(ran, dev+" ran "+v)
			}
		}
	}
	fakes := 0
	for _, f := range r.fakes {
		fakes += len(f.Drones())
	}
	res.OK = fakes > 0 && len(members) == 0 && len(ran) == 0
	res.Detail = fmt.Sprintf("%d fakes enrolled; %d rollout memberships, %d builds run", fakes, len(members), len(ran))
	if fakes == 0 {
		res.Detail += ": no fakes step ran, the expectation tests nothing"
	}
}

type noneFailedExp struct {
	rollout string
}

func (x noneFailedExp) describe() string {
	return fmt.Sprintf("no member of %s failed or timed out", x.rollout)
}

func (x noneFailedExp) refs() []string { return []string{x.rollout} }

func (noneFailedExp) check() error { return nil }

func (x noneFailedExp) judge(r *runner, rep *Report, n int, res *Result) {
	rr := rep.Rollouts[x.rollout]
	bad := rr.Members[rollout.MFailed] + rr.Members[rollout.MTimedOut]
	res.OK = len(rr.Members) > 0 && bad == 0
	res.Detail = fmt.Sprintf("members %v", rr.Members)
}

type noneBrickedExp struct{}

func (_ noneBrickedExp) describe() string {
	return "no drone is bricked"
}

func (_ noneBrickedExp) refs() []string { return nil }

func (noneBrickedExp) check() error { return nil }

func (_ noneBrickedExp) judge(r *runner, rep *Report, n int, res *Result) {
	res.OK = len(rep.Bricked) == 0
	res.Detail = fmt.Sprintf("%d bricked", len(rep.Bricked))
}

type deltasExp struct{ *DeltaCounts }

func (x deltasExp) describe() string {
	return fmt.Sprintf("in %s at least %d members fetch a delta, %d the full artifact, %d fall back, and deltas save bytes",
		x.Rollout, x.MinDelta, x.MinFull, x.MinFallback)
}

func (x deltasExp) refs() []string { return []string{x.Rollout} }

func (x deltasExp) check() error {
	if x.MinDelta < 0 || x.MinFull < 0 || x.MinFallback < 0 {
		return fmt.Errorf("negative count")
	}
	return nil
}

func (x deltasExp) judge(r *runner, rep *Report, n int, res *Result) {
	tr := rep.Rollouts[x.Rollout].Transfer
	res.OK = tr.Delta >= x.MinDelta && tr.Full >= x.MinFull && tr.Fallback >= x.MinFallback && tr.Saved > 0
	res.Detail = fmt.Sprintf("%d delta (%d bytes), %d full (%d bytes), %d fell back; %d bytes saved", tr.Delta, tr.DeltaBytes, tr.Full, tr.FullBytes, tr.Fallback, tr.Saved)
}

type onGroundExp struct{}

func (onGroundExp) describe() string {
	return "no drone boots a new build while it flies, and the drones that flew install after landing"
}

func (onGroundExp) refs() []string { return nil }

func (onGroundExp) check() error { return nil }

func (onGroundExp) judge(r *runner, rep *Report, n int, res *Result) {
	r.mu.Lock()
	defer r.mu.Unlock()
	res.OK = len(r.flyingBoots) == 0 && len(r.flights) > 0
	waited := 0
	for dev, lands := range r.flights {
		if at, ok := r.firstNewBoot[dev]; ok && at.After(lands) {
			waited++
		} else {
			res.OK = false
		}
	}
	res.Detail = fmt.Sprintf("%d of %d drones that flew installed after landing; %d boots of a new build in flight %v",
		waited, len(r.flights), len(r.flyingBoots), r.flyingBoots)
}
