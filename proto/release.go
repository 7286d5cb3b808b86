package proto

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/veraison/go-cose"
)

// Signed release metadata. Two key tiers, as in TUF: a root key (pinned on
// devices, kept offline) signs a KeyList naming the release keys; a release
// key (kept offline by the release engineer) signs a Manifest per release.
// Both are COSE_Sign1 (RFC 9052) with Ed25519 and a context string as
// external data, so that a signature over one kind of document is never
// valid for the other.

// Limits of signed documents: a device refuses anything bigger before
// decoding it.
const (
	MaxManifestSize = 16 << 10
	MaxKeyListSize  = 32 << 10
)

// TargetAgent names the agent itself as a manifest's target.
const TargetAgent = "agent"

const (
	manifestContext = "hangar release manifest v1"
	keyListContext  = "hangar release keys v1"
)

// Manifest describes one signed release.
type Manifest struct {
	Version  string   `cbor:"0,keyasint"`           // semantic version, e.g. 1.5.0
	Counter  uint64   `cbor:"1,keyasint"`           // monotonic release counter: devices only move up
	Target   string   `cbor:"2,keyasint"`           // TargetAgent, or a payload name (e.g. fc-firmware)
	Hardware []string `cbor:"3,keyasint"`           // hardware revisions it may run on
	Arch     []string `cbor:"4,keyasint,omitempty"` // GOARCH values (agent target)
	Size     uint64   `cbor:"5,keyasint"`           // bytes of the build installed (of the artifact, or of a delta's result)
	SHA256   []byte   `cbor:"6,keyasint"`           // digest of the build installed
	Delta    *Delta   `cbor:"7,keyasint,omitempty"` // the artifact is a patch that makes that build of a base
	Created  int64    `cbor:"8,keyasint"`           // unix seconds
	Expires  int64    `cbor:"9,keyasint"`           // unix seconds: devices refuse it after
	KeyID    string   `cbor:"10,keyasint"`          // release key that signs it
	Notes    string   `cbor:"11,keyasint,omitempty"`
}

// Delta says that a manifest's artifact is a BSDIFF40 patch: applied to
// the base (the build in place, named by its digest and size) it makes the
// build the manifest's Size and SHA256 name. A delta manifest is a release
// of its own, under the same counter, target, hardware and expiry as the
// full one: the device checks the patch, the base and the result against
// it, and may fetch the full artifact instead and check that against the
// same result digest.
type Delta struct {
	BaseSHA256  []byte `cbor:"0,keyasint"`
	BaseSize    uint64 `cbor:"1,keyasint"`
	PatchSHA256 []byte `cbor:"2,keyasint"`
	PatchSize   uint64 `cbor:"3,keyasint"`
	BaseVersion string `cbor:"4,keyasint,omitempty"` // for people; the digest is what counts
}

// ArtifactSize is what a device downloads for m: the patch of a delta, the
// build otherwise.
func (m *Manifest) ArtifactSize() uint64 {
	if m.Delta != nil {
		return m.Delta.PatchSize
	}
	return m.Size
}

// ArtifactSHA256 is the digest of what a device downloads for m.
func (m *Manifest) ArtifactSHA256() []byte {
	if m.Delta != nil {
		return m.Delta.PatchSHA256
	}
	return m.SHA256
}

// KeyList is the root-signed list of release keys.
type KeyList struct {
	Version uint64       `cbor:"0,keyasint"` // monotonic: devices refuse an older list
	Keys    []ReleaseKey `cbor:"1,keyasint"`
	Revoked []string     `cbor:"2,keyasint,omitempty"` // key ids no longer trusted, whatever their expiry
	Created int64        `cbor:"3,keyasint"`
	Expires int64        `cbor:"4,keyasint"` // unix seconds: the list itself expires
}

// ReleaseKey is one trusted release-signing key.
type ReleaseKey struct {
	ID      string   `cbor:"0,keyasint"`
	Public  []byte   `cbor:"1,keyasint"` // Ed25519, 32 bytes
	Expires int64    `cbor:"2,keyasint"` // unix seconds
	Targets []string `cbor:"3,keyasint,omitempty"`
}

