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
