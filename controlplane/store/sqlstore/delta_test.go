package sqlstore_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

func testRelease(version string, counter uint64) store.Release {
	now := time.UnixMilli(prototest.Base).UTC()
	return store.Release{Target: "agent", Version: version, Counter: counter, Size: 1000, SHA256: strings.Repeat("ab", 32),
		Hardware: []string{"rev-b"}, Arch: []string{"arm64"}, Created: now.Truncate(time.Second), Expires: now.Add(time.Hour).Truncate(time.Second),
		KeyID: "k", PushedAt: now, PushedBy: "alice", Manifest: []byte("m"), Keys: []byte("k")}
}

// Deltas are stored per release and base, listed with their release, and
// a second delta from the same base is refused, as one of a release that
// does not exist.
func TestReleaseDeltas(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	for _, r := range []store.Release{testRelease("2.0.0", 20), testRelease("2.1.0", 21)} {
		if err := db.AddRelease(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	d := store.ReleaseDelta{Target: "agent", Version: "2.0.0", BaseSHA256: strings.Repeat("01", 32), BaseSize: 900, BaseVersion: "1.9.0",
		PatchSHA256: strings.Repeat("02", 32), PatchSize: 70, Manifest: []byte("dm"), PushedAt: clk.Now().UTC(), PushedBy: "bob"}
	before, _ := db.LiveMarks(ctx)
	if err := db.AddReleaseDelta(ctx, d); err != nil {
		t.Fatal(err)
	}
	if after, _ := db.LiveMarks(ctx); after.Releases == before.Releases {
		t.Error("a delta pushed moves no watermark: the console's releases view is not told")
	}
	d2 := d
	d2.BaseSHA256, d2.PatchSHA256, d2.BaseVersion, d2.PushedAt = strings.Repeat("03", 32), strings.Repeat("04", 32), "", d.PushedAt.Add(time.Second)
	if err := db.AddReleaseDelta(ctx, d2); err != nil {
		t.Fatal(err)
	}
	dup := d
	dup.PatchSHA256 = strings.Repeat("05", 32)
	if err := db.AddReleaseDelta(ctx, dup); !errors.Is(err, store.ErrExists) {
		t.Fatalf("second delta from the same base: %v", err)
	}
	orphan := d
	orphan.Version = "9.9.9"
	if err := db.AddReleaseDelta(ctx, orphan); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("delta of no release: %v", err)
	}
	r, err := db.Release(ctx, "", "2.0.0")
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Deltas) != 2 || r.Deltas[0].BaseSHA256 != d.BaseSHA256 || r.Deltas[1].BaseSHA256 != d2.BaseSHA256 {
		t.Fatalf("deltas %+v", r.Deltas)
	}
	got := r.Deltas[0]
	if got.BaseSize != 900 || got.BaseVersion != "1.9.0" || got.PatchSHA256 != d.PatchSHA256 || got.PatchSize != 70 ||
		string(got.Manifest) != "dm" || got.PushedBy != "bob" || !got.PushedAt.Equal(d.PushedAt) {
		t.Fatalf("stored delta %+v, want %+v", got, d)
	}
	rs, err := db.Releases(ctx, "agent")
	if err != nil || len(rs) != 2 {
		t.Fatalf("releases %v %v", rs, err)
	}
	for _, r := range rs {
		if want := map[string]int{"2.0.0": 2, "2.1.0": 0}[r.Version]; len(r.Deltas) != want {
			t.Errorf("release %s lists %d deltas, want %d", r.Version, len(r.Deltas), want)
		}
	}
	if r, _ := db.Release(ctx, "agent", "2.1.0"); r.Deltas != nil {
		t.Errorf("a release without deltas lists %v", r.Deltas)
	}
}

// A hello's build digests and delta limit are kept (digests in hex, the
// malformed ones dropped), and replaced by the next hello's.
func TestDeviceBuilds(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", nil)
	hello := func(s proto.State) {
		t.Helper()
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestState, State: &s, Received: clk.Now()}}); err != nil {
			t.Fatal(err)
		}
	}
	s := prototest.DeltaState()
	s.Builds["fc-firmware"] = []byte{1, 2, 3} // not a SHA-256
	hello(s)
	d, err := db.Device(ctx, "d1")
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256([]byte("hangar-agent 1.4.2"))
	if len(d.Builds) != 1 || d.Builds[proto.TargetAgent] != hex.EncodeToString(want[:]) || d.DeltaMax != 64<<20 {
		t.Fatalf("builds %v, delta max %d", d.Builds, d.DeltaMax)
	}
	if b := d.DeviceBuilds(); b.DeltaMax != d.DeltaMax || b.Builds[proto.TargetAgent] == "" {
		t.Fatalf("device builds %+v", b)
	}
	old := prototest.State() // an agent that takes full artifacts only
	old.Conn = s.Conn + 1
	hello(old)
	if d, _ := db.Device(ctx, "d1"); d.Builds != nil || d.DeltaMax != 0 {
		t.Fatalf("after an older agent's hello: builds %v, delta max %d", d.Builds, d.DeltaMax)
	}
}

