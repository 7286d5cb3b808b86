package rollout

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Status of a rollout.
type Status string

// Statuses. Created: waiting for start. Running: offering and judging.
// Paused: judged, nothing offered, until resumed. Aborted and Completed
// are final (an aborted rollout may still be reverting).
const (
	StatusCreated   Status = "created"
	StatusRunning   Status = "running"
	StatusPaused    Status = "paused"
	StatusAborted   Status = "aborted"
	StatusCompleted Status = "completed"
)

// Final says whether no operator action can change the status any more.
func (s Status) Final() bool { return s == StatusAborted || s == StatusCompleted }

// Settled says whether planning st can change nothing any more: completed,
// or aborted longer than a device timeout ago (every offered device has
// finished or counts as timed out).
func (s Spec) Settled(st State, now time.Time) bool {
	switch st.Status {
	case StatusCompleted:
		return true
	case StatusAborted:
		return now.Sub(time.UnixMilli(st.Ended)) > s.WithDefaults().Gates.DeviceTimeout.D()
	}
	return false
}

// Member is a device's place in a rollout. It never changes stage.
type Member struct {
	Stage    int   `json:"stage"`
	Offered  int64 `json:"offered,omitempty"`  // unix ms the release was offered; 0 not yet
	Reverted int64 `json:"reverted,omitempty"` // unix ms the revert was offered
	Canceled int64 `json:"canceled,omitempty"` // unix ms the offer was withdrawn
}

// State is a rollout's progress; the applier persists it.
type State struct {
	Status       Status `json:"status"`
	Stage        int    `json:"stage"`         // the stage being rolled out (earlier ones passed)
	StageStarted int64  `json:"stage_started"` // unix ms
	GatesSince   int64  `json:"gates_since"`   // unix ms the gates (but the soak) first held in this stage
	Promoted     bool   `json:"promoted,omitempty"`
	Reverting    bool   `json:"reverting,omitempty"`
	Reason       string `json:"reason,omitempty"`
	// Ended is when the rollout became final (unix ms). An aborted
	// rollout is still planned for a device timeout after that, to
	// withdraw offers not yet installing and to revert late commits.
	Ended   int64              `json:"ended,omitempty"`
	Members map[string]*Member `json:"-"` // persisted per device
}

// Clone copies a state (members too).
func (s State) Clone() State {
	c := s
	c.Members = make(map[string]*Member, len(s.Members))
	all := make([]Member, len(s.Members)) // one allocation, not one per member
	i := 0
	for id, m := range s.Members {
		all[i] = *m
		c.Members[id] = &all[i]
		i++
	}
	return c
}

// Report is a device's latest update report for one release.
type Report struct {
	State  proto.UpdateState `json:"state"`
	At     int64             `json:"at"`
	Reason string            `json:"reason,omitempty"`
}

// Health is a device's telemetry over the health window.
type Health struct {
	Hours       float64 `json:"hours"`        // observed
	Reboots     float64 `json:"reboots"`      // reboot counter increase
	Errors      float64 `json:"errors"`       // error counter increase
	LinkLoss    float64 `json:"link_loss"`    // share of samples without link
	Samples     int     `json:"samples"`      // telemetry samples seen
	FlightHours float64 `json:"flight_hours"` // time flying
	Drain       float64 `json:"drain"`        // battery percent lost while flying
}

// Device is what the control plane knows of one device.
type Device struct {
	ID      string            `json:"id"`
	Labels  map[string]string `json:"labels"`
	Version string            `json:"version"`
	Online  bool              `json:"online"`
	// Busy names another active rollout this device belongs to.
	Busy   string  `json:"busy,omitempty"`
	Update *Report `json:"update,omitempty"` // for the release
	Revert *Report `json:"revert,omitempty"` // for the revert release
	Health *Health `json:"health,omitempty"` // over the current stage's soak
}

// Action kinds.
const (
	ActOffer  = "offer"
	ActRevert = "revert"
	ActCancel = "cancel"
)

