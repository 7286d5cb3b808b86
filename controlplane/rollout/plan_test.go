package rollout

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/hangarfleet/hangar/proto"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func fleet(n int, hws, bases []string) []Device {
	devs := make([]Device, n)
	for i := range devs {
		devs[i] = Device{ID: fmt.Sprintf("d%04d", i), Online: true, Version: "1.0.0",
			Labels: map[string]string{"hw": hws[i%len(hws)], "base": bases[(i/len(hws))%len(bases)]}}
	}
	return devs
}

func testSpec() Spec {
	return Spec{ID: "r-1", Release: ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 20},
		Gates: Gates{Soak: Duration(time.Minute), HealthOff: true}}.WithDefaults()
}

func TestStageSizes(t *testing.T) {
	s := testSpec()
	for _, c := range []struct {
		n    int
		want []int
	}{
		{1000, []int{10, 100, 500, 1000}},
		{100, []int{3, 10, 50, 100}}, // the canary is at least MinCanary
		{2, []int{2, 2, 2, 2}},
		{0, []int{0, 0, 0, 0}},
	} {
		if got := s.stageSizes(c.n); fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("stageSizes(%d) = %v, want %v", c.n, got, c.want)
		}
	}
	s.Stages = []Stage{{Count: 5}, {Count: 20}, {Percent: 100}}
	if got := s.stageSizes(100); fmt.Sprint(got) != "[5 20 100]" {
		t.Errorf("counts: %v", got)
	}
}

// The canary holds every hardware revision and base, and membership is
// deterministic and sticky.
func TestStratifiedCanary(t *testing.T) {
	s := testSpec()
	s.MinCanary = 6
	devs := fleet(600, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "bern"})
	st := State{Status: StatusRunning, Members: map[string]*Member{}}
	out := Plan(s, st, devs, t0)
	canary := map[string]bool{}
	n := 0
	for id, m := range out.State.Members {
		if m.Stage == 0 {
			n++
			for _, d := range devs {
				if d.ID == id {
					canary[d.Labels["hw"]+"/"+d.Labels["base"]] = true
				}
			}
		}
	}
	if n != 6 || len(canary) != 6 {
		t.Fatalf("canary of %d devices covers %d strata %v, want 6 and 6", n, len(canary), canary)
	}
	again := Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, t0)
	for id, m := range out.State.Members {
		if again.State.Members[id].Stage != m.Stage {
			t.Fatal("membership is not deterministic")
		}
	}
	// A device that joins later goes to the stage its rank falls in; nobody
	// else moves.
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

func report(s proto.UpdateState) *Report { return &Report{State: s, At: t0.UnixMilli()} }

// A good stage advances after its soak; a bad canary pauses the rollout and
// nothing reaches stage 2.
func TestGatesAdvanceAndPause(t *testing.T) {
	s := testSpec()
	devs := fleet(300, []string{"rev-b"}, []string{"zurich"})
	st := State{Status: StatusRunning, Members: map[string]*Member{}}
	out := Plan(s, st, devs, t0)
	if len(out.Actions) != 3 {
		t.Fatalf("canary offers: %v", out.Actions)
	}
	for _, a := range out.Actions {
		for i := range devs {
			if devs[i].ID == a.Device {
				devs[i].Update, devs[i].Version = report(proto.UpdateCommitted), "2.0.0"
			}
		}
	}
	now := t0.Add(time.Second)
	out = Plan(s, out.State, devs, now)
	if out.State.GatesSince == 0 || out.State.Stage != 0 {
		t.Fatalf("gates should hold and the soak start: %+v", out.State)
	}
	out = Plan(s, out.State, devs, now.Add(30*time.Second))
	if out.State.Stage != 0 {
		t.Fatal("left the stage before the soak")
	}
	out = Plan(s, out.State, devs, now.Add(61*time.Second))
	if out.State.Stage != 1 || len(out.Transitions) != 1 {
		t.Fatalf("stage after soak: %d, transitions %+v", out.State.Stage, out.Transitions)
	}
	if len(out.Actions) != 27 {
		t.Fatalf("stage 2 offers: %d, want 27 (30 - 3)", len(out.Actions))
	}

	// A bad canary.
	devs = fleet(300, []string{"rev-b"}, []string{"zurich"})
	out = Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, t0)
	for _, a := range out.Actions {
		for i := range devs {
			if devs[i].ID == a.Device {
				devs[i].Update = report(proto.UpdateRolledBack)
			}
		}
	}
	out = Plan(s, out.State, devs, t0.Add(time.Second))
	if out.State.Status != StatusPaused || len(out.Actions) != 0 {
		t.Fatalf("bad canary: status %s, actions %v", out.State.Status, out.Actions)
	}
	s.OnFailure = OnFailureAbort
	out2 := Plan(s, State{Status: StatusRunning, Stage: out.State.Stage, Members: out.State.Clone().Members}, devs, t0.Add(2*time.Second))
	if out2.State.Status != StatusAborted {
		t.Fatalf("abort on failure: %s", out2.State.Status)
	}
}

