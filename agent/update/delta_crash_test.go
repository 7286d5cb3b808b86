package update

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/hangarfleet/hangar/proto/prototest"
)

// TestCrashDeltaStage cuts the delta path's staging at every step (both a
// process crash and a power loss): after the cut the staging directory
// holds no build, or the whole checked one, never a partial result under
// the staged name; the binary in place is untouched; and the next attempt
// (the job is still downloading) stages the build. The install from the
// staged file is the full update's, cut step by step in
// TestCrashUpdaterInstallThenBoot.
func TestCrashDeltaStage(t *testing.T) {
	staging := t.TempDir()
	patch := mustPatch(t, crashOld, crashNew)
	m := prototest.DeltaManifest(crashOld, patch, crashNew)
	patchPath := filepath.Join(staging, "p.patch")
	if err := os.WriteFile(patchPath, patch, 0o600); err != nil {
		t.Fatal(err)
	}
	fresh := func() (*memFS, *Updater) {
		fsys := newMemFS()
		fsys.mkdir(crashDir)
		fsys.mkdir(staging)
		fsys.put(crashTarget, crashOld, 0o755)
		u := &Updater{opts: Options{Dir: staging, FS: fsys}}
		return fsys, u
	}
	staged := crashStagedPath(staging)
	stage := func(fsys *memFS, u *Updater) error {
		return u.stageDelta(context.Background(), &Binary{Path: crashTarget, FS: fsys}, m, patchPath, staged)
	}
	check := func(t *testing.T, label string, fsys *memFS) {
		t.Helper()
		if got, _ := fsys.read(crashTarget); !bytes.Equal(got, crashOld) {
			t.Errorf("%s: the binary in place changed", label)
		}
		if got, ok := fsys.read(staged); ok && !bytes.Equal(got, crashNew) {
			t.Errorf("%s: %d bytes staged under the build's name, not the build", label, len(got))
		}
	}
	fsys, u := fresh()
	base := fsys.stepCount()
	if err := stage(fsys, u); err != nil {
		t.Fatalf("uncut: %v", err)
	}
	if got, _ := fsys.read(staged); !bytes.Equal(got, crashNew) {
		t.Fatal("uncut: the staged file is not the build")
	}
	n := fsys.stepCount() - base
	t.Logf("staging a delta's result: %d steps:%s", n, fsys.trace())
	if n < 4 {
		t.Fatalf("only %d steps: the staging does not go through the fs seam", n)
	}
	for _, mode := range crashModes {
		for k := 0; k < n; k++ {
			t.Run(crashCase(mode, k), func(t *testing.T) {
				fsys, u := fresh()
				fsys.setCut(base+k, mode)
				err := stage(fsys, u)
				label := crashLabel(mode, k, n, fsys, base)
				if !errors.Is(err, errCut) {
					t.Errorf("%s: staging returned %v through a cut", label, err)
				}
				after := fsys.reboot()
				if mode == crashPower {
					after = fsys.powerLoss()
				}
				check(t, label, after)
				// The job goes on downloading: staged and checked, or made again.
				u.opts.FS = after
				if fileHasDigest(after, staged, m.SHA256) != nil {
					if err := stage(after, u); err != nil {
						t.Errorf("%s: staging again: %v", label, err)
					}
				}
				if got, _ := after.read(staged); !bytes.Equal(got, crashNew) {
					t.Errorf("%s: after the retry the staged file is not the build", label)
				}
				check(t, label+", retried", after)
			})
		}
	}
}
