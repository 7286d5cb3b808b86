package sqlstore_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// TestDevicePaging: search, sort and pages over a fleet agree with the
// count, and a page is what the whole ordered list has at that place.
func TestDevicePaging(t *testing.T) {
	db, _ := open(t)
	ctx := t.Context()
	for i := range 45 {
		hw := "rev-a"
		if i%3 == 0 {
			hw = "rev-b"
		}
		enroll(t, db, fmt.Sprintf("drone-%03d", i), map[string]string{"hw": hw})
	}
	enroll(t, db, "Scout_1", nil)
	enroll(t, db, "scoutx1", nil)
	all, err := db.Devices(ctx, store.DeviceFilter{Sort: "-id"})
	if err != nil || len(all) != 47 {
		t.Fatalf("all: %d %v", len(all), err)
	}
	if all[0].ID != "scoutx1" || all[len(all)-1].ID != "Scout_1" {
		t.Errorf("descending: first %s, last %s", all[0].ID, all[len(all)-1].ID)
	}
	var paged []store.Device
	for off := 0; off < len(all); off += 10 {
		page, err := db.Devices(ctx, store.DeviceFilter{Sort: "-id", Limit: 10, Offset: off})
		if err != nil {
			t.Fatal(err)
		}
		paged = append(paged, page...)
	}
	if len(paged) != len(all) {
		t.Fatalf("pages hold %d devices, the list %d", len(paged), len(all))
	}
	for i := range all {
		if paged[i].ID != all[i].ID {
			t.Fatalf("page position %d: %s, list: %s", i, paged[i].ID, all[i].ID)
		}
	}
	// Search is a case-insensitive substring; _ and % are literal.
	for q, want := range map[string]int{"DRONE-01": 10, "scout_": 1, "%": 0, "-04": 5} {
		n, err := db.CountDevices(ctx, store.DeviceFilter{Search: q})
		ds, _ := db.Devices(ctx, store.DeviceFilter{Search: q})
		if err != nil || n != want || len(ds) != want {
			t.Errorf("search %q: count %d, list %d, want %d (%v)", q, n, len(ds), want, err)
		}
	}
	n, err := db.CountDevices(ctx, store.DeviceFilter{Labels: map[string]string{"hw": "rev-b"}, Limit: 2})
	if err != nil || n != 15 {
		t.Errorf("count with a label: %d %v (a limit does not bound the count)", n, err)
	}
	if _, err := db.Devices(ctx, store.DeviceFilter{Sort: "labels; DROP TABLE devices"}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("unknown sort: %v", err)
	}
}

// TestFirstCommitKept: a device's later "committed" report (an offer
// answered "already installed") moves the report's time, not the time it
// first committed, which lead time measures.
func TestFirstCommitKept(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "a", nil)
	report := func(seq uint64, state proto.UpdateState) {
		t.Helper()
		up := prototest.UpdateEvent()
		up.Seq, up.Update.State = seq, state
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "a", Kind: store.IngestEvent, Event: &up, Received: clk.Now()}}); err != nil {
			t.Fatal(err)
		}
	}
	report(40, proto.UpdateDownloading)
	clk.Add(time.Minute)
	first := clk.Now()
	report(41, proto.UpdateCommitted)
	clk.Add(time.Hour)
	report(42, proto.UpdateCommitted)
	us, err := db.DeviceUpdates(ctx, "a", "agent", 13)
	if err != nil || len(us) != 1 {
		t.Fatalf("updates: %v %v", us, err)
	}
	u := us[0]
	if u.Committed == nil || !u.Committed.Equal(first.UTC().Truncate(time.Millisecond)) || !u.Updated.After(*u.Committed) {
		t.Errorf("committed %v, updated %v; want committed at %v", u.Committed, u.Updated, first)
	}
}

// TestTelemetryPoints: a chart over a long range reads about the points it
// asks for, spread over the whole range (the first samples only would be
// an hour of a week), and a short range gets every sample.
func TestTelemetryPoints(t *testing.T) {
	db, _ := open(t)
	ctx := t.Context()
	enroll(t, db, "a", nil)
	const batches = 400 // 5 samples each, a batch every 10 minutes: 66 hours
	var items []store.IngestItem
	for i := range batches {
		b := prototest.Batch(uint64(i+1), 5)
		b.Base = prototest.Base + int64(i)*600_000
		items = append(items, store.IngestItem{Device: "a", Kind: store.IngestBatch, Batch: &b, Received: time.UnixMilli(b.Base)})
	}
	if _, err := db.WriteIngest(ctx, items); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	from, to := time.UnixMilli(prototest.Base), time.UnixMilli(prototest.Base+int64(batches)*600_000)
	rows, err := db.TelemetryPoints(ctx, "a", from, to, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) < 90 || len(rows) > 110 {
		t.Fatalf("%d points, want about 100", len(rows))
	}
	first := rows[0].Base + int64(rows[0].Sample.T)
	last := rows[len(rows)-1].Base + int64(rows[len(rows)-1].Sample.T)
	if first-from.UnixMilli() > 3_600_000 || to.UnixMilli()-last > 3_600_000 {
		t.Errorf("points from %v to %v do not span the range %v–%v", time.UnixMilli(first), time.UnixMilli(last), from, to)
	}
	short, err := db.TelemetryPoints(ctx, "a", from, from.Add(30*time.Minute), 100)
	if err != nil || len(short) != 15 {
		t.Errorf("half an hour: %d samples (%v), want all 15", len(short), err)
	}
}
