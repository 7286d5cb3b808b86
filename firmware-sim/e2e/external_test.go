package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/broker/mosquittotest"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// TestExternalBrokerFleet runs the fleet flow through a real Mosquitto:
// devices enroll (the control plane creates their Mosquitto accounts
// through dynamic security), come online, their telemetry is stored, and a
// revoked device is disconnected and stays out. Mosquitto is restarted in
// the middle: devices and control plane come back by themselves and
// nothing acknowledged is lost.
func TestExternalBrokerFleet(t *testing.T) {
	const n = 30
	m := mosquittotest.Start(t)
	cp := startControlPlane(t, server.Options{BrokerURL: m.URL(), BrokerUser: m.AdminUser, BrokerPassword: m.AdminPassword})
	fleet := newTestFleet(t, cp, n, nil)
	ctx := context.Background()
	st := cp.Store()
	allOnline := func() (bool, string) {
		on := true
		ds, err := st.Devices(ctx, store.DeviceFilter{Online: &on})
		if err != nil {
			return false, err.Error()
		}
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	}
	waitFor(t, 60*time.Second, "every drone online through Mosquitto", allOnline)
	waitFor(t, 30*time.Second, "telemetry from every drone", func() (bool, string) {
		ds, _ := st.Devices(ctx, store.DeviceFilter{})
		with := count(ds, func(d store.Device) bool { return d.Latest != nil })
		return with == n, fmt.Sprintf("%d with telemetry", with)
	})

	before := map[string]uint64{}
	for _, d := range fleet.Drones() {
		before[d.ID] = d.Agent().Connections()
	}
	m.Restart(t)
	waitFor(t, 60*time.Second, "drones reconnected after a Mosquitto restart", func() (bool, string) {
		back := count(fleet.Drones(), func(d *sim.SimDrone) bool {
			return d.Agent().Connected() && d.Agent().Connections() > before[d.ID]
		})
		return back == n, fmt.Sprintf("%d reconnected", back)
	})

	victim := fleet.ID(5)
	refusedBefore := refusedEnrollments(cp)
	if err := st.Revoke(ctx, victim); err != nil {
		t.Fatal(err)
	}
	if err := cp.Bus().Revoke(ctx, victim); err != nil {
		t.Fatal(err)
	}
	connected := func(id string) bool {
		for _, d := range fleet.Drones() {
			if d.ID == id {
				return d.Agent().Connected()
			}
		}
		return false
	}
	waitFor(t, 10*time.Second, "revoked drone disconnected by Mosquitto", func() (bool, string) {
		return !connected(victim), "still connected"
	})
	// It keeps trying (Mosquitto refuses it, re-enrollment is refused)
	// and never reconnects.
	waitRefusedEnrollments(t, cp, refusedBefore+2)
	if connected(victim) {
		t.Fatal("revoked drone reconnected")
	}

	// Every message the drones queued before the restart reached the
	// store once, with no gap.
	queued := map[string]uint64{}
	for _, d := range fleet.Drones() {
		queued[d.ID] = d.Agent().LastSeq()
	}
	waitFor(t, 30*time.Second, "backlog delivered", func() (bool, string) {
		for _, d := range fleet.Drones() {
			if d.ID == victim {
				continue
			}
			seqs, _ := storedSeqs(t, cp.dataDir, d.ID)
			if got := uint64(len(seqs[d.Agent().Boot()])); got < queued[d.ID] {
				return false, fmt.Sprintf("%s: %d of %d stored", d.ID, got, queued[d.ID])
			}
		}
		return true, ""
	})
	fleet.stop()
	cp.stop()
	for _, d := range fleet.Drones() {
		seqs, rows := storedSeqs(t, cp.dataDir, d.ID)
		checkContiguous(t, seqs)
		for k, n := range rows {
			if n != 1 {
				t.Fatalf("%s: batch %v stored %d times", d.ID, k, n)
			}
		}
	}
}