// Action is a command for a device.
type Action struct {
	Kind   string `json:"kind"`
	Device string `json:"device"`
}

// Transition is a change of status or stage, recorded with its reason.
type Transition struct {
	From, To string
	Stage    int
	Reason   string
}

// Member states, as the engine sees them.
const (
	MPending   = "pending"
	MOffered   = "in_progress"
	MDeferred  = "deferred"
	MLate      = "deferred_past_deadline"
	MCommitted = "committed"
	MFailed    = "failed"
	MTimedOut  = "timed_out"
	MGone      = "gone" // a member no longer enrolled (rollout device view only)
)

// MemberStates lists every member state, for filters and their checks.
var MemberStates = []string{MPending, MOffered, MDeferred, MLate, MCommitted, MFailed, MTimedOut, MGone}

// GateResult is one gate's measurement, for operators.
type GateResult struct {
	Name      string  `json:"name"`
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	OK        bool    `json:"ok"`
	Judged    bool    `json:"judged"` // false: not enough data yet
	Why       string  `json:"why"`
}

// Outcome is what Plan decided.
type Outcome struct {
	State       State
	Actions     []Action
	Transitions []Transition
	Gates       []GateResult
	Counts      map[string]int // member states in the current stage
	Targeted    int
}

// rank places a device in a rollout: deterministic, uniform in [0, 1).
func rank(device, rollout string) float64 {
	h := fnv.New64a()
	h.Write([]byte(rollout))
	h.Write([]byte{0})
	h.Write([]byte(device))
	x := h.Sum64()
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], x)
	return float64(x>>11) / float64(1<<53)
}

// Targets reports whether the spec targets d (ignoring other rollouts).
func (s Spec) Targets(d Device) bool {
	for k, v := range s.Selector {
		if d.Labels[k] != v {
			return false
		}
	}
	if len(s.Hardware) > 0 && !slices.Contains(s.Hardware, d.Labels["hw"]) {
		return false
	}
	if len(s.FromVersions) > 0 && !slices.Contains(s.FromVersions, d.Version) && d.Version != s.Release.Version {
		return false
	}
	return true
}

// stageSizes are the cumulative member counts of each stage for n targets.
func (s Spec) stageSizes(n int) []int {
	out := make([]int, len(s.Stages))
	for i, st := range s.Stages {
		c := st.Count
		if st.Percent > 0 {
			c = int(math.Ceil(st.Percent / 100 * float64(n)))
		}
		if i == 0 {
			c = max(c, s.MinCanary)
		}
		if i > 0 {
			c = max(c, out[i-1])
		}
		out[i] = min(c, n)
	}
	if len(out) > 0 && s.Stages[len(s.Stages)-1].Percent == 100 {
		out[len(out)-1] = n
	}
	return out
}

func (s Spec) stratum(d Device) string {
	parts := make([]string, len(s.Strata))
	for i, l := range s.Strata {
		parts[i] = d.Labels[l]
	}
	return strings.Join(parts, "\x00")
}

// assign places devices that are not members yet. The first assignment
// (an empty rollout) is stratified: devices are taken round-robin across
// strata, each stratum in rank order, so that every hardware revision and
// base has devices in the canary where the canary is big enough. Devices
// that join later go to the stage their rank falls in.
func (s Spec) assign(st *State, fresh []*Device) {
	if len(fresh) == 0 {
		return
	}
	type ranked struct {
		d    *Device
		rank float64
	}
	if len(st.Members) == 0 {
		groups := map[string][]ranked{}
		for _, d := range fresh {
			k := s.stratum(*d)
			groups[k] = append(groups[k], ranked{d, rank(d.ID, s.ID)})
		}
		var keys []string
		for k, g := range groups {
			slices.SortFunc(g, func(a, b ranked) int { return cmp.Compare(a.rank, b.rank) })
			keys = append(keys, k)
		}
		// Strata take turns in the order of their best-ranked device.
		slices.SortFunc(keys, func(a, b string) int { return cmp.Compare(groups[a][0].rank, groups[b][0].rank) })
		order := make([]*Device, 0, len(fresh))
		for i := 0; len(order) < len(fresh); i++ {
			for _, k := range keys {
				if i < len(groups[k]) {
					order = append(order, groups[k][i].d)
				}
			}
		}
		sizes := s.stageSizes(len(order))
		stage := 0
		all := make([]Member, len(order))
		for i, d := range order {
			for stage < len(sizes)-1 && i >= sizes[stage] {
				stage++
			}
			all[i].Stage = stage
			st.Members[d.ID] = &all[i]
		}
		return
	}
	n := len(st.Members) + len(fresh)
	sizes := s.stageSizes(n)
	for _, d := range fresh {
		r := rank(d.ID, s.ID)
		stage := len(sizes) - 1
		for i, c := range sizes {
			if r < float64(c)/float64(n) {
				stage = i
				break
			}
		}
		st.Members[d.ID] = &Member{Stage: stage}
	}
}

