package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var (
	binMu    sync.Mutex
	binCache = map[string]string{}
	binDir   string
)

// TestMain removes the binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildAgent builds hangar-agent with the given version (once per version
// per test binary) and returns its path.
func buildAgent(t testing.TB, version string) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	if p, ok := binCache[version]; ok {
		return p
	}
	if binDir == "" {
		d, err := os.MkdirTemp("", "hangar-e2e-bin-")
		if err != nil {
			t.Fatal(err)
		}
		binDir = d
	}
	out := filepath.Join(binDir, "hangar-agent-"+version)
	cmd := exec.Command("go", "build", "-o", out, "-ldflags",
		fmt.Sprintf("-X github.com/hangarfleet/hangar/agent.BuildVersion=%s", version), "github.com/hangarfleet/hangar/agent/cmd/hangar-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build agent: %v\n%s", err, b)
	}
	binCache[version] = out
	return out
}
