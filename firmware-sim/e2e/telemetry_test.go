package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

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
	refusedBefore := refusedEnrollments(cp)
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
	waitRefusedEnrollments(t, cp, refusedBefore+2)
	if agentOf(victim) {
		t.Fatal("revoked drone reconnected")
	}
	if d, _ := st.Device(ctx, victim); d.Online || !d.Revoked {
		t.Fatalf("revoked device %+v", d)
	}
	waitFor(t, 10*time.Second, "the broker without the revoked drone", func() (bool, string) {
		got := cp.Bus().Connected()
		return got == n-1, fmt.Sprintf("broker has %d clients, want %d", got, n-1)
	})
}

// refusedEnrollments is how many enrollments of revoked devices the control
// plane refused.
func refusedEnrollments(cp *controlPlane) float64 {
	return testutil.ToFloat64(cp.Metrics().Enrollments.WithLabelValues("revoked"))
}

// waitRefusedEnrollments waits until the control plane refused want
// enrollments of revoked devices in all: a revoked agent tried again, and
// more than once, rather than a pause that may be too short to see it.
func waitRefusedEnrollments(t *testing.T, cp *controlPlane, want float64) {
	t.Helper()
	waitFor(t, 30*time.Second, fmt.Sprintf("%v refused enrollments of revoked devices", want), func() (bool, string) {
		got := refusedEnrollments(cp)
		return got >= want, fmt.Sprintf("%v refused", got)
	})
}

// TestFleetLiteTransportFromSourceAddresses: drones on the lightweight
// MQTT transport, connecting from two source addresses in turn, enroll,
// come online and deliver telemetry like the default ones; the kernel's
// socket table shows their broker connections coming from those addresses.
func TestFleetLiteTransportFromSourceAddresses(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs Linux: 127.0.0.0/8 all local, and /proc/net/tcp")
	}
	const n = 30
	mq := listen(t)
	brokerPort := mq.Addr().(*net.TCPAddr).Port
	cp := startControlPlane(t, server.Options{MQTTListener: mq})
	sources := []string{"127.0.0.2", "127.0.0.3"}
	newTestFleet(t, cp, n, func(o *sim.FleetOptions) { o.MQTTClient, o.SourceAddrs = "lite", sources })
	ctx := context.Background()
	st := cp.Store()
	waitFor(t, 60*time.Second, "every drone online with telemetry", func() (bool, string) {
		ds, err := st.Devices(ctx, store.DeviceFilter{})
		if err != nil {
			return false, err.Error()
		}
		ok := count(ds, func(d store.Device) bool { return d.Online && d.Latest != nil })
		return ok == n, fmt.Sprintf("%d of %d online with telemetry", ok, n)
	})
	// A drone seen online may be between two connections (the store
	// learns of a drop from the will): poll the socket table.
	waitFor(t, 30*time.Second, "the broker connections spread over the source addresses", func() (bool, string) {
		from, err := tcpConnsTo(brokerPort)
		if err != nil {
			t.Fatal(err)
		}
		for _, src := range sources {
			if from[src] != n/len(sources) {
				return false, fmt.Sprintf("%d broker connections from %s, want %d (all: %v)", from[src], src, n/len(sources), from)
			}
		}
		return true, ""
	})
}

// tcpConnsTo counts established TCP connections to port on this machine by
// local address, from /proc/net/tcp.
func tcpConnsTo(port int) (map[string]int, error) {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "01" { // ESTABLISHED
			continue
		}
		local, remote := strings.Split(f[1], ":"), strings.Split(f[2], ":")
		if len(local) != 2 || len(remote) != 2 {
			continue
		}
		if rp, _ := strconv.ParseUint(remote[1], 16, 16); int(rp) != port {
			continue
		}
		ip, _ := strconv.ParseUint(local[0], 16, 32) // little-endian on the machines tests run on
		out[fmt.Sprintf("%d.%d.%d.%d", ip&0xff, ip>>8&0xff, ip>>16&0xff, ip>>24)]++
	}
	return out, nil
}