// KeyID names a public key: a fingerprint, so ids cannot collide by accident.
func KeyID(pub ed25519.PublicKey) string {
	h := sha256.Sum256(pub)
	return "ed25519:" + hex.EncodeToString(h[:8])
}

// ValidTarget reports whether t can name a target: agent, or a payload
// name of letters, digits, '.', '_' and '-'.
func ValidTarget(t string) bool {
	return t != "" && len(t) <= MaxLabelValueLen && labelChars(t, "._-")
}

// ValidVersion reports whether v is a semantic version (2.0.0).
//
// It matches ^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$
// (tested against that expression), without linking a regular expression
// engine into the agent.
func ValidVersion(v string) bool {
	if len(v) > 64 {
		return false
	}
	rest := v
	for i := range 3 {
		n := 0
		for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
			n++
		}
		if n == 0 || (n > 1 && rest[0] == '0') {
			return false
		}
		rest = rest[n:]
		if i < 2 {
			if rest == "" || rest[0] != '.' {
				return false
			}
			rest = rest[1:]
		}
	}
	for _, sep := range []byte{'-', '+'} {
		if rest != "" && rest[0] == sep {
			n := 0
			for n < len(rest)-1 && versionIDChar(rest[1+n]) {
				n++
			}
			if n == 0 {
				return false
			}
			rest = rest[1+n:]
		}
	}
	return rest == ""
}

// versionIDChar is a character of a pre-release or build identifier.
func versionIDChar(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '.' || c == '-'
}

// Validate checks a manifest's format.
func (m *Manifest) Validate() error {
	switch {
	case !ValidVersion(m.Version):
		return fmt.Errorf("version %q is not a semantic version", m.Version)
	case m.Counter == 0:
		return errors.New("counter is zero")
	case !ValidTarget(m.Target):
		return fmt.Errorf("bad target %q", m.Target)
	case len(m.Hardware) == 0:
		return errors.New("no hardware listed")
	case len(m.SHA256) != sha256.Size:
		return errors.New("sha256 is not 32 bytes")
	case m.Size == 0:
		return errors.New("artifact size is zero")
	case m.Expires <= m.Created:
		return errors.New("expires before it was created")
	case m.KeyID == "":
		return errors.New("no key id")
	case m.Target == TargetAgent && len(m.Arch) == 0:
		return errors.New("an agent release must list its architectures")
	}
	if d := m.Delta; d != nil {
		switch {
		case len(d.BaseSHA256) != sha256.Size || len(d.PatchSHA256) != sha256.Size:
			return errors.New("delta: a base or patch sha256 is not 32 bytes")
		case d.BaseSize == 0 || d.PatchSize < DeltaHeaderSize:
			return errors.New("delta: empty base or patch")
		case slices.Equal(d.BaseSHA256, m.SHA256):
			return errors.New("delta: the base is the result")
		case d.BaseVersion != "" && !ValidVersion(d.BaseVersion):
			return fmt.Errorf("delta: base version %q is not a semantic version", d.BaseVersion)
		}
	}
	return nil
}

// Validate checks a key list's format.
func (k *KeyList) Validate() error {
	if k.Version == 0 {
		return errors.New("key list version is zero")
	}
	if k.Expires <= k.Created {
		return errors.New("key list expires before it was created")
	}
	for _, rk := range k.Keys {
		if len(rk.Public) != ed25519.PublicKeySize {
			return fmt.Errorf("key %q: not an Ed25519 public key", rk.ID)
		}
		if rk.ID != KeyID(rk.Public) {
			return fmt.Errorf("key %q: id does not match the key (%s)", rk.ID, KeyID(rk.Public))
		}
	}
	return nil
}

// Check names the verification step that refused a release; devices
// report it.
type Check string