// How a device fetches a release comes with every report of the attempt
// (the agent's job says it each time): the latest report says, and a
// device's fallback text is bounded.
func TestDeviceUpdatePatchAndFallback(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "a", nil)
	report := func(seq uint64, state proto.UpdateState, patch uint64, fallback string) store.DeviceUpdate {
		t.Helper()
		up := prototest.UpdateEvent()
		up.Seq, up.Update.State, up.Update.Patch, up.Update.Fallback = seq, state, patch, fallback
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "a", Kind: store.IngestEvent, Event: &up, Received: clk.Now()}}); err != nil {
			t.Fatal(err)
		}
		us, err := db.DeviceUpdates(ctx, "a", "agent", 13)
		if err != nil || len(us) != 1 {
			t.Fatalf("updates: %v %v", us, err)
		}
		return us[0]
	}
	if u := report(40, proto.UpdateDownloading, 180, ""); u.Patch != 180 || u.Via() != store.ViaDelta {
		t.Fatalf("downloading a delta: %+v", u)
	}
	if u := report(42, proto.UpdateDownloading, 180, "base differs"); u.Fallback != "base differs" || u.Via() != store.ViaFallback || u.Transferred(1000) != 1180 {
		t.Fatalf("fallback: %+v", u)
	}
	if u := report(43, proto.UpdateCommitted, 180, "base differs"); u.Patch != 180 || u.Fallback != "base differs" {
		t.Fatalf("committed after a fallback: %+v", u)
	}
	if u := report(44, proto.UpdateOffered, 0, ""); u.Patch != 0 || u.Fallback != "" || u.Via() != store.ViaFull {
		t.Fatalf("a new offer of the full artifact: %+v", u)
	}
	long := strings.Repeat("é", 1000)
	if u := report(45, proto.UpdateDownloading, 0, long); len(u.Fallback) > 256 || !utf8.ValidString(u.Fallback) || u.Fallback == "" {
		t.Fatalf("a fallback of %d bytes stored as %d bytes", len(long), len(u.Fallback))
	}
}

// A database made by the previous schema (9) opens: its releases have no
// deltas, its devices no builds, its update reports were full downloads.
func TestMigrationToDeltas(t *testing.T) {
	db := openAtSchema(t, 9, /* the previous schema */
		`INSERT INTO devices (id, hardware, labels, cred_hash, enrolled_at, payloads) VALUES ('d1', 'rev-b', '{"hw":"rev-b"}', x'0102', 1, '{"fc":"4.5"}')`,
		`INSERT INTO releases (target, version, counter, size, sha256, hardware, arch, created, expires, key_id, notes, pushed_at, pushed_by, manifest, keys)
			VALUES ('agent', '2.0.0', 20, 1000, x'abab', '["rev-b"]', '["arm64"]', 1, 2, 'k', '', 1, 'alice', x'01', x'02')`,
		`INSERT INTO device_updates (dev, target, counter, version, state, reason, check_name, progress, rollout, boot, seq, updated, committed)
			VALUES (1, 'agent', 20, '2.0.0', 'committed', '', '', 1000, 'r-1', 1, 1, 5, 5)`,
	)
	ctx := t.Context()
	d, err := db.Device(ctx, "d1")
	if err != nil || d.Builds != nil || d.DeltaMax != 0 || d.Payloads["fc"] != "4.5" {
		t.Fatalf("device %+v %v", d, err)
	}
	r, err := db.Release(ctx, "agent", "2.0.0")
	if err != nil || r.Deltas != nil || r.Counter != 20 {
		t.Fatalf("release %+v %v", r, err)
	}
	us, err := db.DeviceUpdates(ctx, "d1", "", 0)
	if err != nil || len(us) != 1 || us[0].Via() != store.ViaFull || us[0].Committed == nil {
		t.Fatalf("updates %+v %v", us, err)
	}
	if err := db.AddReleaseDelta(ctx, store.ReleaseDelta{Target: "agent", Version: "2.0.0", BaseSHA256: strings.Repeat("01", 32), BaseSize: 1,
		PatchSHA256: strings.Repeat("02", 32), PatchSize: 40, Manifest: []byte("dm")}); err != nil {
		t.Fatalf("a delta of a release pushed before the migration: %v", err)
	}
}
