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

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Settled says whether planning st can change nothing any more: completed
// with nobody left to reach, or closed at its offline deadline (the offers
// still out withdrawn); or aborted longer than a device timeout ago (and
// than a revert asked for since).
func (s Spec) Settled(st State, now time.Time) bool {
	s = s.WithDefaults()
	switch st.Status {
	case StatusCompleted:
		return st.Unreached == 0 || st.Closed
	case StatusAborted:
		// A revert asked for later is planned a device timeout from then.
		return now.Sub(time.UnixMilli(max(st.Ended, st.RevertAt))) > s.Gates.DeviceTimeout.D()
	}
	return false
}

// Report is a device's latest update report for one release.
type Report struct {
	State  proto.UpdateState `json:"state"`
	At     int64             `json:"at"` // unix ms the control plane received it
	Reason string            `json:"reason,omitempty"`
	// Patch is the size of the delta the device fetches (0: the full
	// artifact); Fallback why it gave the delta up for the full artifact.
	Patch    uint64 `json:"patch,omitempty"`
	Fallback string `json:"fallback,omitempty"`
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
	ID       string            `json:"id"`
	Labels   map[string]string `json:"labels"` // the operators'
	Hardware string            `json:"hardware,omitempty"`
	Version  string            `json:"version"`
	Online   bool              `json:"online"`
	LastSeen int64             `json:"last_seen,omitempty"` // unix ms
	// AwaitingEnrollment: pre-provisioned, never enrolled.
	AwaitingEnrollment bool `json:"awaiting_enrollment,omitempty"`
	// Busy names another active rollout this device belongs to.
	Busy string `json:"busy,omitempty"`
	// Acked is when the device acknowledged its latest offer from this
	// rollout (unix ms; 0 not yet).
	Acked  int64   `json:"acked,omitempty"`
	Update *Report `json:"update,omitempty"` // for the release
	Revert *Report `json:"revert,omitempty"` // for the revert release
	Health *Health `json:"health,omitempty"` // over the current stage's soak
}

// Action kinds.
const (
	ActOffer    = "offer"
	ActRevert   = "revert"
	ActCancel   = "cancel"   // the device acknowledged the offer: ask it to drop the update
	ActWithdraw = "withdraw" // it never did: the offer is not sent again
)

// Action is a command for a device.
type Action struct {
	Kind   string `json:"kind"`
	Device string `json:"device"`
}

// Transition is a change of status or stage (or, with Action "replace", of
// a canary member), recorded with its reason.
type Transition struct {
	From, To string
	Stage    int
	Reason   string
	Action   string // the operator's action, "replace", or empty: the engine's decision
}

// MemberState is where a member stands, as the engine sees it.
type MemberState string

// Member states.
const (
	MPending   MemberState = "pending"     // its stage has not come, or it is next in line
	MWaiting   MemberState = "waiting"     // its stage came and the device is unreachable: off, or the offer not acknowledged
	MOffered   MemberState = "in_progress" // offered and acknowledged (or on its way to an online device)
	MDeferred  MemberState = "deferred"
	MLate      MemberState = "deferred_past_deadline"
	MCommitted MemberState = "committed"
	MFailed    MemberState = "failed"
	MTimedOut  MemberState = "timed_out"
	MCanceled  MemberState = "canceled" // the offer was withdrawn or cancelled: paused, aborted or reverting
	MExcluded  MemberState = "excluded" // no longer targeted: in another rollout, relabelled, hardware in question
	MGone      MemberState = "gone"     // no longer enrolled
)

// MemberStates lists every member state, for filters and their checks.
var MemberStates = []MemberState{MPending, MWaiting, MOffered, MDeferred, MLate, MCommitted, MFailed, MTimedOut, MCanceled, MExcluded, MGone}

// finished: the member's part is over, one way or another.
func (m MemberState) finished() bool {
	return m == MCommitted || m == MFailed || m == MTimedOut || m == MLate
}

// reachable: counted by the gates (the device could be, or was, reached).
func (m MemberState) reachable() bool {
	return m != MWaiting && m != MGone && m != MExcluded
}

func (m MemberState) inFlight() bool { return m == MOffered || m == MDeferred || m == MLate }

// occupies says whether a member takes an in-flight slot: updating, or
// offered and not acknowledged yet (the device went off as the offer went
// out; the offer is withdrawn after a device timeout, freeing the slot).
func occupies(m *Member, ms MemberState) bool { return ms.inFlight() || (ms == MWaiting && m.live()) }

// Gate verdicts.
const (
	VerdictHolds   = "holds"
	VerdictFails   = "fails"
	VerdictWaiting = "waiting"    // not failed: time or devices still to come (the soak)
	VerdictUnknown = "not judged" // not enough data yet
)

// GateResult is one gate's measurement, for operators.
type GateResult struct {
	Name      string  `json:"name"`
	Stratum   string  `json:"stratum,omitempty"` // label=value: judged within it
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	OK        bool    `json:"ok"`
	Judged    bool    `json:"judged"` // false: not enough data yet
	Verdict   string  `json:"verdict"`
	Why       string  `json:"why"`
}

