package rollout

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlite"
	"github.com/hangarfleet/hangar/proto"
)

// Store is what the applier reads and writes.
type Store interface {
	CreateRollout(ctx context.Context, r sqlite.RolloutRow, a store.Audit) error
	Rollout(ctx context.Context, id string) (sqlite.RolloutRow, error)
	Rollouts(ctx context.Context, statuses ...string) ([]sqlite.RolloutRow, error)
	Members(ctx context.Context, rollout string) ([]sqlite.MemberRow, error)
	BusyDevices(ctx context.Context, statuses ...string) (map[string]string, error)
	ApplyRollout(ctx context.Context, id string, state []byte, status string, members []sqlite.MemberRow, cmds []store.Command, audits []store.Audit, now time.Time) error
	SetRolloutState(ctx context.Context, id string, state []byte, status string, a store.Audit) error
	Devices(ctx context.Context, f store.DeviceFilter) ([]store.Device, error)
	DeviceUpdates(ctx context.Context, device, target string, counter uint64) ([]store.DeviceUpdate, error)
	Telemetry(ctx context.Context, id string, from, to time.Time, limit int) ([]store.TelemetryRow, error)
	Release(ctx context.Context, target, version string) (store.Release, error)
}

// Publisher sends a stored command (package commands).
type Publisher interface {
	PublishAll(ctx context.Context, cs []store.Command)
}

// Rollout is a rollout with its state, for the API.
type Rollout struct {
	Spec      Spec      `json:"spec"`
	State     State     `json:"state"`
	Created   time.Time `json:"created"`
	CreatedBy string    `json:"created_by"`
	Updated   time.Time `json:"updated"`
}

// Status is a rollout with what its last plan measured.
type StatusReport struct {
	Rollout
	Stages   []StageReport  `json:"stages"`
	Gates    []GateResult   `json:"gates"`
	Counts   map[string]int `json:"counts"` // member states, stages up to the current one
	Targeted int            `json:"targeted"`
	Members  int            `json:"members"`
}

// StageReport counts a stage's members.
type StageReport struct {
	Stage   string         `json:"stage"`
	Devices int            `json:"devices"`
	States  map[string]int `json:"states"`
}

// Options configure an Applier.
type Options struct {
	Store    Store
	Publish  Publisher
	Logger   *slog.Logger
	Now      func() time.Time
	Interval time.Duration // between plans of every active rollout (default 2 s)
	// HealthSample caps the devices whose telemetry is read per cohort.
	HealthSample int
}

// Applier runs Plan for active rollouts and carries out its decisions.
type Applier struct {
	opts Options
	log  *slog.Logger
	mu   sync.Mutex // one plan at a time
	wake chan struct{}
	// last outcome per rollout, for status reports
	lastMu sync.Mutex
	last   map[string]Outcome
}

// active statuses hold their devices; a reverting aborted rollout still
// plans (to send reverts).
var activeStatuses = []string{string(StatusRunning), string(StatusPaused)}

// New returns an applier.
func New(opts Options) *Applier {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Interval == 0 {
		opts.Interval = 2 * time.Second
	}
	if opts.HealthSample == 0 {
		opts.HealthSample = 300
	}
	return &Applier{opts: opts, log: opts.Logger.With("component", "rollout"), wake: make(chan struct{}, 1), last: map[string]Outcome{}}
}

// Poke plans at once (a device reported, an operator acted).
func (a *Applier) Poke() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// Run plans every active rollout periodically until ctx ends.
func (a *Applier) Run(ctx context.Context) {
	t := time.NewTicker(a.opts.Interval)
	defer t.Stop()
	for {
		a.StepAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.wake:
		}
	}
}

// StepAll plans every rollout that is running, paused or reverting.
func (a *Applier) StepAll(ctx context.Context) {
	rows, err := a.opts.Store.Rollouts(ctx, string(StatusRunning), string(StatusPaused), string(StatusAborted))
	if err != nil {
		if ctx.Err() == nil {
			a.log.Error("list rollouts", "err", err)
		}
		return
	}
	now := a.opts.Now()
	for _, r := range rows {
		var spec Spec
		var st State
		if json.Unmarshal(r.Spec, &spec) == nil && json.Unmarshal(r.State, &st) == nil && spec.Settled(st, now) {
			continue // an old aborted rollout: not worth loading its members
		}
		if err := a.Step(ctx, r.ID); err != nil && ctx.Err() == nil {
			a.log.Error("rollout step failed", "rollout", r.ID, "err", err)
		}
	}
}

