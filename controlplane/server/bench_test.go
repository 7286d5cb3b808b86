package server_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// benchServer runs a control plane (embedded broker, SQLite file) with n
// enrolled devices, labelled by an enrollment profile, and a pushed
// release, as it is after a fleet enrolled and said hello (a rollout
// offers only to devices online). No device is actually connected: the
// figures are the control plane's own work (plan, durable state, commands
// handed to the broker and marked sent), not the network's.
func benchServer(b *testing.B, n int) *server.Server {
	b.Helper()
	httpLn, _ := net.Listen("tcp", "127.0.0.1:0")
	mqttLn, _ := net.Listen("tcp", "127.0.0.1:0")
	s, err := server.New(server.Options{DataDir: b.TempDir(), HTTPListener: httpLn, MQTTListener: mqttLn,
		RolloutInterval: time.Hour, Logger: benchLogger(), OnlineTimeout: 24 * time.Hour, // planned when poked, as start does
		LiveInterval: 50 * time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	db := s.Store()
	hws, bases := []string{"rev-a", "rev-b", "rev-c"}, []string{"zurich", "oslo", "lyon", "porto", "graz"}
	for i := range n {
		hash := sha256.Sum256([]byte(strconv.Itoa(i)))
		if _, err := db.Enroll(ctx, store.Enrollment{ID: fmt.Sprintf("drone-%06d", i), Hardware: hws[i%3],
			Profile: map[string]string{"hw": hws[i%3], "base": bases[(i/3)%5]}, CredHash: hash[:], Now: time.Now()}); err != nil {
			b.Fatal(err)
		}
	}
	hellos := make([]store.IngestItem, 0, 1000)
	for i := range n {
		st := &proto.State{Proto: proto.ProtocolVersion, Online: true, Boot: uint64(time.Now().Unix()), Conn: 1, Version: "1.0.0", Hardware: hws[i%3]}
		hellos = append(hellos, store.IngestItem{Device: fmt.Sprintf("drone-%06d", i), Kind: store.IngestState, State: st, Received: time.Now()})
		if len(hellos) == cap(hellos) || i == n-1 {
			if _, err := db.WriteIngest(ctx, hellos); err != nil {
				b.Fatal(err)
			}
			hellos = hellos[:0]
		}
	}
	if err := db.FlushSeen(ctx); err != nil {
		b.Fatal(err)
	}
	manifest, keys := make([]byte, 420), make([]byte, 180) // the sizes of real ones
	rand.Read(manifest)
	rand.Read(keys)
	if err := db.AddRelease(ctx, store.Release{Target: "agent", Version: "2.0.0", Counter: 200, Size: 8 << 20,
		SHA256: fmt.Sprintf("%x", sha256.Sum256(nil)), Hardware: hws, Created: time.Now(), Expires: time.Now().Add(time.Hour),
		KeyID: "k1", PushedAt: time.Now(), PushedBy: "bench", Manifest: manifest, Keys: keys}); err != nil {
		b.Fatal(err)
	}
	return s
}

func sent(s *server.Server) int {
	var m dto.Metric
	s.Metrics().CommandsSent.Write(&m)
	return int(m.GetCounter().GetValue())
}

// startAndWait creates and starts a rollout and waits until want commands
// have been sent; it returns the time from start to the last of them.
func startAndWait(b *testing.B, s *server.Server, spec rollout.Spec, want int) time.Duration {
	ctx := context.Background()
	r, _, err := s.Rollouts().Create(ctx, spec, "bench")
	if err != nil {
		b.Fatal(err)
	}
	base := sent(s)
	t0 := time.Now()
	if _, err := s.Rollouts().Act(ctx, r.Spec.ID, rollout.OpStart, "bench", ""); err != nil {
		b.Fatal(err)
	}
	for sent(s)-base < want {
		if time.Since(t0) > time.Minute {
			b.Fatalf("%d of %d commands sent after a minute", sent(s)-base, want)
		}
		time.Sleep(200 * time.Microsecond)
	}
	d := time.Since(t0)
	// Free the devices for the next rollout.
	if _, err := s.Rollouts().Act(ctx, r.Spec.ID, rollout.OpAbort, "bench", ""); err != nil {
		b.Fatal(err)
	}
	return d
}

func spec(stages string, maxInFlight int) rollout.Spec {
	st, err := rollout.ParseStages(stages)
	if err != nil {
		panic(err)
	}
	return rollout.Spec{Release: rollout.ReleaseRef{Target: "agent", Version: "2.0.0", Counter: 200}, Stages: st,
		Limits: rollout.Limits{MaxInFlight: maxInFlight}}
}

// BenchmarkRolloutStart: from `start` to the last device of the canary
// (1%) notified, over the whole fleet. Target under 1 s.
func BenchmarkRolloutStart(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("devices=%d", n), func(b *testing.B) {
			if n > 10_000 && testing.Short() {
				b.Skip("100k devices: not in -short")
			}
			s := benchServer(b, n)
			var total time.Duration
			for b.Loop() {
				total += startAndWait(b, s, spec("1%,10%,50%,100%", n/100), n/100) // the whole canary at once
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/first-wave")
		})
	}
}

// BenchmarkNotify: one stage of 10,000 devices, no in-flight limit: the
// rate at which offers are stored, handed to the broker and marked sent.
// Target at least 1,000 devices/s.
func BenchmarkNotify(b *testing.B) {
	const n = 10_000
	s := benchServer(b, n)
	var total time.Duration
	for b.Loop() {
		total += startAndWait(b, s, spec("100%", n), n)
	}
	b.ReportMetric(float64(n*b.N)/total.Seconds(), "devices/s")
}

// benchLogger: HANGAR_BENCH_LOG=1 shows the control plane's debug log
// (each rollout step's phases).
func benchLogger() *slog.Logger {
	if os.Getenv("HANGAR_BENCH_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}
