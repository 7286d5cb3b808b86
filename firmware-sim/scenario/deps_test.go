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
		for _, bad := range []string{"/controlplane/server", "/controlplane/api", "/controlplane/cli", "/controlplane/store/sqlite",
			"/controlplane/broker", "/controlplane/ingest", "/controlplane/web", "/controlplane/commands", "labstack/echo", "mochi-mqtt"} {
			if strings.Contains(dep, bad) {
				t.Errorf("links %s", dep)
			}
		}
	}
}
