package update

// Attacks of a malicious release server (the threats of TUF and Uptane:
// arbitrary software, rollback, freeze, endless data, mix-and-match, wrong
// hardware...). Each must be refused before anything is installed: the
// Binary installer is never called and the installed binary is unchanged
// byte for byte; the refusal is reported with the check that refused it.

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
	"github.com/veraison/go-cose"
)

var hostileReleaseID = proto.KeyID(prototest.ReleaseKey.Public().(ed25519.PublicKey))

// hostileRotatedKeys is key list 2: ReleaseKey revoked, OtherKey listed.
func hostileRotatedKeys(t *testing.T) []byte {
	otherPub := prototest.OtherKey.Public().(ed25519.PublicKey)
	v2 := prototest.KeyList()
	v2.Version = 2
	v2.Keys = []proto.ReleaseKey{{ID: proto.KeyID(otherPub), Public: otherPub, Expires: prototest.Base/1000 + 365*86400}}
	v2.Revoked = []string{hostileReleaseID}
	return hostileSignKeys(t, prototest.RootKey, v2)
}

// installGood runs a legitimate release through the hostile server (honest
// for its path unless the test routed it already) to commit, and makes it
// the reference of assertNotInstalled.
func (r *hostileRig) installGood(cmd string, rel hostileRelease, keys []byte) {
	r.t.Helper()
	r.srv.mu.Lock()
	_, routed := r.srv.routes[rel.path]
	r.srv.mu.Unlock()
	if !routed {
		r.srv.route(rel.path, hostileHonest(rel.data))
	}
	if err := r.offer(cmd, rel, keys); err != nil {
		r.t.Fatalf("good release refused: %v", err)
	}
	r.rep.waitState(r.t, cmd, proto.UpdateTrial)
	installs, _, _, _, execs := r.inst.calls()
	if len(installs) != 1 || !bytes.Equal(installs[0], rel.data) {
		r.t.Fatalf("Install called %d times, want once with the release's %d bytes", len(installs), len(rel.data))
	}
	if got, _ := os.ReadFile(r.binPath); !bytes.Equal(got, rel.data) {
		r.t.Fatalf("the binary is not the new release after Install (%d bytes)", len(got))
	}
	if !slices.Equal(execs, []string{r.binPath}) {
		r.t.Fatalf("execs = %v, want one of %s", execs, r.binPath)
	}
	// The new build stays up, healthy, for the soak; the control plane
	// confirms hearing from it.
	soak := r.opts.TrialSoak
	if soak == 0 {
		soak = DefaultTrialSoak
	}
	r.clk.Advance(soak)
	r.u.Confirm(rel.m.Counter)
	r.rep.waitState(r.t, cmd, proto.UpdateCommitted)
	if c := r.u.AgentCounter(); c != rel.m.Counter {
		r.t.Fatalf("AgentCounter = %d after commit, want %d", c, rel.m.Counter)
	}
	r.rebase(rel.m.Counter)
}

// The positive control: through the same server and harness, a good
// release installs, with the right bytes, and commits.
func TestHostileControlGoodReleaseInstalls(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 256<<10))
	r.installGood("c-good", rel, r.keys)
	_, _, prev := siblings(r.binPath)
	if _, err := os.Stat(prev); err == nil {
		t.Errorf("the previous binary is still kept after commit")
	}
	if hits := r.srv.hitsOf(rel.path); hits != 1 {
		t.Errorf("%d downloads of the artifact, want 1", hits)
	}
}

// The download resumes (HTTP Range) from a server that drops every
// response after 16 KiB, and installs the right bytes: truncation alone is
// not fatal, and the resumed file is still checked whole.
func TestHostileControlResumesAfterCuts(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 100<<10))
	r.srv.route(rel.path, hostileChunks(rel.data, 16<<10))
	r.installGood("c-resume", rel, r.keys)
	if hits := r.srv.hitsOf(rel.path); hits != 7 {
		t.Errorf("%d requests, want 7 (100 KiB in 16 KiB pieces)", hits)
	}
	r.srv.mu.Lock()
	ranges := r.srv.ranges[rel.path]
	r.srv.mu.Unlock()
	if len(ranges) < 2 || ranges[0] != "" || ranges[1] != "bytes=16384-" {
		t.Errorf("Range headers %q, want none first and then bytes=16384-", ranges)
	}
}

// COSE external data (context strings) of proto's signed documents.
const (
	hostileManifestContext = "hangar release manifest v1"
	hostileKeyListContext  = "hangar release keys v1"
)

