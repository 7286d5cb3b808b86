package rollout

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/hangarfleet/hangar/proto"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func fleet(n int, hws, bases []string) []Device {
	devs := make([]Device, n)
	for i := range devs {
		hw := hws[i%len(hws)]
		devs[i] = Device{ID: fmt.Sprintf("d%04d", i), Online: true, Version: "1.0.0", Hardware: hw,
			Labels: map[string]string{"hw": hw, "base": bases[(i/len(hws))%len(bases)]}}
	}
	return devs
}

// skewed is a fleet with count[i] devices of hws[i], bases in turn.
func skewed(counts map[string]int, bases []string) []Device {
	var devs []Device
	for _, hw := range slices.Sorted(func(yield func(string) bool) {
		for k := range counts {
			if !yield(k) {
				return
			}
		}
	}) {
		for j := range counts[hw] {
			devs = append(devs, Device{ID: fmt.Sprintf("%s-%04d", hw, j), Online: true, Version: "1.0.0", Hardware: hw,
				Labels: map[string]string{"hw": hw, "base": bases[j%len(bases)]}})
		}
	}
	return devs
}

func testSpec() Spec {
	return Spec{ID: "r-1", Release: ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 20},
		Gates: Gates{Soak: Duration(time.Minute), HealthOff: true}}.WithDefaults()
}

func running() State { return State{Status: StatusRunning, Members: map[string]*Member{}} }

// world plays the devices' side: an offer reaches a device while it is
// online (it acknowledges), waits in the command queue while it is not,
// and a withdrawn offer is never delivered.
type world struct {
	devs   []Device
	idx    map[string]int
	queued map[string]bool // offer not delivered yet
}

func newWorld(devs []Device) *world {
	w := &world{devs: devs, idx: map[string]int{}, queued: map[string]bool{}}
	for i := range devs {
		w.idx[devs[i].ID] = i
	}
	return w
}

func (w *world) dev(id string) *Device { return &w.devs[w.idx[id]] }

// deliver carries out a plan's actions and delivers queued offers to
// online devices.
func (w *world) deliver(out Outcome, now time.Time) {
	for _, a := range out.Actions {
		switch a.Kind {
		case ActOffer:
			w.queued[a.Device] = true
		case ActWithdraw:
			delete(w.queued, a.Device)
		}
	}
	for id := range w.queued {
		if d := w.dev(id); d.Online {
			d.Acked = now.UnixMilli()
			delete(w.queued, id)
		}
	}
}

// report sets the device's report (received now).
func (w *world) report(id string, s proto.UpdateState, now time.Time) {
	d := w.dev(id)
	d.Update = &Report{State: s, At: now.UnixMilli()}
	if s == proto.UpdateCommitted {
		d.Version = "2.0.0"
	}
}

func offered(out Outcome) []string {
	var ids []string
	for _, a := range out.Actions {
		if a.Kind == ActOffer {
			ids = append(ids, a.Device)
		}
	}
	return ids
}

func TestStageSizes(t *testing.T) {
	s := testSpec()
	for _, c := range []struct {
		n, first int
		want     []int
	}{
		{1000, 0, []int{10, 100, 500, 1000}},
		{100, 0, []int{3, 10, 50, 100}}, // the canary is at least MinCanary
		{100, 7, []int{7, 10, 50, 100}}, // and holds every hardware revision
		{2, 0, []int{2, 2, 2, 2}},
		{0, 0, []int{0, 0, 0, 0}},
	} {
		if got := s.stageSizes(c.n, c.first); fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("stageSizes(%d, %d) = %v, want %v", c.n, c.first, got, c.want)
		}
	}
	s.Stages = []Stage{{Count: 5}, {Count: 20}, {Percent: 100}}
	if got := s.stageSizes(100, 0); fmt.Sprint(got) != "[5 20 100]" {
		t.Errorf("counts: %v", got)
	}
}

func stages(out Outcome, devs []Device) map[int][]*Device {
	by := map[int][]*Device{}
	for i := range devs {
		if m := out.State.Members[devs[i].ID]; m != nil {
			by[m.Stage] = append(by[m.Stage], &devs[i])
		}
	}
	return by
}

// The canary holds a device of every hardware revision, however rare,
// spreads over the bases, grows to fit when it must and says so; later
// stages keep the fleet's proportions.
func TestCanaryCoverage(t *testing.T) {
	s := testSpec()
	devs := skewed(map[string]int{"rev-a": 880, "rev-b": 100, "rev-c": 19, "rev-d": 1}, []string{"zurich", "bern", "geneva", "basel", "lyon"})
	out := Plan(s, running(), devs, t0)
	by := stages(out, devs)
	hws, bases := map[string]int{}, map[string]bool{}
	for _, d := range by[0] {
		hws[d.Labels["hw"]]++
		bases[d.Labels["base"]] = true
	}
	if len(by[0]) != 10 || len(hws) != 4 || len(bases) != 5 {
		t.Fatalf("canary of %d covers hardware %v and bases %v: want 10 devices, 4 revisions, 5 bases", len(by[0]), hws, bases)
	}
	if out.State.Canary != "" {
		t.Errorf("a canary big enough says it grew: %s", out.State.Canary)
	}
	// Stage 3 (50%): every revision near its share of the fleet.
	share := map[string]int{}
	for st := 0; st <= 2; st++ {
		for _, d := range by[st] {
			share[d.Labels["hw"]]++
		}
	}
	for hw, want := range map[string]int{"rev-a": 440, "rev-b": 50, "rev-c": 10} {
		if got := share[hw]; got < want-2 || got > want+2 {
			t.Errorf("the first three stages hold %d of %s, want about %d: %v", got, hw, want, share)
		}
	}

	// Five revisions, a 1% canary of 100 (1, min 3): it grows to 5.
	devs = fleet(100, []string{"rev-a", "rev-b", "rev-c", "rev-d", "rev-e"}, []string{"zurich"})
	out = Plan(s, running(), devs, t0)
	by = stages(out, devs)
	if len(by[0]) != 5 || !strings.Contains(out.State.Canary, "5 devices, not 3") || !strings.Contains(out.State.Canary, "rev-e") {
		t.Fatalf("canary %d devices, note %q", len(by[0]), out.State.Canary)
	}
	// Online devices go first: none of the canary is off.
	devs = fleet(300, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "bern"})
	for i := range devs {
		devs[i].Online = i%4 != 0
	}
	for _, d := range stages(Plan(s, running(), devs, t0), devs)[0] {
		if !d.Online {
			t.Errorf("offline %s in the canary while online devices of its kind exist", d.ID)
		}
	}
}

