package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// TestFirmwareCommand: hangar-sim firmware writes a build the simulated
// drones recognise, and refuses what they would not.
func TestFirmwareCommand(t *testing.T) {
	out := filepath.Join(t.TempDir(), "fw.bin")
	var stdout, stderr bytes.Buffer
	if err := Run(context.Background(), []string{"firmware", "--version", "1.2.0", "--behaviour", "errors", "--size", "4096", "--out", out}, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	fw, err := sim.ParseArtifact(b)
	if err != nil || fw.Version != "1.2.0" || fw.Behaviour != sim.Errors || fw.ErrorsPerMinute == 0 || len(b) != 4096 {
		t.Fatalf("artifact %+v (%d bytes): %v", fw, len(b), err)
	}
	for _, args := range [][]string{
		{"firmware", "--version", "one", "--out", out},
		{"firmware", "--version", "1.0.0", "--behaviour", "explode", "--out", out},
		{"firmware", "--version", "1.0.0"},
	} {
		if err := Run(context.Background(), args, &stdout, &stderr); err == nil {
			t.Errorf("%s: accepted", strings.Join(args, " "))
		}
	}
}