// Checks, in the order a device runs them.
const (
	CheckSize      Check = "size"     // document or artifact size
	CheckRoot      Check = "root"     // key list not signed by a trusted root
	CheckKeyList   Check = "key_list" // key list malformed, older than the one held, or expired
	CheckKey       Check = "key"      // manifest signed by a key not in the list
	CheckRevoked   Check = "revoked"  // release key revoked
	CheckKeyExpiry Check = "key_expired"
	CheckSignature Check = "signature"
	CheckFormat    Check = "format"
	CheckTarget    Check = "target"   // not a target this device installs
	CheckHardware  Check = "hardware" // wrong hardware or architecture
	CheckCounter   Check = "counter"  // not newer than installed and highest seen (rollback)
	CheckClock     Check = "clock"    // the device's clock cannot be trusted
	CheckExpired   Check = "expired"  // manifest expired (freeze)
	CheckCreated   Check = "created"  // manifest created in the future, beyond the allowance
	CheckHash      Check = "hash"     // artifact digest
	CheckDelta     Check = "delta"    // a delta that cannot make the build here (base, patch or result), with no full artifact to fall back to
	CheckSmoke     Check = "smoke"    // the new build does not start
)

// VerifyError is a refused release and the check that refused it.
type VerifyError struct {
	Check Check
	Err   error
}

func (e *VerifyError) Error() string { return fmt.Sprintf("%s check failed: %v", e.Check, e.Err) }
func (e *VerifyError) Unwrap() error { return e.Err }

func refuse(c Check, format string, args ...any) error {
	return &VerifyError{Check: c, Err: fmt.Errorf(format, args...)}
}

// CheckOf returns the check that refused err, or "" when err is not a
// VerifyError.
func CheckOf(err error) Check {
	var v *VerifyError
	if errors.As(err, &v) {
		return v.Check
	}
	return ""
}

func sign(priv ed25519.PrivateKey, context string, payload []byte) ([]byte, error) {
	signer, err := cose.NewSigner(cose.AlgorithmEdDSA, priv)
	if err != nil {
		return nil, err
	}
	msg := cose.NewSign1Message()
	msg.Headers.Protected.SetAlgorithm(cose.AlgorithmEdDSA)
	msg.Headers.Protected[cose.HeaderLabelKeyID] = []byte(KeyID(priv.Public().(ed25519.PublicKey)))
	msg.Payload = payload
	if err := msg.Sign(rand.Reader, []byte(context), signer); err != nil {
		return nil, err
	}
	return msg.MarshalCBOR()
}

// open parses a COSE_Sign1 document and returns it with its key id.
func open(signed []byte, max int) (*cose.Sign1Message, string, error) {
	if len(signed) > max {
		return nil, "", refuse(CheckSize, "%d bytes, more than %d", len(signed), max)
	}
	var msg cose.Sign1Message
	if err := msg.UnmarshalCBOR(signed); err != nil {
		return nil, "", refuse(CheckFormat, "not a COSE_Sign1 message: %v", err)
	}
	alg, err := msg.Headers.Protected.Algorithm()
	if err != nil || alg != cose.AlgorithmEdDSA {
		return nil, "", refuse(CheckSignature, "algorithm %v is not EdDSA", alg)
	}
	kid, _ := msg.Headers.Protected[cose.HeaderLabelKeyID].([]byte)
	return &msg, string(kid), nil
}

func verify(msg *cose.Sign1Message, pub ed25519.PublicKey, context string) error {
	v, err := cose.NewVerifier(cose.AlgorithmEdDSA, pub)
	if err != nil {
		return err
	}
	return msg.Verify([]byte(context), v)
}

// SignKeyList signs a key list with a root key.
func SignKeyList(root ed25519.PrivateKey, k KeyList) ([]byte, error) {
	if err := k.Validate(); err != nil {
		return nil, fmt.Errorf("sign key list: %w", err)
	}
	payload, err := Marshal(&k)
	if err != nil {
		return nil, err
	}
	return sign(root, keyListContext, payload)
}

