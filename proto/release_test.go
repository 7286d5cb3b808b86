package proto_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

var (
	roots = []ed25519.PublicKey{prototest.RootKey.Public().(ed25519.PublicKey)}
	now   = time.UnixMilli(prototest.Base).Add(time.Hour)
)

func signedFixtures(t testing.TB) (keys, manifest []byte) {
	keys, err := proto.SignKeyList(prototest.RootKey, prototest.KeyList())
	if err != nil {
		t.Fatal(err)
	}
	manifest, err = proto.SignManifest(prototest.ReleaseKey, prototest.Manifest([]byte("artifact")))
	if err != nil {
		t.Fatal(err)
	}
	return keys, manifest
}

func TestSignedGolden(t *testing.T) {
	keys, manifest := signedFixtures(t)
	for name, got := range map[string][]byte{"keylist_signed": keys, "manifest_signed": manifest} {
		path := filepath.Join("testdata", "golden", name+".hex")
		if *update {
			os.WriteFile(path, []byte(hex.EncodeToString(got)+"\n"), 0o644)
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := hex.DecodeString(strings.TrimSpace(string(raw)))
		if !bytes.Equal(got, want) {
			t.Errorf("%s changed:\n got %x\nwant %x", name, got, want)
		}
	}
	// The committed bytes verify and decode to the fixtures.
	raw, _ := os.ReadFile(filepath.Join("testdata", "golden", "keylist_signed.hex"))
	kb, _ := hex.DecodeString(strings.TrimSpace(string(raw)))
	kl, err := proto.OpenKeyList(kb, roots)
	if err != nil || kl.Version != 1 || len(kl.Keys) != 1 {
		t.Fatalf("golden key list: %+v %v", kl, err)
	}
	raw, _ = os.ReadFile(filepath.Join("testdata", "golden", "manifest_signed.hex"))
	mb, _ := hex.DecodeString(strings.TrimSpace(string(raw)))
	m, err := proto.OpenManifest(mb, kl, now)
	if err != nil || m.Version != "1.5.0" || m.Counter != 13 {
		t.Fatalf("golden manifest: %+v %v", m, err)
	}
}

func TestOpenRefusals(t *testing.T) {
	keys, manifest := signedFixtures(t)
	kl, err := proto.OpenKeyList(keys, roots)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := proto.OpenManifest(manifest, kl, now); err != nil {
		t.Fatalf("good manifest: %v", err)
	}
	otherPub := prototest.OtherKey.Public().(ed25519.PublicKey)
	releasePub := prototest.ReleaseKey.Public().(ed25519.PublicKey)
	sign := func(key ed25519.PrivateKey, edit func(*proto.Manifest)) []byte {
		m := prototest.Manifest([]byte("artifact"))
		if edit != nil {
			edit(&m)
		}
		b, err := proto.SignManifest(key, m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tampered := bytes.Clone(manifest)
	tampered[len(tampered)-40] ^= 1 // inside the payload
	badSig := bytes.Clone(manifest)
	badSig[len(badSig)-1] ^= 1 // inside the signature
	revoked := kl
	revoked.Revoked = []string{proto.KeyID(releasePub)}
	expiredKey := prototest.KeyList()
	expiredKey.Keys[0].Expires = now.Unix() - 1
	targetLimited := prototest.KeyList()
	targetLimited.Keys[0].Targets = []string{"fc-firmware"}
	cases := []struct {
		name     string
		manifest []byte
		keys     proto.KeyList
		check    proto.Check
	}{
		{"payload altered", tampered, kl, proto.CheckSignature},
		{"signature altered", badSig, kl, proto.CheckSignature},
		{"unknown key", sign(prototest.OtherKey, nil), kl, proto.CheckKey},
		{"root key signs a manifest", sign(prototest.RootKey, nil), kl, proto.CheckKey},
		{"revoked key", manifest, revoked, proto.CheckRevoked},
		{"expired key", manifest, expiredKey, proto.CheckKeyExpiry},
		{"key not allowed for target", manifest, targetLimited, proto.CheckKey},
		{"expired manifest", sign(prototest.ReleaseKey, func(m *proto.Manifest) { m.Expires = now.Unix() - 1; m.Created = m.Expires - 10 }), kl, proto.CheckExpired},
		{"too large", bytes.Repeat([]byte{0}, proto.MaxManifestSize+1), kl, proto.CheckSize},
		{"not COSE", []byte("hello"), kl, proto.CheckFormat},
		{"key list as manifest", keys, kl, proto.CheckKey},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := proto.OpenManifest(c.manifest, c.keys, now)
			if got := proto.CheckOf(err); got != c.check {
				t.Fatalf("check %q (%v), want %q", got, err, c.check)
			}
		})
	}
	// Key lists: only a trusted root may sign them, and their version only
	// goes up.
	foreign, _ := proto.SignKeyList(prototest.OtherKey, prototest.KeyList())
	if _, err := proto.OpenKeyList(foreign, roots); proto.CheckOf(err) != proto.CheckRoot {
		t.Fatalf("key list signed by another key: %v", err)
	}
	if _, err := proto.OpenKeyList(manifest, roots); err == nil {
		t.Fatal("a manifest opened as a key list")
	}
	// A list signed by the root, but with the context of a manifest, would
	// be a cross-protocol signature: refused.
	older := kl
	held := kl
	held.Version = 2
	if err := older.Check(&held, now); proto.CheckOf(err) != proto.CheckKeyList {
		t.Fatalf("older key list: %v", err)
	}
	if err := kl.Check(nil, time.Unix(kl.Expires, 0)); proto.CheckOf(err) != proto.CheckKeyList {
		t.Fatalf("expired key list: %v", err)
	}
	bad := prototest.KeyList()
	bad.Keys[0].ID = proto.KeyID(otherPub)
	if _, err := proto.SignKeyList(prototest.RootKey, bad); err == nil {
		t.Fatal("signed a key list whose id does not match its key")
	}
}

func TestManifestValidate(t *testing.T) {
	for name, edit := range map[string]func(*proto.Manifest){
		"bad version":   func(m *proto.Manifest) { m.Version = "v1" },
		"zero counter":  func(m *proto.Manifest) { m.Counter = 0 },
		"no hardware":   func(m *proto.Manifest) { m.Hardware = nil },
		"short digest":  func(m *proto.Manifest) { m.SHA256 = m.SHA256[:8] },
		"agent no arch": func(m *proto.Manifest) { m.Arch = nil },
		"bad target":    func(m *proto.Manifest) { m.Target = "a/b" },
		"bad expiry":    func(m *proto.Manifest) { m.Expires = m.Created },
	} {
		m := prototest.Manifest([]byte("x"))
		edit(&m)
		if err := m.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if _, err := proto.SignManifest(prototest.ReleaseKey, m); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
}

func FuzzOpenManifest(f *testing.F) {
	keys, manifest := signedFixtures(f)
	f.Add(manifest)
	f.Add(keys)
	kl, _ := proto.OpenKeyList(keys, roots)
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := proto.OpenManifest(data, kl, now)
		if err == nil {
			// Anything that verifies must be well formed.
			if verr := m.Validate(); verr != nil {
				t.Fatalf("verified an invalid manifest: %v", verr)
			}
		} else if proto.CheckOf(err) == "" {
			t.Fatalf("refusal without a check: %v", err)
		}
		_, _ = proto.DecodeManifestUnverified(data)
		_, _ = proto.OpenKeyList(data, roots)
	})
}

