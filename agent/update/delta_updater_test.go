package update

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gabstv/go-bsdiff/pkg/bsdiff"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// deltaNew is a new build of the rig's binary: the old one with edits.
func deltaNew(old []byte, tag string) []byte {
	b := slices.Clone(old)
	copy(b, "hangar-agent 1.5.0\n")
	for i := 1000; i < len(b)-64; i += 4099 {
		copy(b[i:], tag)
	}
	return append(b, "a new tail"...)
}

func mustPatch(t *testing.T, old, new []byte) []byte {
	t.Helper()
	p, err := bsdiff.Bytes(old, new)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// deltaRelease is a signed delta release of result: the patch, as the
// manifest names it, made from base (mods may make it lie).
func deltaRelease(t *testing.T, base, patch, result []byte, mods ...func(*proto.Manifest)) hostileRelease {
	t.Helper()
	m := prototest.DeltaManifest(base, patch, result)
	m.Counter, m.Version = 20, "1.5.0"
	for _, f := range mods {
		f(&m)
	}
	sum := sha256.Sum256(patch)
	return hostileRelease{m: m, data: patch, signed: hostileSignManifest(t, prototest.ReleaseKey, m), path: "/patch/" + string(rune('a'+sum[0]%26))}
}

func (r *hostileRig) offerDelta(id string, rel hostileRelease, fullURL string) error {
	cmd := hostileCmd(id, rel.signed, r.keys, rel.path)
	cmd.Update.FullURL = fullURL
	return r.u.Offer(cmd)
}

// TestDeltaInstall: a device running the base takes the delta: it fetches
// the patch only, installs the build the patch makes (the manifest's), and
// reports the patch's size; it tells the control plane its build's digest
// and that it patches.
func TestDeltaInstall(t *testing.T) {
	r := newHostileRig(t)
	sum := sha256.Sum256(r.oldBin)
	if b := r.u.Builds()[proto.TargetAgent]; !bytes.Equal(b, sum[:]) {
		t.Fatalf("Builds reports %x for the agent, want the binary's %x", b, sum)
	}
	if r.u.DeltaCap() != DefaultMaxDeltaResult {
		t.Fatalf("DeltaCap %d", r.u.DeltaCap())
	}
	newBin := deltaNew(r.oldBin, "fix")
	patch := mustPatch(t, r.oldBin, newBin)
	rel := deltaRelease(t, r.oldBin, patch, newBin)
	r.srv.route(rel.path, hostileHonest(patch))
	r.srv.route("/full", hostileHonest(newBin))
	if err := r.offerDelta("c-delta", rel, "/full"); err != nil {
		t.Fatal(err)
	}
	r.rep.waitState(t, "c-delta", proto.UpdateInstalling)
	hostileWaitFor(t, "the install", func() bool { i, _, _, _, _ := r.inst.calls(); return len(i) == 1 })
	installs, _, _, _, _ := r.inst.calls()
	if !bytes.Equal(installs[0], newBin) {
		t.Fatal("the installed build is not the one the patch makes")
	}
	if n := r.srv.hitsOf("/full"); n != 0 {
		t.Errorf("the full artifact was fetched %d times", n)
	}
	for _, rep := range r.rep.forCmd("c-delta") {
		if rep.Patch != uint64(len(patch)) || rep.Fallback != "" || rep.Size != uint64(len(newBin)) {
			t.Errorf("report %s: patch %d, fallback %q, size %d", rep, rep.Patch, rep.Fallback, rep.Size)
		}
	}
	if files := r.stagedFiles(); slices.ContainsFunc(files, func(f string) bool { return strings.HasSuffix(f, ".patch") || strings.HasSuffix(f, ".base") }) {
		t.Errorf("left in staging: %v", files)
	}
}

// TestDeltaAttacks: every way a delta can be wrong is refused, with the
// binary unchanged and nothing installed, when the offer names no full
// artifact to fall back to.
func TestDeltaAttacks(t *testing.T) {
	type attack struct {
		name  string
		check proto.Check
		make  func(t *testing.T, r *hostileRig) (hostileRelease, []byte) // release, bytes served
		keys  func(t *testing.T) []byte
		opts  func(*Options)
	}
	newOf := func(r *hostileRig) []byte { return deltaNew(r.oldBin, "fix") }
	attacks := []attack{
		{name: "a patch for another base", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			other := deltaNew(r.oldBin, "other")
			p := mustPatch(t, other, newOf(r))
			rel := deltaRelease(t, other, p, newOf(r))
			return rel, p
		}},
		{name: "a patch of another base, claiming ours", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, deltaNew(r.oldBin, "other"), newOf(r))
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}},
		{name: "a valid patch, the manifest naming another result", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			evil := slices.Clone(newOf(r))
			evil[len(evil)/2] ^= 1
			return deltaRelease(t, r.oldBin, p, evil), p
		}},
		{name: "a patch making something else than the signed result", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			evil := deltaNew(r.oldBin, "evil")
			p := mustPatch(t, r.oldBin, evil)
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}},
		{name: "a patch expanding beyond the result", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			binary.LittleEndian.PutUint64(p[24:32], 1<<40) // announces a terabyte: refused from the header
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}},
		{name: "a result over this device's cap", check: proto.CheckDelta, opts: func(o *Options) { o.MaxDeltaResult = 1 << 10 }, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}},
		{name: "a truncated patch, signed so", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			p = p[:len(p)*2/3]
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}},
		{name: "a truncated patch served", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			return deltaRelease(t, r.oldBin, p, newOf(r)), p[:len(p)/2]
		}},
		{name: "a padded patch served", check: proto.CheckDelta, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			return deltaRelease(t, r.oldBin, p, newOf(r)), append(slices.Clone(p), make([]byte, 4096)...)
		}},
		{name: "a delta manifest signed by a revoked key", check: proto.CheckRevoked, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}, keys: func(t *testing.T) []byte {
			return hostileSignKeys(t, prototest.RootKey, func() proto.KeyList {
				k := prototest.KeyList()
				k.Version, k.Revoked = 2, []string{hostileReleaseID}
				return k
			}())
		}},
		{name: "deltas turned off", check: proto.CheckDelta, opts: func(o *Options) { o.NoDelta = true }, make: func(t *testing.T, r *hostileRig) (hostileRelease, []byte) {
			p := mustPatch(t, r.oldBin, newOf(r))
			return deltaRelease(t, r.oldBin, p, newOf(r)), p
		}},
	}
	for _, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			var mods []func(*Options)
			if a.opts != nil {
				mods = append(mods, a.opts)
			}
			r := newHostileRig(t, mods...)
			rel, served := a.make(t, r)
			if strings.Contains(a.name, "truncated patch served") {
				r.srv.route(rel.path, hostileCut(served, len(served)))
			} else {
				r.srv.route(rel.path, hostileHonest(served))
			}
			if a.keys != nil {
				r.keys = a.keys(t)
			}
			_ = r.offerDelta("c-attack", rel, "")
			r.rep.wait(t, "the refusal", func(s hostileReport) bool { return s.Cmd == "c-attack" && s.State.Final() })
			r.assertRejected("c-attack", a.check)
			r.assertAddressed("c-attack", rel.signed)
			r.assertNotInstalled("c-attack")
			hostileWaitFor(t, "the job's end", func() bool { return r.u.job() == nil })
			if spent := r.u.st.target(proto.TargetAgent).Spent; spent != 0 {
				t.Errorf("the release was spent (%d)", spent)
			}
		})
	}
}