// Membership is deterministic and sticky; a device that joins later goes
// to the stage its rank falls in and nobody else moves.
func TestStickyMembership(t *testing.T) {
	s := testSpec()
	devs := fleet(600, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "bern"})
	out := Plan(s, running(), devs, t0)
	again := Plan(s, running(), devs, t0)
	for id, m := range out.State.Members {
		if again.State.Members[id].Stage != m.Stage {
			t.Fatal("membership is not deterministic")
		}
	}
	devs = append(devs, Device{ID: "late", Online: true, Version: "1.0.0", Labels: map[string]string{"hw": "rev-a", "base": "zurich"}})
	later := Plan(s, out.State, devs, t0.Add(time.Second))
	for id, m := range out.State.Members {
		if later.State.Members[id].Stage != m.Stage {
			t.Fatalf("%s moved from stage %d to %d", id, m.Stage, later.State.Members[id].Stage)
		}
	}
	if later.State.Members["late"] == nil {
		t.Fatal("a device that starts matching did not join")
	}
}

// A dry run (id "dry-run") and the create that follows (another id) take
// the same devices: membership hashes the seed derived from what the
// rollout targets, not its id.
func TestDryRunIsTheRun(t *testing.T) {
	devs := fleet(500, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "bern"})
	dry, real := testSpec(), testSpec()
	dry.ID, real.ID = "dry-run", "r-0a1b2c"
	dry.Seed, real.Seed = dry.DeriveSeed(), real.DeriveSeed()
	a := Plan(dry, State{Status: StatusCreated}, devs, t0)
	b := Plan(real, State{Status: StatusCreated}, devs, t0.Add(time.Minute))
	if len(a.State.Members) != 500 || len(b.State.Members) != 500 {
		t.Fatalf("members %d and %d", len(a.State.Members), len(b.State.Members))
	}
	for id, m := range a.State.Members {
		if b.State.Members[id].Stage != m.Stage {
			t.Fatalf("%s: stage %d in the dry run, %d in the rollout", id, m.Stage+1, b.State.Members[id].Stage+1)
		}
	}
	other := testSpec()
	other.Selector = map[string]string{"base": "zurich"}
	if other.DeriveSeed() == dry.DeriveSeed() {
		t.Error("another selector, the same seed")
	}
}

// A good stage advances after its soak; a bad canary pauses the rollout
// and nothing reaches stage 2. A soak in progress is waiting, not failing.
func TestGatesAdvanceAndPause(t *testing.T) {
	s := testSpec()
	w := newWorld(fleet(300, []string{"rev-b"}, []string{"zurich"}))
	out := Plan(s, running(), w.devs, t0)
	if len(offered(out)) != 3 {
		t.Fatalf("canary offers: %v", out.Actions)
	}
	w.deliver(out, t0)
	for _, id := range offered(out) {
		w.report(id, proto.UpdateCommitted, t0)
	}
	now := t0.Add(time.Second)
	out = Plan(s, out.State, w.devs, now)
	if out.State.GatesSince == 0 || out.State.Stage != 0 {
		t.Fatalf("gates should hold and the soak start: %+v", out.State)
	}
	out = Plan(s, out.State, w.devs, now.Add(30*time.Second))
	if out.State.Stage != 0 {
		t.Fatal("left the stage before the soak")
	}
	for _, g := range out.Gates {
		if g.Name == "soak" && (g.Verdict != VerdictWaiting || strings.Contains(g.Why, "fail")) {
			t.Errorf("soak in progress reads %s: %s", g.Verdict, g.Why)
		}
		if g.Verdict == VerdictFails {
			t.Errorf("gate %s fails while nothing failed: %s", g.Name, g.Why)
		}
	}
	out = Plan(s, out.State, w.devs, now.Add(61*time.Second))
	if out.State.Stage != 1 || len(out.Transitions) != 1 {
		t.Fatalf("stage after soak: %d, transitions %+v", out.State.Stage, out.Transitions)
	}
	if len(offered(out)) != 27 {
		t.Fatalf("stage 2 offers: %d, want 27 (30 - 3)", len(offered(out)))
	}

	// A bad canary.
	w = newWorld(fleet(300, []string{"rev-b"}, []string{"zurich"}))
	out = Plan(s, running(), w.devs, t0)
	w.deliver(out, t0)
	for _, id := range offered(out) {
		w.report(id, proto.UpdateRolledBack, t0)
	}
	paused := Plan(s, out.State, w.devs, t0.Add(time.Second))
	if paused.State.Status != StatusPaused || len(paused.Actions) != 0 {
		t.Fatalf("bad canary: status %s, actions %v", paused.State.Status, paused.Actions)
	}
	s.OnFailure = OnFailureAbort
	if got := Plan(s, out.State, w.devs, t0.Add(2*time.Second)); got.State.Status != StatusAborted {
		t.Fatalf("abort on failure: %s", got.State.Status)
	}
}

// A build that fails on every device of a revision that is 2% of the fleet
// is stopped at the canary although the overall share of failures is under
// the threshold, and status shows the per-revision gate.
func TestPerStratumGate(t *testing.T) {
	s := testSpec()
	s.Gates.MaxFailed = 0.2
	w := newWorld(skewed(map[string]int{"rev-a": 980, "rev-c": 20}, []string{"zurich", "bern"}))
	s.MinCanary = 10
	out := Plan(s, running(), w.devs, t0)
	w.deliver(out, t0)
	rc := 0
	for _, id := range offered(out) {
		if w.dev(id).Labels["hw"] == "rev-c" {
			w.report(id, proto.UpdateRolledBack, t0)
			rc++
		} else {
			w.report(id, proto.UpdateCommitted, t0)
		}
	}
	if rc == 0 || rc*5 >= len(offered(out)) {
		t.Fatalf("the canary holds %d rev-c of %d: the test wants some, under the overall threshold", rc, len(offered(out)))
	}
	out = Plan(s, out.State, w.devs, t0.Add(time.Second))
	if out.State.Status != StatusPaused || !strings.Contains(out.State.Reason, "hw=rev-c") {
		t.Fatalf("status %s (%s): want paused on hw=rev-c", out.State.Status, out.State.Reason)
	}
	var seen bool
	for _, sr := range out.Strata {
		if sr.Value == "rev-c" {
			seen = true
			verdicts := map[string]string{}
			for _, g := range sr.Gates {
				verdicts[g.Name] = g.Verdict
			}
			if sr.Failed != rc || verdicts["failed"] != VerdictFails || verdicts["committed"] != VerdictWaiting {
				t.Errorf("rev-c stratum: %+v", sr)
			}
		}
	}
	if !seen {
		t.Error("status has no rev-c stratum")
	}
}