func (g *GateResult) verdict() {
	switch {
	case !g.Judged:
		g.Verdict = VerdictUnknown
	case g.OK:
		g.Verdict = VerdictHolds
	default:
		g.Verdict = VerdictFails
	}
}

// StratumReport is one value of the first stratum label, over the stages
// rolled out so far.
type StratumReport struct {
	Label     string       `json:"label"`
	Value     string       `json:"value"`
	Members   int          `json:"members"`   // in the stages up to the current
	Canary    int          `json:"canary"`    // of them in the first stage
	Reachable int          `json:"reachable"` // counted by the gates
	Committed int          `json:"committed"`
	Failed    int          `json:"failed"` // failed, rolled back or timed out
	Held      bool         `json:"held,omitempty"`
	Gates     []GateResult `json:"gates"`
}

// Exclusion is a device the selector matches that the rollout leaves out.
type Exclusion struct {
	Device string `json:"device"`
	Reason string `json:"reason"`
}

// Outcome is what Plan decided.
type Outcome struct {
	State       State
	Actions     []Action
	Transitions []Transition
	Gates       []GateResult
	Strata      []StratumReport
	Counts      map[MemberState]int // member states in the stages up to the current (all, once completed)
	Targeted    int
	Excluded    []Exclusion
	// Unreached counts members whose stage came but whose device has not
	// been reached (waiting).
	Unreached int
}

