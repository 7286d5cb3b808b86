package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/server"
)

// TestEnrollmentTokenCannotTakeOver: whoever holds the fleet token asks
// for the credential of a live drone. The control plane refuses and
// audits it, the real drone stays connected and its telemetry keeps
// coming; only after an operator's rekey does an enrollment of that id
// succeed, once.
func TestEnrollmentTokenCannotTakeOver(t *testing.T) {
	cp := startControlPlane(t, server.Options{})
	fleet := newTestFleet(t, cp, 2, nil)
	ctx := context.Background()
	victim := fleet.ID(1)
	connected := func() bool {
		for _, d := range fleet.Drones() {
			if d.ID == victim && d.Agent() != nil {
				return d.Agent().Connected()
			}
		}
		return false
	}
	waitFor(t, 30*time.Second, "the drone online", func() (bool, string) { return connected(), "not connected" })

	enroll := func() int {
		body, _ := json.Marshal(map[string]any{"enroll_token": cp.enrollToken(t), "device_id": victim})
		resp, err := http.Post(cp.URL()+"/api/v1/enroll", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for range 3 {
		if code := enroll(); code != http.StatusConflict {
			t.Fatalf("enrollment of the live drone's id: HTTP %d, want 409", code)
		}
	}
	audit, _ := cp.Store().AuditLog(ctx, victim, 100)
	refused := 0
	for _, a := range audit {
		if a.Action == "device.enroll-refused" && a.Attrs["remote"] != "" {
			refused++
		}
	}
	if refused != 3 {
		t.Errorf("%d refused enrollments audited with their source, want 3: %+v", refused, audit)
	}
	// The drone's credential still works: new telemetry is stored.
	before := telemetryRows(t, cp, victim)
	waitFor(t, 30*time.Second, "more telemetry from the drone", func() (bool, string) {
		n := telemetryRows(t, cp, victim)
		return n > before && connected(), fmt.Sprintf("%d rows (had %d), connected %v", n, before, connected())
	})
	if d, _ := cp.Store().Device(ctx, victim); !d.Online {
		t.Fatalf("the drone is offline after the takeover attempts: %+v", d)
	}

	// An operator allows a rekey: one enrollment succeeds, the next not.
	kit := &releaseKit{}
	kit.cli(t, cp.URL(), "device", "rekey", victim, "--within", "1h", "--token-file", adminTokenFile(cp))
	if code := enroll(); code != http.StatusOK {
		t.Fatalf("enrollment after the rekey: HTTP %d", code)
	}
	if code := enroll(); code != http.StatusConflict {
		t.Fatalf("second enrollment after one rekey: HTTP %d", code)
	}
}

func telemetryRows(t *testing.T, cp *controlPlane, id string) int {
	rows, err := cp.Store().Telemetry(context.Background(), id, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), 100000)
	if err != nil {
		t.Fatal(err)
	}
	return len(rows)
}