func (a *Applier) load(ctx context.Context, id string) (Rollout, error) {
	row, err := a.opts.Store.Rollout(ctx, id)
	if err != nil {
		return Rollout{}, err
	}
	r := Rollout{Created: row.Created, CreatedBy: row.CreatedBy, Updated: row.Updated}
	if err := json.Unmarshal(row.Spec, &r.Spec); err != nil {
		return r, fmt.Errorf("rollout %s spec: %w", id, err)
	}
	if err := json.Unmarshal(row.State, &r.State); err != nil {
		return r, fmt.Errorf("rollout %s state: %w", id, err)
	}
	ms, err := a.opts.Store.Members(ctx, id)
	if err != nil {
		return r, err
	}
	r.State.Members = make(map[string]*Member, len(ms))
	for _, m := range ms {
		r.State.Members[m.Device] = &Member{Stage: m.Stage, Offered: m.Offered, Reverted: m.Reverted, Canceled: m.Canceled}
	}
	return r, nil
}

// observe gathers what Plan needs about the devices.
func (a *Applier) observe(ctx context.Context, r Rollout, now time.Time) ([]Device, error) {
	s := r.Spec
	ds, err := a.opts.Store.Devices(ctx, store.DeviceFilter{Labels: s.Selector, Brief: true})
	if err != nil {
		return nil, err
	}
	busy, err := a.opts.Store.BusyDevices(ctx, activeStatuses...)
	if err != nil {
		return nil, err
	}
	reports := func(rel *ReleaseRef) (map[string]*Report, error) {
		out := map[string]*Report{}
		if rel == nil {
			return out, nil
		}
		us, err := a.opts.Store.DeviceUpdates(ctx, "", rel.Target, rel.Counter)
		if err != nil {
			return nil, err
		}
		for _, u := range us {
			out[u.Device] = &Report{State: proto.UpdateState(u.State), At: u.Updated.UnixMilli(), Reason: u.Reason}
		}
		return out, nil
	}
	upd, err := reports(&s.Release)
	if err != nil {
		return nil, err
	}
	rev, err := reports(s.Revert)
	if err != nil {
		return nil, err
	}
	devs := make([]Device, 0, len(ds))
	for _, d := range ds {
		if d.Revoked {
			continue
		}
		dev := Device{ID: d.ID, Labels: d.Labels, Version: d.Version, Online: d.Online, Update: upd[d.ID], Revert: rev[d.ID]}
		if b := busy[d.ID]; b != "" && b != s.ID {
			dev.Busy = b
		}
		devs = append(devs, dev)
	}
	if r.State.GatesSince > 0 && !s.Gates.HealthOff {
		a.health(ctx, r, devs, time.UnixMilli(r.State.GatesSince), now)
	}
	return devs, nil
}

// health measures the updated devices and a sample of those not updated
// yet over the soak window.
func (a *Applier) health(ctx context.Context, r Rollout, devs []Device, from, to time.Time) {
	var updated, pending []*Device
	for i := range devs {
		d := &devs[i]
		m := r.State.Members[d.ID]
		if m == nil {
			continue
		}
		switch {
		case m.Stage <= r.State.Stage && m.Offered > 0 && r.Spec.memberState(m, d, to) == MCommitted:
			updated = append(updated, d)
		case m.Stage > r.State.Stage && m.Offered == 0:
			pending = append(pending, d)
		}
	}
	for _, group := range [][]*Device{updated, pending} {
		slices.SortFunc(group, func(x, y *Device) int { return cmp.Compare(rank(x.ID, r.Spec.ID), rank(y.ID, r.Spec.ID)) })
		if len(group) > a.opts.HealthSample {
			group = group[:a.opts.HealthSample]
		}
		for _, d := range group {
			rows, err := a.opts.Store.Telemetry(ctx, d.ID, from, to, 100000)
			if err != nil {
				continue
			}
			samples := make([]proto.Sample, len(rows))
			times := make([]int64, len(rows))
			for i, row := range rows {
				samples[i], times[i] = row.Sample, row.Base+int64(row.Sample.T)
			}
			d.Health = HealthOf(samples, times)
		}
	}
}