// The health gate stops a build that installs fine but raises errors.
func TestHealthGate(t *testing.T) {
	s := testSpec()
	s.Gates.HealthOff = false
	devs := fleet(100, []string{"rev-b"}, []string{"zurich"})
	out := Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, t0)
	for _, a := range out.Actions {
		for i := range devs {
			if devs[i].ID == a.Device {
				devs[i].Update, devs[i].Version = report(proto.UpdateCommitted), "2.0.0"
			}
		}
	}
	out = Plan(s, out.State, devs, t0.Add(time.Second))
	for i := range devs {
		h := &Health{Hours: 0.5, Errors: 1}
		if devs[i].Version == "2.0.0" {
			h.Errors = 40 // 80 errors/h against 2
		}
		devs[i].Health = h
	}
	out = Plan(s, out.State, devs, t0.Add(30*time.Second))
	if out.State.Status != StatusPaused {
		t.Fatalf("unhealthy canary: %s %v", out.State.Status, out.Gates)
	}
	// The same canary as healthy as the rest passes.
	for i := range devs {
		devs[i].Health = &Health{Hours: 0.5, Errors: 1, Reboots: 0}
	}
	st := out.State
	st.Status = StatusRunning
	out = Plan(s, st, devs, t0.Add(90*time.Second))
	if out.State.Status != StatusRunning {
		t.Fatalf("healthy canary: %s %+v", out.State.Status, out.Gates)
	}
}