// TestDeltaFallback: when the delta path fails (a corrupted base on the
// device, a corrupt patch), the device fetches the full artifact, once,
// says why, checks it against the same signed result and installs it; the
// release is not spent by the failed delta.
func TestDeltaFallback(t *testing.T) {
	for _, c := range []struct {
		name, why string
		setup     func(t *testing.T, r *hostileRig, patch []byte) []byte // what is served as the patch
	}{
		{"corrupted base", "is not the patch's base", func(t *testing.T, r *hostileRig, patch []byte) []byte {
			bad := slices.Clone(r.oldBin)
			bad[200] ^= 0xff
			if err := os.WriteFile(r.binPath, bad, 0o755); err != nil {
				t.Fatal(err)
			}
			r.oldBin = bad
			return patch
		}},
		{"corrupt patch served", "the patch", func(t *testing.T, r *hostileRig, patch []byte) []byte {
			bad := slices.Clone(patch)
			bad[len(bad)/2] ^= 0xff
			return bad
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newHostileRig(t)
			base := slices.Clone(r.oldBin)
			newBin := deltaNew(base, "fix")
			patch := mustPatch(t, base, newBin)
			served := c.setup(t, r, patch)
			rel := deltaRelease(t, base, patch, newBin)
			r.srv.route(rel.path, hostileHonest(served))
			r.srv.route("/full", hostileHonest(newBin))
			if err := r.offerDelta("c-fb", rel, "/full"); err != nil {
				t.Fatal(err)
			}
			r.rep.waitState(t, "c-fb", proto.UpdateInstalling)
			hostileWaitFor(t, "the install", func() bool { i, _, _, _, _ := r.inst.calls(); return len(i) == 1 })
			installs, _, _, _, _ := r.inst.calls()
			if !bytes.Equal(installs[0], newBin) {
				t.Fatal("the installed build is not the release's")
			}
			if n := r.srv.hitsOf("/full"); n == 0 {
				t.Error("the full artifact was never fetched")
			}
			fb, ok := r.rep.find(func(s hostileReport) bool { return s.Cmd == "c-fb" && s.Fallback != "" })
			if !ok || !strings.Contains(fb.Fallback, c.why) {
				t.Errorf("no fallback report naming %q: %+v\n%s", c.why, fb, r.rep.dump())
			}
			// A base that is not the patch's is seen before anything is
			// fetched: no byte of the patch, and the reports say so.
			wantPatch := uint64(len(patch))
			if c.name == "corrupted base" {
				wantPatch = 0
				if n := r.srv.hitsOf(rel.path); n != 0 {
					t.Errorf("the patch was fetched %d times for a base it cannot apply to", n)
				}
			}
			for _, rep := range r.rep.forCmd("c-fb") {
				if rep.State == proto.UpdateRejected || rep.State == proto.UpdateFailed {
					t.Errorf("the fallback was reported %s", rep)
				}
				if rep.Patch != wantPatch {
					t.Errorf("report %s: patch %d, want %d", rep, rep.Patch, wantPatch)
				}
			}
		})
	}
}

