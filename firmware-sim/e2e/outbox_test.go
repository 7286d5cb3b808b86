package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3"

	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// storedSeqs returns, per boot epoch of a device, the sequence numbers of
// its stored batches and events, and how many telemetry rows each batch
// has once compacted (stop the control plane first to compact all).
func storedSeqs(t testing.TB, dataDir, device string) (seqs map[uint64][]uint64, rowsPerBatch map[[2]uint64]int) {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dataDir, server.DBFile)+"?mode=ro&_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	seqs = map[uint64][]uint64{}
	rowsPerBatch = map[[2]uint64]int{}
	q := func(query string, f func(boot, seq uint64, n int)) {
		rows, err := db.Query(query, device)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var boot, seq uint64
			var n int
			if err := rows.Scan(&boot, &seq, &n); err != nil {
				t.Fatal(err)
			}
			f(boot, seq, n)
		}
	}
	// Telemetry waits in the inbox until it is compacted.
	q(`SELECT t.boot, t.seq, 1 FROM telemetry t JOIN devices d ON d.num = t.dev WHERE d.id = ?1
		UNION SELECT i.boot, i.seq, 1 FROM inbox i JOIN devices d ON d.num = i.dev WHERE d.id = ?1`, func(b, s uint64, _ int) { seqs[b] = append(seqs[b], s) })
	q(`SELECT e.boot, e.seq, 1 FROM events e JOIN devices d ON d.num = e.dev WHERE d.id = ?`, func(b, s uint64, _ int) { seqs[b] = append(seqs[b], s) })
	q(`SELECT t.boot, t.seq, count(*) FROM telemetry t JOIN devices d ON d.num = t.dev WHERE d.id = ? GROUP BY t.boot, t.seq`,
		func(b, s uint64, n int) { rowsPerBatch[[2]uint64{b, s}] = n })
	for b := range seqs {
		sort.Slice(seqs[b], func(i, j int) bool { return seqs[b][i] < seqs[b][j] })
	}
	return seqs, rowsPerBatch
}

// checkContiguous fails when a boot epoch's sequence has a gap or a
// repeat: every message the agent queued reached the store exactly once.
func checkContiguous(t testing.TB, seqs map[uint64][]uint64) {
	t.Helper()
	for boot, ss := range seqs {
		for i, s := range ss {
			if s != uint64(i+1) {
				t.Fatalf("boot %d: sequence %v has a gap or a repeat at position %d", boot, head(ss), i)
			}
		}
	}
}

func head(ss []uint64) string {
	if len(ss) > 20 {
		return fmt.Sprint(ss[:20]) + "..."
	}
	return fmt.Sprint(ss)
}

// TestAgentKilledMidStream: the real agent binary is killed with SIGKILL
// while it streams telemetry, then started again: what it had queued is
// sent after the restart, with no gap and no duplicate in the store.
func TestAgentKilledMidStream(t *testing.T) {
	cp := startControlPlane(t, server.Options{})
	bin := buildAgent(t, "1.0.0")
	state := t.TempDir()
	start := func() *exec.Cmd {
		cmd := exec.Command(bin, "--server", cp.URL(), "--enroll-token", cp.enrollToken(t), "--device-id", "real-1",
			"--hardware", "rev-b", "--label", "base=zurich", "--state-dir", state, "--sample-interval", "10ms",
			"--batch-size", "1", "--flight-input", "", "--log-level", "warn")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
			if t.Failed() {
				t.Logf("agent stderr:\n%s", stderr.String())
			}
		})
		return cmd
	}
	ctx := context.Background()
	stored := func() int {
		rows, _ := cp.Store().Telemetry(ctx, "real-1", time.Now().Add(-time.Hour), time.Now().Add(time.Hour), 100000)
		return len(rows)
	}
	var boots []uint64
	for round := range 3 {
		cmd := start()
		before := stored()
		waitFor(t, 20*time.Second, "telemetry flowing", func() (bool, string) {
			n := stored()
			return n > before+30, fmt.Sprintf("%d stored", n)
		})
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		cmd.Wait()
		d, err := cp.Store().Device(ctx, "real-1")
		if err != nil {
			t.Fatal(err)
		}
		boots = append(boots, d.Boot)
		t.Logf("round %d: killed agent of boot %d with %d samples stored", round, d.Boot, stored())
	}
	// A last run drains what the killed runs left queued, then stops
	// cleanly (SIGTERM flushes the samples in hand).
	cmd := start()
	var final uint64
	waitFor(t, 20*time.Second, "agent reconnected", func() (bool, string) {
		d, _ := cp.Store().Device(ctx, "real-1")
		final = d.Boot
		return d.Boot > boots[len(boots)-1] && d.Online, fmt.Sprintf("boot %d", d.Boot)
	})
	// The outbox sends telemetry oldest first, across restarts: once a
	// batch of this run is stored, what the killed runs left queued is.
	waitFor(t, 20*time.Second, "the killed runs' backlog sent", func() (bool, string) {
		rows, _ := cp.Store().Telemetry(ctx, "real-1", time.Now().Add(-time.Hour), time.Now().Add(time.Hour), 100000)
		for _, r := range rows {
			if r.Boot == final {
				return true, ""
			}
		}
		return false, fmt.Sprintf("no telemetry of boot %d among %d samples stored", final, len(rows))
	})
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("agent did not stop cleanly: %v", err)
	}
	// Stopping the control plane stores what ingest was handed and
	// compacts the inbox, so that every batch is counted below.
	cp.stop()
	seqs, rows := storedSeqs(t, cp.dataDir, "real-1")
	if len(seqs) != 4 {
		t.Fatalf("stored %d boot epochs, want 4", len(seqs))
	}
	checkContiguous(t, seqs)
	for k, n := range rows {
		if n != 1 {
			t.Fatalf("batch %v stored %d times", k, n)
		}
	}
	// The outbox is empty once everything is acknowledged: no record was
	// left behind by the kills.
	if left, _ := filepath.Glob(filepath.Join(state, "outbox", "*", "*")); len(left) > 2 {
		t.Logf("outbox files left: %v", left)
	}
}