// memberState says where a member stands.
func (s Spec) memberState(m *Member, d *Device, now time.Time) string {
	// A device that already runs the release without being offered it
	// counts as committed. One that was offered it is judged by its own
	// report only: during its trial boot it already reports the new
	// version, and a trial is not a commit.
	if d != nil && m.Offered == 0 && d.Version == s.Release.Version && (d.Update == nil || !failed(d.Update.State)) {
		return MCommitted
	}
	if d != nil && d.Update != nil && m.Offered > 0 {
		switch {
		case d.Update.State == proto.UpdateCommitted:
			return MCommitted
		case failed(d.Update.State):
			return MFailed
		case d.Update.State == proto.UpdateDeferred:
			if now.Sub(time.UnixMilli(m.Offered)) > s.Limits.DeferredDeadline.D() {
				return MLate
			}
			return MDeferred
		}
	}
	if m.Offered == 0 {
		return MPending
	}
	if now.Sub(time.UnixMilli(m.Offered)) > s.Gates.DeviceTimeout.D() {
		return MTimedOut
	}
	return MOffered
}

func failed(u proto.UpdateState) bool {
	return u == proto.UpdateRolledBack || u == proto.UpdateRejected || u == proto.UpdateFailed
}

// Health floors: a difference smaller than these is noise, whatever the
// ratio.
const (
	floorReboots = 0.5  // per hour
	floorErrors  = 5.0  // per hour
	floorLink    = 0.05 // share of samples
	floorDrain   = 5.0  // percent per flight hour
)

// significance is how unlikely an excess over the limit must be under
// the limit's own rate before the health gate fails: a handful of events
// on a few device-minutes of telemetry is not evidence.
const significance = 0.01

type cohort struct {
	n, samples, noLink                  int
	hours, reboots, errors, flightHours float64
	drain                               float64
}

func (c *cohort) add(h *Health) {
	if h == nil || h.Hours <= 0 {
		return
	}
	c.n++
	c.hours += h.Hours
	c.reboots += h.Reboots
	c.errors += h.Errors
	c.flightHours += h.FlightHours
	c.drain += h.Drain
	c.samples += h.Samples
	c.noLink += int(math.Round(h.LinkLoss * float64(h.Samples)))
}

func (c cohort) rates() (reboots, errors, link, drain float64, hasDrain bool) {
	if c.hours == 0 {
		return 0, 0, 0, 0, false
	}
	reboots, errors = c.reboots/c.hours, c.errors/c.hours
	if c.samples > 0 {
		link = float64(c.noLink) / float64(c.samples)
	}
	if c.flightHours > 0.05 {
		return reboots, errors, link, c.drain / c.flightHours, true
	}
	return reboots, errors, link, 0, false
}