// Automatic revert offers the revert release to the devices that took the
// new one, and withdraws offers not yet installing.
func TestAutoRevert(t *testing.T) {
	s := testSpec()
	s.AutoRevert = true
	s.Revert = &ReleaseRef{Target: "agent", Version: "1.0.0", Counter: 21}
	s.MinCanary = 5
	devs := fleet(100, []string{"rev-b"}, []string{"zurich"})
	out := Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, t0)
	states := []proto.UpdateState{proto.UpdateCommitted, proto.UpdateCommitted, proto.UpdateRolledBack, proto.UpdateRolledBack, proto.UpdateDownloading}
	for k, a := range out.Actions {
		for i := range devs {
			if devs[i].ID == a.Device {
				devs[i].Update = report(states[k])
			}
		}
	}
	out = Plan(s, out.State, devs, t0.Add(time.Second))
	kinds := map[string]int{}
	for _, a := range out.Actions {
		kinds[a.Kind]++
	}
	if out.State.Status != StatusPaused || !out.State.Reverting || kinds[ActRevert] != 2 || kinds[ActCancel] != 1 {
		t.Fatalf("status %s reverting %v actions %v", out.State.Status, out.State.Reverting, out.Actions)
	}
	// Reverts are offered once.
	out = Plan(s, out.State, devs, t0.Add(2*time.Second))
	for _, a := range out.Actions {
		if a.Kind == ActRevert {
			t.Fatalf("revert offered twice: %v", out.Actions)
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
	if _, err := ParseStages("1%,10%,x"); err == nil {
		t.Error("bad stage accepted")
	}
	if st, err := ParseStages("5, 20%, 100%"); err != nil || len(st) != 3 || st[0].Count != 5 || st[2].Percent != 100 {
		t.Errorf("ParseStages = %v, %v", st, err)
	}
}

// TestPlanProperties runs random fleets through random report sequences
// and checks the engine's invariants after every step.
func TestPlanProperties(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		n := rapid.IntRange(1, 150).Draw(rt, "devices")
		hws := []string{"rev-a", "rev-b", "rev-c"}[:rapid.IntRange(1, 3).Draw(rt, "hws")]
		bases := []string{"zurich", "bern", "geneva", "basel"}[:rapid.IntRange(1, 4).Draw(rt, "bases")]
		devs := fleet(n, hws, bases)
		spec := Spec{ID: rapid.StringMatching(`r-[a-z0-9]{4}`).Draw(rt, "id"),
			Release: ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 20},
			Gates: Gates{Soak: Duration(time.Duration(rapid.IntRange(0, 120).Draw(rt, "soak")) * time.Second), HealthOff: true,
				MaxFailed:     rapid.SampledFrom([]float64{0.05, 0.2, 0.5}).Draw(rt, "maxFailed"),
				MinCommitted:  rapid.SampledFrom([]float64{0.5, 0.9, 1}).Draw(rt, "minCommitted"),
				DeviceTimeout: Duration(10 * time.Minute)},
			Limits:    Limits{MaxInFlight: rapid.IntRange(1, 40).Draw(rt, "maxInFlight")},
			OnFailure: rapid.SampledFrom([]string{OnFailurePause, OnFailureAbort}).Draw(rt, "onFailure"),
		}
		if rapid.Bool().Draw(rt, "budget") {
			spec.Limits.Budgets = []Budget{{Label: "base", KeepMin: rapid.IntRange(0, 3).Draw(rt, "keepMin"),
				KeepPercent: rapid.SampledFrom([]float64{0, 25, 50}).Draw(rt, "keepPct")}}
		}
		spec = spec.WithDefaults()
		failP := rapid.SampledFrom([]float64{0, 0.05, 0.3, 1}).Draw(rt, "failP")
		st := State{Status: StatusRunning, Members: map[string]*Member{}}
		now := t0
		offered := map[string]int{}
		canaryBroken := false
		byID := map[string]*Device{}
		for i := range devs {
			byID[devs[i].ID] = &devs[i]
		}
		for step := 0; step < 200 && st.Status == StatusRunning; step++ {
			out := Plan(spec, st, devs, now)
			// Invariant: a stage starts only when the previous one's gates
			// held in this very plan.
			for _, tr := range out.Transitions {
				if tr.To == fmt.Sprintf("stage %d", st.Stage+2) {
					for _, g := range out.Gates {
						if (g.Name == "committed" || g.Name == "soak") && !g.OK {
							rt.Fatalf("stage %d left with gate %s not holding: %+v", st.Stage+1, g.Name, g)
						}
						if g.Name == "failed" && !g.OK {
							rt.Fatalf("stage left with failures over the threshold: %+v", g)
						}
					}
				}
			}
			// Canary failure ratio as observed before this plan's offers.
			cf, cfin := 0, 0
			for id, m := range out.State.Members {
				if m.Stage != 0 {
					continue
				}
				switch spec.memberState(m, byID[id], now) {
				case MFailed, MTimedOut:
					cf++
					cfin++
				case MCommitted:
					cfin++
				}
			}
			judged := cfin >= min(spec.Gates.MinFinished, len(devs)) && cfin > 0
			if judged && ratio(cf, cfin) > spec.Gates.MaxFailed {
				canaryBroken = true
			}
			inFlight := 0
			busy := map[string]int{}
			group := map[string]int{}
			for _, a := range out.Actions {
				if a.Kind != ActOffer {
					continue
				}
				offered[a.Device]++
				if offered[a.Device] > 1 {
					rt.Fatalf("%s offered the release twice", a.Device)
				}
				if out.State.Members[a.Device].Stage > 0 && canaryBroken {
					rt.Fatalf("%s (stage %d) offered after the canary's failures went over %.0f%%", a.Device, out.State.Members[a.Device].Stage+1, spec.Gates.MaxFailed*100)
				}
			}
			for id, m := range out.State.Members {
				ms := spec.memberState(m, byID[id], now)
				if ms == MOffered || ms == MDeferred || ms == MLate {
					inFlight++
					busy[byID[id].Labels["base"]]++
				}
				group[byID[id].Labels["base"]]++
			}
			if inFlight > spec.Limits.MaxInFlight {
				rt.Fatalf("%d devices in flight, limit %d", inFlight, spec.Limits.MaxInFlight)
			}
			for _, b := range spec.Limits.Budgets {
				for v, size := range group {
					keep := max(b.KeepMin, int(math.Ceil(b.KeepPercent/100*float64(size))))
					if busy[v] > max(0, size-keep) {
						rt.Fatalf("budget of base %s broken: %d of %d updating, keep %d", v, busy[v], size, keep)
					}
				}
			}
			st = out.State
			// Devices move on.
			now = now.Add(time.Duration(rapid.IntRange(1, 90).Draw(rt, "dt")) * time.Second)
			for id, m := range st.Members {
				d := byID[id]
				if m.Offered == 0 || (d.Update != nil && (d.Update.State == proto.UpdateCommitted || failed(d.Update.State))) {
					continue
				}
				switch r := rapid.IntRange(0, 9).Draw(rt, "progress"); {
				case r < 3:
				case r < 4:
					d.Update = &Report{State: proto.UpdateDeferred, At: now.UnixMilli()}
				default:
					if rapid.Float64Range(0, 1).Draw(rt, "fail") < failP {
						d.Update = &Report{State: proto.UpdateRolledBack, At: now.UnixMilli()}
					} else {
						d.Update = &Report{State: proto.UpdateCommitted, At: now.UnixMilli()}
						d.Version = "2.0.0"
					}
				}
			}
		}
	})
}

