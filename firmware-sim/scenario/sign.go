package scenario

import (
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// The scenario runner signs its releases offline, as a release engineer
// does with hangar release keys and hangar release sign.

func readPrivateKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return proto.ParsePrivateKey(b)
}

// signKeyList writes the key list, signed by the root key, that lists the
// release key (valid for a year).
func signKeyList(rootKey, releasePub, out string) error {
	root, err := readPrivateKey(rootKey)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(releasePub)
	if err != nil {
		return err
	}
	pub, err := proto.ParsePublicKey(b)
	if err != nil {
		return err
	}
	now := time.Now()
	kl := proto.KeyList{Version: uint64(now.Unix()), Created: now.Unix(), Expires: now.Add(365 * 24 * time.Hour).Unix(),
		Keys: []proto.ReleaseKey{{ID: proto.KeyID(pub), Public: pub, Expires: now.Add(365 * 24 * time.Hour).Unix()}}}
	signed, err := proto.SignKeyList(root, kl)
	if err != nil {
		return err
	}
	return os.WriteFile(out, signed, 0o644)
}

// signManifest signs m for the artifact (its size and digest filled in;
// unless m says when, created now and expiring in 90 days).
func signManifest(releaseKey, artifact string, m proto.Manifest) ([]byte, error) {
	priv, err := readPrivateKey(releaseKey)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(artifact)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return nil, fmt.Errorf("digest %s: %w", artifact, err)
	}
	now := time.Now()
	m.Size, m.SHA256 = uint64(n), h.Sum(nil)
	if m.Created == 0 {
		m.Created, m.Expires = now.Unix(), now.Add(90*24*time.Hour).Unix()
	}
	if m.Counter == 0 {
		m.Counter = uint64(now.Unix())
	}
	return proto.SignManifest(priv, m)
}
