package update

import (
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// FuzzSignedManifest feeds the updater manifests that pass the signature
// check: the fuzzer chooses their contents, the harness signs them with a
// trusted release key. Whatever they say, an offer is refused with a named
// check or taken; nothing installs (the artifact is never served), no
// anti-rollback counter is spent, and the time floor never passes the
// clock.
func FuzzSignedManifest(f *testing.F) {
	base := prototest.Manifest([]byte("artifact"))
	f.Add(base.Counter, base.Version, base.Target, "rev-b", base.Created, base.Expires, base.Size, "amd64")
	f.Add(uint64(1<<63), "9.9.9", proto.TargetAgent, "rev-b", base.Created+50*365*86400, base.Expires+51*365*86400, uint64(1), "arm64")
	f.Add(uint64(14), "1.5.1", "fc-firmware", "", base.Created-86400, base.Created, uint64(1<<40), "")
	f.Add(uint64(12), "1.4.0", proto.TargetAgent, "rev-x", int64(0), int64(-1), uint64(0), "riscv")
	f.Fuzz(func(t *testing.T, counter uint64, version, target, hw string, created, expires int64, size uint64, arch string) {
		m := base
		m.Counter, m.Version, m.Target, m.Created, m.Expires, m.Size = counter, version, target, created, expires, size
		m.Hardware, m.Arch = []string{hw}, []string{arch}
		signed, err := proto.SignManifest(prototest.ReleaseKey, m)
		if err != nil {
			return // not a manifest a release key can sign
		}
		r := newHostileRig(t)
		before := r.u.AgentCounter()
		err = r.u.Offer(hostileCmd("c-fuzz", signed, r.keys, "/nowhere"))
		if err != nil && proto.CheckOf(err) == "" {
			t.Fatalf("refused without naming a check: %v", err)
		}
		r.stop()
		if c := r.u.AgentCounter(); c != before {
			t.Fatalf("counter moved from %d to %d with nothing installed", before, c)
		}
		if fl := r.u.floor(); fl.After(r.clk.Now().Add(time.Second)) {
			t.Fatalf("time floor %v ahead of the clock %v", fl, r.clk.Now())
		}
		if installs, activates, commits, _, _ := r.inst.calls(); len(installs)+activates+commits != 0 {
			t.Fatalf("%d installs, %d activations, %d commits of an artifact that was never served", len(installs), activates, commits)
		}
	})
}
