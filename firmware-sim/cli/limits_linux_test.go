package cli

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// limitChildEnv makes the test binary a child that lowers its own
// descriptor limit (the test process's stays as it is) and runs one case.
const limitChildEnv = "HANGAR_SIM_LIMIT_CHILD"

func limitChild(t *testing.T, mode string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestLoweredLimitChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), limitChildEnv+"="+mode)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child %s: %v\n%s", mode, err, out)
	}
	return string(out)
}

// Under RLIMIT_NOFILE 256 (soft and hard, set in a child process),
// `hangar-sim --devices 100` with the on-disk outbox (about 671
// descriptors) is refused and told that the memory outbox fits.
func TestRunRefusesUnderLoweredLimit(t *testing.T) {
	out := limitChild(t, "refuse")
	for _, w := range []string{"REFUSED", "100 drones do not fit", "needs about 671", "the limit (RLIMIT_NOFILE) is 256",
		"--memory-outbox: 1 descriptor per drone instead of 6, about 171 in all (fits)", "ulimit -n 700", "4 processes of --devices 25"} {
		if !strings.Contains(out, w) {
			t.Errorf("child output lacks %q:\n%s", w, out)
		}
	}
}

// With the soft limit under what the fleet needs and the hard one above,
// the check raises the soft limit to the hard one.
func TestRaisesSoftLimit(t *testing.T) {
	if out := limitChild(t, "raise"); !strings.Contains(out, "RAISED 1000") {
		t.Errorf("child output:\n%s", out)
	}
}

func TestLoweredLimitChild(t *testing.T) {
	mode := os.Getenv(limitChildEnv)
	if mode == "" {
		t.Skip("run by the tests above in a child process")
	}
	lim := syscall.Rlimit{Cur: 256, Max: 256}
	if mode == "raise" {
		lim = syscall.Rlimit{Cur: 100, Max: 1000}
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Println("setrlimit:", err)
		os.Exit(2)
	}
	switch mode {
	case "refuse":
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // should the check let it through, the fleet stops at once
		var stdout, stderr bytes.Buffer
		err := Run(ctx, []string{"--devices", "100", "--server", "http://127.0.0.1:1", "--enroll-token", "x", "--state-dir", t.TempDir()}, &stdout, &stderr)
		if err == nil {
			fmt.Printf("ACCEPTED\n%s%s", stdout.String(), stderr.String())
			os.Exit(1)
		}
		fmt.Printf("REFUSED %v\n", err)
	case "raise":
		if err := checkLimits(sim.Load{Devices: 100, MemoryOutbox: true}); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		soft, _, _ := fileLimit()
		fmt.Printf("RAISED %d\n", soft)
	}
	os.Exit(0)
}
