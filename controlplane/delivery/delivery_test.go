package delivery

import (
	"fmt"
	"testing"
	"time"
)

// history is a fixture fleet of ten rev-a and four rev-b drones over two
// weeks: two good releases, a bad one that rolls back on rev-b only and
// is reverted, and one still rolling out.
func history() Input {
	t0 := time.Date(2026, 11, 2, 8, 0, 0, 0, time.UTC)
	var devs []string
	hw := map[string]string{}
	for i := 1; i <= 10; i++ {
		d := fmt.Sprintf("a%d", i)
		devs, hw[d] = append(devs, d), "rev-a"
	}
	for i := 1; i <= 4; i++ {
		d := fmt.Sprintf("b%d", i)
		devs, hw[d] = append(devs, d), "rev-b"
	}
	in := Input{From: t0, To: t0.Add(14 * 24 * time.Hour), Hardware: hw}
	day := 24 * time.Hour
	in.Releases = []Release{
		{Target: "agent", Version: "1.1", Counter: 11, Built: t0.Add(-time.Hour), Pushed: t0},
		{Target: "agent", Version: "1.2", Counter: 12, Pushed: t0.Add(2 * day)},
		{Target: "agent", Version: "1.3", Counter: 13, Pushed: t0.Add(5 * day)},
		{Target: "agent", Version: "1.2-revert", Counter: 14, Pushed: t0.Add(5*day + time.Hour)},
		{Target: "agent", Version: "1.4", Counter: 15, Pushed: t0.Add(9 * day)},
		// Before the window: not counted.
		{Target: "agent", Version: "1.0", Counter: 10, Pushed: t0.Add(-3 * day)},
	}
	in.Rollouts = []Rollout{
		{ID: "r0", Target: "agent", Counter: 10, Created: t0.Add(-3 * day), Ended: t0.Add(-2 * day), Completed: true, Members: devs},
		{ID: "r1", Target: "agent", Counter: 11, Created: t0.Add(10 * time.Minute), Ended: t0.Add(day), Completed: true, Members: devs},
		{ID: "r2", Target: "agent", Counter: 12, Created: t0.Add(2 * day), Ended: t0.Add(3 * day), Completed: true, Members: devs},
		{ID: "r3", Target: "agent", Counter: 13, RevertCounter: 14, Created: t0.Add(5 * day), Failed: t0.Add(5*day + 30*time.Minute),
			Ended: t0.Add(5*day + 40*time.Minute), Members: devs},
		{ID: "r5", Target: "agent", Counter: 15, Created: t0.Add(9 * day), Members: devs},
	}
	for i, d := range devs {
		in.Updates = append(in.Updates,
			Update{Device: d, Target: "agent", Counter: 11, State: "committed", Time: t0.Add(time.Hour + time.Duration(i)*10*time.Minute)},
			Update{Device: d, Target: "agent", Counter: 12, State: "committed", Time: t0.Add(2*day + 2*time.Hour)})
		if i < 7 {
			in.Updates = append(in.Updates, Update{Device: d, Target: "agent", Counter: 15, State: "committed", Time: t0.Add(9*day + time.Hour)})
		}
	}
	at := func(d time.Duration) time.Time { return t0.Add(5*day + d) }
	in.Updates = append(in.Updates,
		Update{Device: "b1", Target: "agent", Counter: 13, State: "rolled_back", Time: at(25 * time.Minute)},
		Update{Device: "b2", Target: "agent", Counter: 13, State: "rolled_back", Time: at(25 * time.Minute)},
		Update{Device: "a1", Target: "agent", Counter: 13, State: "committed", Time: at(20 * time.Minute)},
		Update{Device: "a2", Target: "agent", Counter: 13, State: "offered", Time: at(20 * time.Minute)},
		Update{Device: "a1", Target: "agent", Counter: 14, State: "committed", Time: at(3 * time.Hour)})
	return in
}

func val(t *testing.T, what string, got *float64, want float64) {
	t.Helper()
	if got == nil {
		t.Errorf("%s: none, want %v", what, want)
	} else if *got != want {
		t.Errorf("%s: %v, want %v", what, *got, want)
	}
}