// TestDeltaHookPayload: a payload installed through a hook takes deltas
// when its installed file is known (--hook-file): the updater reports the
// file's digest, patches a copy of it, and hands the hook the build the
// release names; without the file it takes the full artifact.
func TestDeltaHookPayload(t *testing.T) {
	dir := t.TempDir()
	fw := filepath.Join(dir, "fw.bin")
	oldFW := bytes.Repeat([]byte("flight controller firmware 4.5.0 "), 2000)
	if err := os.WriteFile(fw, oldFW, 0o644); err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(dir, "hook.sh")
	os.WriteFile(script, []byte(`#!/bin/sh
d=$(dirname "$0")
case "$1" in
install) cp "$2" "$d/fw.bin" && echo "$3" > "$d/current" ;;
check|commit) ;;
rollback) echo "4.5.0" > "$d/current" ;;
current) cat "$d/current" 2>/dev/null || echo 4.5.0 ;;
esac
`), 0o755)
	hook := &Hook{Path: script, File: fw}
	r := newHostileRig(t, func(o *Options) { o.Installers["fc-firmware"] = hook })
	sum := sha256.Sum256(oldFW)
	if b := r.u.Builds()["fc-firmware"]; !bytes.Equal(b, sum[:]) {
		t.Fatalf("the payload's build digest: %x, want %x", b, sum)
	}
	newFW := bytes.ReplaceAll(oldFW, []byte("4.5.0"), []byte("4.6.0"))
	patch := mustPatch(t, oldFW, newFW)
	rel := deltaRelease(t, oldFW, patch, newFW, func(m *proto.Manifest) { m.Target, m.Version, m.Arch = "fc-firmware", "4.6.0", nil })
	r.srv.route(rel.path, hostileHonest(patch))
	r.srv.route("/fw-full", hostileHonest(newFW))
	if err := r.offerDelta("c-fc", rel, "/fw-full"); err != nil {
		t.Fatal(err)
	}
	r.rep.waitState(t, "c-fc", proto.UpdateTrial) // installed by the hook; the trial is the full update's
	if got, _ := os.ReadFile(fw); !bytes.Equal(got, newFW) {
		t.Fatal("the hook did not install the build the patch makes")
	}
	if r.srv.hitsOf("/fw-full") != 0 || r.srv.hitsOf(rel.path) == 0 {
		t.Errorf("fetched the full artifact %d times, the patch %d", r.srv.hitsOf("/fw-full"), r.srv.hitsOf(rel.path))
	}
	if _, err := (&Hook{Path: script}).Base(); !errors.Is(err, ErrNoBase) {
		t.Errorf("a hook without a file: %v", err)
	}
}

