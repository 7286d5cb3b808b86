package rollout

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// fakeStore keeps the applier's records in memory. ApplyFn, when set,
// replaces ApplyRollout (to fail it, or to watch the order of effects).
type fakeStore struct {
	mu        sync.Mutex
	rollouts  map[string]store.RolloutRow
	members   map[string]map[string]store.MemberRow
	commands  map[string]store.Command
	acked     map[string]int64
	withdrawn map[string]bool
	devices   []store.Device
	updates   map[string][]store.DeviceUpdate // by target@counter
	audits    []store.Audit
	applies   []store.RolloutChange
	ApplyFn   func(store.RolloutChange) error
	// releases by version (none: any release asked for, without deltas)
	releases map[string]store.Release
}

var _ Store = (*fakeStore)(nil)

func newFakeStore(devs []store.Device) *fakeStore {
	return &fakeStore{rollouts: map[string]store.RolloutRow{}, members: map[string]map[string]store.MemberRow{},
		commands: map[string]store.Command{}, acked: map[string]int64{}, withdrawn: map[string]bool{}, devices: devs, updates: map[string][]store.DeviceUpdate{}}
}

func (f *fakeStore) CreateRollout(_ context.Context, r store.RolloutRow, ms []store.MemberRow, a store.Audit) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.rollouts[r.ID]; ok {
		return store.ErrExists
	}
	f.rollouts[r.ID] = r
	f.members[r.ID] = map[string]store.MemberRow{}
	for _, m := range ms {
		f.members[r.ID][m.Device] = m
	}
	f.audits = append(f.audits, a)
	return nil
}

func (f *fakeStore) Rollout(_ context.Context, id string) (store.RolloutRow, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.rollouts[id]
	if !ok {
		return r, store.ErrNotFound
	}
	return r, nil
}

func (f *fakeStore) Rollouts(_ context.Context, statuses ...string) ([]store.RolloutRow, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []store.RolloutRow
	for _, r := range f.rollouts {
		if len(statuses) == 0 || slices.Contains(statuses, r.Status) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (f *fakeStore) Members(_ context.Context, id string) ([]store.MemberRow, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []store.MemberRow
	for _, m := range f.members[id] {
		out = append(out, m)
	}
	return out, nil
}

func (f *fakeStore) BusyDevices(_ context.Context, statuses ...string) (map[string]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]string{}
	var rs []store.RolloutRow
	for _, r := range f.rollouts {
		if slices.Contains(statuses, r.Status) {
			rs = append(rs, r)
		}
	}
	// As the store: the oldest owns a device in two.
	slices.SortFunc(rs, func(a, b store.RolloutRow) int { return b.Created.Compare(a.Created) })
	for _, r := range rs {
		for dev := range f.members[r.ID] {
			out[dev] = r.ID
		}
	}
	return out, nil
}

func (f *fakeStore) RolloutAcks(_ context.Context, id string) (map[string]int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int64{}
	for cid, at := range f.acked {
		if c, ok := f.commands[cid]; ok && c.Rollout == id && !f.withdrawn[cid] {
			out[cid] = at
		}
	}
	return out, nil
}

func (f *fakeStore) ApplyRollout(_ context.Context, c store.RolloutChange) error {
	if f.ApplyFn != nil {
		if err := f.ApplyFn(c); err != nil {
			return err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, cmd := range c.Commands {
		if _, dup := f.commands[cmd.ID]; dup {
			return fmt.Errorf("command %s: %w", cmd.ID, store.ErrExists) // the store refuses a repeated decision
		}
	}
	r := f.rollouts[c.ID]
	if c.State != nil {
		r.State, r.Status = c.State, c.Status
	}
	f.rollouts[c.ID] = r
	for _, m := range c.Members {
		f.members[c.ID][m.Device] = m
	}
	for _, cmd := range c.Commands {
		f.commands[cmd.ID] = cmd
	}
	for _, id := range c.Withdraw {
		if _, ok := f.acked[id]; !ok {
			f.withdrawn[id] = true
		}
	}
	f.audits = append(f.audits, c.Audits...)
	f.applies = append(f.applies, c)
	return nil
}

func (f *fakeStore) Devices(_ context.Context, fl store.DeviceFilter) ([]store.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []store.Device
	for _, d := range f.devices {
		ok := len(fl.IDs) == 0 || slices.Contains(fl.IDs, d.ID)
		for k, v := range fl.Labels {
			ok = ok && d.Labels[k] == v
		}
		if ok {
			out = append(out, d)
		}
	}
	return out, nil
}

func (f *fakeStore) DeviceUpdates(_ context.Context, device, target string, counter uint64) ([]store.DeviceUpdate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.updates[fmt.Sprintf("%s@%d", target, counter)]), nil
}

func (f *fakeStore) Telemetry(context.Context, string, time.Time, time.Time, int) ([]store.TelemetryRow, error) {
	return nil, nil
}

func (f *fakeStore) Release(_ context.Context, target, version string) (store.Release, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r, ok := f.releases[version]; ok {
		return r, nil
	}
	return store.Release{Target: target, Version: version, Counter: 20, Manifest: []byte("m"), Keys: []byte("k")}, nil
}

func (f *fakeStore) report(dev string, st proto.UpdateState, at time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := "agent@20"
	us := slices.DeleteFunc(f.updates[k], func(u store.DeviceUpdate) bool { return u.Device == dev })
	f.updates[k] = append(us, store.DeviceUpdate{Device: dev, Target: "agent", Counter: 20, State: string(st), Updated: at})
}

func (f *fakeStore) ack(id string, at time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.commands[id]; ok {
		f.acked[id] = at.UnixMilli()
	}
}

// fakePublisher records what is published, and checks it was stored first.
type fakePublisher struct {
	mu   sync.Mutex
	st   *fakeStore
	sent []string
	t    *testing.T
}

func (p *fakePublisher) PublishAll(_ context.Context, cs []store.Command) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		p.st.mu.Lock()
		_, stored := p.st.commands[c.ID]
		p.st.mu.Unlock()
		if !stored {
			p.t.Errorf("command %s published before it was stored", c.ID)
		}
		p.sent = append(p.sent, c.ID)
	}
}

