package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// TestFleetTelemetry: 200 simulated drones enroll with the fleet token, come
// online, and their telemetry is stored; revoking one disconnects it.
func TestFleetTelemetry(t *testing.T) {
	const n = 200
	cp := startControlPlane(t, server.Options{})
	fleet := newTestFleet(t, cp, n, func(o *sim.FleetOptions) { o.StartRate = 400 })
	ctx := context.Background()
	st := cp.Store()
	waitFor(t, 60*time.Second, "every drone online", func() (bool, string) {
		on := true
		ds, err := st.Devices(ctx, store.DeviceFilter{Online: &on})
		if err != nil {
			return false, err.Error()
		}
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	})
	waitFor(t, 30*time.Second, "telemetry from every drone", func() (bool, string) {
		ds, _ := st.Devices(ctx, store.DeviceFilter{})
		with := count(ds, func(d store.Device) bool { return d.Latest != nil })
		return with == n, fmt.Sprintf("%d with telemetry", with)
	})
	ds, _ := st.Devices(ctx, store.DeviceFilter{Labels: map[string]string{"hw": "rev-b"}})
	if len(ds) == 0 || len(ds) == n {
		t.Errorf("rev-b drones: %d of %d, want a mix", len(ds), n)
	}
	rows, err := st.Telemetry(ctx, fleet.ID(7), time.Now().Add(-time.Hour), time.Now().Add(time.Minute), 1000)
	if err != nil || len(rows) == 0 {
		t.Fatalf("telemetry of %s: %d rows, %v", fleet.ID(7), len(rows), err)
	}

	// Revoke one drone: it is disconnected and cannot come back.
	victim := fleet.ID(3)
	if err := st.Revoke(ctx, victim); err != nil {
		t.Fatal(err)
	}
	if err := cp.Bus().Revoke(ctx, victim); err != nil {
		t.Fatal(err)
	}
	var agentOf = func(id string) bool {
		for _, d := range fleet.Drones() {
			if d.ID == id {
				return d.Agent().Connected()
			}
		}
		return false
	}
	waitFor(t, 10*time.Second, "revoked drone disconnected", func() (bool, string) {
		return !agentOf(victim), "still connected"
	})
	// It keeps trying (re-enrollment is refused) and never reconnects.
	time.Sleep(500 * time.Millisecond)
	if agentOf(victim) {
		t.Fatal("revoked drone reconnected")
	}
	if d, _ := st.Device(ctx, victim); d.Online || !d.Revoked {
		t.Fatalf("revoked device %+v", d)
	}
	if got := cp.Bus().Connected(); got != n-1 {
		t.Errorf("broker has %d clients, want %d", got, n-1)
	}
}
