package certs

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
	"github.com/hangarfleet/hangar/proto"
)

// TestSignedUpdateOverMutualTLS: simulated drones (the real agent code)
// with device certificates, some through a caller-made HTTP client (the
// simulator's source addresses), take a signed release: the offer over
// mutual-TLS MQTT, the download over HTTPS authenticated by the device
// certificate alone (no password exists), the trial and the commit.
func TestSignedUpdateOverMutualTLS(t *testing.T) {
	keys := t.TempDir()
	hangar(t, "release", "keygen", "--out", filepath.Join(keys, "root"))
	hangar(t, "release", "keygen", "--out", filepath.Join(keys, "release"))
	hangar(t, "release", "keys", "--root-key", filepath.Join(keys, "root.key"), "--add", filepath.Join(keys, "release.pub"),
		"--out", filepath.Join(keys, "keys.cose"))
	b, _ := os.ReadFile(filepath.Join(keys, "root.pub"))
	root, err := proto.ParsePublicKey(b)
	if err != nil {
		t.Fatal(err)
	}
	f := startFleet(t, server.Options{RootKeys: []ed25519.PublicKey{root}})
	fleet, err := sim.NewFleet(sim.FleetOptions{
		ServerURL: f.srv.URL(), EnrollToken: f.enroll, Devices: 4, StateRoot: t.TempDir(), Prefix: "u-",
		SampleInterval: 200 * time.Millisecond, BatchSize: 5, HeartbeatInterval: time.Second,
		BackoffMin: 50 * time.Millisecond, BackoffMax: time.Second, Logger: logger(), Seed: 1,
		TLS: f.roots.Clone(), SourceAddrs: []string{"127.0.0.1"},
		Roots: []ed25519.PublicKey{root}, Grounded: true, TrialSoak: 300 * time.Millisecond, TrialDeadline: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fleet.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	waitFor(t, 60*time.Second, "the fleet online with certificates", func() (bool, string) {
		ds, _ := f.srv.Store().Devices(context.Background(), store.DeviceFilter{Auth: store.AuthCert})
		on := 0
		for _, d := range ds {
			if d.Online {
				on++
			}
		}
		return on == 4, fmt.Sprintf("%d online with certificates", on)
	})
	fw := sim.Firmware{Version: "1.1.0", Behaviour: sim.Good, Size: 64 << 10}
	art := filepath.Join(keys, "fw.bin")
	if err := os.WriteFile(art, fw.Artifact(), 0o644); err != nil {
		t.Fatal(err)
	}
	hangar(t, "release", "sign", "--key", filepath.Join(keys, "release.key"), "--artifact", art, "--version", "1.1.0",
		"--hardware", "rev-a,rev-b,rev-c", "--arch", "amd64,arm64,arm", "--counter", "110", "--out", art+".manifest")
	ca := filepath.Join(f.data, "tls", devca.CAFile)
	admin := filepath.Join(f.data, server.AdminTokenFile)
	hangar(t, "release", "push", "--server", f.srv.URL(), "--ca-file", ca, "--token-file", admin,
		"--manifest", art+".manifest", "--keys", filepath.Join(keys, "keys.cose"), "--artifact", art)
	for _, d := range fleet.Drones() {
		hangar(t, "device", "update", d.ID, "--release", "1.1.0", "--server", f.srv.URL(), "--ca-file", ca, "--token-file", admin)
	}
	waitFor(t, 90*time.Second, "every drone on 1.1.0", func() (bool, string) {
		n := 0
		for _, d := range fleet.Drones() {
			if d.Firmware().Version == "1.1.0" {
				n++
			}
		}
		return n == 4, fmt.Sprintf("%d of 4", n)
	})
	for _, d := range fleet.Drones() {
		if a, _ := f.srv.Store().DeviceAuth(context.Background(), d.ID); a.PasswordHash != nil {
			t.Fatalf("%s has a password", d.ID)
		}
	}
}