var _ = errors.New

// TestDeltaManifest: a delta manifest signs and opens with its patch and
// base, and names what a device downloads; malformed delta fields are
// refused at signing.
func TestDeltaManifest(t *testing.T) {
	base, patch, result := []byte("old build"), []byte(proto.DeltaMagic+"a patch of at least a header's length"), []byte("new build")
	m := prototest.DeltaManifest(base, patch, result)
	signed, err := proto.SignManifest(prototest.ReleaseKey, m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := proto.OpenManifest(signed, prototest.KeyList(), time.UnixMilli(prototest.Base))
	if err != nil {
		t.Fatal(err)
	}
	if got.Delta == nil || got.ArtifactSize() != uint64(len(patch)) || !bytes.Equal(got.ArtifactSHA256(), m.Delta.PatchSHA256) || got.Size != uint64(len(result)) {
		t.Fatalf("opened %+v (delta %+v)", got, got.Delta)
	}
	full := prototest.Manifest(result)
	if full.ArtifactSize() != full.Size || !bytes.Equal(full.ArtifactSHA256(), full.SHA256) {
		t.Fatal("a full manifest's artifact is not its build")
	}
	for name, edit := range map[string]func(d *proto.Delta){
		"short base digest":  func(d *proto.Delta) { d.BaseSHA256 = d.BaseSHA256[:31] },
		"no patch digest":    func(d *proto.Delta) { d.PatchSHA256 = nil },
		"empty base":         func(d *proto.Delta) { d.BaseSize = 0 },
		"patch under header": func(d *proto.Delta) { d.PatchSize = proto.DeltaHeaderSize - 1 },
		"base is result":     func(d *proto.Delta) { d.BaseSHA256 = m.SHA256 },
		"bad base version":   func(d *proto.Delta) { d.BaseVersion = "latest" },
	} {
		bad := prototest.DeltaManifest(base, patch, result)
		edit(bad.Delta)
		if _, err := proto.SignManifest(prototest.ReleaseKey, bad); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
}