// hostileCoseSign1 builds a signed document by hand: doc's CBOR as
// payload, the key id header kid, signed by priv with context. It lets a
// test lie about the key id.
func hostileCoseSign1(t *testing.T, priv ed25519.PrivateKey, kid, context string, doc any) []byte {
	t.Helper()
	payload, err := proto.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, priv)
	if err != nil {
		t.Fatal(err)
	}
	msg := cose.NewSign1Message()
	msg.Headers.Protected.SetAlgorithm(cose.AlgorithmEdDSA)
	msg.Headers.Protected[cose.HeaderLabelKeyID] = []byte(kid)
	msg.Payload = payload
	if err := msg.Sign(nil, []byte(context), signer); err != nil {
		t.Fatal(err)
	}
	b, err := msg.MarshalCBOR()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The hand-built documents are accepted when they do not lie: the
// forgeries below are refused for their signature, not for their
// construction.
func TestHostileCoseSign1Control(t *testing.T) {
	rootPub := prototest.RootKey.Public().(ed25519.PublicKey)
	kl := prototest.KeyList()
	keys := hostileCoseSign1(t, prototest.RootKey, proto.KeyID(rootPub), hostileKeyListContext, &kl)
	got, err := proto.OpenKeyList(keys, []ed25519.PublicKey{rootPub})
	if err != nil {
		t.Fatalf("hand-built key list refused: %v", err)
	}
	m := prototest.Manifest([]byte("x"))
	signed := hostileCoseSign1(t, prototest.ReleaseKey, hostileReleaseID, hostileManifestContext, &m)
	if _, err := proto.OpenManifest(signed, got, hostileNow); err != nil {
		t.Fatalf("hand-built manifest refused: %v", err)
	}
}