// Step plans one rollout and carries out the result: state, members,
// commands and transitions are stored in one durable transaction, then the
// commands are published.
func (a *Applier) Step(ctx context.Context, id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := a.load(ctx, id)
	if err != nil {
		return err
	}
	now := a.opts.Now()
	if r.Spec.Settled(r.State, now) {
		return nil
	}
	t0 := time.Now()
	devs, err := a.observe(ctx, r, now)
	if err != nil {
		return err
	}
	t1 := time.Now()
	out := Plan(r.Spec, r.State, devs, now)
	a.lastMu.Lock()
	a.last[id] = out
	a.lastMu.Unlock()
	t2 := time.Now()
	err = a.apply(ctx, r, out, now)
	a.log.Debug("rollout planned", "rollout", id, "devices", len(devs), "actions", len(out.Actions),
		"observe", t1.Sub(t0), "plan", t2.Sub(t1), "apply", time.Since(t2))
	return err
}

func (a *Applier) apply(ctx context.Context, r Rollout, out Outcome, now time.Time) error {
	var members []sqlite.MemberRow
	for dev, m := range out.State.Members {
		old := r.State.Members[dev]
		if old == m { // Plan copies on write: unchanged members are shared
			continue
		}
		if old == nil || *old != *m {
			members = append(members, sqlite.MemberRow{Device: dev, Stage: m.Stage, Offered: m.Offered, Reverted: m.Reverted, Canceled: m.Canceled})
		}
	}
	stateChanged := out.State.Status != r.State.Status || out.State.Stage != r.State.Stage || out.State.GatesSince != r.State.GatesSince ||
		out.State.Reverting != r.State.Reverting || out.State.Reason != r.State.Reason || out.State.Promoted != r.State.Promoted
	if len(members) == 0 && len(out.Actions) == 0 && len(out.Transitions) == 0 && !stateChanged {
		return nil
	}
	cmds, err := a.commands(ctx, r.Spec, out.Actions, now)
	if err != nil {
		return err
	}
	var audits []store.Audit
	for _, t := range out.Transitions {
		audits = append(audits, store.Audit{Time: now, Actor: "rollout-engine", Action: "rollout.transition", Target: r.Spec.ID,
			Reason: t.Reason, Attrs: map[string]string{"from": t.From, "to": t.To, "stage": fmt.Sprint(t.Stage + 1)}})
		a.log.Info("rollout transition", "rollout", r.Spec.ID, "from", t.From, "to", t.To, "reason", t.Reason)
	}
	state, _ := json.Marshal(out.State)
	if err := a.opts.Store.ApplyRollout(ctx, r.Spec.ID, state, string(out.State.Status), members, cmds, audits, now); err != nil {
		return err
	}
	if len(cmds) > 0 {
		a.opts.Publish.PublishAll(ctx, cmds)
	}
	return nil
}

// commands turns actions into stored commands. Their ids are derived from
// the rollout, device and kind, so a repeated action would be refused by
// the store rather than sent twice.
func (a *Applier) commands(ctx context.Context, s Spec, acts []Action, now time.Time) ([]store.Command, error) {
	if len(acts) == 0 {
		return nil, nil
	}
	var rel, rev store.Release
	var err error
	need := map[string]bool{}
	for _, act := range acts {
		need[act.Kind] = true
	}
	if need[ActOffer] {
		if rel, err = a.opts.Store.Release(ctx, s.Release.Target, s.Release.Version); err != nil {
			return nil, fmt.Errorf("release %s: %w", s.Release, err)
		}
	}
	if need[ActRevert] {
		if rev, err = a.opts.Store.Release(ctx, s.Revert.Target, s.Revert.Version); err != nil {
			return nil, fmt.Errorf("revert release %s: %w", s.Revert, err)
		}
	}
	out := make([]store.Command, 0, len(acts))
	for _, act := range acts {
		c := proto.Command{ID: s.ID + ":" + act.Device + ":" + act.Kind, Rollout: s.ID, Issued: now.UnixMilli()}
		switch act.Kind {
		case ActOffer:
			c.Kind, c.Update = proto.CmdUpdate, rel.Offer()
		case ActRevert:
			c.Kind, c.Update = proto.CmdUpdate, rev.Offer()
		case ActCancel:
			c.Kind = proto.CmdCancel
		}
		body, err := proto.Marshal(&c)
		if err != nil {
			return nil, err
		}
		out = append(out, store.Command{ID: c.ID, Device: act.Device, Kind: string(c.Kind), Body: body, Rollout: s.ID, Created: now})
	}
	return out, nil
}

