package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
	"github.com/hangarfleet/hangar/internal/freeport"
)

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("HANGAR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := freeport.Listen()
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// controlPlane is a running control plane for a test.
type controlPlane struct {
	*server.Server
	dataDir string
	cancel  context.CancelFunc
	done    chan error
}

// startControlPlane starts a control plane on free loopback ports. With a
// dataDir from an earlier run it restarts that control plane.
func startControlPlane(t testing.TB, opts server.Options) *controlPlane {
	t.Helper()
	if opts.DataDir == "" {
		opts.DataDir = t.TempDir()
	}
	if opts.HTTPListener == nil {
		opts.HTTPListener = listen(t)
	}
	if opts.MQTTListener == nil && opts.BrokerURL == "" {
		opts.MQTTListener = listen(t)
	}
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	srv, err := server.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cp := &controlPlane{Server: srv, dataDir: opts.DataDir, cancel: cancel, done: make(chan error, 1)}
	go func() { cp.done <- srv.Run(ctx) }()
	t.Cleanup(cp.stop)
	return cp
}

func (cp *controlPlane) stop() {
	cp.cancel()
	<-cp.done
	cp.done <- nil // later stops return at once
}

// endpoint is a control plane the tests talk to, in process or a child
// process.
type endpoint interface {
	URL() string
	DataDir() string
}

func (cp *controlPlane) DataDir() string { return cp.dataDir }

func (cp *controlPlane) enrollToken(t testing.TB) string { return enrollToken(t, cp) }

func enrollToken(t testing.TB, cp endpoint) string {
	b, err := os.ReadFile(filepath.Join(cp.DataDir(), server.EnrollTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func adminTokenFile(cp endpoint) string { return filepath.Join(cp.DataDir(), server.AdminTokenFile) }

func (cp *controlPlane) adminToken(t testing.TB) string {
	b, err := os.ReadFile(cp.dataDir + "/" + server.AdminTokenFile)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// testFleet is a simulated fleet running for a test.
type testFleet struct {
	*sim.Fleet
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newTestFleet(t testing.TB, cp endpoint, n int, tweak func(*sim.FleetOptions)) *testFleet {
	t.Helper()
	opts := sim.FleetOptions{
		ServerURL: cp.URL(), EnrollToken: enrollToken(t, cp), Devices: n, StateRoot: t.TempDir(),
		SampleInterval: 100 * time.Millisecond, BatchSize: 5, HeartbeatInterval: 5 * time.Second,
		BackoffMin: 50 * time.Millisecond, BackoffMax: time.Second, Logger: testLogger(t), Seed: 1,
	}
	if tweak != nil {
		tweak(&opts)
	}
	f, err := sim.NewFleet(opts)
	if err != nil {
		t.Fatal(err)
	}
	importInventory(t, cp, f)
	ctx, cancel := context.WithCancel(context.Background())
	tf := &testFleet{Fleet: f, cancel: cancel}
	tf.wg.Add(1)
	go func() {
		defer tf.wg.Done()
		if err := f.Run(ctx); err != nil {
			t.Error(err)
		}
	}()
	t.Cleanup(tf.stop)
	return tf
}

// importInventory does the operator's part before the drones enroll:
// their hardware and base become labels (what the drones say about
// themselves never does).
func importInventory(t testing.TB, cp endpoint, f *sim.Fleet) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "inventory")
	file, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.WriteInventory(file); err != nil {
		t.Fatal(err)
	}
	file.Close()
	var out strings.Builder
	if err := cli.Run(context.Background(), []string{"device", "import", path, "--server", cp.URL(), "--token-file", adminTokenFile(cp)},
		cli.Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }}); err != nil {
		t.Fatalf("device import: %v\n%s", err, out.String())
	}
}

func (f *testFleet) stop() {
	f.cancel()
	f.wg.Wait()
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, status := cond()
		if ok {
			return
		}
		if status != last {
			last = status
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (last: %s)", timeout, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func count[T any](xs []T, f func(T) bool) int {
	n := 0
	for _, x := range xs {
		if f(x) {
			n++
		}
	}
	return n
}

var _ = fmt.Sprint

// netListen listens again on an address a stopped control plane used.
func netListen(addr string) (net.Listener, error) {
	var err error
	for range 50 {
		var ln net.Listener
		if ln, err = net.Listen("tcp", addr); err == nil {
			return ln, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, err
}