// A few events over a short window are noise, even when the rate looks
// far over the limit; the same excess over a long window is not.
func TestHealthGateSignificance(t *testing.T) {
	s := testSpec()
	s.Gates.HealthMargin = 1
	base := cohort{n: 450, hours: 450 * 3.0 / 3600, errors: 6.7, samples: 450 * 15}
	few := cohort{n: 50, hours: 50 * 3.0 / 3600, errors: 2, samples: 50 * 15} // 48/h against 18/h
	for _, g := range s.healthGates(few, base) {
		if !g.OK {
			t.Errorf("2 errors over 2.5 device-minutes failed %s: %s", g.Name, g.Why)
		}
	}
	many := cohort{n: 50, hours: 50 * 3.0, errors: 7200, samples: 50 * 15} // same rate, 3600 times the exposure
	base.hours, base.errors = 450*3.0, 24300
	var failed []string
	for _, g := range s.healthGates(many, base) {
		if !g.OK {
			failed = append(failed, g.Name)
		}
	}
	if len(failed) != 1 || failed[0] != "health:errors" {
		t.Errorf("48 errors/h against 18 over 150 device-hours: failed %v", failed)
	}
	// Link loss: 3 samples of 750 without link is not 5 % worse; 200 is.
	few = cohort{n: 50, hours: 1, samples: 750, noLink: 3}
	base = cohort{n: 450, hours: 9, samples: 6750}
	for _, g := range s.healthGates(few, base) {
		if !g.OK {
			t.Errorf("%s failed: %s", g.Name, g.Why)
		}
	}
	few.noLink = 200
	if gs := s.healthGates(few, base); gs[2].OK {
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
	devs := fleet(300, []string{"rev-b"}, []string{"zurich"})
	out := Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, t0)
	set := func(state proto.UpdateState) {
		for _, a := range out.Actions {
			for i := range devs {
				if devs[i].ID == a.Device {
					devs[i].Update, devs[i].Version = report(state), "2.0.0"
				}
			}
		}
	}
	offers := out.Actions
	set(proto.UpdateTrial)
	for i := 1; i <= 5; i++ {
		next := Plan(s, out.State, devs, t0.Add(time.Duration(i)*time.Minute))
		if next.State.GatesSince != 0 || next.State.Stage != 0 || len(next.Transitions) != 0 {
			t.Fatalf("devices in trial passed the gates: %+v", next.State)
		}
		out.State = next.State
	}
	out.Actions = offers
	set(proto.UpdateRolledBack)
	for i := range devs {
		if devs[i].Update != nil {
			devs[i].Version = "1.0.0"
		}
	}
	if got := Plan(s, out.State, devs, t0.Add(6*time.Minute)); got.State.Status != StatusPaused {
		t.Fatalf("rolled-back canary: %s", got.State.Status)
	}
}

// An operator's abort withdraws the offers not yet installing, and an
// aborted rollout stops being planned a device timeout later.
func TestAbortWithdrawsOffers(t *testing.T) {
	s := testSpec()
	devs := fleet(300, []string{"rev-b"}, []string{"zurich"})
	out := Plan(s, State{Status: StatusRunning, Members: map[string]*Member{}}, devs, t0)
	if len(out.Actions) == 0 {
		t.Fatal("no canary offers")
	}
	states := []proto.UpdateState{proto.UpdateDownloading, proto.UpdateInstalling, proto.UpdateCommitted}
	want := map[string]bool{}
	for i, a := range out.Actions {
		for j := range devs {
			if devs[j].ID == a.Device {
				devs[j].Update = report(states[i%len(states)])
				if i%len(states) == 0 {
					want[a.Device] = true
				}
			}
		}
	}
	st := out.State
	st.Status, st.Ended = StatusAborted, t0.Add(time.Second).UnixMilli()
	now := t0.Add(2 * time.Second)
	out = Plan(s, st, devs, now)
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
	if again := Plan(s, out.State, devs, now.Add(time.Second)); len(again.Actions) != 0 {
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
	for _, g := range s.healthGates(updated, baseline) {
		if !g.OK {
			t.Errorf("%s failed on one error in a short window: %s", g.Name, g.Why)
		}
	}
	bad := cohort{}
	for range 5 {
		bad.add(&Health{Hours: window, Samples: 20, Errors: 20})
	}
	failed := false
	for _, g := range s.healthGates(bad, baseline) {
		failed = failed || (g.Name == "health:errors" && !g.OK)
	}
	if !failed {
		t.Error("100 errors over 20 device-seconds against none passed the health gate")
	}
}
