package e2e

import (
	"github.com/hangarfleet/hangar/internal/pgtest"

	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	binMu    sync.Mutex
	binCache = map[string]string{}
	binDir   string
)

// TestMain removes the binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildAgent builds hangar-agent with the given version (once per version
// per test binary) and returns its path.
func buildAgent(t testing.TB, version string) string {
	return buildProgram(t, "github.com/hangarfleet/hangar/agent/cmd/hangar-agent", version)
}

// buildProgram builds a main package as an agent of the given version,
// stripped as releases are, and returns its path.
func buildProgram(t testing.TB, pkg, version string, extraLDFlags ...string) string {
	t.Helper()
	return buildTagged(t, pkg, version, "", extraLDFlags...)
}

// buildTagged is buildProgram with build tags.
func buildTagged(t testing.TB, pkg, version, tags string, extraLDFlags ...string) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	key := pkg + "@" + version + "/" + tags + strings.Join(extraLDFlags, " ")
	if p, ok := binCache[key]; ok {
		return p
	}
	if binDir == "" {
		d, err := os.MkdirTemp("", "hangar-e2e-bin-")
		if err != nil {
			t.Fatal(err)
		}
		binDir = d
	}
	out := filepath.Join(binDir, filepath.Base(pkg)+"-"+version)
	if tags != "" {
		out += "-" + strings.ReplaceAll(tags, ",", "-")
	}
	cmd := exec.Command("go", "build", "-trimpath", "-tags", tags, "-o", out, "-ldflags",
		fmt.Sprintf("-s -w -X github.com/hangarfleet/hangar/agent.BuildVersion=%s -X github.com/hangarfleet/hangar/agent.BuildTime=%d %s",
			version, time.Now().Add(-time.Hour).Unix(), strings.Join(extraLDFlags, " ")), pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build agent: %v\n%s", err, b)
	}
	binCache[key] = out
	return out
}