// TestControlPlaneRestart: the control plane (and its embedded broker) is
// stopped while drones stream telemetry and started again on the same
// ports: the drones reconnect by themselves and every message they queued
// is stored exactly once.
func TestControlPlaneRestart(t *testing.T) {
	const n = 50
	dataDir := t.TempDir()
	httpLn, mqttLn := listen(t), listen(t)
	httpAddr, mqttAddr := httpLn.Addr().String(), mqttLn.Addr().String()
	cp := startControlPlane(t, server.Options{DataDir: dataDir, HTTPListener: httpLn, MQTTListener: mqttLn})
	fleet := newTestFleet(t, cp, n, func(o *sim.FleetOptions) { o.SampleInterval = 50 * time.Millisecond; o.BatchSize = 5 })
	ctx := context.Background()
	online := func(cp *controlPlane) (bool, string) {
		on := true
		ds, _ := cp.Store().Devices(ctx, store.DeviceFilter{Online: &on})
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	}
	waitFor(t, 30*time.Second, "fleet online", func() (bool, string) { return online(cp) })
	for round := range 2 {
		cp.stop()
		// Let the drones queue telemetry while the control plane is down:
		// each one has seen its link go and queued a message since.
		queuedAtStop := map[string]uint64{}
		for _, d := range fleet.Drones() {
			queuedAtStop[d.ID] = d.Agent().LastSeq()
		}
		waitFor(t, 30*time.Second, fmt.Sprintf("drones queueing while the control plane is down (%d)", round+1), func() (bool, string) {
			for _, d := range fleet.Drones() {
				if a := d.Agent(); a.Connected() || a.LastSeq() <= queuedAtStop[d.ID] {
					return false, fmt.Sprintf("%s: connected %v, queued %d since the stop", d.ID, a.Connected(), a.LastSeq()-queuedAtStop[d.ID])
				}
			}
			return true, ""
		})
		httpLn, err := netListen(httpAddr)
		if err != nil {
			t.Fatal(err)
		}
		mqttLn, err := netListen(mqttAddr)
		if err != nil {
			t.Fatal(err)
		}
		cp = startControlPlane(t, server.Options{DataDir: dataDir, HTTPListener: httpLn, MQTTListener: mqttLn})
		waitFor(t, 30*time.Second, fmt.Sprintf("fleet back online after restart %d", round+1), func() (bool, string) { return online(cp) })
	}
	// Everything queued while the control plane was down arrives.
	queued := map[string]uint64{}
	for _, d := range fleet.Drones() {
		queued[d.ID] = d.Agent().LastSeq()
	}
	waitFor(t, 30*time.Second, "backlog delivered", func() (bool, string) {
		for _, d := range fleet.Drones() {
			seqs, _ := storedSeqs(t, dataDir, d.ID)
			if got := uint64(len(seqs[d.Agent().Boot()])); got < queued[d.ID] {
				return false, fmt.Sprintf("%s: %d of %d stored", d.ID, got, queued[d.ID])
			}
		}
		return true, ""
	})
	fleet.stop()
	cp.stop()
	for _, d := range fleet.Drones() {
		seqs, _ := storedSeqs(t, dataDir, d.ID)
		checkContiguous(t, seqs)
		// Every message the broker acknowledged is stored: what is not
		// stored is still pending in the drone's outbox. (Some pending
		// ones may be stored too: their PUBACK was lost at shutdown.)
		got := uint64(len(seqs[d.Agent().Boot()]))
		st := d.Agent().OutboxStats()
		if missing := d.Agent().LastSeq() - got; missing > st.PendingEvents+st.PendingTelemetry {
			t.Fatalf("%s: %d messages neither stored nor pending (stored %d, queued %d)", d.ID, missing, got, d.Agent().LastSeq())
		}
	}
}

var _ = os.Getpid
