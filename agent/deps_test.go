package agent_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the device binary small and free of server and test code:
// it must not link Echo, SQLite, the broker, the control plane, the
// simulator or the testing package.
func TestDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/hangarfleet/hangar/agent/cmd/hangar-agent").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{
		"github.com/labstack/echo", "github.com/mattn/go-sqlite3", "github.com/mochi-mqtt/server",
		"github.com/hangarfleet/hangar/controlplane", "github.com/hangarfleet/hangar/firmware-sim",
		"github.com/prometheus/", "testing", "net/http/httptest", "github.com/hangarfleet/hangar/proto/prototest",
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if dep == f || strings.HasPrefix(dep, f+"/") || (strings.HasSuffix(f, "/") && strings.HasPrefix(dep, f)) {
				t.Errorf("hangar-agent depends on %s", dep)
			}
		}
	}
}

// TestGuardDeps keeps the trial guard tiny and independent of agent
// releases: the standard library, the guard and its file-system seam.
func TestGuardDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/hangarfleet/hangar/agent/cmd/hangar-guard").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	allowed := map[string]bool{
		"github.com/hangarfleet/hangar/agent/cmd/hangar-guard": true,
		"github.com/hangarfleet/hangar/agent/guard":            true,
		"github.com/hangarfleet/hangar/agent/safefs":           true,
	}
	for _, dep := range strings.Fields(string(out)) {
		first, _, _ := strings.Cut(dep, "/")
		if strings.Contains(first, ".") && !allowed[dep] {
			t.Errorf("hangar-guard depends on %s", dep)
		}
	}
}
