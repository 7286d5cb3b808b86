package update

import (
	"crypto/ed25519"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// An agent upgraded over one that kept a single counter for every target
// keeps what was spent, for each target it installs, and forgets the
// highest counter only offered.
func TestStateUpgradeFromSharedCounters(t *testing.T) {
	fsys := newMemFS()
	legacy := `{"highest_seen":40,"highest_sha":"AQID","spent":15,"time_floor":0,"installed":{"agent":{"version":"1.4.0","counter":14,"sha256":"AQID"}}}`
	store := &crashStore{fs: fsys, files: map[string][]byte{stateFile: []byte(legacy)}}
	u, err := New(Options{
		Roots: []ed25519.PublicKey{prototest.RootKey.Public().(ed25519.PublicKey)}, Store: store, Dir: t.TempDir(),
		Clock:      clock.NewFake(time.UnixMilli(prototest.Base)),
		Installers: map[string]Installer{proto.TargetAgent: &Hook{Path: "/bin/false"}, "fc-firmware": &Hook{Path: "/bin/false"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{proto.TargetAgent, "fc-firmware"} {
		if c := u.st.target(target); c.Spent != 15 {
			t.Errorf("%s: spent %d after the upgrade, want 15", target, c.Spent)
		}
	}
	if c := u.st.target(proto.TargetAgent); c.Seen != 40 {
		t.Errorf("agent: seen %d, want 40 (kept against another artifact under that counter)", c.Seen)
	}
	if err := u.counterLocked(proto.Manifest{Target: proto.TargetAgent, Counter: 15}); proto.CheckOf(err) != proto.CheckCounter {
		t.Errorf("a spent counter after the upgrade: %v", err)
	}
	if err := u.counterLocked(proto.Manifest{Target: proto.TargetAgent, Counter: 20, SHA256: []byte{9}}); err != nil {
		t.Errorf("a counter only offered before the upgrade blocks a lower one: %v", err)
	}
	if u.st.LegacySpent != 0 || u.st.LegacyHighestSeen != 0 {
		t.Errorf("legacy counters kept: %+v", u.st)
	}
}
