package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/firmware-sim/scenario"
	"github.com/hangarfleet/hangar/internal/natstest"
)

// TestScenarios plays every shipped scenario (firmware-sim/scenarios) at
// CI size (HANGAR_TEST_SCENARIO_DRONES, default 100; the files give the
// full size) against a real control plane process, and requires every
// expectation to hold and the report to be written.
func TestScenarios(t *testing.T) {
	n := 100
	if v := os.Getenv("HANGAR_TEST_SCENARIO_DRONES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			t.Fatal(err)
		}
	}
	files, _ := filepath.Glob("../scenarios/*.yaml")
	if len(files) == 0 {
		t.Fatal("no scenarios")
	}
	bin := buildServer(t)
	natsServer := natstest.Binary(t) // for the scenarios on a NATS cluster
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s, err := scenario.Load(f)
			if err != nil {
				t.Fatal(err)
			}
			var progress bytes.Buffer
			rep, err := scenario.Run(context.Background(), s, scenario.Options{Hangar: bin, NATSServer: natsServer, Devices: n, WorkDir: t.TempDir(),
				Logger: testLogger(t), Progress: &progress})
			if err != nil {
				t.Fatalf("%v\n%s", err, progress.String())
			}
			var sum bytes.Buffer
			rep.Summary(&sum)
			t.Logf("\n%s%s", progress.String(), sum.String())
			if !rep.Passed {
				t.Errorf("expectations not met")
			}
			dir := t.TempDir()
			if err := rep.Write(dir); err != nil {
				t.Fatal(err)
			}
			for _, file := range []string{"report.json", "report.html"} {
				if st, err := os.Stat(filepath.Join(dir, file)); err != nil || st.Size() == 0 {
					t.Errorf("%s not written: %v", file, err)
				}
			}
		})
	}
}