// healthGates compares the updated devices with the not yet updated.
func (s Spec) healthGates(updated, baseline cohort) []GateResult {
	if updated.n == 0 || baseline.n == 0 {
		why := "no updated devices reporting yet"
		if baseline.n == 0 {
			why = "no devices left to compare with"
		}
		return []GateResult{{Name: "health", OK: true, Judged: false, Why: why}}
	}
	ur, ue, ul, ud, uok := updated.rates()
	br, be, bl, bd, bok := baseline.rates()
	m := 1 + s.Gates.HealthMargin
	// A metric fails when the updated cohort's rate is over the limit
	// and an excess that large would be unlikely (p < significance) if
	// the cohort's true rate were the limit itself.
	check := func(name string, u, b, floor float64, unit string, tail func(limit float64) float64) GateResult {
		limit := max(b*m, b+floor)
		g := GateResult{Name: "health:" + name, Value: u, Threshold: limit, OK: true, Judged: true,
			Why: fmt.Sprintf("updated %.2f %s, not yet updated %.2f: limit %.2f", u, unit, b, limit)}
		if u > limit {
			p := 0.0
			if tail != nil {
				p = tail(limit)
			}
			g.OK = p >= significance
			if g.OK {
				g.Why += fmt.Sprintf(", over it but not significant (p=%.2g)", p)
			} else if tail != nil {
				g.Why += fmt.Sprintf(" (p=%.2g)", p)
			}
		}
		return g
	}
	// Two tests, both must reject: the updated cohort's count against the
	// limit (one sample: is it above the limit at all?), and against the
	// other cohort over the same window (two samples: given all the events
	// seen, are there too many on the updated side for its share of the
	// exposure, margin included?). A short window with one background
	// error on an updated device fails the first but not the second.
	twoSample := func(ku, kb, eu, eb float64) float64 {
		k := int(math.Round(ku + kb))
		if k == 0 || eu <= 0 {
			return 1
		}
		share := eu * m / (eu*m + eb)
		return binomialTail(k, share, int(math.Round(ku)))
	}
	poisson := func(events, hours, baseEvents, baseHours float64) func(float64) float64 {
		return func(limit float64) float64 {
			return max(poissonTail(limit*hours, int(math.Round(events))), twoSample(events, baseEvents, hours, baseHours))
		}
	}
	out := []GateResult{
		check("reboots", ur, br, floorReboots, "reboots/h", poisson(updated.reboots, updated.hours, baseline.reboots, baseline.hours)),
		check("errors", ue, be, floorErrors, "errors/h", poisson(updated.errors, updated.hours, baseline.errors, baseline.hours)),
		check("link_loss", ul, bl, floorLink, "of samples", func(limit float64) float64 {
			return max(binomialTail(updated.samples, limit, updated.noLink),
				twoSample(float64(updated.noLink), float64(baseline.noLink), float64(updated.samples), float64(baseline.samples)))
		}),
	}
	if uok && bok {
		out = append(out, check("battery_drain", ud, bd, floorDrain, "%/flight h", nil))
	}
	return out
}

