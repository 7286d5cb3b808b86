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
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Store is what the applier reads and writes.
type Store interface {
	CreateRollout(ctx context.Context, r store.RolloutRow, members []store.MemberRow, a store.Audit) error
	Rollout(ctx context.Context, id string) (store.RolloutRow, error)
	Rollouts(ctx context.Context, statuses ...string) ([]store.RolloutRow, error)
	Members(ctx context.Context, rollout string) ([]store.MemberRow, error)
	BusyDevices(ctx context.Context, statuses ...string) (map[string]string, error)
	RolloutAcks(ctx context.Context, rollout string) (map[string]int64, error)
	ApplyRollout(ctx context.Context, c store.RolloutChange) error
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
	// rev is the stored revision this was read at.
	rev int64
}

// StatusReport is a rollout with what its last plan measured.
type StatusReport struct {
	Rollout
	Stages   []StageReport       `json:"stages"`
	Gates    []GateResult        `json:"gates"`
	Strata   []StratumReport     `json:"strata,omitempty"`
	Counts   map[MemberState]int `json:"counts"` // member states, stages up to the current one
	Targeted int                 `json:"targeted"`
	Members  int                 `json:"members"`
	// Unreached counts members whose stage came and whose device is off.
	Unreached int `json:"unreached"`
	// Excluded summarises the devices the selector matches and the
	// rollout leaves out, by reason.
	Excluded map[string]int `json:"excluded,omitempty"`
	// Transfer is what the members that reported on the release fetch
	// over the air, from their reports: a delta, the full artifact, or
	// both when they gave the delta up.
	Transfer Transfer `json:"transfer"`
}

// StageReport counts a stage's members.
type StageReport struct {
	Stage    string              `json:"stage"`
	Devices  int                 `json:"devices"`
	States   map[MemberState]int `json:"states"`
	Transfer Transfer            `json:"transfer"`
}

// Preview is which devices each stage takes: what a dry run shows, and
// what create took.
type Preview struct {
	Spec     Spec           `json:"spec"`
	Targeted int            `json:"targeted"`
	Stages   []PreviewStage `json:"stages"`
	// Canary says why the first stage is larger than it asks.
	Canary string `json:"canary,omitempty"`
	// Excluded are the devices the selector matches that the rollout
	// leaves out, each with why.
	Excluded []Exclusion `json:"excluded"`
	// Transfer is what the offers would send: deltas to the devices that
	// report a delta's base, the full artifact to the others.
	Transfer Transfer `json:"transfer"`
}

// PreviewStage is one stage of a Preview: the devices it adds, and of
// those the ones offline now (offered when they come back).
type PreviewStage struct {
	Stage    string   `json:"stage"`
	Devices  []string `json:"devices"`
	Offline  []string `json:"offline"`
	Transfer Transfer `json:"transfer"`
}

// Options configure an Applier.
type Options struct {
	Store    Store
	Publish  Publisher
	Logger   *slog.Logger
	Now      func() time.Time
	Interval time.Duration // between plans of every active rollout (default 2 s)
	// HealthSample caps the devices whose telemetry is read per cohort,
	// beside up to HealthPerStratum of each value of the first stratum.
	HealthSample     int
	HealthPerStratum int
}

// Applier runs Plan for active rollouts and carries out its decisions.
type Applier struct {
	opts Options
	log  *slog.Logger
	mu   sync.Mutex // one plan at a time
	wake chan struct{}
}

// active statuses hold their devices: a created rollout too (it placed its
// members, and another rollout taking them would offer them twice).
var activeStatuses = []string{string(StatusCreated), string(StatusRunning), string(StatusPaused)}

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
	if opts.HealthPerStratum == 0 {
		opts.HealthPerStratum = 30
	}
	return &Applier{opts: opts, log: opts.Logger.With("component", "rollout"), wake: make(chan struct{}, 1)}
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

// StepAll plans every rollout that is running or paused, aborted and
// withdrawing or reverting, or completed and delivering to members that
// come back.
func (a *Applier) StepAll(ctx context.Context) {
	rows, err := a.opts.Store.Rollouts(ctx, string(StatusRunning), string(StatusPaused), string(StatusAborted), string(StatusCompleted))
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
			continue // nothing left to do: not worth loading its members
		}
		if err := a.Step(ctx, r.ID); err != nil && ctx.Err() == nil {
			a.log.Error("rollout step failed", "rollout", r.ID, "err", err)
		}
	}
}

