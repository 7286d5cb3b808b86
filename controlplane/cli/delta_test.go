package cli_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Deltas are signed from earlier builds with the release, pushed with it
// or after it, offered by device update to a device on their base, and
// device updates says how each release was fetched.
func TestReleaseDeltas(t *testing.T) {
	dir := t.TempDir()
	offline := func(args ...string) (string, error) {
		t.Helper()
		var out strings.Builder
		err := cli.Run(context.Background(), args, cli.Env{Stdout: &out, Stderr: &strings.Builder{}, Getenv: func(string) string { return "" }})
		return out.String(), err
	}
	for _, args := range [][]string{
		{"release", "keygen", "--out", filepath.Join(dir, "root")},
		{"release", "keygen", "--out", filepath.Join(dir, "rel")},
		{"release", "keys", "--root-key", filepath.Join(dir, "root.key"), "--add", filepath.Join(dir, "rel.pub"), "--out", filepath.Join(dir, "keys.cose")},
	} {
		if _, err := offline(args...); err != nil {
			t.Fatal(err)
		}
	}
	pemBytes, _ := os.ReadFile(filepath.Join(dir, "root.pub"))
	root, err := proto.ParsePublicKey(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	c := startServerWith(t, server.Options{RootKeys: []ed25519.PublicKey{root}})

	builds := map[string][]byte{}
	prev := make([]byte, 128<<10)
	rand.Read(prev)
	for _, v := range []string{"1.8.0", "1.9.0", "2.0.0"} {
		b := append(bytes.Clone(prev[:len(prev)/2]), []byte("changes of "+v)...)
		b = append(b, prev[len(prev)/2:]...)
		builds[v], prev = b, b
		os.WriteFile(filepath.Join(dir, "agent-"+v), b, 0o644)
	}
	art := filepath.Join(dir, "agent-2.0.0")
	patchOf := func(v string) string {
		sum := sha256.Sum256(builds[v])
		return fmt.Sprintf("%s.from-%x.patch", art, sum[:6])
	}
	sign := []string{"release", "sign", "--key", filepath.Join(dir, "rel.key"), "--artifact", art, "--version", "2.0.0",
		"--hardware", "rev-b", "--arch", "arm64", "--counter", "200"}
	if _, err := offline(append(sign, "--delta-from", art)...); err == nil || !strings.Contains(err.Error(), "is the build released") {
		t.Fatalf("a delta from the build itself: %v", err)
	}
	out, err := offline(append(sign, "--delta-from", filepath.Join(dir, "agent-1.9.0")+"@1.9.0", "--delta-from", filepath.Join(dir, "agent-1.8.0"))...)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "delta from 1.9.0") || !strings.Contains(out, "delta from agent-1.8.0") || !strings.Contains(out, "% of the full") ||
		!strings.Contains(out, "made in") {
		t.Fatalf("sign output:\n%s", out)
	}
	for _, v := range []string{"1.8.0", "1.9.0"} {
		patch, err := os.ReadFile(patchOf(v))
		if err != nil {
			t.Fatal(err)
		}
		mb, err := os.ReadFile(patchOf(v) + ".manifest")
		if err != nil {
			t.Fatal(err)
		}
		m, err := proto.DecodeManifestUnverified(mb)
		base, result, ps := sha256.Sum256(builds[v]), sha256.Sum256(builds["2.0.0"]), sha256.Sum256(patch)
		if err != nil || m.Delta == nil || !bytes.Equal(m.Delta.BaseSHA256, base[:]) || !bytes.Equal(m.SHA256, result[:]) ||
			!bytes.Equal(m.Delta.PatchSHA256, ps[:]) || m.Counter != 200 || m.Version != "2.0.0" {
			t.Fatalf("delta manifest from %s: %+v %v", v, m, err)
		}
		if want := map[string]string{"1.9.0": "1.9.0"}[v]; m.Delta.BaseVersion != want {
			t.Fatalf("base version %q, want %q", m.Delta.BaseVersion, want)
		}
	}

	keys := filepath.Join(dir, "keys.cose")
	// release verify checks a delta as a device would: the patch against
	// its manifest, and with --base that it is the base and the patch
	// makes the release's build of it.
	verify := []string{"release", "verify", "--root-key", filepath.Join(dir, "root.pub"), "--keys", keys,
		"--manifest", patchOf("1.9.0") + ".manifest", "--artifact", patchOf("1.9.0")}
	if out, err := offline(append(verify, "--base", filepath.Join(dir, "agent-1.9.0"))...); err != nil ||
		!strings.Contains(out, "a delta from 1.9.0") || !strings.Contains(out, "base, patch and result checked") {
		t.Fatalf("verify a delta with its base: %v\n%s", err, out)
	}
	if _, err := offline(append(verify, "--base", filepath.Join(dir, "agent-1.8.0"))...); err == nil || !strings.Contains(err.Error(), "not the delta's base") {
		t.Fatalf("verify a delta against another base: %v", err)
	}
	if _, err := offline(append(verify[:len(verify)-1], patchOf("1.8.0"))...); err == nil || !strings.Contains(err.Error(), "INVALID") {
		t.Fatalf("verify a delta with another patch: %v", err)
	}
	out, _, err = run(t, c, "release", "push", "--keys", keys, "--artifact", art, "--delta", patchOf("1.9.0"))
	if err != nil || !strings.Contains(out, "pushed agent 2.0.0") || !strings.Contains(out, "pushed delta from 1.9.0") {
		t.Fatalf("push: %v\n%s", err, out)
	}
	// A delta made later goes to the release pushed already.
	out, _, err = run(t, c, "release", "push", "--keys", keys, "--artifact", art, "--delta", patchOf("1.8.0"))
	if err != nil || !strings.Contains(out, "was pushed already") || !strings.Contains(out, "pushed delta from sha256") {
		t.Fatalf("push of a later delta: %v\n%s", err, out)
	}
	if _, _, err := run(t, c, "release", "push", "--keys", keys, "--artifact", art, "--delta", patchOf("1.9.0")); err == nil ||
		!strings.Contains(err.Error(), "already has a delta") {
		t.Fatalf("a delta pushed twice: %v", err)
	}
	out, _, err = run(t, c, "release", "ls")
	if err != nil || !strings.Contains(out, "DELTAS") || !strings.Contains(out, "from 1.9.0") {
		t.Fatalf("release ls: %v\n%s", err, out)
	}

	ctx := context.Background()
	db := c.srv.Store()
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "d1", Hardware: "rev-b", CredHash: []byte("x"), Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(builds["1.9.0"])
	hello := proto.State{Proto: proto.ProtocolVersion, Online: true, Boot: 1, Conn: 1, Version: "1.9.0", Hardware: "rev-b", Arch: "arm64",
		Builds: map[string][]byte{proto.TargetAgent: sum[:]}, Deltas: 64 << 20}
	if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestState, State: &hello, Received: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	out, _, err = run(t, c, "device", "update", "d1", "--release", "2.0.0")
	if err != nil || !strings.Contains(out, "as a delta from 1.9.0") {
		t.Fatalf("device update: %v\n%s", err, out)
	}
	out, _, err = run(t, c, "device", "update", "d1", "--release", "2.0.0", "--full")
	if err != nil || !strings.Contains(out, "as the full artifact") {
		t.Fatalf("device update --full: %v\n%s", err, out)
	}
	out, _, err = run(t, c, "device", "show", "d1", "-o", "json")
	var d store.Device
	if err != nil || json.Unmarshal([]byte(out), &d) != nil || d.DeltaMax != 64<<20 || d.Builds[proto.TargetAgent] == "" {
		t.Fatalf("device json: %v\n%s", err, out)
	}

	if _, _, err := run(t, c, "device", "label", "d1", "hw=rev-b"); err != nil {
		t.Fatal(err)
	}
	out, _, err = run(t, c, "rollout", "create", "--release", "2.0.0", "--dry-run")
	if err != nil || !strings.Contains(out, "in all: delta to 1 devices") || !strings.Contains(out, "saved") {
		t.Fatalf("dry run: %v\n%s", err, out)
	}
	out, _, err = run(t, c, "rollout", "create", "--release", "2.0.0", "--dry-run", "--full")
	if err != nil || !strings.Contains(out, "in all: full artifacts to 1 devices") {
		t.Fatalf("dry run --full: %v\n%s", err, out)
	}

	for i, u := range []proto.UpdateReport{
		{Target: "agent", Version: "2.0.0", Counter: 200, State: proto.UpdateCommitted, Patch: 2000, Fallback: "the base is not the patch's"},
		{Target: "agent", Version: "1.9.0", Counter: 190, State: proto.UpdateCommitted, Patch: 1500},
		{Target: "agent", Version: "1.8.0", Counter: 180, State: proto.UpdateCommitted},
	} {
		ev := proto.Event{Boot: 1, Seq: uint64(i + 1), Time: time.Now().UnixMilli(), Kind: proto.EventUpdate, Update: &u}
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestEvent, Event: &ev, Received: time.Now()}}); err != nil {
			t.Fatal(err)
		}
	}
	out, _, err = run(t, c, "device", "updates", "d1")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"VIA", "delta→full (the base is not the patch's)", "delta 1.5 KiB"} {
		if !strings.Contains(out, want) {
			t.Fatalf("device updates lacks %q:\n%s", want, out)
		}
	}
	// The 1.8.0 row, fetched whole, says so in its own VIA column.
	var row string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "1.8.0") {
			row = line
		}
	}
	if f := strings.Fields(row); !slices.Contains(f, "full") || strings.Contains(row, "delta") {
		t.Fatalf("the 1.8.0 row: %q\n%s", row, out)
	}
}