func TestFixtureHistory(t *testing.T) {
	rep := Compute(history())
	o := rep.Overall
	if o.DeploymentFrequency.Completed != 2 || o.DeploymentFrequency.PerWeek != 1 {
		t.Errorf("deployment frequency: %+v, want 2 completed, 1 a week", o.DeploymentFrequency)
	}
	if o.ChangeFailureRate.Finished != 3 || o.ChangeFailureRate.Failed != 1 {
		t.Errorf("change failure: %+v, want 1 of 3", o.ChangeFailureRate)
	}
	val(t, "change failure rate", o.ChangeFailureRate.Rate, 0.333)
	// 1.1: the 14th of 14 commits came 3h10m after the push (95% of 14
	// rounds up to all 14); 1.2: 2h. 1.3 and 1.4 did not get there.
	val(t, "lead time median", o.LeadTime.MedianSeconds, 7200)
	val(t, "lead time p90", o.LeadTime.P90Seconds, 11400)
	val(t, "build to fleet", o.LeadTime.BuildToFleetMedianSeconds, 15000)
	if o.LeadTime.Releases != 2 || o.LeadTime.Pending != 2 {
		t.Errorf("lead time counts: %+v, want 2 measured, 2 pending", o.LeadTime)
	}
	// a1 committed the bad build and got the revert 2h30m after the gate
	// failed; b1 and b2 had rolled back before it.
	val(t, "time to restore", o.TimeToRestore.MedianSeconds, 9000)
	if o.TimeToRestore.Restored != 1 || o.TimeToRestore.Unrestored != 0 {
		t.Errorf("restore counts: %+v", o.TimeToRestore)
	}
	// Per revision: the failure is rev-b's (its drones rolled back); rev-a
	// took the same rollouts without one.
	a, b := rep.ByHardware["rev-a"], rep.ByHardware["rev-b"]
	if a.ChangeFailureRate.Failed != 0 || a.ChangeFailureRate.Finished != 3 {
		t.Errorf("rev-a change failure: %+v", a.ChangeFailureRate)
	}
	val(t, "rev-a change failure rate", a.ChangeFailureRate.Rate, 0)
	if b.ChangeFailureRate.Failed != 1 {
		t.Errorf("rev-b change failure: %+v", b.ChangeFailureRate)
	}
	val(t, "rev-b time to restore", b.TimeToRestore.MedianSeconds, 0)
	if a.TimeToRestore.MedianSeconds != nil {
		t.Errorf("rev-a had no failure to restore from: %v", *a.TimeToRestore.MedianSeconds)
	}
	// rev-a's ten drones had all committed 1.1 2h30m after the push (its
	// 10th commit), 1.2 after 2h.
	val(t, "rev-a lead time median", a.LeadTime.MedianSeconds, 7200)
	val(t, "rev-a lead time p90", a.LeadTime.P90Seconds, 9000)
	val(t, "rev-b lead time p90", b.LeadTime.P90Seconds, 11400)
}

// A failure nobody has recovered from yet is counted apart, not as a
// restore time; an empty window has no rates (not zero ones).
func TestUnrestoredAndEmpty(t *testing.T) {
	in := history()
	// a1 never got the revert, nor the release after it.
	var ups []Update
	for _, u := range in.Updates {
		if u.Device != "a1" || u.Counter < 14 {
			ups = append(ups, u)
		}
	}
	in.Updates = ups
	o := Compute(in).Overall
	if o.TimeToRestore.Unrestored != 1 || o.TimeToRestore.MedianSeconds != nil {
		t.Errorf("restore: %+v", o.TimeToRestore)
	}
	in.From, in.To = in.To.Add(24*time.Hour), in.To.Add(8*24*time.Hour)
	o = Compute(in).Overall
	if o.ChangeFailureRate.Rate != nil || o.LeadTime.MedianSeconds != nil || o.DeploymentFrequency.PerWeek != 0 {
		t.Errorf("empty window: %+v", o)
	}
}

// A rollout left paused on its failing gate counts as a failure, and a
// failure of one rollout is not another's: an operator's abort of a
// rollout whose members did not fail counts, whatever other rollouts of
// the release saw.
func TestPausedAndOtherRollouts(t *testing.T) {
	in := history()
	for i := range in.Rollouts {
		if in.Rollouts[i].ID == "r3" {
			in.Rollouts[i].Ended = time.Time{}
		}
	}
	o := Compute(in).Overall
	if o.ChangeFailureRate.Failed != 1 || o.ChangeFailureRate.Finished != 3 {
		t.Errorf("paused on a failure: %+v, want 1 of 3", o.ChangeFailureRate)
	}
	// r6 rolls out 1.3 to two rev-a drones that never got it, and an
	// operator aborts it: a failure, though r3's rev-b drones rolled
	// back 1.3 and r6's did not.
	t6 := in.From.Add(6 * 24 * time.Hour)
	in.Rollouts = append(in.Rollouts, Rollout{ID: "r6", Target: "agent", Counter: 13, Created: t6, Failed: t6.Add(time.Minute),
		Ended: t6.Add(time.Minute), Members: []string{"a9", "a10"}})
	rep := Compute(in)
	if got := rep.ByHardware["rev-a"].ChangeFailureRate; got.Failed != 1 {
		t.Errorf("rev-a after an operator's abort of its own rollout: %+v", got)
	}
}