func storeFleet(n int) []store.Device {
	now := t0
	out := make([]store.Device, n)
	for i := range out {
		hw := []string{"rev-a", "rev-b", "rev-c"}[i%3]
		out[i] = store.Device{ID: fmt.Sprintf("d%03d", i), Labels: map[string]string{"hw": hw, "base": "zurich"}, Hardware: hw,
			Version: "1.0.0", Online: true, LastSeen: &now}
	}
	return out
}

type clockT struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clockT) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clockT) Add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func newTestApplier(t *testing.T, n int) (*Applier, *fakeStore, *fakePublisher, *clockT) {
	st := newFakeStore(storeFleet(n))
	pub := &fakePublisher{st: st, t: t}
	clk := &clockT{t: t0}
	return New(Options{Store: st, Publish: pub, Now: clk.Now}), st, pub, clk
}

func spec20() Spec {
	return Spec{Release: ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 20}, Hardware: []string{"rev-a", "rev-b", "rev-c"},
		Gates: Gates{Soak: Duration(time.Minute), HealthOff: true, DeviceTimeout: Duration(10 * time.Minute)}}
}

// Create stores the members the dry run showed, in one write with the
// rollout; a rollout that would take nothing is refused and nothing is
// stored.
func TestApplierCreate(t *testing.T) {
	a, st, _, _ := newTestApplier(t, 90)
	ctx := t.Context()
	dry, err := a.DryRun(ctx, spec20())
	if err != nil {
		t.Fatal(err)
	}
	r, made, err := a.Create(ctx, spec20(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	if r.Spec.Seed != dry.Spec.Seed || r.Spec.ID == "dry-run" {
		t.Fatalf("seed %q (dry run %q), id %s", r.Spec.Seed, dry.Spec.Seed, r.Spec.ID)
	}
	for i := range dry.Stages {
		if !slices.Equal(dry.Stages[i].Devices, made.Stages[i].Devices) {
			t.Fatalf("stage %d: dry run %v, create %v", i+1, dry.Stages[i].Devices, made.Stages[i].Devices)
		}
	}
	ms, _ := st.Members(ctx, r.Spec.ID)
	if len(ms) != 90 {
		t.Fatalf("%d members stored", len(ms))
	}
	for _, m := range ms {
		if !slices.Contains(dry.Stages[m.Stage].Devices, m.Device) {
			t.Fatalf("%s stored in stage %d, not the dry run's", m.Device, m.Stage+1)
		}
	}
	if len(st.audits) != 1 || st.audits[0].Action != "rollout.create" || st.audits[0].Actor != "alice" {
		t.Fatalf("audits %+v", st.audits)
	}
	s := spec20()
	s.Selector = map[string]string{"base": "nowhere"}
	if _, _, err := a.Create(ctx, s, "alice"); !errors.Is(err, ErrNoTargets) || !strings.Contains(err.Error(), "base=nowhere matches no device") {
		t.Fatalf("empty selector: %v", err)
	}
	if len(st.rollouts) != 1 {
		t.Fatalf("a refused rollout was stored: %d rollouts", len(st.rollouts))
	}
}

// Every decision is stored before any command of it is published; a store
// that fails publishes nothing, and the next step makes the same decision
// (nothing is lost, nothing sent twice).
func TestApplierStoresBeforePublishing(t *testing.T) {
	a, st, pub, clk := newTestApplier(t, 90)
	ctx := t.Context()
	r, _, err := a.Create(ctx, spec20(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Act(ctx, r.Spec.ID, OpStart, "alice", ""); err != nil {
		t.Fatal(err)
	}
	fail := true
	st.ApplyFn = func(store.RolloutChange) error {
		if fail {
			return errors.New("disk full")
		}
		return nil
	}
	if err := a.Step(ctx, r.Spec.ID); err == nil {
		t.Fatal("a failed write was not reported")
	}
	if len(pub.sent) != 0 {
		t.Fatalf("published %v although nothing was stored", pub.sent)
	}
	fail = false
	clk.Add(time.Second)
	if err := a.Step(ctx, r.Spec.ID); err != nil {
		t.Fatal(err)
	}
	if len(pub.sent) != 3 || !strings.HasSuffix(pub.sent[0], ":offer") {
		t.Fatalf("canary offers %v", pub.sent)
	}
	if err := a.Step(ctx, r.Spec.ID); err != nil {
		t.Fatal(err)
	}
	if len(pub.sent) != 3 {
		t.Fatalf("offered again: %v", pub.sent)
	}
}

// Pausing withdraws the offers no device acknowledged (by their command
// ids); resuming offers them again as new commands; an acknowledged offer
// whose device then says nothing times out from its acknowledgement.
func TestApplierWithdrawAndAcks(t *testing.T) {
	a, st, pub, clk := newTestApplier(t, 90)
	ctx := t.Context()
	r, _, _ := a.Create(ctx, spec20(), "alice")
	id := r.Spec.ID
	a.Act(ctx, id, OpStart, "alice", "")
	if err := a.Step(ctx, id); err != nil {
		t.Fatal(err)
	}
	offers := slices.Clone(pub.sent)
	// The first acknowledges; the others never do.
	st.ack(offers[0], clk.Now())
	dev0 := strings.Split(offers[0], ":")[1]
	if _, err := a.Act(ctx, id, OpPause, "alice", "look"); err != nil {
		t.Fatal(err)
	}
	clk.Add(time.Second)
	if err := a.Step(ctx, id); err != nil {
		t.Fatal(err)
	}
	last := st.applies[len(st.applies)-1]
	if len(last.Withdraw) != 2 || slices.Contains(last.Withdraw, offers[0]) || !slices.Contains(last.Withdraw, offers[1]) {
		t.Fatalf("withdrawn %v (offers %v, %s acknowledged)", last.Withdraw, offers, offers[0])
	}
	a.Act(ctx, id, OpResume, "alice", "")
	clk.Add(time.Second)
	if err := a.Step(ctx, id); err != nil {
		t.Fatal(err)
	}
	again := pub.sent[len(offers):]
	if len(again) != 2 || !strings.HasSuffix(again[0], ":offer:2") {
		t.Fatalf("offers after resume: %v", again)
	}
	// dev0 acknowledged at t0 and said nothing since: timed out 10 minutes
	// later, not before.
	clk.Add(9 * time.Minute)
	devs, _ := a.Devices(ctx, id, "")
	for _, m := range devs {
		if m.Device == dev0 && m.State != MOffered {
			t.Fatalf("%s 9 minutes after acknowledging: %s", dev0, m.State)
		}
	}
	clk.Add(2 * time.Minute)
	devs, _ = a.Devices(ctx, id, MTimedOut)
	if len(devs) != 1 || devs[0].Device != dev0 || devs[0].Acked == nil {
		t.Fatalf("timed out: %+v", devs)
	}
	// A report received since the offer counts as acknowledgement too.
	st.report(strings.Split(again[0], ":")[1], proto.UpdateCommitted, clk.Now())
	rep, err := a.Status(ctx, id)
	if err != nil || rep.Counts[MCommitted] != 1 {
		t.Fatalf("status counts %v %v", rep.Counts, err)
	}
}

// An action the state does not allow changes nothing and says why.
func TestApplierActRefused(t *testing.T) {
	a, st, _, _ := newTestApplier(t, 30)
	ctx := t.Context()
	r, _, _ := a.Create(ctx, spec20(), "alice")
	before := len(st.audits)
	_, err := a.Act(ctx, r.Spec.ID, OpResume, "bob", "")
	if !errors.Is(err, ErrState) || !strings.Contains(err.Error(), "only a paused rollout resumes") {
		t.Fatalf("resume a created rollout: %v", err)
	}
	if len(st.audits) != before || st.rollouts[r.Spec.ID].Status != string(StatusCreated) {
		t.Fatal("a refused action was recorded")
	}
	if _, err := a.Act(ctx, "r-nope", OpStart, "bob", ""); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("unknown rollout: %v", err)
	}
}

// Two rollouts created over the same devices do not both take them: a
// created rollout holds its members. A member relabelled out of the
// selector is still seen, as left out, and its offer is taken back.
func TestApplierExclusiveMembersAndRelabelled(t *testing.T) {
	a, st, _, clk := newTestApplier(t, 30)
	ctx := t.Context()
	s := spec20()
	s.Selector = map[string]string{"base": "zurich"}
	first, _, err := a.Create(ctx, s, "alice")
	if err != nil {
		t.Fatal(err)
	}
	clk.Add(time.Second)
	s2 := spec20()
	s2.Release.Version = "2.0.1"
	if _, _, err := a.Create(ctx, s2, "bob"); !errors.Is(err, ErrNoTargets) || !strings.Contains(err.Error(), "in rollout "+first.Spec.ID) {
		t.Fatalf("a second rollout over the same devices: %v", err)
	}
	a.Act(ctx, first.Spec.ID, OpStart, "alice", "")
	if err := a.Step(ctx, first.Spec.ID); err != nil {
		t.Fatal(err)
	}
	var offeredDev string
	for id, m := range st.members[first.Spec.ID] {
		if m.Offered > 0 {
			offeredDev = id
		}
	}
	st.mu.Lock()
	for i := range st.devices {
		if st.devices[i].ID == offeredDev {
			st.devices[i].Labels = map[string]string{"hw": st.devices[i].Labels["hw"], "base": "bern"} // moved
		}
	}
	st.mu.Unlock()
	clk.Add(time.Second)
	if err := a.Step(ctx, first.Spec.ID); err != nil {
		t.Fatal(err)
	}
	last := st.applies[len(st.applies)-1]
	if !slices.Contains(last.Withdraw, OfferID(first.Spec.ID, offeredDev, 1)) {
		t.Fatalf("the offer of %s, moved to bern, was not withdrawn: %+v", offeredDev, last)
	}
	ms, _ := a.Devices(ctx, first.Spec.ID, MExcluded)
	if len(ms) != 1 || ms[0].Device != offeredDev {
		t.Fatalf("excluded members %+v", ms)
	}
}
