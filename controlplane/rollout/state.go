package rollout

import (
	"errors"
	"fmt"
	"time"
)

// Status of a rollout.
type Status string

// Statuses. Created: members placed, waiting for start. Running: offering
// and judging. Paused: judged, nothing offered, until resumed. Aborted and
// Completed are final (an aborted rollout may still be reverting; a
// completed one still delivers to members that come back, until its
// offline deadline).
const (
	StatusCreated   Status = "created"
	StatusRunning   Status = "running"
	StatusPaused    Status = "paused"
	StatusAborted   Status = "aborted"
	StatusCompleted Status = "completed"
)

// Final says whether no operator action can change the status any more.
func (s Status) Final() bool { return s == StatusAborted || s == StatusCompleted }

// Op is an operator's action on a rollout.
type Op string

// Operator actions.
const (
	OpStart   Op = "start"
	OpPause   Op = "pause"
	OpResume  Op = "resume"
	OpAbort   Op = "abort"
	OpPromote Op = "promote"
	OpRevert  Op = "revert"
)

// Ops lists the operator actions.
var Ops = []Op{OpStart, OpPause, OpResume, OpAbort, OpPromote, OpRevert}

// Member is a device's place in a rollout. Its stage changes only when a
// canary member that stayed unreachable is replaced (the two swap).
type Member struct {
	Stage     int   `json:"stage"`
	Offered   int64 `json:"offered,omitempty"`   // unix ms of the latest offer; 0 not yet
	Offers    int   `json:"offers,omitempty"`    // offers made; the first is 1 (0 in rollouts stored before this was counted)
	Withdrawn int64 `json:"withdrawn,omitempty"` // unix ms the unacknowledged offer was withdrawn
	Reverted  int64 `json:"reverted,omitempty"`  // unix ms the revert was offered
	Canceled  int64 `json:"canceled,omitempty"`  // unix ms the acknowledged offer was cancelled
	// ReplacedBy names the device that took this canary member's place
	// while it was unreachable; Replaces, the member this one replaced.
	ReplacedBy string `json:"replaced_by,omitempty"`
	Replaces   string `json:"replaces,omitempty"`
}

// live says whether the member's latest offer stands (made, neither
// withdrawn nor cancelled since).
func (m *Member) live() bool {
	return m.Offered > 0 && m.Withdrawn < m.Offered && m.Canceled < m.Offered
}

// OfferID is the id of the command carrying the member's latest offer: one
// per offer, so that an offer made again after a withdrawal is a command of
// its own (and its acknowledgement too).
func OfferID(rollout, device string, offers int) string {
	id := rollout + ":" + device + ":offer"
	if offers > 1 {
		id += fmt.Sprintf(":%d", offers)
	}
	return id
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
	// withdraw offers and to revert late commits; a completed one until
	// its offline deadline, to deliver to members that come back.
	Ended int64 `json:"ended,omitempty"`
	// Canary says why the first stage holds more devices than it asks
	// for (every hardware revision must be in it); empty when it does not.
	Canary string `json:"canary,omitempty"`
	// Unreached: once completed, the members still to reach (their
	// devices were off); the rollout delivers to them until its offline
	// deadline.
	Unreached int `json:"unreached,omitempty"`
	// Closed: completed, past its offline deadline, nothing more offered.
	Closed bool `json:"closed,omitempty"`
	// RevertAt is when a revert was asked for (unix ms): an aborted
	// rollout is planned a device timeout from then, to send the reverts.
	RevertAt int64              `json:"revert_at,omitempty"`
	Members  map[string]*Member `json:"-"` // persisted per device
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

// ErrState is returned for an operator action the rollout's status does
// not allow; its message says what the action needs.
var ErrState = errors.New("not allowed in this state")

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrState, fmt.Sprintf(format, args...))
}

// Apply is an operator's action on a rollout: the state it leads to and
// the transition to record, or why it is refused (ErrState). It is pure;
// the members are not touched (what an action means for them, offers
// withdrawn or reverted, is the next Plan's work).
func (st State) Apply(spec Spec, op Op, actor, reason string, now time.Time) (State, Transition, error) {
	next := st
	next.Members = st.Members
	tr := Transition{From: string(st.Status), Stage: st.Stage, Reason: reason, Action: string(op)}
	by := func(what string) string {
		s := what + " by " + actor
		if reason != "" {
			s += ": " + reason
		}
		return s
	}
	switch op {
	case OpStart:
		if st.Status != StatusCreated {
			return st, tr, refuse("start a rollout that is %s: only a created rollout starts", st.Status)
		}
		next.Status, next.Stage, next.StageStarted = StatusRunning, 0, now.UnixMilli()
	case OpPause:
		if st.Status != StatusRunning {
			return st, tr, refuse("pause a rollout that is %s: only a running rollout pauses", st.Status)
		}
		next.Status, next.Reason = StatusPaused, by("paused")
	case OpResume:
		switch {
		case st.Status != StatusPaused:
			return st, tr, refuse("resume a rollout that is %s: only a paused rollout resumes", st.Status)
		case st.Reverting:
			return st, tr, refuse("resume a rollout that is reverting: its updated devices are being offered %s; "+
				"roll the release out again as a new rollout once the cause is fixed", spec.revertName())
		}
		next.Status, next.Reason, next.GatesSince = StatusRunning, "", 0
	case OpAbort:
		if st.Status.Final() {
			return st, tr, refuse("abort a rollout that is %s: it has ended", st.Status)
		}
		next.Status, next.Reason, next.Ended = StatusAborted, by("aborted"), now.UnixMilli()
	case OpPromote:
		if st.Status != StatusRunning && st.Status != StatusPaused {
			return st, tr, refuse("promote a rollout that is %s: only a running or paused rollout has a soak to skip", st.Status)
		}
		if reason == "" {
			return st, tr, refuse("promote needs a reason: it skips the rest of the stage's soak")
		}
		next.Promoted = true
	case OpRevert:
		switch {
		case spec.Revert == nil:
			return st, tr, refuse("revert needs a revert release, and rollout %s was created without one (--revert-release). "+
				"Sign a re-release of the build the devices ran before with a counter above %d (devices refuse lower counters), "+
				"push it, and roll it out to the devices that took %s: hangar rollout create --release VERSION --from-version %s",
				spec.ID, spec.Release.Counter, spec.Release, spec.Release.Version)
		case st.Status == StatusCreated:
			return st, tr, refuse("revert a rollout that has not started: nothing was offered; abort it instead")
		case st.Status == StatusCompleted:
			return st, tr, refuse("revert a completed rollout: every member took %s; roll %s out as a new rollout "+
				"(hangar rollout create --release %s --from-version %s)", spec.Release, spec.revertName(), spec.Revert.Version, spec.Release.Version)
		case st.Reverting:
			return st, tr, refuse("rollout %s is already reverting to %s", spec.ID, spec.revertName())
		}
		next.Reverting, next.RevertAt = true, now.UnixMilli()
		if st.Status == StatusRunning {
			next.Status, next.Reason = StatusPaused, by("reverted")
		}
	default:
		return st, tr, refuse("unknown action %q", op)
	}
	if next.Status.Final() && next.Ended == 0 {
		next.Ended = now.UnixMilli()
	}
	tr.To = string(next.Status)
	return next, tr, nil
}

func (s Spec) revertName() string {
	if s.Revert == nil {
		return "the previous build"
	}
	return s.Revert.String()
}