// Switched-off devices are waiting, not failing: they are not offered
// while off, a device that acknowledged and then went silent times out
// from its acknowledgement, the rollout completes for the rest, counts
// those still waiting, and delivers to them as they come back until its
// offline deadline.
func TestOfflineMembers(t *testing.T) {
	s := testSpec()
	s.Gates.DeviceTimeout = Duration(10 * time.Minute)
	s.Limits.OfflineDeadline = Duration(24 * time.Hour)
	s.Stages = []Stage{{Percent: 10}, {Percent: 100}}
	w := newWorld(fleet(90, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "bern"}))
	for i := range w.devs {
		w.devs[i].Online = i%3 != 0 // a third in the hangar
	}
	st := running()
	now := t0
	var out Outcome
	for step := 0; step < 400 && st.Status == StatusRunning; step++ {
		out = Plan(s, st, w.devs, now)
		for _, a := range offered(out) {
			if !w.dev(a).Online {
				t.Fatalf("offline %s offered", a)
			}
		}
		w.deliver(out, now)
		for id, m := range out.State.Members {
			d := w.dev(id)
			if m.Offered > 0 && d.Acked > 0 && d.Update == nil {
				w.report(id, proto.UpdateCommitted, now)
			}
			if st := s.memberState(m, d, true, out.State, now); !d.Online && (st == MFailed || st == MTimedOut) {
				t.Fatalf("%s (off) is %s", id, st)
			}
		}
		st = out.State
		now = now.Add(20 * time.Second)
	}
	if st.Status != StatusCompleted || st.Unreached != 30 {
		t.Fatalf("status %s, unreached %d (%s): want completed with 30 waiting", st.Status, st.Unreached, st.Reason)
	}
	// One comes back: offered, although completed.
	back := "d0003"
	w.dev(back).Online = true
	out = Plan(s, st, w.devs, now)
	if got := offered(out); len(got) != 1 || got[0] != back {
		t.Fatalf("a returning member was offered %v", got)
	}
	// One acknowledges and goes silent (a brick): timed out, from its
	// acknowledgement.
	w.deliver(out, now)
	w.dev(back).Online = false
	m := out.State.Members[back]
	if got := s.memberState(m, w.dev(back), true, out.State, now.Add(9*time.Minute)); got != MOffered {
		t.Errorf("silent for 9 minutes after acknowledging: %s", got)
	}
	if got := s.memberState(m, w.dev(back), true, out.State, now.Add(11*time.Minute)); got != MTimedOut {
		t.Errorf("silent for 11 minutes after acknowledging: %s", got)
	}
	// Past the deadline nothing more is offered.
	w.dev("d0006").Online = true
	late := Plan(s, out.State, w.devs, now.Add(25*time.Hour))
	if len(offered(late)) != 0 {
		t.Fatalf("offered after the offline deadline: %v", late.Actions)
	}
	if s.Settled(out.State, now.Add(25*time.Hour)) || !s.Settled(late.State, now.Add(25*time.Hour)) || !late.State.Closed {
		t.Error("a completed rollout closes (and settles) at the first plan past its offline deadline")
	}
}