func rolloutOf(row store.RolloutRow) (Rollout, error) {
	r := Rollout{Created: row.Created, CreatedBy: row.CreatedBy, Updated: row.Updated, rev: row.Rev}
	if err := json.Unmarshal(row.Spec, &r.Spec); err != nil {
		return r, fmt.Errorf("rollout %s spec: %w", row.ID, err)
	}
	if err := json.Unmarshal(row.State, &r.State); err != nil {
		return r, fmt.Errorf("rollout %s state: %w", row.ID, err)
	}
	return r, nil
}

func (a *Applier) load(ctx context.Context, id string) (Rollout, error) {
	row, err := a.opts.Store.Rollout(ctx, id)
	if err != nil {
		return Rollout{}, err
	}
	r, err := rolloutOf(row)
	if err != nil {
		return r, err
	}
	ms, err := a.opts.Store.Members(ctx, id)
	if err != nil {
		return r, err
	}
	r.State.Members = make(map[string]*Member, len(ms))
	all := make([]Member, len(ms))
	for i, m := range ms {
		all[i] = Member{Stage: m.Stage, Offered: m.Offered, Offers: m.Offers, Withdrawn: m.Withdrawn, Reverted: m.Reverted,
			Canceled: m.Canceled, ReplacedBy: m.ReplacedBy, Replaces: m.Replaces}
		r.State.Members[m.Device] = &all[i]
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
	if len(s.Selector) > 0 && len(r.State.Members) > 0 {
		// Members the selector no longer matches (relabelled) are still
		// members: seen as left out, so that their offers are taken back.
		seen := make(map[string]bool, len(ds))
		for _, d := range ds {
			seen[d.ID] = true
		}
		var missing []string
		for id := range r.State.Members {
			if !seen[id] {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			more, err := a.opts.Store.Devices(ctx, store.DeviceFilter{IDs: missing, Brief: true})
			if err != nil {
				return nil, err
			}
			ds = append(ds, more...)
		}
	}
	busy, err := a.opts.Store.BusyDevices(ctx, activeStatuses...)
	if err != nil {
		return nil, err
	}
	acks := map[string]int64{}
	if len(r.State.Members) > 0 && s.ID != "" {
		if acks, err = a.opts.Store.RolloutAcks(ctx, s.ID); err != nil {
			return nil, err
		}
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
			out[u.Device] = &Report{State: proto.UpdateState(u.State), At: u.Updated.UnixMilli(), Reason: u.Reason,
				Patch: u.Patch, Fallback: u.Fallback}
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
		dev := Device{ID: d.ID, Labels: d.Labels, Hardware: d.Hardware, Version: d.Version, Online: d.Online,
			AwaitingEnrollment: d.AwaitingEnrollment, Update: upd[d.ID], Revert: rev[d.ID]}
		if d.LastSeen != nil {
			dev.LastSeen = d.LastSeen.UnixMilli()
		}
		if b := busy[d.ID]; b != "" && b != s.ID {
			dev.Busy = b
		}
		if m := r.State.Members[d.ID]; m != nil && m.Offered > 0 {
			dev.Acked = acks[OfferID(s.ID, d.ID, m.Offers)]
		}
		devs = append(devs, dev)
	}
	if r.State.GatesSince > 0 && !s.Gates.HealthOff {
		a.health(ctx, r, devs, time.UnixMilli(r.State.GatesSince), now)
	}
	return devs, nil
}

// health measures the updated devices and a sample of those not updated
// yet over the soak window: the first HealthSample of each cohort by rank,
// and up to HealthPerStratum of each value of the first stratum label, so
// that a rare hardware revision is compared with its own kind.
func (a *Applier) health(ctx context.Context, r Rollout, devs []Device, from, to time.Time) {
	spec := r.Spec.WithDefaults()
	var updated, pending []*Device
	for i := range devs {
		d := &devs[i]
		m := r.State.Members[d.ID]
		if m == nil {
			continue
		}
		switch {
		case m.Stage <= r.State.Stage && m.live() && spec.memberState(m, d, true, r.State, to) == MCommitted:
			updated = append(updated, d)
		case m.Stage > r.State.Stage && m.Offered == 0:
			pending = append(pending, d)
		}
	}
	seed := spec.seed()
	for _, group := range [][]*Device{updated, pending} {
		slices.SortFunc(group, func(x, y *Device) int { return cmp.Compare(rank(x.ID, seed), rank(y.ID, seed)) })
		perValue := map[string]int{}
		for i, d := range group {
			v := spec.stratumOf(d)
			if i >= a.opts.HealthSample && perValue[v] >= a.opts.HealthPerStratum {
				continue
			}
			perValue[v]++
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
// commands, withdrawals and transitions are stored in one durable
// transaction, then the commands are published.
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
	t2 := time.Now()
	err = a.apply(ctx, r, out, now)
	if errors.Is(err, store.ErrConflict) {
		// Changed meanwhile (an operator's action through another
		// replica): plan again from what is stored now.
		a.log.Debug("rollout changed while planned, planning again", "rollout", id)
		a.Poke()
		return nil
	}
	a.log.Debug("rollout planned", "rollout", id, "devices", len(devs), "actions", len(out.Actions),
		"observe", t1.Sub(t0), "plan", t2.Sub(t1), "apply", time.Since(t2))
	return err
}

// changedMembers are the members Plan changed (it copies on write:
// unchanged members are shared with the old state).
func changedMembers(old, now map[string]*Member) []store.MemberRow {
	var out []store.MemberRow
	for dev, m := range now {
		o := old[dev]
		if o == m || (o != nil && *o == *m) {
			continue
		}
		out = append(out, store.MemberRow{Device: dev, Stage: m.Stage, Offered: m.Offered, Offers: m.Offers, Withdrawn: m.Withdrawn,
			Reverted: m.Reverted, Canceled: m.Canceled, ReplacedBy: m.ReplacedBy, Replaces: m.Replaces})
	}
	return out
}

func (a *Applier) apply(ctx context.Context, r Rollout, out Outcome, now time.Time) error {
	members := changedMembers(r.State.Members, out.State.Members)
	state, _ := json.Marshal(out.State)
	old, _ := json.Marshal(r.State)
	if len(members) == 0 && len(out.Actions) == 0 && len(out.Transitions) == 0 && string(old) == string(state) {
		return nil
	}
	cmds, withdraw, err := a.commands(ctx, r.Spec, out.State, out.Actions, now)
	if err != nil {
		return err
	}
	var audits []store.Audit
	for _, t := range out.Transitions {
		action := "rollout.transition"
		if t.Action != "" {
			action = "rollout." + t.Action
		}
		attrs := map[string]string{"from": t.From, "to": t.To, "stage": fmt.Sprint(t.Stage + 1)}
		if l, ok := store.FenceFrom(ctx); ok {
			// Which replica decided, in which term of the scheduler lease.
			attrs["replica"], attrs["term"] = l.Holder, fmt.Sprint(l.Token)
		}
		audits = append(audits, store.Audit{Time: now, Actor: "rollout-engine", Action: action, Target: r.Spec.ID,
			Reason: t.Reason, Attrs: attrs})
		a.log.Info("rollout "+strings.TrimPrefix(action, "rollout."), "rollout", r.Spec.ID, "from", t.From, "to", t.To, "reason", t.Reason)
	}
	if err := a.opts.Store.ApplyRollout(ctx, store.RolloutChange{ID: r.Spec.ID, State: state, Status: string(out.State.Status),
		Members: members, Commands: cmds, Withdraw: withdraw, Audits: audits, Now: now, Rev: r.rev}); err != nil {
		return err
	}
	if len(cmds) > 0 {
		a.opts.Publish.PublishAll(ctx, cmds)
	}
	return nil
}

// commandID derives a command's id from the rollout, the device, the kind
// and the offer it belongs to, so that a repeated action is refused by the
// store rather than sent twice, and an offer made again (after a
// withdrawal) is a command of its own.
func commandID(rollout, device, kind string, offers int) string {
	switch kind {
	case ActOffer:
		return OfferID(rollout, device, offers)
	case ActCancel:
		if offers > 1 {
			return fmt.Sprintf("%s:%s:cancel:%d", rollout, device, offers)
		}
	}
	return rollout + ":" + device + ":" + kind
}

// commands turns actions into stored commands, and withdrawals into the
// ids of the offers no longer to send.
func (a *Applier) commands(ctx context.Context, s Spec, st State, acts []Action, now time.Time) ([]store.Command, []string, error) {
	if len(acts) == 0 {
		return nil, nil, nil
	}
	var rel, rev store.Release
	var err error
	need := map[string]bool{}
	for _, act := range acts {
		need[act.Kind] = true
	}
	if need[ActOffer] {
		if rel, err = a.opts.Store.Release(ctx, s.Release.Target, s.Release.Version); err != nil {
			return nil, nil, fmt.Errorf("release %s: %w", s.Release, err)
		}
	}
	if need[ActRevert] {
		if rev, err = a.opts.Store.Release(ctx, s.Revert.Target, s.Revert.Version); err != nil {
			return nil, nil, fmt.Errorf("revert release %s: %w", s.Revert, err)
		}
	}
	builds, err := a.builds(ctx, s, acts, rel, rev)
	if err != nil {
		return nil, nil, err
	}
	out := make([]store.Command, 0, len(acts))
	var withdraw []string
	for _, act := range acts {
		offers := 0
		if m := st.Members[act.Device]; m != nil {
			offers = m.Offers
		}
		if act.Kind == ActWithdraw {
			withdraw = append(withdraw, OfferID(s.ID, act.Device, offers))
			continue
		}
		c := proto.Command{ID: commandID(s.ID, act.Device, act.Kind, offers), Rollout: s.ID, Issued: now.UnixMilli()}
		switch act.Kind {
		case ActOffer:
			c.Kind = proto.CmdUpdate
			c.Update, _ = store.OfferFor(rel, rel.Deltas, builds[act.Device], s.Full)
		case ActRevert:
			c.Kind = proto.CmdUpdate
			c.Update, _ = store.OfferFor(rev, rev.Deltas, builds[act.Device], s.Full)
		case ActCancel:
			c.Kind = proto.CmdCancel
		}
		body, err := proto.Marshal(&c)
		if err != nil {
			return nil, nil, err
		}
		out = append(out, store.Command{ID: c.ID, Device: act.Device, Kind: string(c.Kind), Body: body, Rollout: s.ID, Created: now})
	}
	return out, withdraw, nil
}

// builds reads what the devices offered a release (or the revert
// release) report of their builds, when a delta may be chosen for them.
func (a *Applier) builds(ctx context.Context, s Spec, acts []Action, rel, rev store.Release) (map[string]store.DeviceBuilds, error) {
	if s.Full {
		return nil, nil
	}
	var ids []string
	for _, act := range acts {
		if (act.Kind == ActOffer && len(rel.Deltas) > 0) || (act.Kind == ActRevert && len(rev.Deltas) > 0) {
			ids = append(ids, act.Device)
		}
	}
	return a.deviceBuilds(ctx, ids)
}

func (a *Applier) deviceBuilds(ctx context.Context, ids []string) (map[string]store.DeviceBuilds, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	ds, err := a.opts.Store.Devices(ctx, store.DeviceFilter{IDs: ids})
	if err != nil {
		return nil, fmt.Errorf("device builds: %w", err)
	}
	out := make(map[string]store.DeviceBuilds, len(ds))
	for _, d := range ds {
		out[d.ID] = d.DeviceBuilds()
	}
	return out, nil
}

// Transfer is what a rollout sends over the air: how many devices fetch a
// delta, the full artifact, or (in a rollout's status) a delta given up
// for the full artifact, and the bytes of each.
type Transfer struct {
	Delta      int    `json:"delta"`
	Full       int    `json:"full"`
	Fallback   int    `json:"fallback,omitempty"` // counted in Delta and Full too: it fetched both
	DeltaBytes uint64 `json:"delta_bytes"`
	FullBytes  uint64 `json:"full_bytes"`
	// Saved is the bytes not sent thanks to deltas: the full artifact for
	// every device, less what is sent (below zero when fallbacks cost more
	// than the deltas saved).
	Saved int64 `json:"saved_bytes"`
}

// add counts one device fetching a release of size bytes, through a patch
// of patch bytes (0: none), given up for the full artifact or not.
func (t *Transfer) add(size, patch uint64, fallback bool) {
	if patch > 0 {
		t.Delta++
		t.DeltaBytes += patch
		t.Saved += int64(size) - int64(patch)
	}
	if patch == 0 || fallback {
		t.Full++
		t.FullBytes += size
	}
	if patch > 0 && fallback {
		t.Fallback++
		t.Saved -= int64(size)
	}
}

// Sum adds o to t.
func (t *Transfer) Sum(o Transfer) {
	t.Delta += o.Delta
	t.Full += o.Full
	t.Fallback += o.Fallback
	t.DeltaBytes += o.DeltaBytes
	t.FullBytes += o.FullBytes
	t.Saved += o.Saved
}

// NewID returns a rollout id.
func NewID() string {
	var b [6]byte
	rand.Read(b[:])
	return "r-" + hex.EncodeToString(b[:])
}

// ErrNoTargets is returned for a rollout that would take no device.
var ErrNoTargets = errors.New("no device to roll out to")

// prepare fills a new spec's defaults, seed and id.
func prepare(s Spec) (Spec, error) {
	s = s.WithDefaults()
	if err := s.Validate(); err != nil {
		return s, err
	}
	if s.Seed == "" {
		s.Seed = s.DeriveSeed()
	}
	return s, nil
}

// preview plans a rollout that has not started: which devices each stage
// takes, and which the selector matches but the rollout leaves out.
func (a *Applier) preview(ctx context.Context, s Spec, now time.Time) (Preview, State, error) {
	st := State{Status: StatusCreated, Members: map[string]*Member{}}
	devs, err := a.observe(ctx, Rollout{Spec: s, State: st}, now)
	if err != nil {
		return Preview{}, st, err
	}
	out := Plan(s, st, devs, now)
	p := Preview{Spec: s, Targeted: out.Targeted, Canary: out.State.Canary, Excluded: out.Excluded}
	if p.Excluded == nil {
		p.Excluded = []Exclusion{}
	}
	if out.Targeted == 0 {
		return p, out.State, noTargets(s, devs, out.Excluded)
	}
	online := make(map[string]bool, len(devs))
	for _, d := range devs {
		online[d.ID] = d.Online
	}
	p.Stages = make([]PreviewStage, len(s.Stages))
	for i, stage := range s.Stages {
		p.Stages[i] = PreviewStage{Stage: stage.String(), Devices: []string{}, Offline: []string{}}
	}
	for id, m := range out.State.Members {
		ps := &p.Stages[m.Stage]
		ps.Devices = append(ps.Devices, id)
		if !online[id] {
			ps.Offline = append(ps.Offline, id)
		}
	}
	for i := range p.Stages {
		slices.Sort(p.Stages[i].Devices)
		slices.Sort(p.Stages[i].Offline)
	}
	if err := a.previewTransfer(ctx, s, &p, out.State); err != nil {
		return p, out.State, err
	}
	return p, out.State, nil
}

// previewTransfer counts, per stage, the devices the offers would send a
// delta or the full artifact, and the bytes.
func (a *Applier) previewTransfer(ctx context.Context, s Spec, p *Preview, st State) error {
	rel, err := a.opts.Store.Release(ctx, s.Release.Target, s.Release.Version)
	if errors.Is(err, store.ErrNotFound) {
		return nil // nothing to offer: Create's caller checked the release
	}
	if err != nil {
		return fmt.Errorf("release %s: %w", s.Release, err)
	}
	var builds map[string]store.DeviceBuilds
	if len(rel.Deltas) > 0 && !s.Full {
		ids := make([]string, 0, len(st.Members))
		for id := range st.Members {
			ids = append(ids, id)
		}
		if builds, err = a.deviceBuilds(ctx, ids); err != nil {
			return err
		}
	}
	for id, m := range st.Members {
		var patch uint64
		if _, d := store.OfferFor(rel, rel.Deltas, builds[id], s.Full); d != nil {
			patch = d.PatchSize
		}
		p.Stages[m.Stage].Transfer.add(rel.Size, patch, false)
	}
	for _, ps := range p.Stages {
		p.Transfer.Sum(ps.Transfer)
	}
	return nil
}

// noTargets says why a rollout would take nothing: the selector matches no
// device, or every one it matches is left out (grouped by reason).
func noTargets(s Spec, devs []Device, excl []Exclusion) error {
	sel := selectorString(s.Selector)
	if len(devs) == 0 || len(excl) == 0 {
		if sel == "" {
			return fmt.Errorf("%w: no device is enrolled", ErrNoTargets)
		}
		return fmt.Errorf("%w: selector %s matches no device", ErrNoTargets, sel)
	}
	by := ExclusionCounts(excl)
	reasons := slices.Sorted(maps.Keys(by))
	parts := make([]string, len(reasons))
	for i, r := range reasons {
		parts[i] = fmt.Sprintf("%d %s", by[r], r)
	}
	what := "every device"
	if sel != "" {
		what = "every device the selector " + sel + " matches"
	}
	return fmt.Errorf("%w: %s is left out: %s", ErrNoTargets, what, strings.Join(parts, "; "))
}

// ExclusionCounts counts exclusions by reason.
func ExclusionCounts(excl []Exclusion) map[string]int {
	by := map[string]int{}
	for _, e := range excl {
		by[e.Reason]++
	}
	return by
}

func selectorString(sel map[string]string) string {
	keys := slices.Sorted(maps.Keys(sel))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + sel[k]
	}
	return strings.Join(parts, ",")
}

// DryRun shows which devices each stage of a rollout would take, and which
// are left out and why; Create with the same spec takes the same devices
// as long as the fleet has not changed.
func (a *Applier) DryRun(ctx context.Context, s Spec) (Preview, error) {
	s, err := prepare(s)
	if err != nil {
		return Preview{}, err
	}
	if s.ID == "" {
		s.ID = "dry-run"
	}
	p, _, err := a.preview(ctx, s, a.opts.Now())
	return p, err
}

// Create validates a rollout and stores it (status created) with its
// members: the devices each stage takes are decided now, as the dry run
// showed them.
func (a *Applier) Create(ctx context.Context, s Spec, actor string) (Rollout, Preview, error) {
	s, err := prepare(s)
	if err != nil {
		return Rollout{}, Preview{}, err
	}
	if s.ID == "" {
		s.ID = NewID()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.opts.Now()
	p, st, err := a.preview(ctx, s, now)
	if err != nil {
		return Rollout{}, p, err
	}
	spec, _ := json.Marshal(s)
	state, _ := json.Marshal(st)
	members := changedMembers(nil, st.Members)
	attrs := map[string]string{"release": s.Release.String(), "stages": stagesString(s.Stages), "members": fmt.Sprint(len(members))}
	if st.Canary != "" {
		attrs["canary"] = st.Canary
	}
	err = a.opts.Store.CreateRollout(ctx, store.RolloutRow{ID: s.ID, Spec: spec, State: state, Status: string(st.Status),
		Created: now, CreatedBy: actor, Updated: now}, members,
		store.Audit{Time: now, Actor: actor, Action: "rollout.create", Target: s.ID, Attrs: attrs})
	if err != nil {
		return Rollout{}, p, err
	}
	st.Members = nil
	return Rollout{Spec: s, State: st, Created: now, CreatedBy: actor, Updated: now}, p, nil
}

func stagesString(ss []Stage) string {
	parts := make([]string, len(ss))
	for i, s := range ss {
		parts[i] = s.String()
	}
	return strings.Join(parts, ",")
}

// Act applies an operator's action (State.Apply), recorded with who and
// why.
func (a *Applier) Act(ctx context.Context, id string, op Op, actor, reason string) (Rollout, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// Another replica's scheduler may store a plan between our read and
	// our write: the write is then refused, and the action is applied
	// again to what is stored.
	for attempt := 0; ; attempt++ {
		r, err := a.act(ctx, id, op, actor, reason)
		if errors.Is(err, store.ErrConflict) && attempt < 10 {
			continue
		}
		if err == nil {
			a.Poke()
		}
		return r, err
	}
}

func (a *Applier) act(ctx context.Context, id string, op Op, actor, reason string) (Rollout, error) {
	row, err := a.opts.Store.Rollout(ctx, id)
	if err != nil {
		return Rollout{}, err
	}
	r, err := rolloutOf(row)
	if err != nil {
		return r, err
	}
	now := a.opts.Now()
	next, tr, err := r.State.Apply(r.Spec.WithDefaults(), op, actor, reason, now)
	if err != nil {
		return r, err
	}
	state, _ := json.Marshal(next)
	err = a.opts.Store.ApplyRollout(ctx, store.RolloutChange{ID: id, State: state, Status: string(next.Status), Now: now, Rev: r.rev,
		Audits: []store.Audit{{Time: now, Actor: actor, Action: "rollout." + string(op), Target: id, Reason: reason,
			Attrs: map[string]string{"from": tr.From, "to": tr.To, "stage": fmt.Sprint(next.Stage + 1)}}}})
	if err != nil {
		return r, err
	}
	r.State = next
	r.rev++
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
		r, _ := rolloutOf(row)
		out = append(out, r)
	}
	return out, nil
}

// Status reports a rollout with what the engine measures now: per stage
// counts, each gate against its threshold, overall and per stratum. It
// plans without acting.
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
	out := Plan(r.Spec, r.State.Clone(), devs, now)
	rep := StatusReport{Rollout: r, Gates: out.Gates, Strata: out.Strata, Counts: out.Counts, Targeted: out.Targeted,
		Members: len(r.State.Members), Unreached: out.Unreached, Excluded: ExclusionCounts(out.Excluded)}
	rep.State.Members = nil
	byID := make(map[string]*Device, len(devs))
	for i := range devs {
		byID[devs[i].ID] = &devs[i]
	}
	spec := r.Spec.WithDefaults()
	rep.Stages = make([]StageReport, len(spec.Stages))
	for i, s := range spec.Stages {
		rep.Stages[i] = StageReport{Stage: s.String(), States: map[MemberState]int{}}
	}
	targeted := targetedSet(spec, devs)
	rel, relErr := a.opts.Store.Release(ctx, r.Spec.Release.Target, r.Spec.Release.Version)
	patches := map[uint64]bool{} // the patch sizes of the release's deltas
	for _, d := range rel.Deltas {
		patches[d.PatchSize] = true
	}
	for dev, m := range r.State.Members {
		if m.Stage < len(rep.Stages) {
			sr := &rep.Stages[m.Stage]
			sr.Devices++
			sr.States[spec.memberState(m, byID[dev], targeted[dev], r.State, now)]++
			if d := byID[dev]; relErr == nil && d != nil && d.Update != nil && fetching(d.Update.State) {
				// The patch size is the device's claim: only a size one of
				// the release's deltas has is counted as a patch.
				patch := d.Update.Patch
				if !patches[patch] {
					patch = 0
				}
				sr.Transfer.add(rel.Size, patch, d.Update.Fallback != "")
			}
		}
	}
	for _, sr := range rep.Stages {
		rep.Transfer.Sum(sr.Transfer)
	}
	return rep, nil
}

// fetching says whether a device that reported st has fetched (or is
// fetching) the release: not one that was only offered it, or refused it.
func fetching(st proto.UpdateState) bool {
	return st != proto.UpdateOffered && st != proto.UpdateRejected
}

// targetedSet says which devices the spec targets now.
func targetedSet(s Spec, devs []Device) map[string]bool {
	t := make(map[string]bool, len(devs))
	for i := range devs {
		d := &devs[i]
		t[d.ID] = s.exclusion(d) == "" && (d.Busy == "" || d.Busy == s.ID)
	}
	return t
}

// MemberReport is where one device stands in a rollout.
type MemberReport struct {
	Device     string      `json:"device"`
	Stage      int         `json:"stage"` // 1-based
	State      MemberState `json:"state"`
	Version    string      `json:"version,omitempty"`
	Online     bool        `json:"online"`
	Offered    *time.Time  `json:"offered,omitempty"`
	Acked      *time.Time  `json:"acked,omitempty"`
	Withdrawn  *time.Time  `json:"withdrawn,omitempty"`
	Canceled   *time.Time  `json:"canceled,omitempty"`
	Reverted   *time.Time  `json:"reverted,omitempty"`
	ReplacedBy string      `json:"replaced_by,omitempty"`
	Replaces   string      `json:"replaces,omitempty"`
	Update     *Report     `json:"update,omitempty"` // the device's last report on the release
	Revert     *Report     `json:"revert,omitempty"` // and on the revert release
}

// Devices lists a rollout's members, in stage then device order, with
// their state (all states when state is empty).
func (a *Applier) Devices(ctx context.Context, id string, state MemberState) ([]MemberReport, error) {
	r, err := a.load(ctx, id)
	if err != nil {
		return nil, err
	}
	now := a.opts.Now()
	devs, err := a.observe(ctx, r, now)
	if err != nil {
		return nil, err
	}
	spec := r.Spec.WithDefaults()
	targeted := targetedSet(spec, devs)
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
		mr := MemberReport{Device: dev, Stage: m.Stage + 1, State: spec.memberState(m, d, targeted[dev], r.State, now),
			Offered: at(m.Offered), Withdrawn: at(m.Withdrawn), Canceled: at(m.Canceled), Reverted: at(m.Reverted),
			ReplacedBy: m.ReplacedBy, Replaces: m.Replaces}
		if d != nil {
			mr.Version, mr.Online, mr.Update, mr.Revert = d.Version, d.Online, d.Update, d.Revert
			if ack, ok := acked(m, d); ok {
				mr.Acked = at(ack)
			}
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