// NewID returns a rollout id.
func NewID() string {
	var b [6]byte
	rand.Read(b[:])
	return "r-" + hex.EncodeToString(b[:])
}

// Create validates and stores a rollout (status created).
func (a *Applier) Create(ctx context.Context, s Spec, actor string) (Rollout, error) {
	if s.ID == "" {
		s.ID = NewID()
	}
	s = s.WithDefaults()
	if err := s.Validate(); err != nil {
		return Rollout{}, err
	}
	now := a.opts.Now()
	st := State{Status: StatusCreated}
	spec, _ := json.Marshal(s)
	state, _ := json.Marshal(st)
	err := a.opts.Store.CreateRollout(ctx, sqlite.RolloutRow{ID: s.ID, Spec: spec, State: state, Status: string(st.Status),
		Created: now, CreatedBy: actor, Updated: now},
		store.Audit{Time: now, Actor: actor, Action: "rollout.create", Target: s.ID,
			Attrs: map[string]string{"release": s.Release.String(), "stages": stagesString(s.Stages)}})
	if err != nil {
		return Rollout{}, err
	}
	return Rollout{Spec: s, State: st, Created: now, CreatedBy: actor, Updated: now}, nil
}

func stagesString(ss []Stage) string {
	out := ""
	for i, s := range ss {
		if i > 0 {
			out += ","
		}
		out += s.String()
	}
	return out
}

// Operator actions.
const (
	OpStart   = "start"
	OpPause   = "pause"
	OpResume  = "resume"
	OpAbort   = "abort"
	OpPromote = "promote"
	OpRevert  = "revert"
)

// ErrState is returned for an operator action the rollout's status does
// not allow.
var ErrState = errors.New("not allowed in this state")

// Act applies an operator's action, recorded with who and why.
func (a *Applier) Act(ctx context.Context, id, op, actor, reason string) (Rollout, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := a.load(ctx, id)
	if err != nil {
		return r, err
	}
	st := &r.State
	now := a.opts.Now()
	from := st.Status
	switch {
	case op == OpStart && st.Status == StatusCreated:
		st.Status, st.Stage, st.StageStarted = StatusRunning, 0, now.UnixMilli()
	case op == OpPause && st.Status == StatusRunning:
		st.Status, st.Reason = StatusPaused, "paused by "+actor
	case op == OpResume && st.Status == StatusPaused:
		st.Status, st.Reason, st.GatesSince = StatusRunning, "", 0
	case op == OpAbort && (st.Status == StatusRunning || st.Status == StatusPaused || st.Status == StatusCreated):
		st.Status, st.Reason, st.Ended = StatusAborted, "aborted by "+actor, now.UnixMilli()
	case op == OpPromote && (st.Status == StatusRunning || st.Status == StatusPaused):
		st.Promoted = true
	case op == OpRevert && r.Spec.Revert != nil && st.Status != StatusCompleted && st.Status != StatusCreated:
		st.Reverting = true
		if st.Status == StatusRunning {
			st.Status = StatusPaused
		}
	default:
		return r, fmt.Errorf("%s a rollout that is %s: %w", op, st.Status, ErrState)
	}
	if reason != "" && (op == OpPause || op == OpAbort) {
		st.Reason += ": " + reason
	}
	state, _ := json.Marshal(st)
	err = a.opts.Store.SetRolloutState(ctx, id, state, string(st.Status), store.Audit{Time: now, Actor: actor, Action: "rollout." + op,
		Target: id, Reason: reason, Attrs: map[string]string{"from": string(from), "to": string(st.Status), "stage": fmt.Sprint(st.Stage + 1)}})
	if err != nil {
		return r, err
	}
	a.Poke()
	return r, nil
}

// Get returns a rollout.
func (a *Applier) Get(ctx context.Context, id string) (Rollout, error) { return a.load(ctx, id) }

// List returns every rollout (without members).
func (a *Applier) List(ctx context.Context) ([]Rollout, error) {
	rows, err := a.opts.Store.Rollouts(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Rollout, 0, len(rows))
	for _, row := range rows {
		r := Rollout{Created: row.Created, CreatedBy: row.CreatedBy, Updated: row.Updated}
		_ = json.Unmarshal(row.Spec, &r.Spec)
		_ = json.Unmarshal(row.State, &r.State)
		out = append(out, r)
	}
	return out, nil
}

