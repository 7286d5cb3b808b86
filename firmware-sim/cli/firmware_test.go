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

// TestFirmwareFactory: hangar-sim firmware --factory writes, byte for
// byte, the build a drone of a hangar-sim fleet runs before any update
// (what it reports the digest of): the base of a delta.
func TestFirmwareFactory(t *testing.T) {
	out := filepath.Join(t.TempDir(), "factory.bin")
	var stdout, stderr bytes.Buffer
	if err := Run(context.Background(), []string{"firmware", "--factory", "--version", "1.0.0", "--out", out}, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if want := sim.FactoryFirmware("1.0.0", sim.DefaultFactorySize).Artifact(); !bytes.Equal(b, want) || len(b) != sim.DefaultFactorySize {
		t.Fatalf("--factory wrote %d bytes, not the fleet's factory build (%d bytes)", len(b), len(want))
	}
}