// A canary member that stays off is replaced by a reachable device of its
// stratum, and the swap is recorded.
func TestCanaryReplacement(t *testing.T) {
	s := testSpec()
	s.Gates.ReplaceAfter = Duration(5 * time.Minute)
	w := newWorld(fleet(300, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich"}))
	st := Plan(s, State{Status: StatusCreated}, w.devs, t0).State
	st, _, _ = st.Apply(s, OpStart, "op", "", t0)
	var gone string
	for id, m := range st.Members {
		if m.Stage == 0 && w.dev(id).Labels["hw"] == "rev-c" {
			gone = id
		}
	}
	w.dev(gone).Online = false
	w.dev(gone).LastSeen = t0.UnixMilli()
	out := Plan(s, st, w.devs, t0.Add(time.Minute))
	if slices.Contains(offered(out), gone) || out.State.Members[gone].Stage != 0 {
		t.Fatalf("off for a minute: offered or replaced already")
	}
	out = Plan(s, out.State, w.devs, t0.Add(6*time.Minute))
	m := out.State.Members[gone]
	if m.Stage == 0 || m.ReplacedBy == "" {
		t.Fatalf("off for 6 minutes, still in the canary: %+v", m)
	}
	r := out.State.Members[m.ReplacedBy]
	if r.Stage != 0 || r.Replaces != gone || w.dev(m.ReplacedBy).Labels["hw"] != "rev-c" || !slices.Contains(offered(out), m.ReplacedBy) {
		t.Fatalf("replacement %s %+v (hw %s), offers %v", m.ReplacedBy, r, w.dev(m.ReplacedBy).Labels["hw"], offered(out))
	}
	if len(out.Transitions) != 1 || out.Transitions[0].Action != "replace" {
		t.Fatalf("transitions %+v", out.Transitions)
	}
}

// Past the canary, a revision none of whose canary devices finished (they
// were off) is held: its devices in later stages are not offered, and one
// that is reachable joins the canary; if it fails, the rollout stops with
// one device of that revision hit.
func TestHeldStratum(t *testing.T) {
	s := testSpec()
	s.Gates.ReplaceAfter = Duration(time.Hour) // no replacement within the test: the hold alone
	s.Stages = []Stage{{Percent: 10}, {Percent: 100}}
	w := newWorld(skewed(map[string]int{"rev-a": 90, "rev-c": 10}, []string{"zurich"}))
	st := Plan(s, State{Status: StatusCreated}, w.devs, t0).State
	st, _, _ = st.Apply(s, OpStart, "op", "", t0)
	for id, m := range st.Members {
		if m.Stage == 0 && w.dev(id).Labels["hw"] == "rev-c" {
			w.dev(id).Online = false
		}
	}
	now := t0
	var out Outcome
	var joined []string
	for step := 0; step < 60 && st.Status == StatusRunning && len(joined) == 0; step++ {
		out = Plan(s, st, w.devs, now)
		w.deliver(out, now)
		for _, id := range offered(out) {
			if w.dev(id).Labels["hw"] != "rev-c" {
				w.report(id, proto.UpdateCommitted, now)
				continue
			}
			if out.State.Members[id].Stage != 0 || out.State.Stage == 0 {
				t.Fatalf("rev-c %s offered in stage %d (rollout at stage %d) before any rev-c finished in the canary",
					id, out.State.Members[id].Stage+1, out.State.Stage+1)
			}
			joined = append(joined, id)
		}
		st, now = out.State, now.Add(20*time.Second)
	}
	if len(joined) != 1 || st.Stage != 1 {
		t.Fatalf("rev-c devices joining the canary: %v (stage %d)", joined, st.Stage+1)
	}
	if tr := out.Transitions; len(tr) == 0 || tr[len(tr)-1].Action != "replace" || !strings.Contains(tr[len(tr)-1].Reason, "joins the canary") {
		t.Errorf("the join is not recorded: %+v", tr)
	}
	w.deliver(out, now)
	w.report(joined[0], proto.UpdateRolledBack, now)
	out = Plan(s, out.State, w.devs, now.Add(time.Second))
	if out.State.Status != StatusPaused {
		t.Fatalf("the rev-c canary failed: status %s", out.State.Status)
	}
}

// Pausing withdraws the offers no device acknowledged (a device that comes
// back is not offered), cancels those being downloaded; resuming offers
// them again as new commands. After an abort, nothing reaches a device
// that comes back.
func TestPauseWithdrawsAndResumeOffersAgain(t *testing.T) {
	s := testSpec()
	s.MinCanary = 6
	w := newWorld(fleet(300, []string{"rev-b"}, []string{"zurich"}))
	out := Plan(s, running(), w.devs, t0)
	ids := offered(out)
	if len(ids) != 6 {
		t.Fatalf("offers %v", ids)
	}
	// Three went off before the offer reached them; two are downloading.
	for _, id := range ids[:3] {
		w.dev(id).Online = false
	}
	w.deliver(out, t0)
	w.report(ids[3], proto.UpdateDownloading, t0)
	w.report(ids[4], proto.UpdateDownloading, t0)
	for _, id := range ids[:3] {
		if got := s.memberState(out.State.Members[id], w.dev(id), true, out.State, t0.Add(time.Hour)); got != MWaiting {
			t.Fatalf("%s off, offer not acknowledged, an hour on: %s", id, got)
		}
	}
	st, _, err := out.State.Apply(s, OpPause, "op", "check", t0.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	out = Plan(s, st, w.devs, t0.Add(2*time.Second))
	kinds := map[string][]string{}
	for _, a := range out.Actions {
		kinds[a.Kind] = append(kinds[a.Kind], a.Device)
	}
	if len(kinds[ActWithdraw]) != 3 || len(kinds[ActCancel]) != 2 || len(kinds[ActOffer]) != 0 {
		t.Fatalf("pause: %v", kinds)
	}
	w.deliver(out, t0.Add(2*time.Second))
	for _, id := range ids[:3] {
		w.dev(id).Online = true
	}
	w.deliver(Outcome{}, t0.Add(3*time.Second))
	for _, id := range ids[:3] {
		if w.dev(id).Acked != 0 {
			t.Fatalf("%s came back while paused and got the withdrawn offer", id)
		}
		if got := s.memberState(out.State.Members[id], w.dev(id), true, out.State, t0.Add(3*time.Second)); got != MCanceled {
			t.Errorf("%s withdrawn while paused: %s", id, got)
		}
	}
	st, _, _ = out.State.Apply(s, OpResume, "op", "", t0.Add(4*time.Second))
	out = Plan(s, st, w.devs, t0.Add(5*time.Second))
	again := offered(out)
	for _, id := range append(ids[:3], ids[3:5]...) {
		if !slices.Contains(again, id) || out.State.Members[id].Offers != 2 {
			t.Errorf("%s not offered again on resume (offers %d): %v", id, out.State.Members[id].Offers, again)
		}
	}
	// Abort with an offer in transit to a device that then went off:
	// withdrawn, and never delivered when it comes back.
	w.deliver(Outcome{}, t0) // nothing queued
	late := ids[0]
	w.dev(late).Online = false
	out.Actions = []Action{{Kind: ActOffer, Device: late}}
	w.deliver(out, t0.Add(5*time.Second))
	st, _, _ = out.State.Apply(s, OpAbort, "op", "bad", t0.Add(6*time.Second))
	out = Plan(s, st, w.devs, t0.Add(7*time.Second))
	w.deliver(out, t0.Add(7*time.Second))
	w.dev(late).Online = true
	w.deliver(Outcome{}, t0.Add(8*time.Second))
	if w.dev(late).Acked >= out.State.Members[late].Offered {
		t.Fatalf("%s got the offer after the abort", late)
	}
	if got := s.memberState(out.State.Members[late], w.dev(late), true, out.State, t0.Add(8*time.Second)); got != MCanceled {
		t.Errorf("withdrawn in an aborted rollout: %s", got)
	}
	if n := len(offered(Plan(s, out.State, w.devs, t0.Add(9*time.Second)))); n != 0 {
		t.Errorf("aborted rollout offered %d", n)
	}
}

// The health gate stops a build that installs fine but raises errors.
func TestHealthGate(t *testing.T) {
	s := testSpec()
	s.Gates.HealthOff = false
	w := newWorld(fleet(100, []string{"rev-b"}, []string{"zurich"}))
	out := Plan(s, running(), w.devs, t0)
	w.deliver(out, t0)
	for _, id := range offered(out) {
		w.report(id, proto.UpdateCommitted, t0)
	}
	out = Plan(s, out.State, w.devs, t0.Add(time.Second))
	for i := range w.devs {
		h := &Health{Hours: 0.5, Errors: 1}
		if w.devs[i].Version == "2.0.0" {
			h.Errors = 40 // 80 errors/h against 2
		}
		w.devs[i].Health = h
	}
	bad := Plan(s, out.State, w.devs, t0.Add(30*time.Second))
	if bad.State.Status != StatusPaused {
		t.Fatalf("unhealthy canary: %s %v", bad.State.Status, bad.Gates)
	}
	for i := range w.devs {
		w.devs[i].Health = &Health{Hours: 0.5, Errors: 1}
	}
	if good := Plan(s, out.State, w.devs, t0.Add(30*time.Second)); good.State.Status != StatusRunning {
		t.Fatalf("healthy canary: %s %+v", good.State.Status, good.Gates)
	}
}

// Automatic revert offers the revert release to the devices that took the
// new one, and cancels offers not yet installing.
func TestAutoRevert(t *testing.T) {
	s := testSpec()
	s.AutoRevert = true
	s.Revert = &ReleaseRef{Target: "agent", Version: "1.0.0", Counter: 21}
	s.MinCanary = 5
	w := newWorld(fleet(100, []string{"rev-b"}, []string{"zurich"}))
	out := Plan(s, running(), w.devs, t0)
	w.deliver(out, t0)
	states := []proto.UpdateState{proto.UpdateCommitted, proto.UpdateCommitted, proto.UpdateRolledBack, proto.UpdateRolledBack, proto.UpdateDownloading}
	for k, id := range offered(out) {
		w.report(id, states[k], t0)
	}
	out = Plan(s, out.State, w.devs, t0.Add(time.Second))
	kinds := map[string]int{}
	for _, a := range out.Actions {
		kinds[a.Kind]++
	}
	if out.State.Status != StatusPaused || !out.State.Reverting || kinds[ActRevert] != 2 || kinds[ActCancel] != 1 {
		t.Fatalf("status %s reverting %v actions %v", out.State.Status, out.State.Reverting, out.Actions)
	}
	out = Plan(s, out.State, w.devs, t0.Add(2*time.Second))
	for _, a := range out.Actions {
		if a.Kind == ActRevert || a.Kind == ActCancel {
			t.Fatalf("sent twice: %v", out.Actions)
		}
	}
}

func TestWindowsAndSpecValidate(t *testing.T) {
	w, err := ParseWindow("22:00-06:00")
	if err != nil {
		t.Fatal(err)
	}
	for h, want := range map[int]bool{23: true, 3: true, 6: false, 12: false, 22: true} {
		if got := w.In(time.Date(2026, 1, 1, h, 0, 0, 0, time.UTC)); got != want {
			t.Errorf("%02d:00 in %v = %v", h, w, got)
		}
	}
	s := testSpec()
	s.AutoRevert = true
	if err := s.Validate(); err == nil {
		t.Error("auto revert without a revert release accepted")
	}
	s.Revert = &ReleaseRef{Target: "agent", Version: "1.0.0", Counter: 5}
	if err := s.Validate(); err == nil {
		t.Error("a revert release with a lower counter accepted")
	}
	s = testSpec()
	s.Gates.ReplaceAfter = Duration(-time.Second)
	if err := s.Validate(); err == nil {
		t.Error("a negative duration accepted")
	}
	if _, err := ParseStages("1%,10%,x"); err == nil {
		t.Error("bad stage accepted")
	}
	if st, err := ParseStages("5, 20%, 100%"); err != nil || len(st) != 3 || st[0].Count != 5 || st[2].Percent != 100 {
		t.Errorf("ParseStages = %v, %v", st, err)
	}
}

// Devices the rollout leaves out are listed with why.
func TestExclusions(t *testing.T) {
	s := testSpec()
	s.Hardware = []string{"rev-b"}
	s.FromVersions = []string{"1.0.0"}
	devs := fleet(6, []string{"rev-b"}, []string{"zurich"})
	devs[1].Labels = map[string]string{"base": "zurich"}                                                       // no hw label
	devs[2].Labels = map[string]string{"hw": "rev-a", "base": "zurich"}                                        // another revision
	devs[3].Hardware = "rev-c"                                                                                 // labelled rev-b, reports rev-c
	devs[4].Version = "0.9.0"                                                                                  // not a from-version
	devs[5].Busy = "r-other"                                                                                   // in another rollout
	devs = append(devs, Device{ID: "pre", AwaitingEnrollment: true, Labels: map[string]string{"hw": "rev-b"}}) // never enrolled
	out := Plan(s, running(), devs, t0)
	if out.Targeted != 1 || len(out.Excluded) != 6 {
		t.Fatalf("targeted %d, excluded %+v", out.Targeted, out.Excluded)
	}
	want := map[string]string{"d0001": "no hw label", "d0002": "hardware rev-a", "d0003": "reports hardware rev-c",
		"d0004": "runs 0.9.0", "d0005": "in rollout r-other", "pre": "not enrolled"}
	for _, e := range out.Excluded {
		if !strings.Contains(e.Reason, want[e.Device]) {
			t.Errorf("%s left out because %q, want %q", e.Device, e.Reason, want[e.Device])
		}
	}
}

// TestPlanProperties runs random fleets (skewed hardware mixes down to one
// device of a revision, a random share switched off, devices that come and
// go) and builds through random report sequences, and checks the engine's
// invariants after every step.
func TestPlanProperties(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		revs := []string{"rev-a", "rev-b", "rev-c", "rev-d"}[:rapid.IntRange(1, 4).Draw(rt, "revisions")]
		counts := map[string]int{}
		for _, r := range revs {
			counts[r] = rapid.SampledFrom([]int{1, 2, 3, 10, 40, 100}).Draw(rt, "count "+r)
		}
		bases := []string{"zurich", "bern", "geneva", "basel"}[:rapid.IntRange(1, 4).Draw(rt, "bases")]
		w := newWorld(skewed(counts, bases))
		offP := rapid.SampledFrom([]float64{0, 0.1, 0.33, 0.6}).Draw(rt, "offline share")
		for i := range w.devs {
			w.devs[i].Online = rapid.Float64Range(0, 1).Draw(rt, "off") >= offP
		}
		spec := Spec{ID: rapid.StringMatching(`r-[a-z0-9]{4}`).Draw(rt, "id"),
			Release: ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 20},
			Stages:  []Stage{{Percent: 1}, {Percent: 10}, {Percent: 50}, {Percent: 100}},
			Gates: Gates{Soak: Duration(time.Duration(rapid.IntRange(0, 120).Draw(rt, "soak")) * time.Second), HealthOff: true,
				MaxFailed:     rapid.SampledFrom([]float64{0.05, 0.2, 0.5}).Draw(rt, "maxFailed"),
				MinCommitted:  rapid.SampledFrom([]float64{0.5, 0.9, 1}).Draw(rt, "minCommitted"),
				DeviceTimeout: Duration(10 * time.Minute), ReplaceAfter: Duration(time.Duration(rapid.IntRange(1, 10).Draw(rt, "replace")) * time.Minute)},
			Limits:    Limits{MaxInFlight: rapid.IntRange(1, 40).Draw(rt, "maxInFlight")},
			OnFailure: rapid.SampledFrom([]string{OnFailurePause, OnFailureAbort}).Draw(rt, "onFailure"),
		}
		if rapid.Bool().Draw(rt, "budget") {
			spec.Limits.Budgets = []Budget{{Label: "base", KeepMin: rapid.IntRange(0, 3).Draw(rt, "keepMin"),
				KeepPercent: rapid.SampledFrom([]float64{0, 25, 50}).Draw(rt, "keepPct")}}
		}
		spec = spec.WithDefaults()
		// The build is bad on one revision (on every device of it), or
		// fails at random.
		badRev := ""
		if rapid.Bool().Draw(rt, "bad revision") {
			badRev = rapid.SampledFrom(revs).Draw(rt, "which")
		}
		failP := rapid.SampledFrom([]float64{0, 0.05, 0.3}).Draw(rt, "failP")
		abortAt := rapid.IntRange(5, 400).Draw(rt, "operator aborts at step")

		st := Plan(spec, State{Status: StatusCreated}, w.devs, t0).State
		// The first stage holds every revision.
		inCanary := map[string]bool{}
		for id, m := range st.Members {
			if m.Stage == 0 {
				inCanary[w.dev(id).Labels["hw"]] = true
			}
		}
		for _, r := range revs {
			if !inCanary[r] {
				rt.Fatalf("no %s in the canary %v (fleet %v)", r, inCanary, counts)
			}
		}
		st, _, _ = st.Apply(spec, OpStart, "op", "", t0)
		now := t0
		offers := map[string]int{}
		everAcked := map[string]bool{}
		var abortedAt int64
		for step := 0; step < 300 && !spec.Settled(st, now); step++ {
			if step == abortAt && !st.Status.Final() {
				st, _, _ = st.Apply(spec, OpAbort, "op", "enough", now)
				abortedAt = now.UnixMilli()
			}
			out := Plan(spec, st, w.devs, now)
			// The canary is not left while a device of the bad revision
			// in it can still be judged.
			if out.State.Stage > 0 && st.Stage == 0 {
				for id, m := range st.Members {
					if ms := spec.memberState(m, w.dev(id), true, st, now); m.Stage == 0 && w.dev(id).Labels["hw"] == badRev &&
						ms.reachable() && m.Offered > 0 {
						rt.Fatalf("left the canary with %s (the bad revision) %s in it", id, ms)
					}
				}
			}
			if out.State.Status == StatusAborted && abortedAt == 0 {
				abortedAt = now.UnixMilli()
			}
			for _, id := range offered(out) {
				offers[id]++
				m := out.State.Members[id]
				if m.Offers != offers[id] {
					rt.Fatalf("%s: offer %d counted as %d", id, offers[id], m.Offers)
				}
				if !w.dev(id).Online {
					rt.Fatalf("%s offered while off", id)
				}
				if w.dev(id).Labels["hw"] == badRev && m.Stage != 0 {
					rt.Fatalf("%s (%s, the bad revision) offered in stage %d", id, badRev, m.Stage+1)
				}
				if abortedAt > 0 {
					rt.Fatalf("%s offered after the abort", id)
				}
			}
			inFlight := 0
			for id, m := range out.State.Members {
				d := w.dev(id)
				ms := spec.memberState(m, d, true, out.State, now)
				if !everAcked[id] && (ms == MFailed || ms == MTimedOut) && (d.Update == nil || d.Update.At < m.Offered) {
					rt.Fatalf("%s never reached, counted %s", id, ms)
				}
				if occupies(m, ms) {
					inFlight++
				}
			}
			if inFlight > spec.Limits.MaxInFlight {
				rt.Fatalf("%d devices in flight, limit %d", inFlight, spec.Limits.MaxInFlight)
			}
			// Some switch off just as the offer goes out: it waits in the
			// queue for them.
			for _, id := range offered(out) {
				if rapid.IntRange(0, 4).Draw(rt, "off before delivery") == 0 {
					w.dev(id).Online, w.dev(id).LastSeen = false, now.UnixMilli()
				}
			}
			before := map[string]int64{}
			for id := range w.queued {
				before[id] = 1
			}
			for _, id := range offered(out) {
				before[id] = 1
			}
			w.deliver(out, now)
			for id := range before {
				if _, still := w.queued[id]; !still && w.dev(id).Acked == now.UnixMilli() {
					everAcked[id] = true
					if abortedAt > 0 && abortedAt < now.UnixMilli() {
						rt.Fatalf("%s: an offer reached it after the abort", id)
					}
				}
			}
			for _, id := range offered(out) {
				if w.dev(id).Acked == now.UnixMilli() {
					everAcked[id] = true
				}
			}
			st = out.State
			now = now.Add(time.Duration(rapid.IntRange(1, 90).Draw(rt, "dt")) * time.Second)
			// Devices move on: acknowledged ones report; some switch on or off.
			for id, m := range st.Members {
				d := w.dev(id)
				if m.Offered == 0 || d.Acked < m.Offered || (d.Update != nil && d.Update.At >= m.Offered &&
					(d.Update.State == proto.UpdateCommitted || failed(d.Update.State))) {
					continue
				}
				if !d.Online {
					continue // off: it says nothing
				}
				switch r := rapid.IntRange(0, 9).Draw(rt, "progress"); {
				case r < 3:
				case r < 4:
					w.report(id, proto.UpdateDeferred, now)
				default:
					if d.Labels["hw"] == badRev || rapid.Float64Range(0, 1).Draw(rt, "fail") < failP {
						w.report(id, proto.UpdateRolledBack, now)
					} else {
						w.report(id, proto.UpdateCommitted, now)
					}
				}
			}
			if rapid.IntRange(0, 4).Draw(rt, "flip") == 0 {
				d := &w.devs[rapid.IntRange(0, len(w.devs)-1).Draw(rt, "who")]
				d.Online = !d.Online
				if !d.Online {
					d.LastSeen = now.UnixMilli()
				}
			}
		}
	})
}