// Status reports a rollout with what the engine measures now: per stage
// counts and each gate against its threshold. For a rollout not planned
// by the applier (created, completed), it plans without acting.
func (a *Applier) Status(ctx context.Context, id string) (StatusReport, error) {
	r, err := a.load(ctx, id)
	if err != nil {
		return StatusReport{}, err
	}
	now := a.opts.Now()
	devs, err := a.observe(ctx, r, now)
	if err != nil {
		return StatusReport{}, err
	}
	st := r.State.Clone()
	if st.Status == StatusCreated {
		// The blast radius: which devices each stage would take.
		st.Status = StatusRunning
	}
	out := Plan(r.Spec, st, devs, now)
	rep := StatusReport{Rollout: r, Gates: out.Gates, Counts: out.Counts, Targeted: out.Targeted, Members: len(out.State.Members)}
	byID := map[string]*Device{}
	for i := range devs {
		byID[devs[i].ID] = &devs[i]
	}
	spec := r.Spec.WithDefaults()
	rep.Stages = make([]StageReport, len(spec.Stages))
	for i, s := range spec.Stages {
		rep.Stages[i] = StageReport{Stage: s.String(), States: map[string]int{}}
	}
	for dev, m := range out.State.Members {
		if m.Stage < len(rep.Stages) {
			rep.Stages[m.Stage].Devices++
			orig := r.State.Members[dev]
			if orig == nil {
				orig = &Member{Stage: m.Stage}
			}
			rep.Stages[m.Stage].States[spec.memberState(orig, byID[dev], now)]++
		}
	}
	return rep, nil
}

// Plan runs the engine on a rollout without acting: which devices each
// stage would take (the dry run).
// MemberReport is where one device stands in a rollout.
type MemberReport struct {
	Device   string     `json:"device"`
	Stage    int        `json:"stage"` // 1-based
	State    string     `json:"state"`
	Version  string     `json:"version,omitempty"`
	Online   bool       `json:"online"`
	Offered  *time.Time `json:"offered,omitempty"`
	Canceled *time.Time `json:"canceled,omitempty"`
	Reverted *time.Time `json:"reverted,omitempty"`
	Update   *Report    `json:"update,omitempty"` // the device's last report on the release
	Revert   *Report    `json:"revert,omitempty"` // and on the revert release
}

// Devices lists a rollout's members, in stage then device order, with
// their state (all states when state is empty).
func (a *Applier) Devices(ctx context.Context, id, state string) ([]MemberReport, error) {
	r, err := a.load(ctx, id)
	if err != nil {
		return nil, err
	}
	now := a.opts.Now()
	devs, err := a.observe(ctx, r, now)
	if err != nil {
		return nil, err
	}
	byID := make(map[string]*Device, len(devs))
	for i := range devs {
		byID[devs[i].ID] = &devs[i]
	}
	at := func(ms int64) *time.Time {
		if ms == 0 {
			return nil
		}
		t := time.UnixMilli(ms).UTC()
		return &t
	}
	out := []MemberReport{}
	for dev, m := range r.State.Members {
		d := byID[dev]
		mr := MemberReport{Device: dev, Stage: m.Stage + 1, State: r.Spec.memberState(m, d, now),
			Offered: at(m.Offered), Canceled: at(m.Canceled), Reverted: at(m.Reverted)}
		if d == nil {
			mr.State = MGone
		} else {
			mr.Version, mr.Online, mr.Update, mr.Revert = d.Version, d.Online, d.Update, d.Revert
		}
		if state == "" || mr.State == state {
			out = append(out, mr)
		}
	}
	slices.SortFunc(out, func(x, y MemberReport) int {
		return cmp.Or(cmp.Compare(x.Stage, y.Stage), cmp.Compare(x.Device, y.Device))
	})
	return out, nil
}

func (a *Applier) DryRun(ctx context.Context, s Spec) (map[int][]string, int, error) {
	s = s.WithDefaults()
	if s.ID == "" {
		s.ID = "dry-run"
	}
	devs, err := a.observe(ctx, Rollout{Spec: s, State: State{Status: StatusRunning, Members: map[string]*Member{}}}, a.opts.Now())
	if err != nil {
		return nil, 0, err
	}
	out := Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, a.opts.Now())
	stages := map[int][]string{}
	for id, m := range out.State.Members {
		stages[m.Stage] = append(stages[m.Stage], id)
	}
	for k := range stages {
		slices.Sort(stages[k])
	}
	return stages, out.Targeted, nil
}
