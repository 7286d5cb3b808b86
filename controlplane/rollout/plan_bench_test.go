package rollout

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// midRollout is a fleet of n devices in the third stage (50%) of a
// rollout: the first two stages offered, most committed, some downloading,
// a few failed; the health of a sample of each cohort measured, as the
// applier does.
func midRollout(n, maxInFlight int) (Spec, State, []Device, time.Time) {
	s := Spec{ID: "r-bench", Release: ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 20},
		Gates: Gates{Soak: Duration(10 * time.Minute)}, Limits: Limits{MaxInFlight: maxInFlight}}.WithDefaults()
	devs := fleet(n, []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "oslo", "lyon", "porto", "graz"})
	st := State{Status: StatusRunning, Members: map[string]*Member{}}
	out := Plan(s, st, devs, t0)
	st = out.State
	st.Stage, st.StageStarted = 2, t0.UnixMilli()
	rng := rand.New(rand.NewPCG(1, 2))
	now := t0.Add(30 * time.Minute)
	sampled := [2]int{}
	for i := range devs {
		d := &devs[i]
		m := st.Members[d.ID]
		cohort := 1
		if m.Stage <= 1 {
			m.Offered = t0.UnixMilli()
			switch x := rng.IntN(100); {
			case x < 85:
				d.Update, d.Version, cohort = &Report{State: proto.UpdateCommitted, At: t0.UnixMilli()}, "2.0.0", 0
			case x < 98:
				d.Update = &Report{State: proto.UpdateDownloading, At: t0.UnixMilli()}
			default:
				d.Update = &Report{State: proto.UpdateRolledBack, At: t0.UnixMilli(), Reason: "health check"}
			}
		}
		if sampled[cohort] < 300 {
			sampled[cohort]++
			d.Health = &Health{Hours: 0.5, Reboots: float64(rng.IntN(2)), Errors: float64(rng.IntN(5)), Samples: 180,
				LinkLoss: 0.01, FlightHours: 0.2, Drain: 6}
		}
	}
	st.GatesSince = now.Add(-time.Minute).UnixMilli()
	return s, st, devs, now
}

// BenchmarkPlan: one plan of a rollout in its third stage. "tick" is the
// plan every few seconds with the default in-flight limit (100 devices
// updating at once); "unlimited" has no limit, so that one plan offers the
// release to the whole stage (35% of the fleet), the most a plan ever
// does. The 100k/10k ratio shows how it scales; target under 100 ms at
// 100,000 devices.
func BenchmarkPlan(b *testing.B) {
	for _, c := range []struct {
		name     string
		n, limit int
	}{
		{"tick/devices=10000", 10_000, 0}, {"tick/devices=100000", 100_000, 0},
		{"unlimited/devices=10000", 10_000, 10_000}, {"unlimited/devices=100000", 100_000, 100_000},
	} {
		n := c.n
		b.Run(c.name, func(b *testing.B) {
			s, st, devs, now := midRollout(n, c.limit)
			if out := Plan(s, st, devs, now); c.limit > 0 && len(out.Actions) < n/4 {
				b.Fatal("the plan offers nothing: not the case measured")
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				Plan(s, st, devs, now)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/device")
		})
	}
}