// rank places a device in a rollout: deterministic, uniform in [0, 1).
func rank(device, seed string) float64 {
	h := fnv.New64a()
	h.Write([]byte(seed))
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

// exclusion says why the spec leaves out a device its selector matches
// ("" when it targets it). Other rollouts are the caller's to check.
func (s Spec) exclusion(d *Device) string {
	for k, v := range s.Selector {
		if d.Labels[k] != v {
			return "not selected"
		}
	}
	if d.AwaitingEnrollment {
		return "pre-provisioned, not enrolled yet"
	}
	if len(s.Hardware) > 0 {
		hw := d.Labels[store.HardwareLabel]
		switch {
		case hw == "":
			return fmt.Sprintf("no %s label (the release is for %s; the device reports %q): label it", store.HardwareLabel, strings.Join(s.Hardware, ", "), d.Hardware)
		case !slices.Contains(s.Hardware, hw):
			return fmt.Sprintf("hardware %s (the release is for %s)", hw, strings.Join(s.Hardware, ", "))
		case store.Mismatch(d.Labels, d.Hardware):
			return fmt.Sprintf("labelled %s=%s but reports hardware %s", store.HardwareLabel, hw, d.Hardware)
		}
	}
	if len(s.FromVersions) > 0 && !slices.Contains(s.FromVersions, d.Version) && d.Version != s.Release.Version {
		return fmt.Sprintf("runs %s, not a --from-version", orDash(d.Version))
	}
	return ""
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// stageSizes are the cumulative member counts of each stage for n
// targets, the first at least first.
func (s Spec) stageSizes(n, first int) []int {
	out := make([]int, len(s.Stages))
	for i, st := range s.Stages {
		c := st.Count
		if st.Percent > 0 {
			c = int(math.Ceil(st.Percent / 100 * float64(n)))
		}
		if i == 0 {
			c = max(c, s.MinCanary, first)
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

// firstLabel is the stratum label the canary covers and the gates judge
// within ("" without strata).
func (s Spec) firstLabel() string {
	if len(s.Strata) == 0 {
		return ""
	}
	return s.Strata[0]
}

func (s Spec) stratumOf(d *Device) string {
	if d == nil || len(s.Strata) == 0 {
		return ""
	}
	return d.Labels[s.Strata[0]]
}

// member is a member with its device (nil when gone) and where it stands,
// for one plan.
type member struct {
	id       string
	m        *Member
	d        *Device // nil: gone
	targeted bool
	state    MemberState
	rank     float64 // computed where an order is needed (offers, replacements)
	stratum  string  // value of the first stratum label
}

// planner holds one Plan's work: the spec, the state being changed (its
// members copied on write) and the outcome.
type planner struct {
	spec    Spec
	st      State
	now     time.Time
	nowMS   int64
	orig    map[string]*Member
	vals    []Member // copies of the members this plan changes
	members []member
	fresh   []*Device
	out     Outcome
	// held: first-stratum values whose members outside the canary wait
	// until a canary member of theirs has finished.
	held, blocked   map[string]bool
	classifiedStage int // the stage held was decided for
	inFlight        int
}

// Plan decides the next step of a rollout. It is pure: same inputs, same
// outcome. Its phases: join (new targets become members), classify (where
// each member stands), judge (gates, overall and per stratum; stage
// advance, pause, abort, completion), replace (canary members that stay
// unreachable), offer, undo (withdraw, cancel, revert).
func Plan(spec Spec, st State, devs []Device, now time.Time) Outcome {
	p := newPlanner(spec.WithDefaults(), st, devs, now)
	p.join()
	p.classify()
	p.judge()
	p.replace()
	p.offer()
	p.undo()
	return p.finish()
}

func newPlanner(spec Spec, st State, devs []Device, now time.Time) *planner {
	p := &planner{spec: spec, now: now, nowMS: now.UnixMilli(), orig: st.Members, out: Outcome{Counts: map[MemberState]int{}}}
	// Copy on write: the members map is copied (cheap: no rehash) and a
	// member is copied only when this plan changes it (own). The caller's
	// state is never touched, and an unchanged member keeps its pointer.
	st.Members = maps.Clone(st.Members)
	if st.Members == nil {
		st.Members = map[string]*Member{}
	}
	p.st = st
	p.vals = make([]Member, 0, 64)
	p.members = make([]member, 0, len(st.Members)+len(devs)/8)
	for i := range devs {
		d := &devs[i]
		why := spec.exclusion(d)
		if why == "" && d.Busy != "" && d.Busy != spec.ID {
			why = "in rollout " + d.Busy
		}
		targeted := why == ""
		if targeted {
			p.out.Targeted++
		} else if why != "not selected" {
			p.out.Excluded = append(p.out.Excluded, Exclusion{Device: d.ID, Reason: why})
		}
		if m := p.orig[d.ID]; m != nil {
			p.members = append(p.members, member{id: d.ID, m: m, d: d, targeted: targeted, stratum: spec.stratumOf(d)})
		} else if targeted {
			p.fresh = append(p.fresh, d)
		}
	}
	if len(p.members) < len(p.orig) { // devices gone (revoked, deleted)
		seen := make(map[string]bool, len(p.members))
		for _, e := range p.members {
			seen[e.id] = true
		}
		for id, m := range p.orig {
			if !seen[id] {
				p.members = append(p.members, member{id: id, m: m})
			}
		}
	}
	return p
}

// own makes e's member this plan's to change.
func (p *planner) own(e *member) *Member {
	if p.orig[e.id] == e.m {
		if len(p.vals) == cap(p.vals) {
			p.vals = make([]Member, 0, 2*cap(p.vals)) // pointers into the old one stay valid
		}
		p.vals = append(p.vals, *e.m)
		e.m = &p.vals[len(p.vals)-1]
		p.st.Members[e.id] = e.m
	}
	return e.m
}

func (p *planner) transition(to Status, stage int, reason string) {
	p.out.Transitions = append(p.out.Transitions, Transition{From: string(p.st.Status), To: string(to), Stage: stage, Reason: reason})
	p.st.Status, p.st.Reason = to, reason
	if to.Final() {
		p.st.Ended = p.nowMS
	}
}

// join makes the targets that are not members yet members, while the
// rollout has not ended.
func (p *planner) join() {
	if p.st.Status.Final() || len(p.fresh) == 0 {
		return
	}
	first := len(p.st.Members) == 0
	placed := p.spec.place(p.fresh, len(p.st.Members), first)
	all := make([]Member, len(p.fresh))
	for i, d := range p.fresh {
		all[i].Stage = placed.stage[i]
		p.st.Members[d.ID] = &all[i]
		p.members = append(p.members, member{id: d.ID, m: &all[i], d: d, targeted: true, stratum: p.spec.stratumOf(d)})
	}
	if first {
		p.st.Canary = placed.note
	}
}

// classify says where each member stands.
func (p *planner) classify() {
	for i := range p.members {
		e := &p.members[i]
		e.state = p.spec.memberState(e.m, e.d, e.targeted, p.st, p.now)
		if occupies(e.m, e.state) {
			p.inFlight++
		}
	}
	p.held, p.blocked = p.spec.heldStrata(p.members, p.st)
	p.classifiedStage = p.st.Stage
}

// acked says whether the device acknowledged the member's latest offer,
// and when: the command's acknowledgement, or a report on the release
// received since the offer.
func acked(m *Member, d *Device) (int64, bool) {
	if d == nil || m.Offered == 0 {
		return 0, false
	}
	at := int64(0)
	if d.Acked >= m.Offered {
		at = d.Acked
	}
	if r := d.Update; r != nil && r.At >= m.Offered && (at == 0 || r.At < at) {
		at = r.At
	}
	return at, at > 0
}

// memberState says where a member stands.
func (s Spec) memberState(m *Member, d *Device, targeted bool, st State, now time.Time) MemberState {
	if d == nil {
		return MGone
	}
	u := d.Update
	if !m.live() {
		// Not offered, or the offer was taken back. A device that runs
		// the release anyway (updated by hand, or it acted on the offer
		// before the withdrawal reached it) counts as committed.
		if d.Version == s.Release.Version && (u == nil || u.State == proto.UpdateCommitted) {
			return MCommitted
		}
		if !targeted {
			return MExcluded
		}
		switch st.Status {
		case StatusRunning, StatusCompleted:
			// A withdrawn or cancelled offer is made again (resumed).
			if st.Status == StatusRunning && m.Stage > st.Stage {
				return MPending
			}
			if !d.Online {
				return MWaiting
			}
			return MPending
		}
		if m.Offered > 0 {
			return MCanceled
		}
		if st.Status != StatusCreated && m.Stage <= st.Stage && !d.Online {
			return MWaiting
		}
		return MPending
	}
	// Offered: judged by the device's own reports since the offer. During
	// its trial boot it already reports the new version, and a trial is
	// not a commit.
	if u != nil && u.At >= m.Offered {
		switch {
		case u.State == proto.UpdateCommitted:
			return MCommitted
		case failed(u.State):
			return MFailed
		}
	}
	at, ok := acked(m, d)
	if !ok {
		if d.Online {
			return MOffered // on its way
		}
		return MWaiting
	}
	if u != nil && u.At >= m.Offered && u.State == proto.UpdateDeferred {
		if now.Sub(time.UnixMilli(at)) > s.Limits.DeferredDeadline.D() {
			return MLate
		}
		return MDeferred
	}
	// The device timeout is silence: it runs from the device's latest word
	// on this offer (its acknowledgement, or a report since), so time spent
	// deferred, or a slow download that reports progress, does not count.
	last := at
	if u != nil && u.At >= m.Offered {
		last = max(last, u.At)
	}
	if now.Sub(time.UnixMilli(last)) > s.Gates.DeviceTimeout.D() {
		return MTimedOut
	}
	return MOffered
}

func failed(u proto.UpdateState) bool {
	return u == proto.UpdateRolledBack || u == proto.UpdateRejected || u == proto.UpdateFailed
}

// heldStrata are the first-stratum values without evidence from the
// canary yet, once the rollout is past it: none of their first-stage
// members committed. Their members in later stages wait, and one of them
// joins the canary (replace), so that a build bad on one hardware revision
// meets it in the canary even when the revision's canary devices were
// switched off. A canary member that failed stops the rollout by the
// stratum's failure gate; once completed (no gates), that value is
// blocked: it gets nothing more.
func (s Spec) heldStrata(members []member, st State) (held, blocked map[string]bool) {
	if st.Stage == 0 || s.firstLabel() == "" || st.Status == StatusCreated {
		return nil, nil
	}
	evidence, bad, present := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, e := range members {
		if !e.targeted {
			continue
		}
		v := e.stratum
		present[v] = true
		if e.m.Stage != 0 {
			continue
		}
		switch e.state {
		case MCommitted:
			evidence[v] = true
		case MFailed, MTimedOut:
			bad[v] = true
		}
	}
	held, blocked = map[string]bool{}, map[string]bool{}
	for v := range present {
		if !evidence[v] {
			held[v] = true
			blocked[v] = bad[v]
		}
	}
	return held, blocked
}

// tally counts what the gates judge, overall or within one stratum.
type tally struct {
	members, canary, reachable, eligible int
	committed, failed, late, finished    int
	updated, baseline                    cohort
}

// add counts a member; held: its stratum waits for the canary, and it is
// not in the canary (it cannot finish yet).
func (t *tally) add(e *member, held bool) {
	t.members++
	if e.m.Stage == 0 {
		t.canary++
	}
	if !e.state.reachable() {
		return
	}
	t.reachable++
	if !held {
		t.eligible++
	}
	switch e.state {
	case MCommitted:
		t.committed++
		if e.m.Offered > 0 {
			t.updated.add(healthOf(e.d))
		}
	case MFailed, MTimedOut:
		t.failed++
	case MLate:
		t.late++
	}
	if e.state.finished() {
		t.finished++
	}
}

// failGate judges failures among finished members, once enough finished:
// MinFinished, or all of those that can finish now where fewer can (a
// stratum held for the canary: its canary members, so that the one canary
// device of a rare revision is judged on its own).
func (s Spec) failGate(t tally, stratum string) GateResult {
	g := s.Gates
	fin := t.committed + t.failed
	r := ratio(t.failed, fin)
	need := min(g.MinFinished, t.eligible)
	judged := fin >= need && fin > 0
	res := GateResult{Name: "failed", Stratum: stratum, Value: r, Threshold: g.MaxFailed, OK: !judged || r <= g.MaxFailed, Judged: judged,
		Why: fmt.Sprintf("%d of %d finished devices failed, rolled back or timed out", t.failed, fin)}
	if !judged {
		res.Why += fmt.Sprintf(" (judged from %d finished)", max(need, 1))
	}
	res.verdict()
	return res
}

// judge measures the gates of the current stage and decides: pause or
// abort on a failure, advance after the soak, complete after the last.
func (p *planner) judge() {
	st, spec := &p.st, p.spec
	if st.Status == StatusCompleted {
		for _, e := range p.members {
			p.out.Counts[e.state]++
			_, ack := acked(e.m, e.d)
			if e.state == MWaiting || (e.state == MPending && e.targeted) || (e.m.live() && !ack) {
				p.out.Unreached++ // still to reach, or an offer not acknowledged yet
			}
		}
		return
	}
	if st.Status != StatusRunning && st.Status != StatusPaused {
		return
	}
	label := spec.firstLabel()
	var all tally
	per := map[string]*tally{}
	for i := range p.members {
		e := &p.members[i]
		if e.m.Stage > st.Stage {
			if e.m.Offered == 0 && (e.state == MPending || e.state == MWaiting) {
				all.baseline.add(healthOf(e.d))
				if v := e.stratum; label != "" && e.d != nil {
					if per[v] == nil {
						per[v] = &tally{}
					}
					per[v].baseline.add(healthOf(e.d))
				}
			}
			continue
		}
		if e.d == nil {
			continue // gone: not counted
		}
		p.out.Counts[e.state]++
		if e.state == MWaiting {
			p.out.Unreached++
		}
		v := e.stratum
		held := p.held[v] && e.m.Stage != 0
		all.add(e, held)
		if label != "" {
			if per[v] == nil {
				per[v] = &tally{}
			}
			per[v].add(e, held)
		}
	}
	g := spec.Gates
	last := st.Stage == len(spec.Stages)-1
	failGate := spec.failGate(all, "")
	var advance GateResult
	if last {
		// The last stage completes once every member that could be
		// reached has finished; --min-committed gates advances only.
		fin := all.finished
		advance = GateResult{Name: "finished", Value: ratio(fin, all.reachable), Threshold: 1, Judged: true,
			OK: all.reachable > 0 && fin == all.reachable,
			Why: fmt.Sprintf("%d of %d reachable devices finished (%d committed, %d failed, %d deferred past the deadline); %d waiting for their device",
				fin, all.reachable, all.committed, all.failed, all.late, p.out.Unreached)}
	} else {
		cr := ratio(all.committed, all.reachable)
		advance = GateResult{Name: "committed", Value: cr, Threshold: g.MinCommitted, OK: all.reachable > 0 && cr >= g.MinCommitted, Judged: true,
			Why: fmt.Sprintf("%d of %d reachable devices of stages 1-%d committed (%d deferred past the deadline, %d waiting for their device)",
				all.committed, all.reachable, st.Stage+1, all.late, p.out.Unreached)}
	}
	advance.verdict()
	if !advance.OK {
		advance.Verdict = VerdictWaiting // devices still to finish: not a failure
	}
	p.out.Gates = append(p.out.Gates, advance, failGate)
	var health []GateResult
	if !g.HealthOff && st.GatesSince > 0 {
		health = spec.healthGates(all.updated, all.baseline, "")
		p.out.Gates = append(p.out.Gates, health...)
	}
	var broken []string
	if !failGate.OK {
		broken = append(broken, fmt.Sprintf("failures %.0f%% over %.0f%%", failGate.Value*100, g.MaxFailed*100))
	}
	for _, h := range health {
		if h.Judged && !h.OK {
			broken = append(broken, h.Name+": "+h.Why)
		}
	}
	// The same within each value of the first stratum label: a build that
	// fails on every device of a rare revision is stopped although the
	// overall share stays under the threshold.
	values := slices.Sorted(maps.Keys(per))
	var lagging []string // strata under --min-committed
	for _, v := range values {
		t := per[v]
		if t.members == 0 {
			continue
		}
		name := label + "=" + v
		sr := StratumReport{Label: label, Value: v, Members: t.members, Canary: t.canary, Reachable: t.reachable,
			Committed: t.committed, Failed: t.failed, Held: p.held[v]}
		fg := spec.failGate(*t, name)
		if !last {
			// Each revision must commit like the whole: the canary is not
			// left while its one rev-c device is still on trial.
			cr := ratio(t.committed, t.eligible)
			cg := GateResult{Name: "committed", Stratum: name, Value: cr, Threshold: g.MinCommitted, Judged: true,
				OK:  t.eligible == 0 || cr >= g.MinCommitted,
				Why: fmt.Sprintf("%d of %d reachable %s devices that may update committed", t.committed, t.eligible, name)}
			cg.verdict()
			if !cg.OK {
				cg.Verdict = VerdictWaiting
				lagging = append(lagging, fmt.Sprintf("%s %d of %d", name, t.committed, t.eligible))
			}
			sr.Gates = append(sr.Gates, cg)
		}
		sr.Gates = append(sr.Gates, fg)
		if !fg.OK {
			broken = append(broken, fmt.Sprintf("failures on %s %.0f%% over %.0f%% (%d of %d)", name, fg.Value*100, g.MaxFailed*100, t.failed, t.committed+t.failed))
		}
		if !g.HealthOff && st.GatesSince > 0 && len(values) > 1 {
			base := t.baseline
			if base.n == 0 {
				base = all.baseline // none of the same stratum left to compare with
			}
			for _, h := range spec.healthGates(t.updated, base, name) {
				sr.Gates = append(sr.Gates, h)
				if h.Judged && !h.OK {
					broken = append(broken, h.Name+" on "+name+": "+h.Why)
				}
			}
		}
		p.out.Strata = append(p.out.Strata, sr)
	}
	if len(lagging) > 0 && advance.OK {
		advance.OK, advance.Verdict = false, VerdictWaiting
		advance.Why += "; not yet within " + strings.Join(lagging, ", ")
		p.out.Gates[0] = advance
	}

	soakFor := g.Soak.D()
	soaked := st.GatesSince > 0 && (st.Promoted || p.now.Sub(time.UnixMilli(st.GatesSince)) >= soakFor)
	switch {
	case len(broken) > 0 && st.Status == StatusRunning:
		reason := fmt.Sprintf("stage %d (%s) failed its gates: %s", st.Stage+1, spec.Stages[st.Stage], strings.Join(broken, "; "))
		to := StatusPaused
		if spec.OnFailure == OnFailureAbort {
			to = StatusAborted
		}
		p.transition(to, st.Stage, reason)
		if spec.AutoRevert {
			st.Reverting = true
		}
	case len(broken) == 0 && st.Status == StatusRunning:
		if advance.OK && st.GatesSince == 0 {
			st.GatesSince = p.nowMS
		}
		if !advance.OK && st.GatesSince > 0 && !st.Promoted && !last {
			// A device left or failed late: soak again. In the last stage,
			// a member that comes back during the soak does not restart it:
			// it is delivered to after completion like the others.
			st.GatesSince = 0
		}
		soaked = st.GatesSince > 0 && (st.Promoted || p.now.Sub(time.UnixMilli(st.GatesSince)) >= soakFor)
		if (advance.OK || (last && st.GatesSince > 0)) && soaked {
			if last {
				reason := fmt.Sprintf("all %d stages passed: %d of %d reachable devices committed, %d failed, %d deferred past the deadline",
					len(spec.Stages), all.committed, all.reachable, all.failed, all.late)
				if p.out.Unreached > 0 {
					reason += fmt.Sprintf("; %d unreachable get the release as they come back, until %s", p.out.Unreached,
						p.now.Add(spec.Limits.OfflineDeadline.D()).UTC().Format("2006-01-02 15:04 MST"))
				}
				p.transition(StatusCompleted, st.Stage, reason)
				st.Unreached = p.out.Unreached
			} else {
				p.out.Transitions = append(p.out.Transitions, Transition{From: fmt.Sprintf("stage %d", st.Stage+1),
					To: fmt.Sprintf("stage %d", st.Stage+2), Stage: st.Stage + 1,
					Reason: fmt.Sprintf("stage %d passed: %d of %d reachable committed, %d failed, soaked %v", st.Stage+1, all.committed, all.reachable, all.failed, soakFor)})
				st.Stage++
				st.StageStarted, st.GatesSince, st.Promoted = p.nowMS, 0, false
			}
		}
	}
	soak := GateResult{Name: "soak", Threshold: soakFor.Seconds(), Judged: st.GatesSince > 0, OK: soaked}
	switch {
	case st.GatesSince > 0 && soaked:
		soak.Value = p.now.Sub(time.UnixMilli(st.GatesSince)).Seconds()
		soak.Verdict, soak.Why = VerdictHolds, fmt.Sprintf("%v of %v soaked", p.now.Sub(time.UnixMilli(st.GatesSince)).Round(time.Second), soakFor)
		if st.Promoted {
			soak.Why += " (promoted: the rest is skipped)"
		}
	case st.GatesSince > 0:
		soak.Value = p.now.Sub(time.UnixMilli(st.GatesSince)).Seconds()
		soak.Verdict, soak.Why = VerdictWaiting, fmt.Sprintf("soaking: %v of %v", p.now.Sub(time.UnixMilli(st.GatesSince)).Round(time.Second), soakFor)
	default:
		soak.Verdict, soak.Why = VerdictWaiting, "starts when the other gates hold"
	}
	p.out.Gates = append(p.out.Gates, soak)
}

// replace keeps the canary's coverage while devices are switched off: a
// first-stage member unreachable for ReplaceAfter since its stage started
// swaps places with a reachable device of the same stratum from a later
// stage; past the canary, a held stratum (no evidence from the canary)
// has one reachable device join the canary. Most plans have nothing to
// replace: the candidates are gathered only when something is.
func (p *planner) replace() {
	st, spec := &p.st, p.spec
	if st.Status != StatusRunning && !(st.Status == StatusCompleted && p.delivering()) {
		return
	}
	if st.Stage != p.classifiedStage {
		// The stage has just advanced: what is held is decided anew.
		p.held, p.blocked = spec.heldStrata(p.members, *st)
	}
	var gone []*member // canary members to replace
	var join []string  // held strata that need a device in the canary
	if st.Stage == 0 && st.Status == StatusRunning {
		after := spec.Gates.ReplaceAfter.D()
		for i := range p.members {
			e := &p.members[i]
			if e.m.Stage == 0 && e.state == MWaiting && !e.m.live() && e.d != nil && e.d.Acked == 0 &&
				p.now.Sub(time.UnixMilli(max(st.StageStarted, e.d.LastSeen))) >= after {
				gone = append(gone, e)
			}
		}
	} else if len(p.held) > 0 {
		busy := map[string]bool{} // a canary member of the stratum is on it already
		for i := range p.members {
			e := &p.members[i]
			if e.m.Stage == 0 && e.targeted && (e.state == MOffered || e.state == MDeferred || (e.state == MPending && e.d.Online)) {
				busy[e.stratum] = true
			}
		}
		for _, v := range slices.Sorted(maps.Keys(p.held)) {
			if !p.blocked[v] && !busy[v] {
				join = append(join, v)
			}
		}
	}
	if len(gone) == 0 && len(join) == 0 {
		return
	}
	need := map[string]bool{}
	for _, e := range gone {
		need[e.stratum] = true
	}
	for _, v := range join {
		need[v] = true
	}
	// Candidates: reachable, never offered, in a later stage, of a
	// stratum that needs one; earliest stage first, then by rank, in
	// queues by full stratum key and by first-label value.
	full := func(d *Device) string {
		parts := make([]string, len(spec.Strata))
		for i, l := range spec.Strata {
			parts[i] = d.Labels[l]
		}
		return strings.Join(parts, "\x00")
	}
	seed := spec.seed()
	var cands []*member
	for i := range p.members {
		e := &p.members[i]
		if e.targeted && e.m.Stage > 0 && e.m.Offered == 0 && e.state == MPending && e.d.Online && need[e.stratum] {
			e.rank = rank(e.id, seed)
			cands = append(cands, e)
		}
	}
	for _, e := range gone {
		e.rank = rank(e.id, seed)
	}
	slices.SortFunc(cands, func(a, b *member) int { return cmp.Or(cmp.Compare(a.m.Stage, b.m.Stage), cmp.Compare(a.rank, b.rank)) })
	byKey, byValue := map[string][]*member{}, map[string][]*member{}
	for _, c := range cands {
		k := full(c.d)
		byKey[k] = append(byKey[k], c)
		byValue[c.stratum] = append(byValue[c.stratum], c)
	}
	taken := map[*member]bool{}
	pick := func(q map[string][]*member, k string) *member {
		for len(q[k]) > 0 {
			c := q[k][0]
			q[k] = q[k][1:]
			if !taken[c] {
				taken[c] = true
				return c
			}
		}
		return nil
	}
	slices.SortFunc(gone, func(a, b *member) int { return cmp.Compare(a.rank, b.rank) })
	for _, e := range gone {
		r := pick(byKey, full(e.d))
		if r == nil {
			r = pick(byValue, e.stratum)
		}
		if r == nil {
			continue
		}
		me, mr := p.own(e), p.own(r)
		me.Stage, mr.Stage = mr.Stage, 0
		me.ReplacedBy, mr.Replaces = r.id, e.id
		p.out.Transitions = append(p.out.Transitions, Transition{From: e.id, To: r.id, Stage: 0, Action: "replace",
			Reason: fmt.Sprintf("canary member %s unreachable for %v: replaced by %s (%s), which moves from stage %d",
				e.id, p.now.Sub(time.UnixMilli(max(st.StageStarted, e.d.LastSeen))).Round(time.Second), r.id, labelsOf(r.d, spec.Strata), me.Stage+1)})
	}
	for _, v := range join {
		r := pick(byValue, v)
		if r == nil {
			continue
		}
		from := r.m.Stage
		p.own(r).Stage = 0
		p.out.Transitions = append(p.out.Transitions, Transition{From: "", To: r.id, Stage: 0, Action: "replace",
			Reason: fmt.Sprintf("%s joins the canary from stage %d: no %s=%s device of the canary has committed", r.id, from+1, spec.firstLabel(), v)})
	}
}

func labelsOf(d *Device, keys []string) string {
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+d.Labels[k])
	}
	return strings.Join(parts, ", ")
}

// offer picks the members to offer the release to: running and in a
// window, or completed and delivering to those that come back.
func (p *planner) offer() {
	st := p.st
	if (st.Status != StatusRunning && !(st.Status == StatusCompleted && p.delivering())) || !inWindow(p.spec.Limits.Windows, p.now) {
		return
	}
	stage := st.Stage
	if st.Status == StatusCompleted {
		stage = len(p.spec.Stages) - 1
	}
	offers := p.spec.offers(p.members, p.inFlight, stage, p.held)
	p.out.Actions = slices.Grow(p.out.Actions, len(offers))
	for _, e := range offers {
		m := p.own(e)
		m.Offered = p.nowMS
		m.Offers = max(m.Offers, 1) + boolInt(m.Offers > 0 || m.Withdrawn > 0 || m.Canceled > 0)
		p.out.Actions = append(p.out.Actions, Action{Kind: ActOffer, Device: e.id})
	}
}

// undo takes offers back: while the rollout is paused or has aborted (and,
// running, from members no longer targeted: relabelled, in another
// rollout), an offer the device never acknowledged is withdrawn (never
// sent again), one it is working on is cancelled while it is not
// installing yet; an offer unacknowledged for a device timeout is
// withdrawn; and while reverting, the targeted devices that committed are
// offered the revert release.
func (p *planner) undo() {
	st := p.st
	var undo []Action
	closing := st.Status == StatusCompleted && !p.delivering() && !st.Closed
	if st.Status == StatusRunning || st.Status == StatusCompleted {
		// An offer the device has not acknowledged for a device timeout
		// (it went off as the offer went out, or it does not answer) is
		// withdrawn: the slot is freed, and the device is offered again
		// when it is reachable. At the offline deadline, every offer still
		// unacknowledged is withdrawn, and the rollout closes.
		for i := range p.members {
			e := &p.members[i]
			if !e.m.live() || e.d == nil {
				continue
			}
			if _, ack := acked(e.m, e.d); !ack && (closing || p.now.Sub(time.UnixMilli(e.m.Offered)) > p.spec.Gates.DeviceTimeout.D()) {
				p.own(e).Withdrawn = p.nowMS
				undo = append(undo, Action{Kind: ActWithdraw, Device: e.id})
			}
		}
		if closing {
			p.st.Closed = true
		}
	}
	if st.Status == StatusPaused || st.Status == StatusAborted || st.Status == StatusRunning {
		for i := range p.members {
			e := &p.members[i]
			m, d := e.m, e.d
			if d == nil || m.Offered == 0 || m.Canceled >= m.Offered {
				continue
			}
			u := d.Update
			working := u != nil && u.At >= m.Offered && (u.State == proto.UpdateOffered || u.State == proto.UpdateDownloading ||
				u.State == proto.UpdateVerified || u.State == proto.UpdateDeferred)
			_, ack := acked(m, d)
			if st.Status == StatusRunning && e.targeted {
				continue // running: only members no longer targeted are taken back
			}
			switch {
			case working:
				// Acknowledged (or acting on it although withdrawn: the
				// withdrawal raced the delivery).
				p.own(e).Canceled = p.nowMS
				undo = append(undo, Action{Kind: ActCancel, Device: e.id})
			case !ack && m.live():
				p.own(e).Withdrawn = p.nowMS
				undo = append(undo, Action{Kind: ActWithdraw, Device: e.id})
			}
		}
	}
	if st.Reverting && p.spec.Revert != nil {
		for i := range p.members {
			e := &p.members[i]
			if e.m.Reverted == 0 && e.m.Offered > 0 && e.state == MCommitted && e.targeted {
				p.own(e).Reverted = p.nowMS
				undo = append(undo, Action{Kind: ActRevert, Device: e.id})
			}
		}
	}
	// Offers come in offer order (stage, online, rank); the rest in a
	// stable order, whatever the map iteration did.
	slices.SortFunc(undo, func(a, b Action) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Device, b.Device))
	})
	p.out.Actions = append(p.out.Actions, undo...)
}