// Plan decides the next step of a rollout. It is pure: same inputs, same
// outcome.
func Plan(spec Spec, st State, devs []Device, now time.Time) Outcome {
	spec = spec.WithDefaults()
	// Copy on write: the members map is copied (cheap: no rehash) and
	// each member is read once into a contiguous copy that this plan works
	// on; the map takes the copy only of members this plan changes (own).
	// The caller's state is never touched, and an unchanged member keeps
	// its pointer.
	orig := st.Members
	st.Members = maps.Clone(orig)
	if st.Members == nil {
		st.Members = map[string]*Member{}
	}
	vals := make([]Member, 0, len(orig)) // never grows: pointers into it stay valid
	copyOf := func(m *Member) *Member {
		vals = append(vals, *m)
		return &vals[len(vals)-1]
	}
	own := func(e *member) *Member {
		st.Members[e.id] = e.m
		return e.m
	}
	out := Outcome{Counts: map[string]int{}}
	nowMS := now.UnixMilli()
	transition := func(to Status, stage int, reason string) {
		out.Transitions = append(out.Transitions, Transition{From: string(st.Status), To: string(to), Stage: stage, Reason: reason})
		st.Status, st.Reason = to, reason
		if to.Final() {
			st.Ended = nowMS
		}
	}

	// Members with their devices, in one pass over the devices (map
	// lookups per member and per pass are what a plan costs at 100k
	// devices). Targets that are not members yet join while the rollout
	// is active.
	members := make([]member, 0, len(st.Members)+len(devs)/8)
	var fresh []*Device
	for i := range devs {
		d := &devs[i]
		targeted := (d.Busy == "" || d.Busy == spec.ID) && spec.Targets(*d)
		if targeted {
			out.Targeted++
		}
		if m := orig[d.ID]; m != nil {
			members = append(members, member{id: d.ID, m: copyOf(m), d: d, targeted: targeted})
		} else if targeted {
			fresh = append(fresh, d)
		}
	}
	if len(members) < len(orig) { // devices gone (revoked, deleted)
		seen := make(map[string]bool, len(members))
		for _, e := range members {
			seen[e.id] = true
		}
		for id, m := range orig {
			if !seen[id] {
				members = append(members, member{id: id, m: copyOf(m)})
			}
		}
	}
	if (st.Status == StatusRunning || st.Status == StatusPaused) && len(fresh) > 0 {
		spec.assign(&st, fresh)
		for _, d := range fresh {
			members = append(members, member{id: d.ID, m: st.Members[d.ID], d: d, targeted: true})
		}
	}

	// Where each member stands.
	inFlight := 0
	for i := range members {
		e := &members[i]
		e.state = spec.memberState(e.m, e.d, now)
		if e.state == MOffered || e.state == MDeferred || e.state == MLate {
			inFlight++
		}
	}

	// Judge the current stage.
	if st.Status == StatusRunning || st.Status == StatusPaused {
		var total, committed, failedN, late int
		var updated, baseline cohort
		for _, e := range members {
			ms := e.state
			if e.m.Stage > st.Stage {
				if ms == MPending {
					baseline.add(healthOf(e.d))
				}
				continue
			}
			if e.d == nil {
				continue // gone (revoked, relabelled): not counted
			}
			total++
			out.Counts[ms]++
			switch ms {
			case MCommitted:
				committed++
				updated.add(healthOf(e.d))
			case MFailed, MTimedOut:
				failedN++
			case MLate:
				late++
			}
		}
		g := spec.Gates
		finished := committed + failedN
		failRatio := ratio(failedN, finished)
		judged := finished >= min(g.MinFinished, total) && finished > 0
		failGate := GateResult{Name: "failed", Value: failRatio, Threshold: g.MaxFailed, OK: !judged || failRatio <= g.MaxFailed, Judged: judged,
			Why: fmt.Sprintf("%d of %d finished devices failed, rolled back or timed out", failedN, finished)}
		if !judged {
			failGate.Why += fmt.Sprintf(" (judged from %d finished)", min(g.MinFinished, total))
		}
		commitRatio := ratio(committed, total)
		commitGate := GateResult{Name: "committed", Value: commitRatio, Threshold: g.MinCommitted, OK: total > 0 && commitRatio >= g.MinCommitted, Judged: true,
			Why: fmt.Sprintf("%d of %d devices of stages 1-%d committed (%d deferred past the deadline)", committed, total, st.Stage+1, late)}
		out.Gates = append(out.Gates, commitGate, failGate)
		var health []GateResult
		if !g.HealthOff && st.GatesSince > 0 {
			health = spec.healthGates(updated, baseline)
			out.Gates = append(out.Gates, health...)
		}
		soakFor := g.Soak.D()
		soaked := st.GatesSince > 0 && (st.Promoted || now.Sub(time.UnixMilli(st.GatesSince)) >= soakFor)
		soakGate := GateResult{Name: "soak", Threshold: soakFor.Seconds(), Judged: st.GatesSince > 0, OK: soaked}
		if st.GatesSince > 0 {
			soakGate.Value = now.Sub(time.UnixMilli(st.GatesSince)).Seconds()
			soakGate.Why = fmt.Sprintf("%v of %v soaked", now.Sub(time.UnixMilli(st.GatesSince)).Round(time.Second), soakFor)
			if st.Promoted {
				soakGate.Why += " (promoted: the rest is skipped)"
			}
		} else {
			soakGate.Why = "starts when the other gates hold"
		}
		out.Gates = append(out.Gates, soakGate)

		var broken []string
		if !failGate.OK {
			broken = append(broken, fmt.Sprintf("failures %.0f%% over %.0f%%", failRatio*100, g.MaxFailed*100))
		}
		for _, h := range health {
			if h.Judged && !h.OK {
				broken = append(broken, h.Name+": "+h.Why)
			}
		}
		switch {
		case len(broken) > 0 && st.Status == StatusRunning:
			reason := fmt.Sprintf("stage %d (%s) failed its gates: %s", st.Stage+1, spec.Stages[st.Stage], strings.Join(broken, "; "))
			to := StatusPaused
			if spec.OnFailure == OnFailureAbort {
				to = StatusAborted
			}
			transition(to, st.Stage, reason)
			if spec.AutoRevert {
				st.Reverting = true
			}
		case len(broken) == 0 && st.Status == StatusRunning:
			if commitGate.OK && st.GatesSince == 0 {
				st.GatesSince = nowMS
			}
			if !commitGate.OK && st.GatesSince > 0 && !st.Promoted {
				st.GatesSince = 0 // a device left or failed late: soak again
			}
			soaked = st.GatesSince > 0 && (st.Promoted || now.Sub(time.UnixMilli(st.GatesSince)) >= soakFor)
			if commitGate.OK && soaked {
				if st.Stage == len(spec.Stages)-1 {
					transition(StatusCompleted, st.Stage, fmt.Sprintf("all %d stages passed", len(spec.Stages)))
				} else {
					out.Transitions = append(out.Transitions, Transition{From: fmt.Sprintf("stage %d", st.Stage+1),
						To: fmt.Sprintf("stage %d", st.Stage+2), Stage: st.Stage + 1,
						Reason: fmt.Sprintf("stage %d passed: %d of %d committed, %d failed, soaked %v", st.Stage+1, committed, total, failedN, soakFor)})
					st.Stage++
					st.StageStarted, st.GatesSince, st.Promoted = nowMS, 0, false
				}
			}
		}
	}

	// Offers.
	if st.Status == StatusRunning && inWindow(spec.Limits.Windows, now) {
		offers := spec.offers(members, inFlight, st.Stage)
		out.Actions = slices.Grow(out.Actions, len(offers))
		for _, e := range offers {
			own(e).Offered = nowMS
			out.Actions = append(out.Actions, Action{Kind: ActOffer, Device: e.id})
		}
	}
	var undo []Action
	// On failure: withdraw offers not yet installing, and revert.
	if st.Status == StatusPaused || st.Status == StatusAborted {
		for i := range members {
			e := &members[i]
			m, d := e.m, e.d
			if m.Offered > 0 && m.Canceled == 0 && d != nil && d.Update != nil &&
				(d.Update.State == proto.UpdateOffered || d.Update.State == proto.UpdateDownloading ||
					d.Update.State == proto.UpdateVerified || d.Update.State == proto.UpdateDeferred) {
				own(e).Canceled = nowMS
				undo = append(undo, Action{Kind: ActCancel, Device: e.id})
			}
		}
	}
	if st.Reverting && spec.Revert != nil {
		for i := range members {
			e := &members[i]
			if e.m.Reverted == 0 && e.m.Offered > 0 && e.state == MCommitted {
				own(e).Reverted = nowMS
				undo = append(undo, Action{Kind: ActRevert, Device: e.id})
			}
		}
	}
	// Offers come in offer order (stage, online, rank); the rest in a
	// stable order, whatever the map iteration did.
	slices.SortFunc(undo, func(a, b Action) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Device, b.Device))
	})
	out.Actions = append(out.Actions, undo...)
	out.State = st
	return out
}