// Offers refused at Offer, before anything is downloaded or written.
func TestHostileOfferRefused(t *testing.T) {
	data := hostilePayload(0x13, 64<<10)
	base := prototest.Base / 1000
	good := func(t *testing.T, mods ...func(*proto.Manifest)) []byte {
		return newHostileRelease(t, 13, "1.5.0", data, mods...).signed
	}
	keysWith := func(t *testing.T, signer ed25519.PrivateKey, mod func(*proto.KeyList)) []byte {
		kl := prototest.KeyList()
		mod(&kl)
		return hostileSignKeys(t, signer, kl)
	}
	otherPub := prototest.OtherKey.Public().(ed25519.PublicKey)

	tests := []struct {
		name  string
		check proto.Check
		clock time.Time // the device's clock; zero: hostileNow
		offer func(t *testing.T) (manifest, keys []byte)
	}{
		{"bad signature: a manifest byte flipped (the digest)", proto.CheckSignature, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			rel := newHostileRelease(t, 13, "1.5.0", data)
			signed := bytes.Clone(rel.signed)
			i := bytes.Index(signed, rel.m.SHA256)
			if i < 0 {
				t.Fatal("digest not found in the signed manifest")
			}
			signed[i] ^= 0x01
			return signed, hostileKeys(t)
		}},
		{"bad signature: a signature byte flipped", proto.CheckSignature, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			signed := bytes.Clone(good(t))
			signed[len(signed)-1] ^= 0x80
			return signed, hostileKeys(t)
		}},
		{"unknown key: signed by a key not in the list", proto.CheckKey, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return hostileSignManifest(t, prototest.OtherKey, prototest.Manifest(data)), hostileKeys(t)
		}},
		{"unknown key: the root key signs a manifest", proto.CheckKey, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return hostileSignManifest(t, prototest.RootKey, prototest.Manifest(data)), hostileKeys(t)
		}},
		{"forged key id: a trusted key's id over another key's signature", proto.CheckSignature, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			m := prototest.Manifest(data)
			return hostileCoseSign1(t, prototest.OtherKey, hostileReleaseID, hostileManifestContext, &m), hostileKeys(t)
		}},
		{"forged key id: a manifest signed as a key list (wrong context)", proto.CheckSignature, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			m := prototest.Manifest(data)
			return hostileCoseSign1(t, prototest.ReleaseKey, hostileReleaseID, hostileKeyListContext, &m), hostileKeys(t)
		}},
		{"expired release key", proto.CheckKeyExpiry, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), keysWith(t, prototest.RootKey, func(k *proto.KeyList) { k.Keys[0].Expires = base + 60 })
		}},
		{"revoked release key", proto.CheckRevoked, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), keysWith(t, prototest.RootKey, func(k *proto.KeyList) { k.Version, k.Revoked = 2, []string{hostileReleaseID} })
		}},
		{"release key not allowed for the target", proto.CheckKey, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), keysWith(t, prototest.RootKey, func(k *proto.KeyList) { k.Keys[0].Targets = []string{"fc-firmware"} })
		}},
		{"key list not chained to the root: signed by another key", proto.CheckRoot, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), keysWith(t, prototest.OtherKey, func(*proto.KeyList) {})
		}},
		{"key list not chained to the root: the release key lists itself", proto.CheckRoot, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), keysWith(t, prototest.ReleaseKey, func(*proto.KeyList) {})
		}},
		{"key list not chained to the root: the attacker lists its own key", proto.CheckRoot, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			kl := keysWith(t, prototest.OtherKey, func(k *proto.KeyList) {
				k.Keys = []proto.ReleaseKey{{ID: proto.KeyID(otherPub), Public: otherPub, Expires: base + 86400}}
			})
			return hostileSignManifest(t, prototest.OtherKey, prototest.Manifest(data)), kl
		}},
		{"key list not chained to the root: the root's key id over another key's signature", proto.CheckRoot, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			kl := prototest.KeyList()
			kl.Keys = []proto.ReleaseKey{{ID: proto.KeyID(otherPub), Public: otherPub, Expires: base + 86400}}
			rootID := proto.KeyID(prototest.RootKey.Public().(ed25519.PublicKey))
			return hostileSignManifest(t, prototest.OtherKey, prototest.Manifest(data)), hostileCoseSign1(t, prototest.OtherKey, rootID, hostileKeyListContext, &kl)
		}},
		{"no key list offered or held", proto.CheckKeyList, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), nil
		}},
		{"freeze: expired key list", proto.CheckKeyList, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t), keysWith(t, prototest.RootKey, func(k *proto.KeyList) {
				k.Created, k.Expires = base-400*86400, base-35*86400
			})
		}},
		{"freeze: the server keeps serving an expired manifest", proto.CheckExpired, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t, func(m *proto.Manifest) { m.Created, m.Expires = base-40*86400, base-10*86400 }), hostileKeys(t)
		}},
		{"freeze: manifest expires the second the device reads", proto.CheckExpired, time.Unix(base+30*86400, 0), func(t *testing.T) ([]byte, []byte) {
			return good(t), hostileKeys(t)
		}},
		{"device clock at 1970", proto.CheckClock, time.Unix(0, 0), func(t *testing.T) ([]byte, []byte) {
			return good(t), hostileKeys(t)
		}},
		{"device clock before the build time", proto.CheckClock, hostileBuild.Add(-time.Second), func(t *testing.T) ([]byte, []byte) {
			return good(t), hostileKeys(t)
		}},
		{"wrong hardware", proto.CheckHardware, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t, func(m *proto.Manifest) { m.Hardware = []string{"rev-a", "rev-c"} }), hostileKeys(t)
		}},
		{"wrong architecture", proto.CheckHardware, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t, func(m *proto.Manifest) { m.Arch = []string{"amd64", "riscv64"} }), hostileKeys(t)
		}},
		{"target this device has no installer for", proto.CheckTarget, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t, func(m *proto.Manifest) { m.Target, m.Arch = "fc-firmware", nil }), hostileKeys(t)
		}},
		{"manifest over the size cap", proto.CheckSize, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return append(bytes.Clone(good(t)), make([]byte, proto.MaxManifestSize)...), hostileKeys(t)
		}},
		{"artifact declared over the size cap", proto.CheckSize, time.Time{}, func(t *testing.T) ([]byte, []byte) {
			return good(t, func(m *proto.Manifest) { m.Size = DefaultMaxArtifact + 1 }), hostileKeys(t)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newHostileRig(t)
			if !tc.clock.IsZero() {
				r.clk.Set(tc.clock)
			}
			manifest, keys := tc.offer(t)
			r.srv.route("/artifact/x", hostileHonest(data))
			before := r.stateFile()
			cmd := "c-" + tc.name
			err := r.u.Offer(hostileCmd(cmd, manifest, keys, "/artifact/x"))
			if got := proto.CheckOf(err); got != tc.check {
				t.Errorf("Offer: check %q (%v), want %q", got, err, tc.check)
			}
			r.assertRejected(cmd, tc.check)
			r.assertAddressed(cmd, manifest)
			r.assertNotInstalled(cmd, proto.UpdateOffered, proto.UpdateDownloading, proto.UpdateVerified, proto.UpdateInstalling)
			if n := r.srv.totalHits(); n != 0 {
				t.Errorf("%d requests to the release server after a refused offer", n)
			}
			if files := r.stagedFiles(); len(files) != 0 {
				t.Errorf("staging holds %v after a refused offer", files)
			}
			// A refused offer may leave only a newer verified key list
			// (rotations and revocations hold whatever the manifest).
			if after := r.stateFile(); !bytes.Equal(before, after) && !onlyKeyListChanged(t, before, after) {
				t.Errorf("update state written by a refused offer: %s", after)
			}
			if j := r.u.job(); j != nil {
				t.Errorf("a job was started: %+v", j)
			}
		})
	}
}