// OpenKeyList verifies a key list against the trusted root keys and
// returns it. It does not judge expiry (see KeyList.Check).
func OpenKeyList(signed []byte, roots []ed25519.PublicKey) (KeyList, error) {
	var k KeyList
	msg, kid, err := open(signed, MaxKeyListSize)
	if err != nil {
		return k, err
	}
	var root ed25519.PublicKey
	for _, r := range roots {
		if KeyID(r) == kid {
			root = r
		}
	}
	if root == nil {
		return k, refuse(CheckRoot, "key list signed by %q, not a trusted root", kid)
	}
	if err := verify(msg, root, keyListContext); err != nil {
		return k, refuse(CheckRoot, "key list signature: %v", err)
	}
	if err := Unmarshal(msg.Payload, &k); err != nil {
		return k, refuse(CheckKeyList, "%v", err)
	}
	return k, nil
}

// SignManifest signs a manifest with a release key, setting its KeyID.
func SignManifest(key ed25519.PrivateKey, m Manifest) ([]byte, error) {
	m.KeyID = KeyID(key.Public().(ed25519.PublicKey))
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("sign manifest: %w", err)
	}
	payload, err := Marshal(&m)
	if err != nil {
		return nil, err
	}
	if len(payload) > MaxManifestSize-256 {
		return nil, fmt.Errorf("sign manifest: %d bytes is too large", len(payload))
	}
	return sign(key, manifestContext, payload)
}

// OpenManifest verifies a manifest against a (verified) key list at time
// now and returns it: signed by a listed, unrevoked, unexpired release key
// allowed for its target, well formed, not expired.
func OpenManifest(signed []byte, keys KeyList, now time.Time) (Manifest, error) {
	var m Manifest
	msg, kid, err := open(signed, MaxManifestSize)
	if err != nil {
		return m, err
	}
	if slices.Contains(keys.Revoked, kid) {
		return m, refuse(CheckRevoked, "release key %s is revoked", kid)
	}
	i := slices.IndexFunc(keys.Keys, func(k ReleaseKey) bool { return k.ID == kid })
	if i < 0 {
		return m, refuse(CheckKey, "release key %q is not in the root-signed key list", kid)
	}
	rk := keys.Keys[i]
	if now.Unix() >= rk.Expires {
		return m, refuse(CheckKeyExpiry, "release key %s expired at %s", kid, time.Unix(rk.Expires, 0).UTC().Format(time.RFC3339))
	}
	if err := verify(msg, ed25519.PublicKey(rk.Public), manifestContext); err != nil {
		return m, refuse(CheckSignature, "%v", err)
	}
	if err := Unmarshal(msg.Payload, &m); err != nil {
		return m, refuse(CheckFormat, "%v", err)
	}
	if m.KeyID != kid {
		return m, refuse(CheckFormat, "manifest names key %q but is signed by %q", m.KeyID, kid)
	}
	if len(rk.Targets) > 0 && !slices.Contains(rk.Targets, m.Target) {
		return m, refuse(CheckKey, "release key %s may not sign target %q", kid, m.Target)
	}
	if now.Unix() >= m.Expires {
		return m, refuse(CheckExpired, "manifest expired at %s", time.Unix(m.Expires, 0).UTC().Format(time.RFC3339))
	}
	return m, nil
}

// Check judges a verified key list against the one a device holds (its
// version must not go down) and time now.
func (k *KeyList) Check(held *KeyList, now time.Time) error {
	if held != nil && k.Version < held.Version {
		return refuse(CheckKeyList, "key list version %d is older than the held %d", k.Version, held.Version)
	}
	if now.Unix() >= k.Expires {
		return refuse(CheckKeyList, "key list expired at %s", time.Unix(k.Expires, 0).UTC().Format(time.RFC3339))
	}
	return nil
}

// DecodeManifestUnverified decodes a manifest's payload without checking
// its signature: for fuzzing and for tools that display a manifest. Never
// act on its result.
func DecodeManifestUnverified(signed []byte) (Manifest, error) {
	var m Manifest
	msg, _, err := open(signed, MaxManifestSize)
	if err != nil {
		return m, err
	}
	err = Unmarshal(msg.Payload, &m)
	return m, err
}
