// Package prototest provides fixture messages for tests of the wire contract
// and of everything that speaks it.
package prototest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"

	"github.com/hangarfleet/hangar/proto"
)

// Base is the fixed time of fixtures: 2026-11-25T12:00:00Z in unix ms.
const Base int64 = 1795780800000

func u8(v uint8) *uint8  { return &v }
func i16(v int16) *int16 { return &v }

// Sample returns a typical in-flight reading over Zurich.
func Sample() proto.Sample {
	return proto.Sample{
		T:       1000,
		Battery: u8(87),
		Voltage: 16420,
		Temp:    i16(452),
		CPU:     231,
		Mem:     418,
		Lat:     473769000,
		Lon:     85417000,
		Alt:     4321,
		Fix:     3,
		Flight:  proto.FlightFlying,
		Link:    92,
		Errors:  3,
		Reboots: 1,
		Uptime:  86400,
	}
}

// Batch returns a batch of n samples one second apart.
func Batch(seq uint64, n int) proto.Batch {
	b := proto.Batch{Boot: 1795780000, Seq: seq, Base: Base}
	for i := range n {
		s := Sample()
		s.T = uint32(i * 1000)
		b.Samples = append(b.Samples, s)
	}
	return b
}

// State returns the hello of a rev-b drone at base zurich.
func State() proto.State {
	return proto.State{
		Proto:    proto.ProtocolVersion,
		Online:   true,
		Boot:     1795780000,
		Conn:     7,
		Time:     Base,
		Hardware: "rev-b",
		Arch:     "arm64",
		Version:  "1.4.2",
		Labels:   map[string]string{"base": "zurich", "hw": "rev-b"},
		Release:  12,
	}
}

// DeltaState returns State from an agent that patches builds of up to
// 64 MiB, with the digest of its binary.
func DeltaState() proto.State {
	s := State()
	sum := sha256.Sum256([]byte("hangar-agent 1.4.2"))
	s.Builds = map[string][]byte{proto.TargetAgent: sum[:]}
	s.Deltas = 64 << 20
	return s
}

// Will returns the last will matching State.
func Will() proto.State {
	return proto.State{Proto: proto.ProtocolVersion, Online: false, Boot: 1795780000, Conn: 7}
}

// AlertEvent returns a low-battery alert.
func AlertEvent() proto.Event {
	return proto.Event{
		Boot: 1795780000, Seq: 42, Time: Base, Kind: proto.EventAlert, Severity: proto.SevWarning,
		Code: "battery_low", Message: "battery at 18%", Attrs: map[string]string{"battery_pct": "18"},
	}
}

// UpdateEvent returns an update progress report.
func UpdateEvent() proto.Event {
	return proto.Event{
		Boot: 1795780000, Seq: 43, Time: Base, Kind: proto.EventUpdate,
		Update: &proto.UpdateReport{
			Target: "agent", Version: "1.5.0", Counter: 13, State: proto.UpdateDownloading,
			Progress: 1 << 20, Size: 6 << 20, Rollout: "r-1",
		},
	}
}

// DeltaUpdateEvent returns an update report of a delta given up for the
// full artifact.
func DeltaUpdateEvent() proto.Event {
	e := UpdateEvent()
	e.Update.Patch = 180 << 10
	e.Update.Fallback = "the patch makes a build whose digest is not the manifest's"
	return e
}

// PingCommand returns a ping.
func PingCommand() proto.Command {
	return proto.Command{ID: "c-1", Kind: proto.CmdPing, Issued: Base}
}

// CertRequest returns a certificate request with a placeholder CSR.
func CertRequest() proto.CertRequest {
	return proto.CertRequest{ID: "csr-1", CSR: []byte{0x30, 0x82, 0x01, 0x0a}}
}

// CertCommand returns a certificate grant with a placeholder chain.
func CertCommand() proto.Command {
	return proto.Command{ID: "c-3", Kind: proto.CmdCertificate, Issued: Base,
		Cert: &proto.CertGrant{Request: "csr-1", Chain: [][]byte{{0x30, 0x82, 0x02, 0x01}, {0x30, 0x82, 0x01, 0xf0}}}}
}

// UpdateCommand returns an update offer with placeholder signed blobs.
func UpdateCommand() proto.Command {
	return proto.Command{
		ID: "c-2", Kind: proto.CmdUpdate, Issued: Base, Rollout: "r-1",
		Update: &proto.UpdateOffer{
			Manifest: []byte{0xd2, 0x84, 0x40, 0xa0, 0xf6, 0x40},
			Keys:     []byte{0xd2, 0x84, 0x40, 0xa0, 0xf6, 0x40},
			URL:      "/api/v1/releases/1.5.0/artifact",
		},
	}
}

// DeltaUpdateCommand returns an offer of a delta with its full fallback.
func DeltaUpdateCommand() proto.Command {
	c := UpdateCommand()
	c.Update.URL = "/api/v1/releases/1.5.0/deltas/9f2c/artifact"
	c.Update.FullURL = "/api/v1/releases/1.5.0/artifact"
	return c
}

// DeltaManifest returns the manifest of a patch (its bytes) that makes
// result of base.
func DeltaManifest(base, patch, result []byte) proto.Manifest {
	m := Manifest(result)
	bs, ps := sha256.Sum256(base), sha256.Sum256(patch)
	m.Delta = &proto.Delta{BaseSHA256: bs[:], BaseSize: uint64(len(base)), PatchSHA256: ps[:], PatchSize: uint64(len(patch)), BaseVersion: "1.4.2"}
	return m
}

// FlightInput returns what a flight stack sends while flying.
func FlightInput() proto.FlightInput {
	return proto.FlightInput{
		Battery: u8(64), Voltage: 15800, Lat: 473769000, Lon: 85417000, Alt: 12000,
		Fix: 3, Flight: proto.FlightFlying, Link: u8(80),
	}
}

// Deterministic test keys: Ed25519 keys from fixed seeds, so that signed
// fixtures (Ed25519 signatures are deterministic) have golden bytes.
var (
	RootKey    = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, 32))
	ReleaseKey = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, 32))
	OtherKey   = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{3}, 32))
)

// KeyList lists ReleaseKey, valid for a year from Base.
func KeyList() proto.KeyList {
	pub := ReleaseKey.Public().(ed25519.PublicKey)
	return proto.KeyList{
		Version: 1, Created: Base / 1000, Expires: Base/1000 + 365*86400,
		Keys: []proto.ReleaseKey{{ID: proto.KeyID(pub), Public: pub, Expires: Base/1000 + 365*86400}},
	}
}

// Manifest is an agent release for rev-b on arm64 and amd64, valid for 30
// days from Base, of an artifact with the given content.
func Manifest(artifact []byte) proto.Manifest {
	sum := sha256.Sum256(artifact)
	return proto.Manifest{
		Version: "1.5.0", Counter: 13, Target: proto.TargetAgent, Hardware: []string{"rev-b"},
		Arch: []string{"arm64", "amd64"}, Size: uint64(len(artifact)), SHA256: sum[:],
		Created: Base / 1000, Expires: Base/1000 + 30*86400,
		KeyID: proto.KeyID(ReleaseKey.Public().(ed25519.PublicKey)),
	}
}