// Rollback: with 13 installed, 12 is refused, and so is another build
// under the same counter 13 (two signed releases cannot share a counter);
// after an agent restart the persisted counters still refuse them.
func TestHostileRollbackRefused(t *testing.T) {
	r := newHostileRig(t)
	r.installGood("c-13", newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10)), r.keys)

	older := newHostileRelease(t, 12, "1.4.9", hostilePayload(0x12, 64<<10))
	twin := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x66, 64<<10))
	twin.path = "/artifact/13-twin"
	r.srv.route(older.path, hostileHonest(older.data))
	r.srv.route(twin.path, hostileHonest(twin.data))
	attempt := func(cmd string, rel hostileRelease) {
		t.Helper()
		if err := r.offer(cmd, rel, r.keys); proto.CheckOf(err) != proto.CheckCounter {
			t.Errorf("%s: Offer = %v, want a %q refusal", cmd, err, proto.CheckCounter)
		}
		r.assertRejected(cmd, proto.CheckCounter)
		r.assertNotInstalled(cmd, proto.UpdateOffered, proto.UpdateDownloading, proto.UpdateVerified, proto.UpdateInstalling)
	}
	attempt("c-12", older)
	attempt("c-13-twin", twin)

	r.restart("1.5.0")
	attempt("c-12-after-restart", older)
	attempt("c-13-twin-after-restart", twin)
	if n := r.srv.hitsOf(older.path) + r.srv.hitsOf(twin.path); n != 0 {
		t.Errorf("%d downloads of refused releases", n)
	}
}

// A leaked release key cannot freeze a device. With it an attacker (who
// also holds the control plane) offers the last counter there is, a
// manifest created 50 years ahead, and a release far ahead that never
// installs; the first two are refused, the third waits. Then the key is
// revoked by a new key list that comes with the fix, signed by the new
// key under a lower counter: the pending release of the leaked key is
// dropped, the fix installs, and a restart changes nothing.
func TestHostileLeakedKeyCannotFreeze(t *testing.T) {
	r, lock := newLockedRig(t)
	now := r.clk.Now().Unix()

	maxed := newHostileRelease(t, math.MaxUint64, "9.9.9", hostilePayload(0x99, 16<<10))
	r.srv.route(maxed.path, hostileHonest(maxed.data))
	if err := r.offer("c-max", maxed, r.keys); proto.CheckOf(err) != proto.CheckCounter {
		t.Errorf("counter 2^64-1: Offer = %v, want a %q refusal", err, proto.CheckCounter)
	}
	r.assertRejected("c-max", proto.CheckCounter)

	future := newHostileRelease(t, 30, "3.0.0", hostilePayload(0x30, 16<<10), func(m *proto.Manifest) {
		m.Created, m.Expires = now+50*365*86400, now+51*365*86400
	})
	r.srv.route(future.path, hostileHonest(future.data))
	if err := r.offer("c-future", future, r.keys); proto.CheckOf(err) != proto.CheckCreated {
		t.Errorf("created 50 years ahead: Offer = %v, want a %q refusal", err, proto.CheckCreated)
	}
	r.assertRejected("c-future", proto.CheckCreated)

	ahead := newHostileRelease(t, 1<<39, "8.0.0", hostilePayload(0x80, 16<<10))
	r.srv.route(ahead.path, hostileHonest(ahead.data))
	if err := r.offer("c-ahead", ahead, r.keys); err != nil {
		t.Fatalf("a release far ahead, validly signed: %v", err)
	}
	r.rep.waitState(t, "c-ahead", proto.UpdateDeferred) // downloaded, held by the maintenance lock

	// The revocation, with the fix.
	keysV2 := hostileRotatedKeys(t)
	fix := newHostileRelease(t, 20, "2.0.0", hostilePayload(0x20, 16<<10))
	fix.signed = hostileSignManifest(t, prototest.OtherKey, fix.m)
	r.srv.route(fix.path, hostileHonest(fix.data))
	if err := r.offer("c-fix", fix, keysV2); err != nil {
		t.Fatalf("the fix is refused: %v", err)
	}
	r.assertRejected("c-ahead", proto.CheckRevoked)
	r.assertNotInstalled("c-ahead", proto.UpdateInstalling)
	if err := os.Remove(lock); err != nil {
		t.Fatal(err)
	}
	r.installGood("c-fix", fix, keysV2)
	r.restart("2.0.0")
	if c := r.u.AgentCounter(); c != 20 {
		t.Fatalf("after a restart the agent's counter is %d", c)
	}
	// And the time floor did not move ahead of the clock.
	if f := r.u.floor().Unix(); f > r.clk.Now().Unix() {
		t.Errorf("time floor %d is ahead of the clock %d", f, r.clk.Now().Unix())
	}
}