// stagingClean checks that the staging directory holds nothing but files
// of the release's build (the staged result, during its install).
func stagingClean(t *testing.T, r *hostileRig, result []byte) {
	t.Helper()
	sum := sha256.Sum256(result)
	prefix := fmt.Sprintf("%x", sum)
	hostileWaitFor(t, "staging tidied", func() bool {
		for _, f := range r.stagedFiles() {
			if !strings.HasPrefix(f, prefix) {
				return false
			}
		}
		return true
	})
}

// TestDeltaPatchStalls: a patch that never comes (HTTP 503 every time)
// is given up for the full artifact after the stall limit, reported as no
// patch fetched; a patch that stops half-way is given up too, and the
// full artifact's own progress (1,000 bytes a connection, resumed) is
// counted from zero, not from where the patch stopped.
func TestDeltaPatchStalls(t *testing.T) {
	for _, c := range []struct {
		name    string
		serve   func(patch []byte) http.HandlerFunc
		fetched bool
	}{
		{"never served", func([]byte) http.HandlerFunc {
			return func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) }
		}, false},
		{"stops half-way", func(patch []byte) http.HandlerFunc { return hostileCut(patch, len(patch)/2) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newHostileRig(t)
			newBin := slices.Clone(r.oldBin)
			rng := rand.New(rand.NewPCG(7, 8))
			for i := 100; i < len(newBin); i++ { // a build unlike the old: a patch of tens of KiB
				newBin[i] = byte(rng.IntN(256))
			}
			patch := mustPatch(t, r.oldBin, newBin)
			if len(patch) < 20<<10 {
				t.Fatalf("a patch of %d bytes: too small to outrun the full download's chunks", len(patch))
			}
			rel := deltaRelease(t, r.oldBin, patch, newBin)
			r.srv.route(rel.path, c.serve(patch))
			r.srv.route("/full", hostileChunks(newBin, 1000))
			if err := r.offerDelta("c-stall", rel, "/full"); err != nil {
				t.Fatal(err)
			}
			r.rep.waitState(t, "c-stall", proto.UpdateInstalling)
			installs, _, _, _, _ := r.inst.calls()
			hostileWaitFor(t, "the install", func() bool { installs, _, _, _, _ = r.inst.calls(); return len(installs) == 1 })
			if !bytes.Equal(installs[0], newBin) {
				t.Fatal("the installed build is not the release's")
			}
			fb, ok := r.rep.find(func(s hostileReport) bool { return s.Cmd == "c-stall" && s.Fallback != "" })
			if !ok || !strings.Contains(fb.Fallback, "no progress") {
				t.Fatalf("no stall fallback reported:\n%s", r.rep.dump())
			}
			if want := map[bool]uint64{true: uint64(len(patch))}[c.fetched]; fb.Patch != want {
				t.Errorf("the fallback report says patch %d, want %d (some of it fetched: %v)", fb.Patch, want, c.fetched)
			}
			stagingClean(t, r, newBin)
		})
	}
}

// TestDeltaStagingTidied: what earlier jobs left in the staging directory
// (a partial patch, a copy of a base, a partial result, another build)
// goes once the device works on another job, and the delta's own files go
// once its build is staged.
func TestDeltaStagingTidied(t *testing.T) {
	dir := t.TempDir()
	staging := filepath.Join(dir, "state", "staging")
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"aa.patch.part", "bb.base", "cc.made", "dd.bin", "ee.part", "ff.patch"} {
		os.WriteFile(filepath.Join(staging, f), []byte("left over"), 0o600)
	}
	r := newHostileRig(t, func(o *Options) { o.Dir = staging })
	newBin := deltaNew(r.oldBin, "fix")
	patch := mustPatch(t, r.oldBin, newBin)
	rel := deltaRelease(t, r.oldBin, patch, newBin)
	r.srv.route(rel.path, hostileHonest(patch))
	if err := r.offerDelta("c-tidy", rel, ""); err != nil {
		t.Fatal(err)
	}
	r.rep.waitState(t, "c-tidy", proto.UpdateInstalling)
	stagingClean(t, r, newBin)
}
