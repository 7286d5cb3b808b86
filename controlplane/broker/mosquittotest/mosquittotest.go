// Package mosquittotest runs a real Mosquitto broker (package mosquitto)
// for a test, so that the external bus is tested against the ACLs and
// behaviour of the broker operators actually run.
package mosquittotest

import (
	"errors"
	"os"
	"testing"

	"github.com/hangarfleet/hangar/internal/freeport"
	"github.com/hangarfleet/hangar/internal/mosquitto"
)

// Names of the account and role the broker is created with.
const (
	AdminUser = mosquitto.AdminUser
	AdminRole = mosquitto.AdminRole
)

// Mosquitto is a running broker.
type Mosquitto struct {
	*mosquitto.Mosquitto
}

// Start runs a broker until the end of the test. It skips the test when
// Mosquitto or its dynamic security plugin is not installed, unless the
// environment variable CI is "true": a skipped peer test in CI is a failure.
func Start(t testing.TB) *Mosquitto {
	t.Helper()
	m, err := mosquitto.Start(t.TempDir(), mosquitto.Options{})
	started(t, err)
	t.Cleanup(func() {
		m.Kill()
		if t.Failed() {
			t.Log(m.LogTail())
		}
	})
	return &Mosquitto{m}
}

// StartConfig runs a broker with a configuration file listening on port,
// until the end of the test; it skips (fails in CI) as Start does.
func StartConfig(t testing.TB, conf string, port int) *Mosquitto {
	t.Helper()
	m, err := mosquitto.StartConfig(conf, port)
	started(t, err)
	t.Cleanup(m.Kill)
	return &Mosquitto{m}
}

// started skips the test when Mosquitto is not installed (fails it in CI,
// where a skipped peer test is a failure) and fails it on other errors.
func started(t testing.TB, err error) {
	t.Helper()
	if errors.Is(err, mosquitto.ErrNotInstalled) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("mosquitto is required in CI: %v", err)
		}
		t.Skipf("mosquitto not available: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// FreePort returns a loopback port free at the time of the call.
func FreePort(t testing.TB) int {
	t.Helper()
	p, err := freeport.Port()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Stop terminates the broker gracefully and waits for it.
func (m *Mosquitto) Stop(t testing.TB) {
	t.Helper()
	if err := m.Mosquitto.Stop(); err != nil {
		t.Fatalf("mosquitto: %v", err)
	}
}

// Restart stops the broker and starts it again on the same port.
func (m *Mosquitto) Restart(t testing.TB) {
	t.Helper()
	if err := m.Mosquitto.Restart(); err != nil {
		t.Fatalf("mosquitto: %v", err)
	}
}
