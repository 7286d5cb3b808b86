package e2e

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRolloutWithConsoles: a 1,000-drone rollout with 0 and with 10
// consoles' live streams open. Reported: the process's CPU time (control
// plane and fleet together) and the streams' messages and bytes; the
// difference between the two runs is what ten consoles cost.
//
//	go test ./firmware-sim/e2e -run XXX -bench RolloutWithConsoles -benchtime 1x
func BenchmarkRolloutWithConsoles(b *testing.B) {
	for _, streams := range []int{0, 10} {
		b.Run(fmt.Sprintf("consoles-%d", streams), func(b *testing.B) {
			for range b.N {
				rolloutWithConsoles(b, 1000, streams)
			}
		})
	}
}

func rolloutWithConsoles(b *testing.B, n, streams int) {
	b.StopTimer()
	k := newReleaseKit(b)
	cp := startControlPlane(b, server.Options{RootKeys: []ed25519.PublicKey{k.rootKey(b)}, RolloutInterval: 500 * time.Millisecond})
	newTestFleet(b, cp, n, func(o *sim.FleetOptions) {
		o.Roots = []ed25519.PublicKey{k.rootKey(b)}
		o.Grounded, o.TrialSoak, o.TrialDeadline = true, 300*time.Millisecond, time.Minute
		o.SampleInterval, o.BatchSize = time.Second, 5
		o.StartRate, o.MQTTClient, o.MemoryOutbox = 500, "lite", true
	})
	ctx := context.Background()
	waitFor(b, 2*time.Minute, "fleet online", func() (bool, string) {
		on := true
		ds, _ := cp.Store().Devices(ctx, store.DeviceFilter{Online: &on})
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	})
	k.simRelease(b, cp, sim.Firmware{Version: "1.1.0", Behaviour: sim.Good}, 110)
	var msgs, bytes atomic.Int64
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range streams {
		req, _ := http.NewRequestWithContext(sctx, http.MethodGet, cp.URL()+"/api/v1/events/stream", nil)
		req.Header.Set("Authorization", "Bearer "+cp.adminToken(b))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer resp.Body.Close()
			sc := bufio.NewScanner(resp.Body)
			sc.Buffer(make([]byte, 1<<20), 1<<20)
			for sc.Scan() {
				bytes.Add(int64(len(sc.Bytes()) + 1))
				if strings.HasPrefix(sc.Text(), "event: change") {
					msgs.Add(1)
				}
			}
		}()
	}
	cpu0, t0 := cpuTime(), time.Now()
	b.StartTimer()
	r, _, err := cp.Rollouts().Create(ctx, rollout.Spec{Release: rollout.ReleaseRef{Target: "agent", Version: "1.1.0", Counter: 110},
		Stages: []rollout.Stage{{Percent: 5}, {Percent: 100}}, Gates: func() rollout.Gates {
			g := rollout.DefaultGates
			g.Soak = rollout.Duration(time.Second)
			return g
		}(), Limits: func() rollout.Limits { l := rollout.DefaultLimits; l.MaxInFlight = 500; return l }()}, "bench")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := cp.Rollouts().Act(ctx, r.Spec.ID, rollout.OpStart, "bench", ""); err != nil {
		b.Fatal(err)
	}
	waitFor(b, 5*time.Minute, "rollout completed", func() (bool, string) {
		rep, err := cp.Rollouts().Status(ctx, r.Spec.ID)
		return err == nil && rep.State.Status == rollout.StatusCompleted, fmt.Sprintf("%v %v", rep.State.Status, rep.Counts)
	})
	b.StopTimer()
	cpu, wall := cpuTime()-cpu0, time.Since(t0)
	cancel()
	wg.Wait()
	b.ReportMetric(cpu.Seconds(), "cpu-s")
	b.ReportMetric(wall.Seconds(), "rollout-s")
	if streams > 0 {
		b.ReportMetric(float64(msgs.Load())/float64(streams), "msgs/console")
		b.ReportMetric(float64(bytes.Load())/float64(streams)/1024, "KiB/console")
	}
}