// Operator actions: a pure transition, property-tested over random states
// and action sequences.
func TestApplyProperties(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		spec := testSpec()
		if rapid.Bool().Draw(rt, "revert release") {
			spec.Revert = &ReleaseRef{Target: "agent", Version: "1.0.0+revert.1", Counter: 21}
		}
		st := State{Status: StatusCreated, Members: map[string]*Member{"d1": {Stage: 0}}}
		now := t0
		for range 30 {
			op := rapid.SampledFrom(Ops).Draw(rt, "op")
			reason := rapid.SampledFrom([]string{"", "why"}).Draw(rt, "reason")
			now = now.Add(time.Minute)
			next, tr, err := st.Apply(spec, op, "alice", reason, now)
			if err != nil {
				if !errorsIs(err, ErrState) || next.Status != st.Status || next.Reverting != st.Reverting || next.Promoted != st.Promoted {
					rt.Fatalf("%s refused (%v) but the state changed: %+v -> %+v", op, err, st, next)
				}
				if len(err.Error()) < 40 {
					rt.Fatalf("%s refused without saying what it needs: %v", op, err)
				}
				continue
			}
			if next.Members == nil || len(next.Members) != 1 {
				rt.Fatalf("%s touched the members", op)
			}
			if tr.From != string(st.Status) || tr.To != string(next.Status) || tr.Action != string(op) {
				rt.Fatalf("transition %+v for %s from %s to %s", tr, op, st.Status, next.Status)
			}
			switch {
			case st.Status.Final() && next.Status != st.Status:
				rt.Fatalf("%s moved a %s rollout to %s", op, st.Status, next.Status)
			case next.Status.Final() && next.Ended == 0:
				rt.Fatalf("%s ended a rollout without an end time", op)
			case op == OpRevert && (spec.Revert == nil || next.Status == StatusRunning):
				rt.Fatalf("revert accepted without a revert release or left it running: %+v", next)
			case op == OpPromote && reason == "":
				rt.Fatal("promote accepted without a reason")
			case op == OpResume && (st.Reverting || next.Status != StatusRunning):
				rt.Fatalf("resume from %+v to %+v", st, next)
			case op == OpStart && (st.Status != StatusCreated || next.StageStarted != now.UnixMilli()):
				rt.Fatalf("start from %s", st.Status)
			}
			st = next
		}
	})
	// The refusals say what is needed.
	s := testSpec()
	_, _, err := State{Status: StatusAborted}.Apply(s, OpRevert, "op", "", t0)
	if err == nil || !strings.Contains(err.Error(), "revert release") || !strings.Contains(err.Error(), "counter above 20") {
		t.Errorf("revert without a revert release: %v", err)
	}
}