// Key list rollback: once key list 2 (which rotates the release key:
// ReleaseKey revoked, OtherKey listed) was accepted, key list 1 (which
// still trusts ReleaseKey) is refused, with or without a restart, and the
// held list keeps refusing the revoked key.
func TestHostileKeyListRollbackRefused(t *testing.T) {
	r := newHostileRig(t)
	keysV2 := hostileRotatedKeys(t)

	rotated := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	rotated.signed = hostileSignManifest(t, prototest.OtherKey, rotated.m)
	r.installGood("c-13-v2", rotated, keysV2)

	// A release signed by the revoked key, with the old list that trusts it.
	old := newHostileRelease(t, 14, "1.6.0", hostilePayload(0x14, 64<<10))
	r.srv.route(old.path, hostileHonest(old.data))
	for _, a := range []struct {
		cmd   string
		keys  []byte
		check proto.Check
	}{
		{"c-14-v1", r.keys, proto.CheckKeyList},
		{"c-14-held", nil, proto.CheckRevoked},
		{"c-14-v2", keysV2, proto.CheckRevoked},
		{"restart", nil, ""},
		{"c-14-v1-after-restart", r.keys, proto.CheckKeyList},
		{"c-14-held-after-restart", nil, proto.CheckRevoked},
	} {
		if a.cmd == "restart" {
			r.restart("1.5.0")
			continue
		}
		if err := r.offer(a.cmd, old, a.keys); proto.CheckOf(err) != a.check {
			t.Errorf("%s: Offer = %v, want a %q refusal", a.cmd, err, a.check)
		}
		r.assertRejected(a.cmd, a.check)
		r.assertNotInstalled(a.cmd, proto.UpdateOffered, proto.UpdateDownloading, proto.UpdateVerified, proto.UpdateInstalling)
	}
	if n := r.srv.hitsOf(old.path); n != 0 {
		t.Errorf("%d downloads of refused releases", n)
	}
}

// After a manifest created at T was accepted, a clock set back before T
// (a spoofed time source making an expired manifest look valid) is not
// trusted, across a restart: a manifest that expired before T is refused
// for good (it is expired whatever the clock says, as the time cannot be
// before T), and one still valid at T waits for a trustworthy clock.
func TestHostileClockSetBackBelowAcceptedMetadata(t *testing.T) {
	r := newHostileRig(t)
	base := prototest.Base / 1000
	r.clk.Set(time.Unix(base+10*86400, 0))
	newer := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10), func(m *proto.Manifest) { m.Created, m.Expires = base+9*86400, base+39*86400 })
	r.installGood("c-13", newer, r.keys)
	r.restart("1.5.0")
	// The clock steps back to a day when an old, since expired, manifest
	// was valid.
	r.clk.Set(time.Unix(base+2*86400, 0))
	stale := newHostileRelease(t, 14, "1.6.0", hostilePayload(0x14, 64<<10), func(m *proto.Manifest) { m.Created, m.Expires = base+86400, base+3*86400 })
	r.srv.route(stale.path, hostileHonest(stale.data))
	if err := r.offer("c-14-stale", stale, r.keys); proto.CheckOf(err) != proto.CheckExpired {
		t.Errorf("Offer = %v, want an %q refusal", err, proto.CheckExpired)
	}
	r.assertRejected("c-14-stale", proto.CheckExpired)
	r.assertNotInstalled("c-14-stale", proto.UpdateOffered, proto.UpdateDownloading, proto.UpdateVerified, proto.UpdateInstalling, proto.UpdateDeferred)
	// Valid at T, and also at the (untrusted) clock's reading: it waits.
	early := newHostileRelease(t, 15, "1.7.0", hostilePayload(0x15, 64<<10), func(m *proto.Manifest) { m.Created, m.Expires = base+86400, base+30*86400 })
	r.srv.route(early.path, hostileHonest(early.data))
	if err := r.offer("c-15-early", early, r.keys); proto.CheckOf(err) != proto.CheckClock {
		t.Errorf("Offer = %v, want a %q deferral", err, proto.CheckClock)
	}
	r.assertRejected("c-15-early", proto.CheckClock)
	r.assertNotInstalled("c-15-early", proto.UpdateOffered, proto.UpdateDownloading, proto.UpdateVerified, proto.UpdateInstalling, proto.UpdateRejected)
	if n := r.srv.hitsOf(stale.path) + r.srv.hitsOf(early.path); n != 0 {
		t.Errorf("%d downloads while the clock reads before the accepted metadata", n)
	}
}