// delivering: completed, and still offering the release to members that
// come back.
func (p *planner) delivering() bool {
	return p.st.Status == StatusCompleted && p.now.Sub(time.UnixMilli(p.st.Ended)) <= p.spec.Limits.OfflineDeadline.D()
}

func (p *planner) finish() Outcome {
	if p.st.Status == StatusCompleted {
		p.st.Unreached = p.out.Unreached
	}
	slices.SortFunc(p.out.Excluded, func(a, b Exclusion) int { return cmp.Compare(a.Device, b.Device) })
	p.out.State = p.st
	return p.out
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

// offers picks members of stages up to stage to offer the release to:
// reachable now (online), not held, within the in-flight limit and the
// disruption budgets.
func (s Spec) offers(members []member, inFlight, stage int, held map[string]bool) []*member {
	// Candidates in offer order: earlier stage first, then by rank. The
	// keys are computed once (a comparator that hashes and looks members
	// up costs n log n of each).
	type cand struct {
		stage int
		rank  float64
		e     *member
	}
	slots := len(members)
	if s.Limits.MaxInFlight > 0 {
		slots = s.Limits.MaxInFlight - inFlight
	}
	if slots <= 0 {
		return nil
	}
	var cands []cand
	seed := s.seed()
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
			if occupies(e.m, ms) {
				busyBy[b.Label][v]++
			}
		}
		if e.m.Stage <= stage && !e.m.live() && ms == MPending && e.d.Online && (e.m.Stage == 0 || !held[e.stratum]) {
			cands = append(cands, cand{stage: e.m.Stage, rank: rank(e.id, seed), e: e})
		}
	}
	less := func(a, b cand) int {
		return cmp.Or(cmp.Compare(a.stage, b.stage), cmp.Compare(a.rank, b.rank))
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

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