func healthOf(d *Device) *Health {
	if d == nil {
		return nil
	}
	return d.Health
}

func ratio(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func inWindow(ws []Window, now time.Time) bool {
	if len(ws) == 0 {
		return true
	}
	for _, w := range ws {
		if w.In(now) {
			return true
		}
	}
	return false
}

// offers picks the members of stages up to the current one to offer the
// release to, within the in-flight limit and the disruption budgets.
func (s Spec) offers(members []member, inFlight, stage int) []*member {
	// Candidates in offer order: earlier stage first, online first, then
	// by rank. The keys are computed once (a comparator that hashes and
	// looks members up costs n log n of each).
	type cand struct {
		stage   int
		offline bool
		rank    float64
		e       *member
	}
	slots := len(members)
	if s.Limits.MaxInFlight > 0 {
		slots = s.Limits.MaxInFlight - inFlight
	}
	if slots <= 0 {
		return nil
	}
	var cands []cand
	busyBy := map[string]map[string]int{} // label -> value -> in flight
	groupSize := map[string]map[string]int{}
	for _, b := range s.Limits.Budgets {
		busyBy[b.Label], groupSize[b.Label] = map[string]int{}, map[string]int{}
	}
	for i := range members {
		e := &members[i]
		if !e.targeted {
			continue
		}
		ms := e.state
		for _, b := range s.Limits.Budgets {
			v := e.d.Labels[b.Label]
			groupSize[b.Label][v]++
			if ms == MOffered || ms == MDeferred || ms == MLate {
				busyBy[b.Label][v]++
			}
		}
		if e.m.Stage <= stage && e.m.Offered == 0 && ms == MPending {
			cands = append(cands, cand{stage: e.m.Stage, offline: !e.d.Online, rank: rank(e.id, s.ID), e: e})
		}
	}
	less := func(a, b cand) int {
		return cmp.Or(cmp.Compare(a.stage, b.stage), cmp.Compare(boolInt(a.offline), boolInt(b.offline)), cmp.Compare(a.rank, b.rank))
	}
	if len(s.Limits.Budgets) == 0 && slots < len(cands)/4 {
		// Only the first slots candidates can be offered: select them
		// (linear on average) and sort those alone.
		cands = selectFirst(cands, slots, less)
	}
	slices.SortFunc(cands, less)
	var acts []*member
	for _, c := range cands {
		if s.Limits.MaxInFlight > 0 && inFlight >= s.Limits.MaxInFlight {
			break
		}
		ok := true
		for _, b := range s.Limits.Budgets {
			v := c.e.d.Labels[b.Label]
			size := groupSize[b.Label][v]
			keep := max(b.KeepMin, int(math.Ceil(b.KeepPercent/100*float64(size))))
			if busyBy[b.Label][v] >= size-keep {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		for _, b := range s.Limits.Budgets {
			busyBy[b.Label][c.e.d.Labels[b.Label]]++
		}
		inFlight++
		acts = append(acts, c.e)
	}
	return acts
}

// selectFirst returns the k smallest of xs (in no order), reordering xs:
// quickselect with a middle pivot, linear on average.
func selectFirst[T any](xs []T, k int, cmpf func(a, b T) int) []T {
	lo, hi := 0, len(xs)-1
	for lo < hi {
		p := xs[lo+(hi-lo)/2]
		i, j := lo, hi
		for i <= j {
			for cmpf(xs[i], p) < 0 {
				i++
			}
			for cmpf(xs[j], p) > 0 {
				j--
			}
			if i <= j {
				xs[i], xs[j] = xs[j], xs[i]
				i++
				j--
			}
		}
		switch {
		case k-1 <= j:
			hi = j
		case k-1 >= i:
			lo = i
		default:
			return xs[:k]
		}
	}
	return xs[:k]
}

// member is a member with its device (nil when gone) and where it stands,
// for one plan.
type member struct {
	id       string
	m        *Member
	d        *Device // nil: gone
	targeted bool
	state    string
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