// downloadRefused offers rel (signed, valid) while the server serves what
// handler sends, and checks that the download is refused by check with
// nothing installed.
func hostileDownloadRefused(t *testing.T, r *hostileRig, cmd string, rel hostileRelease, check proto.Check) {
	t.Helper()
	if err := r.offer(cmd, rel, r.keys); err != nil {
		t.Fatalf("Offer: %v", err)
	}
	rep := r.rep.wait(t, "rejected or failed for "+cmd, func(s hostileReport) bool {
		return s.Cmd == cmd && (s.State == proto.UpdateRejected || s.State == proto.UpdateFailed)
	})
	if rep.State != proto.UpdateRejected || rep.Check != string(check) {
		t.Errorf("%s: reported %s, want rejected by %q", cmd, rep, check)
	}
	r.assertNotInstalled(cmd, proto.UpdateVerified, proto.UpdateInstalling)
	hostileWaitFor(t, "the job to end", func() bool { return r.u.job() == nil })
	for _, f := range r.stagedFiles() {
		if strings.HasSuffix(f, ".bin") {
			t.Errorf("%s: %s staged", cmd, f)
		}
	}
}

// Endless data: the server streams past the declared size forever. The
// agent stops at the declared size, refuses (size), and neither its memory
// nor what it let the server send grows with the stream.
func TestHostileEndlessData(t *testing.T) {
	r := newHostileRig(t)
	const declared = 1 << 20
	const offered = 256 << 20
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, declared))
	r.srv.route(rel.path, hostileEndless(rel.data, offered))

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	var peak uint64
	stop, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	hostileDownloadRefused(t, r, "c-endless", rel, proto.CheckSize)
	close(stop)
	<-sampled

	if growth := int64(peak) - int64(before.HeapAlloc); growth > 16<<20 {
		t.Errorf("heap grew by %d MiB while the server streamed endless data", growth>>20)
	}
	// What the server got to send is bounded by the declared size plus
	// the socket buffers, nowhere near what it offered.
	hostileWaitFor(t, "the server's handler to return", func() bool { return r.srv.active.Load() == 0 })
	if n := r.srv.hitsOf(rel.path); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
	if sent := r.srv.sent.Load(); sent > 64<<20 || sent < declared {
		t.Errorf("the server sent %d MiB of the %d MiB it offered; want at least the declared 1 MiB and at most 64 MiB", sent>>20, offered>>20)
	} else {
		t.Logf("declared %d KiB; the server sent %d KiB before the agent hung up; heap peak +%d KiB", declared>>10, sent>>10, (int64(peak)-int64(before.HeapAlloc))>>10)
	}
	if st, err := os.Stat(strings.TrimSuffix(r.u.stagedPath(rel.m), ".bin") + ".part"); err == nil && st.Size() > declared {
		t.Errorf("the partial file holds %d bytes, more than the declared %d", st.Size(), declared)
	}
}

// The artifact is one byte longer than declared.
func TestHostileExtraByte(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	r.srv.route(rel.path, hostileHonest(append(bytes.Clone(rel.data), 0x00)))
	hostileDownloadRefused(t, r, "c-extra", rel, proto.CheckSize)
}

// Same size, different bytes.
func TestHostileHashMismatch(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	evil := bytes.Clone(rel.data)
	evil[len(evil)/2] ^= 0x01
	r.srv.route(rel.path, hostileHonest(evil))
	hostileDownloadRefused(t, r, "c-hash", rel, proto.CheckHash)
}