func errorsIs(err, target error) bool {
	return err != nil && strings.HasPrefix(err.Error(), target.Error())
}

// A few events over a short window are noise, even when the rate looks
// far over the limit; the same excess over a long window is not.
func TestHealthGateSignificance(t *testing.T) {
	s := testSpec()
	s.Gates.HealthMargin = 1
	base := cohort{n: 450, hours: 450 * 3.0 / 3600, errors: 6.7, samples: 450 * 15}
	few := cohort{n: 50, hours: 50 * 3.0 / 3600, errors: 2, samples: 50 * 15} // 48/h against 18/h
	for _, g := range s.healthGates(few, base, "") {
		if !g.OK {
			t.Errorf("2 errors over 2.5 device-minutes failed %s: %s", g.Name, g.Why)
		}
	}
	many := cohort{n: 50, hours: 50 * 3.0, errors: 7200, samples: 50 * 15} // same rate, 3600 times the exposure
	base.hours, base.errors = 450*3.0, 24300
	var failedGates []string
	for _, g := range s.healthGates(many, base, "") {
		if !g.OK {
			failedGates = append(failedGates, g.Name)
		}
	}
	if len(failedGates) != 1 || failedGates[0] != "health:errors" {
		t.Errorf("48 errors/h against 18 over 150 device-hours: failed %v", failedGates)
	}
	// Link loss: 3 samples of 750 without link is not 5 % worse; 200 is.
	few = cohort{n: 50, hours: 1, samples: 750, noLink: 3}
	base = cohort{n: 450, hours: 9, samples: 6750}
	for _, g := range s.healthGates(few, base, "") {
		if !g.OK {
			t.Errorf("%s failed: %s", g.Name, g.Why)
		}
	}
	few.noLink = 200
	if gs := s.healthGates(few, base, ""); gs[2].OK || gs[2].Verdict != VerdictFails {
		t.Errorf("27%% link loss against 0 passed: %s", gs[2].Why)
	}
}

