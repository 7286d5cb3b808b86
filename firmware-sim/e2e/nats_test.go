package e2e

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
	"github.com/hangarfleet/hangar/internal/natstest"
	"github.com/hangarfleet/hangar/internal/pgtest"
)

// TestNATSClusterFleet: two control-plane replicas on PostgreSQL share the
// ingest of a fleet connected to a three-node NATS cluster (its MQTT
// listeners; devices authenticated by the replicas' auth callout). A NATS
// node is killed with SIGKILL, then a replica stops: the drones go on
// through the other nodes, the other replica takes the whole ingest, and
// no message a drone had acknowledged is missing from the database.
func TestNATSClusterFleet(t *testing.T) {
	n := 150
	if v := os.Getenv("HANGAR_TEST_NATS_DRONES"); v != "" {
		n, _ = strconv.Atoi(v)
	}
	c, co := natstest.StartForHangar(t)
	pgURL := pgtest.URL(t)
	dir := t.TempDir()
	replica := func(name string) *controlPlane {
		return startControlPlane(t, server.Options{Store: pgURL, DataDir: dir, Replica: name, BrokerURL: c.URLs(),
			BrokerUser: co.User, BrokerPassword: co.Password, BrokerCalloutSeed: co.Seed, MQTTAdvertise: c.MQTTURLs()})
	}
	r1 := replica("r1")
	r2 := replica("r2")
	lb := newBalancer(t, dir, r1.URL(), r2.URL())
	fleet := newTestFleet(t, lb, n, func(o *sim.FleetOptions) {
		o.SampleInterval, o.BatchSize = 200*time.Millisecond, 5
		o.BackoffMax = time.Second
		o.StartRate = 200
	})
	ctx := context.Background()
	online := func() (bool, string) {
		on := true
		ds, err := r1.Store().Devices(ctx, store.DeviceFilter{Online: &on})
		if err != nil {
			return false, err.Error()
		}
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	}
	waitFor(t, 2*time.Minute, "every drone online through NATS", online)

	before := map[string]uint64{}
	for _, d := range fleet.Drones() {
		before[d.ID] = d.Agent().Connections()
	}
	t0 := time.Now()
	c.Nodes[0].Kill()
	// The drones that were on n1 lose their connection and make another,
	// to n2 or n3; the others never notice.
	waitFor(t, 2*time.Minute, "drones on the dead node reconnected elsewhere", func() (bool, string) {
		moved, down := 0, 0
		for _, d := range fleet.Drones() {
			switch {
			case !d.Agent().Connected():
				down++
			case d.Agent().Connections() > before[d.ID]:
				moved++
			}
		}
		return down == 0 && moved > 0, fmt.Sprintf("%d reconnected, %d down", moved, down)
	})
	t.Logf("NATS node n1 killed: every drone connected again after %v", time.Since(t0).Round(10*time.Millisecond))
	// One replica goes: the other consumes for both (what the stopped
	// one had in hand comes back after the ack wait).
	r2.stop()

	queued := map[string]uint64{}
	ids := make([]string, 0, n)
	for _, d := range fleet.Drones() {
		queued[d.ID] = d.Agent().LastSeq()
		ids = append(ids, d.ID)
	}
	db, err := sql.Open("pgx", pgURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// What the stopped replica had in hand comes back after the ack wait.
	waitFor(t, 2*time.Minute, "backlog stored, every sequence whole", func() (bool, string) {
		stored := 0
		for _, d := range fleet.Drones() {
			if maxSeq(t, db, d.ID, d.Agent().Boot()) >= queued[d.ID] {
				stored++
			}
		}
		holes, _, detail := seqHoles(t, db, ids)
		return stored == n && holes == 0, fmt.Sprintf("%d of %d drones' backlog stored, %d holes (%s)", stored, n, holes, detail)
	})
	fleet.stop()
	holes, repeats, detail := seqHoles(t, db, ids)
	if holes != 0 || repeats != 0 {
		t.Errorf("sequence holes %d, repeats %d in the database (%s)", holes, repeats, detail)
	}
}