// Mix-and-match: the manifest of release A with the artifact of release B
// (both genuinely signed releases).
func TestHostileMixAndMatch(t *testing.T) {
	t.Run("same size", func(t *testing.T) {
		r := newHostileRig(t)
		a := newHostileRelease(t, 13, "1.5.0", hostilePayload(0xA, 64<<10))
		b := newHostileRelease(t, 12, "1.4.9", hostilePayload(0xB, 64<<10))
		r.srv.route(a.path, hostileHonest(b.data))
		hostileDownloadRefused(t, r, "c-mix", a, proto.CheckHash)
	})
	t.Run("B is longer", func(t *testing.T) {
		r := newHostileRig(t)
		a := newHostileRelease(t, 13, "1.5.0", hostilePayload(0xA, 64<<10))
		b := newHostileRelease(t, 12, "1.4.9", hostilePayload(0xB, 80<<10))
		r.srv.route(a.path, hostileHonest(b.data))
		hostileDownloadRefused(t, r, "c-mix-long", a, proto.CheckSize)
	})
	t.Run("B is shorter", func(t *testing.T) {
		// The download ends early every time, and resuming fails (If-Range
		// does not match B's ETag, so the server sends B whole again):
		// the agent keeps retrying and never installs.
		r := newHostileRig(t)
		a := newHostileRelease(t, 13, "1.5.0", hostilePayload(0xA, 64<<10))
		b := newHostileRelease(t, 12, "1.4.9", hostilePayload(0xB, 48<<10))
		r.srv.route(a.path, hostileHonest(b.data))
		if err := r.offer("c-mix-short", a, r.keys); err != nil {
			t.Fatal(err)
		}
		// It gives up after 20 attempts without progress (or keeps trying).
		hostileWaitFor(t, "20 download attempts", func() bool { return r.srv.hitsOf(a.path) >= 20 })
		hostileWaitFor(t, "the job to end or 30 attempts", func() bool { return r.u.job() == nil || r.srv.hitsOf(a.path) >= 30 })
		r.stop()
		r.assertNotInstalled("c-mix-short", proto.UpdateVerified, proto.UpdateInstalling)
	})
}

