package scenario

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoServerInternals: the scenario runner and the simulator talk to the
// control plane through its API (package client); they link none of the
// server's parts.
func TestNoServerInternals(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".", "../sim").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, bad := range []string{"github.com/hangarfleet/hangar/controlplane/server", "github.com/hangarfleet/hangar/controlplane/api",
			"github.com/hangarfleet/hangar/controlplane/cli", "github.com/hangarfleet/hangar/controlplane/store/sqlstore",
			"github.com/hangarfleet/hangar/controlplane/broker", "github.com/hangarfleet/hangar/controlplane/ingest",
			"github.com/hangarfleet/hangar/controlplane/web", "github.com/hangarfleet/hangar/controlplane/commands",
			"github.com/labstack/echo", "github.com/mochi-mqtt"} {
			if dep == bad || strings.HasPrefix(dep, bad+"/") {
				t.Errorf("links %s", dep)
			}
		}
	}
}
