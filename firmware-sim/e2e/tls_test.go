package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/server"
)

// TestRealAgentOverTLS: the real agent binary, pinned to the control
// plane's CA, enrolls over HTTPS and sends telemetry over MQTT with TLS;
// an agent pinned to another CA is refused at the handshake and never
// shows up.
func TestRealAgentOverTLS(t *testing.T) {
	caDir := filepath.Join(t.TempDir(), "tls")
	cfg, err := devca.Ensure(caDir, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cp := startControlPlane(t, server.Options{TLS: cfg})
	if !strings.HasPrefix(cp.URL(), "https://") {
		t.Fatalf("control plane URL %s", cp.URL())
	}
	otherDir := filepath.Join(t.TempDir(), "other")
	if _, err := devca.Ensure(otherDir, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	bin := buildAgent(t, "1.0.0")
	agent := func(id, ca, state string) *supervisor {
		return supervise(t, bin, []string{"--server", cp.URL(), "--enroll-token", cp.enrollToken(t), "--device-id", id,
			"--ca-file", ca, "--state-dir", state, "--flight-input", "", "--sample-interval", "200ms", "--batch-size", "2", "--heartbeat", "2s"}, nil)
	}
	goodState := t.TempDir()
	agent("tls-good", filepath.Join(caDir, devca.CAFile), goodState)
	bad := agent("tls-wrong-ca", filepath.Join(otherDir, devca.CAFile), t.TempDir())
	ctx := context.Background()
	waitFor(t, 60*time.Second, "telemetry over TLS", func() (bool, string) {
		d, err := cp.Store().Device(ctx, "tls-good")
		if err != nil {
			return false, err.Error()
		}
		return d.Online && d.Latest != nil, "not yet"
	})
	if u := credentialURL(t, goodState); !strings.HasPrefix(u, "tls://") {
		t.Errorf("the device was handed the broker URL %q", u)
	}
	// The agent with the wrong CA has tried (and failed the handshake)
	// by now, more than once.
	waitFor(t, 30*time.Second, "the wrong-CA agent refusing the server", func() (bool, string) {
		bad.mu.Lock()
		defer bad.mu.Unlock()
		return strings.Count(bad.log.String(), "certificate signed by unknown authority") >= 2, "no handshake failure logged yet"
	})
	if _, err := cp.Store().Device(ctx, "tls-wrong-ca"); err == nil {
		t.Fatal("an agent that does not trust the control plane enrolled")
	}
}

// credentialURL is the broker URL the control plane handed a device, as
// the device keeps it in its state directory.
func credentialURL(t *testing.T, state string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "credential.json"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		MQTTURL string `json:"mqtt_url"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return c.MQTTURL
}