// The staged file is swapped after it was verified and before the
// install: the install re-verifies and refuses (hash), Install is never
// called.
func TestHostileStagedFileSwapped(t *testing.T) {
	for _, whileDown := range []bool{false, true} {
		name := "while running"
		if whileDown {
			name = "while the agent is down"
		}
		t.Run(name, func(t *testing.T) {
			r, lock := newLockedRig(t)
			rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
			r.srv.route(rel.path, hostileHonest(rel.data))
			if err := r.offer("c-swap", rel, r.keys); err != nil {
				t.Fatal(err)
			}
			r.rep.waitState(t, "c-swap", proto.UpdateVerified)
			r.rep.waitState(t, "c-swap", proto.UpdateDeferred)
			staged := r.u.stagedPath(rel.m)
			if got, err := os.ReadFile(staged); err != nil || !bytes.Equal(got, rel.data) {
				t.Fatalf("staged file: %d bytes, %v; want the verified artifact", len(got), err)
			}
			evil := hostilePayload(0x66, len(rel.data))
			if whileDown {
				r.stop()
			}
			if err := os.WriteFile(staged, evil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(lock); err != nil {
				t.Fatal(err)
			}
			if whileDown {
				r.restart(hostileOldVersion)
			} // else: the updater's tick sees the lock gone
			r.rep.waitState(t, "c-swap", proto.UpdateRejected)
			r.assertRejected("c-swap", proto.CheckHash)
			r.assertNotInstalled("c-swap")
			hostileWaitFor(t, "the job to end", func() bool { return r.u.job() == nil })
			if _, err := os.Stat(staged); err == nil {
				t.Errorf("the swapped staged file was kept")
			}
		})
	}
}

// A server that truncates every response at the same point and ignores
// Range: the agent never installs, never reports the release verified or
// committed; it retries (past the no-progress limit of 20 attempts).
func TestHostileTruncatedForever(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	r.srv.route(rel.path, hostileCut(rel.data, len(rel.data)/2))
	if err := r.offer("c-cut", rel, r.keys); err != nil {
		t.Fatal(err)
	}
	hostileWaitFor(t, "the job to end or 40 attempts", func() bool { return r.u.job() == nil || r.srv.hitsOf(rel.path) >= 40 })
	r.stop()
	r.assertNotInstalled("c-cut", proto.UpdateVerified, proto.UpdateInstalling, proto.UpdateRejected)
	if j := r.u.job(); j != nil {
		t.Logf("after %d attempts the job is still %q (the agent keeps retrying)", r.srv.hitsOf(rel.path), j.Phase)
		if j.Phase != phaseDownload {
			t.Errorf("job in phase %q, want %q", j.Phase, phaseDownload)
		}
	} else if _, ok := r.rep.find(func(s hostileReport) bool { return s.Cmd == "c-cut" && s.State == proto.UpdateFailed }); !ok {
		t.Errorf("the job ended without a failed report; reports:\n%s", r.rep.dump())
	}
	for _, f := range r.stagedFiles() {
		if strings.HasSuffix(f, ".bin") {
			t.Errorf("%s staged", f)
		}
	}
}

// A server that answers every request with headers and not one byte: after
// the no-progress limit the agent gives up and reports the job failed,
// having installed nothing.
func TestHostileTruncatedToNothing(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	r.srv.route(rel.path, hostileCut(rel.data, 0))
	if err := r.offer("c-empty", rel, r.keys); err != nil {
		t.Fatal(err)
	}
	rep := r.rep.waitState(t, "c-empty", proto.UpdateFailed)
	if !strings.Contains(rep.Reason, "no progress") {
		t.Errorf("failed with reason %q, want the no-progress limit", rep.Reason)
	}
	if n := r.srv.hitsOf(rel.path); n != 20 {
		t.Errorf("%d attempts, want the limit of 20", n)
	}
	r.assertNotInstalled("c-empty", proto.UpdateVerified, proto.UpdateInstalling)
	hostileWaitFor(t, "the job to end", func() bool { return r.u.job() == nil })
}

// onlyKeyListChanged reports whether two update states differ in their
// key list alone.
func onlyKeyListChanged(t *testing.T, before, after []byte) bool {
	t.Helper()
	var a, b state
	if len(before) > 0 {
		if err := json.Unmarshal(before, &a); err != nil {
			return false
		}
	}
	if err := json.Unmarshal(after, &b); err != nil {
		return false
	}
	a.KeyList, b.KeyList = nil, nil
	if a.Installed == nil {
		a.Installed = map[string]installed{}
	}
	if b.Installed == nil {
		b.Installed = map[string]installed{}
	}
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// A device whose clock reads 1970 after a power cut does not install, and
// does not count the release against it either: it defers, and once its
// clock is right again (NTP, GPS) it verifies the waiting offer from the
// start and installs.
func TestClockWaitThenInstall(t *testing.T) {
	var clk *readCountingClock
	r := newHostileRig(t, func(o *Options) {
		clk = &readCountingClock{hostileClock: o.Clock.(*hostileClock)}
		o.Clock = clk
	})
	now := r.clk.Now()
	r.clk.Set(time.Unix(0, 0))
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	r.srv.route(rel.path, hostileHonest(rel.data))
	if err := r.offer("c-1970", rel, r.keys); proto.CheckOf(err) != proto.CheckClock {
		t.Fatalf("Offer at 1970 = %v, want a clock deferral", err)
	}
	r.assertRejected("c-1970", proto.CheckClock) // reported deferred, check clock
	// Ten passes of the updater's loop, each asking the clock whether it
	// can be trusted yet: still waiting.
	reads := clk.reads.Load()
	deadline := time.Now().Add(hostileWait)
	for clk.reads.Load() < reads+10 {
		if time.Now().After(deadline) {
			t.Fatalf("the updater read the clock %d times in %v, want 10", clk.reads.Load()-reads, hostileWait)
		}
		time.Sleep(time.Millisecond)
	}
	if n := r.srv.totalHits(); n != 0 {
		t.Fatalf("%d downloads while the clock is untrusted", n)
	}
	r.clk.Set(now)
	r.rep.waitState(t, "c-1970", proto.UpdateTrial)
	if installs, _, _, _, _ := r.inst.calls(); len(installs) != 1 {
		t.Fatalf("%d installs after the clock came right, want 1", len(installs))
	}
}

// readCountingClock counts reads of the time: the updater reads it once a
// pass of its loop while an offer waits for a trustworthy clock.
type readCountingClock struct {
	*hostileClock
	reads atomic.Int64
}

func (c *readCountingClock) Now() time.Time {
	c.reads.Add(1)
	return c.hostileClock.Now()
}