func TestTails(t *testing.T) {
	for _, c := range []struct {
		mean float64
		k    int
		want float64
	}{
		{1, 2, 0.26424111765711533}, // 1 - e^-1 (1 + 1)
		{1, 5, 0.0036598468273437},
		{10, 20, 0.0034452365656}, // tabulated
		{2, 0, 1},
		{0, 3, 0},
		{1000, 1200, 1.3e-10},
	} {
		got := poissonTail(c.mean, c.k)
		if d := math.Abs(got - c.want); d > 1e-9 && d/c.want > 0.1 {
			t.Errorf("poissonTail(%v, %d) = %v, want %v", c.mean, c.k, got, c.want)
		}
	}
	// Binomial(10, 0.5): P(X >= 8) = 56/1024.
	if got := binomialTail(10, 0.5, 8); math.Abs(got-56.0/1024) > 1e-12 {
		t.Errorf("binomialTail(10, .5, 8) = %v", got)
	}
	if got := binomialTail(10, 0.1, 11); got != 0 {
		t.Errorf("binomialTail over n = %v", got)
	}
}

// A device in its trial boot already reports the new version; that is not
// a commit, and a canary that then rolls back must stop the rollout.
func TestTrialIsNotCommitted(t *testing.T) {
	s := testSpec()
	w := newWorld(fleet(300, []string{"rev-b"}, []string{"zurich"}))
	out := Plan(s, running(), w.devs, t0)
	w.deliver(out, t0)
	offers := offered(out)
	for _, id := range offers {
		w.report(id, proto.UpdateTrial, t0)
		w.dev(id).Version = "2.0.0"
	}
	for i := 1; i <= 5; i++ {
		next := Plan(s, out.State, w.devs, t0.Add(time.Duration(i)*time.Minute))
		if next.State.GatesSince != 0 || next.State.Stage != 0 || len(next.Transitions) != 0 {
			t.Fatalf("devices in trial passed the gates: %+v", next.State)
		}
		out.State = next.State
	}
	for _, id := range offers {
		w.report(id, proto.UpdateRolledBack, t0.Add(6*time.Minute))
		w.dev(id).Version = "1.0.0"
	}
	if got := Plan(s, out.State, w.devs, t0.Add(6*time.Minute)); got.State.Status != StatusPaused {
		t.Fatalf("rolled-back canary: %s", got.State.Status)
	}
}

// An operator's abort cancels the offers not yet installing, and an
// aborted rollout stops being planned a device timeout later.
func TestAbortCancelsOffers(t *testing.T) {
	s := testSpec()
	w := newWorld(fleet(300, []string{"rev-b"}, []string{"zurich"}))
	out := Plan(s, running(), w.devs, t0)
	w.deliver(out, t0)
	states := []proto.UpdateState{proto.UpdateDownloading, proto.UpdateInstalling, proto.UpdateCommitted}
	want := map[string]bool{}
	for i, id := range offered(out) {
		w.report(id, states[i%len(states)], t0)
		if i%len(states) == 0 {
			want[id] = true
		}
	}
	st, _, _ := out.State.Apply(s, OpAbort, "op", "", t0.Add(time.Second))
	now := t0.Add(2 * time.Second)
	out = Plan(s, st, w.devs, now)
	got := map[string]bool{}
	for _, a := range out.Actions {
		if a.Kind != ActCancel {
			t.Fatalf("aborted rollout planned %v", a)
		}
		got[a.Device] = true
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("cancels %v, want %v (the devices still downloading)", got, want)
	}
	if again := Plan(s, out.State, w.devs, now.Add(time.Second)); len(again.Actions) != 0 {
		t.Fatalf("cancels sent twice: %v", again.Actions)
	}
	if s.Settled(out.State, now) || !s.Settled(out.State, now.Add(s.Gates.DeviceTimeout.D()+time.Second)) {
		t.Fatal("an aborted rollout settles a device timeout after it ended")
	}
}

