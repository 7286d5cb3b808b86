package guard

import (
	"os"
	"strings"
	"testing"
)

// TestUnitStartsThroughGuard: the shipped systemd unit starts the agent
// through the guard, and lets the guard's child talk to systemd.
func TestUnitStartsThroughGuard(t *testing.T) {
	b, err := os.ReadFile("../../scripts/systemd/hangar-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	settings := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			settings[k] = v
		}
	}
	exec := strings.Fields(settings["ExecStart"])
	if len(exec) < 2 || !strings.HasSuffix(exec[0], "/hangar-guard") || !strings.HasSuffix(exec[1], "/hangar-agent") {
		t.Errorf("ExecStart=%s: want the guard, then the agent", settings["ExecStart"])
	}
	if settings["NotifyAccess"] != "all" {
		t.Errorf("NotifyAccess=%s: the new build on trial is the guard's child, its notifications must count", settings["NotifyAccess"])
	}
	if settings["Restart"] != "always" {
		t.Errorf("Restart=%s", settings["Restart"])
	}
}