// selectFirst returns exactly the k smallest, duplicates included.
func TestSelectFirst(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		xs := rapid.SliceOfN(rapid.IntRange(0, 20), 1, 200).Draw(t, "xs")
		k := rapid.IntRange(1, len(xs)).Draw(t, "k")
		want := slices.Clone(xs)
		slices.Sort(want)
		got := slices.Clone(selectFirst(slices.Clone(xs), k, cmp.Compare[int]))
		slices.Sort(got)
		if !slices.Equal(got, want[:k]) {
			t.Fatalf("selectFirst(%v, %d) = %v, want %v", xs, k, got, want[:k])
		}
	})
}

// One background error on one of five updated devices four seconds into
// the soak says nothing about the build: the one-sample test against the
// floor alone would fail it (p≈0.006); the comparison with the other
// cohort over the same window does not. Hundreds of errors do fail.
func TestHealthGateShortWindow(t *testing.T) {
	s := testSpec()
	s.Gates.HealthMargin = 1
	window := 4.0 / 3600
	var updated, baseline cohort
	for i := range 5 {
		h := &Health{Hours: window, Samples: 20}
		if i == 0 {
			h.Errors = 1
		}
		updated.add(h)
	}
	for range 95 {
		baseline.add(&Health{Hours: window, Samples: 20})
	}
	for _, g := range s.healthGates(updated, baseline, "") {
		if !g.OK {
			t.Errorf("%s failed on one error in a short window: %s", g.Name, g.Why)
		}
	}
	bad := cohort{}
	for range 5 {
		bad.add(&Health{Hours: window, Samples: 20, Errors: 20})
	}
	failedGate := false
	for _, g := range s.healthGates(bad, baseline, "") {
		failedGate = failedGate || (g.Name == "health:errors" && !g.OK)
	}
	if !failedGate {
		t.Error("100 errors over 20 device-seconds against none passed the health gate")
	}
}

// Cases found in review, each once.
func TestReviewedCases(t *testing.T) {
	t.Run("a revert asked for after an aborted rollout settled is sent", func(t *testing.T) {
		s := testSpec()
		s.Revert = &ReleaseRef{Target: "agent", Version: "1.0.0+revert.1", Counter: 21}
		w := newWorld(fleet(100, []string{"rev-b"}, []string{"zurich"}))
		out := Plan(s, running(), w.devs, t0)
		w.deliver(out, t0)
		for _, id := range offered(out) {
			w.report(id, proto.UpdateCommitted, t0)
		}
		st, _, _ := out.State.Apply(s, OpAbort, "op", "", t0.Add(time.Minute))
		later := t0.Add(time.Minute + s.Gates.DeviceTimeout.D() + time.Minute)
		if !s.Settled(st, later) {
			t.Fatal("an aborted rollout does not settle")
		}
		st, _, err := st.Apply(s, OpRevert, "op", "late", later)
		if err != nil || s.Settled(st, later) {
			t.Fatalf("revert accepted (%v) but the rollout stays settled", err)
		}
		reverts := 0
		for _, a := range Plan(s, st, w.devs, later).Actions {
			if a.Kind == ActRevert {
				reverts++
			}
		}
		if reverts != 3 {
			t.Fatalf("%d reverts, want the 3 committed canary devices", reverts)
		}
	})
	t.Run("time deferred and reported progress are not silence", func(t *testing.T) {
		s := testSpec()
		s.Gates.DeviceTimeout = Duration(30 * time.Minute)
		w := newWorld(fleet(30, []string{"rev-b"}, []string{"zurich"}))
		out := Plan(s, running(), w.devs, t0)
		w.deliver(out, t0)
		id := offered(out)[0]
		w.report(id, proto.UpdateDeferred, t0)
		w.report(id, proto.UpdateDownloading, t0.Add(49*time.Minute)) // landed after 49 minutes of flying
		if got := s.memberState(out.State.Members[id], w.dev(id), true, out.State, t0.Add(50*time.Minute)); got != MOffered {
			t.Fatalf("downloading a minute after a long deferral: %s", got)
		}
		if got := s.memberState(out.State.Members[id], w.dev(id), true, out.State, t0.Add(80*time.Minute)); got != MTimedOut {
			t.Fatalf("silent for 31 minutes since: %s", got)
		}
	})
	t.Run("an offer that an online device never acknowledges is withdrawn after a device timeout", func(t *testing.T) {
		s := testSpec()
		w := newWorld(fleet(30, []string{"rev-b"}, []string{"zurich"}))
		out := Plan(s, running(), w.devs, t0) // not delivered: the devices never answer
		ids := offered(out)
		late := Plan(s, out.State, w.devs, t0.Add(s.Gates.DeviceTimeout.D()+time.Second))
		var withdrawn []string
		for _, a := range late.Actions {
			if a.Kind == ActWithdraw {
				withdrawn = append(withdrawn, a.Device)
			}
		}
		slices.Sort(withdrawn)
		slices.Sort(ids)
		if !slices.Equal(withdrawn, ids) {
			t.Fatalf("withdrawn %v, offered %v", withdrawn, ids)
		}
	})
	t.Run("a member no longer targeted has its offer taken back", func(t *testing.T) {
		s := testSpec()
		w := newWorld(fleet(30, []string{"rev-b"}, []string{"zurich"}))
		out := Plan(s, running(), w.devs, t0)
		ids := offered(out)
		w.dev(ids[0]).Busy = "r-other" // taken by another rollout before the offer reached it
		w.dev(ids[1]).Labels = map[string]string{"hw": "rev-z"}
		s2 := s
		s2.Hardware = []string{"rev-b"}
		next := Plan(s2, out.State, w.devs, t0.Add(time.Second))
		got := map[string]string{}
		for _, a := range next.Actions {
			got[a.Device] = a.Kind
		}
		if got[ids[0]] != ActWithdraw || got[ids[1]] != ActWithdraw || got[ids[2]] != "" {
			t.Fatalf("actions %v (offers %v)", next.Actions, ids)
		}
	})
	t.Run("members coming back during the last soak do not hold completion", func(t *testing.T) {
		s := testSpec()
		s.Stages = []Stage{{Percent: 100}}
		w := newWorld(fleet(60, []string{"rev-b"}, []string{"zurich"}))
		for i := 0; i < 20; i++ {
			w.devs[i].Online = false
		}
		st, now := running(), t0
		back := 0
		for step := 0; step < 200 && st.Status == StatusRunning; step++ {
			out := Plan(s, st, w.devs, now)
			w.deliver(out, now)
			for _, id := range offered(out) {
				w.report(id, proto.UpdateCommitted, now)
			}
			st, now = out.State, now.Add(10*time.Second)
			if step%2 == 0 && back < 20 { // one comes back every 20 s, the soak is a minute
				w.devs[back].Online = true
				back++
			}
		}
		if st.Status != StatusCompleted || back == 20 {
			t.Fatalf("status %s after %v, %d of 20 back: the soak restarted with every return", st.Status, now.Sub(t0), back)
		}
	})
}
