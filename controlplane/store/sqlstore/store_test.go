package sqlstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/internal/pgtest"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *testClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestMain(m *testing.M) { pgtest.Main(m) }

func open(t *testing.T) (*sqlstore.DB, *testClock) {
	t.Helper()
	clk := &testClock{t: time.UnixMilli(prototest.Base)}
	return sqlstoretest.Open(t, sqlstore.Options{Now: clk.Now, OnlineTimeout: time.Minute}), clk
}

// enroll enrolls a device with an enrollment profile giving it labels.
func enroll(t *testing.T, db *sqlstore.DB, id string, labels map[string]string) {
	t.Helper()
	_, err := db.Enroll(t.Context(), store.Enrollment{ID: id, Hardware: "rev-b", Profile: labels, CredHash: []byte("h-" + id), Now: time.UnixMilli(prototest.Base)})
	if err != nil {
		t.Fatal(err)
	}
}

func TestEnrollRevoke(t *testing.T) {
	db, _ := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", map[string]string{"hw": "rev-b"})
	h, err := db.Credential(ctx, "d1")
	if err != nil || string(h) != "h-d1" {
		t.Fatalf("credential = %q, %v", h, err)
	}
	if _, err := db.Credential(ctx, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
	if err := db.Revoke(ctx, "d1"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Credential(ctx, "d1"); !errors.Is(err, store.ErrRevoked) {
		t.Fatalf("revoked device credential: %v", err)
	}
	_, err = db.Enroll(ctx, store.Enrollment{ID: "d1", CredHash: []byte("x"), Now: time.Now()})
	if !errors.Is(err, store.ErrRevoked) {
		t.Fatalf("re-enroll of revoked device: %v", err)
	}
	// An operator can reinstate it, and operator labels win over reported ones.
	d, err := db.Enroll(ctx, store.Enrollment{ID: "d1", Operator: true, Labels: map[string]string{"hw": "rev-c", "base": "bern"}, CredHash: []byte("y"), Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if d.Revoked || d.Labels["hw"] != "rev-c" || d.Labels["base"] != "bern" {
		t.Fatalf("reinstated device %+v", d)
	}
	if err := db.Revoke(ctx, "ghost"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoke unknown: %v", err)
	}
}

func TestIngestDedupeAndOnline(t *testing.T) {
	db, clk := open(t)
	ctx := context.Background()
	enroll(t, db, "d1", nil)
	now := clk.Now()
	hello := prototest.State()
	b1, b2 := prototest.Batch(1, 3), prototest.Batch(2, 2)
	items := []store.IngestItem{
		{Device: "d1", Kind: store.IngestState, State: &hello, Received: now},
		{Device: "d1", Kind: store.IngestBatch, Batch: &b1, Received: now},
		{Device: "d1", Kind: store.IngestBatch, Batch: &b1, Received: now}, // redelivery in the same group
		{Device: "d1", Kind: store.IngestBatch, Batch: &b2, Received: now},
		{Device: "ghost", Kind: store.IngestBatch, Batch: &b1, Received: now},
	}
	res, err := db.WriteIngest(ctx, items)
	if err != nil {
		t.Fatal(err)
	}
	if res.Unknown != 1 {
		t.Fatalf("result %+v", res)
	}
	// Until compaction (SQLite's inbox), queries see each batch once.
	rows, err := db.Telemetry(ctx, "d1", now.Add(-time.Hour), now.Add(time.Hour), 100)
	if err != nil || len(rows) != 5 {
		t.Fatalf("telemetry before compaction: %d rows, %v", len(rows), err)
	}
	// Duplicates are found at the insert (PostgreSQL) or when the inbox
	// is compacted (SQLite).
	dups, err := db.Compact(ctx)
	if err != nil || dups+int64(res.Duplicates) != 1 {
		t.Fatalf("compact: %d+%d duplicates, %v", res.Duplicates, dups, err)
	}
	// A redelivery in a later group, even out of order, is dropped too.
	b3 := prototest.Batch(3, 1)
	res, err = db.WriteIngest(ctx, []store.IngestItem{
		{Device: "d1", Kind: store.IngestBatch, Batch: &b3, Received: now},
		{Device: "d1", Kind: store.IngestBatch, Batch: &b1, Received: now},
	})
	if err != nil {
		t.Fatal(err)
	}
	if dups, err := db.Compact(ctx); err != nil || dups+int64(res.Duplicates) != 1 {
		t.Fatalf("late redelivery: %d+%d duplicates, %v", res.Duplicates, dups, err)
	}
	rows, err = db.Telemetry(ctx, "d1", now.Add(-time.Hour), now.Add(time.Hour), 100)
	if err != nil || len(rows) != 6 {
		t.Fatalf("telemetry: %d rows, %v", len(rows), err)
	}
	if r := rows[0].Sample; r.Battery == nil || *r.Battery != 87 || r.Lat != 473769000 {
		t.Errorf("stored sample %+v", r)
	}
	d, _ := db.Device(ctx, "d1")
	if !d.Online || d.Version != "1.4.2" || d.Latest == nil || d.Boot != hello.Boot {
		t.Fatalf("device after hello: %+v", d)
	}

	// A reconnect that takes over the client id: the new hello comes first,
	// then the old connection's will. The device stays online.
	newHello := hello
	newHello.Conn = hello.Conn + 1
	oldWill := prototest.Will()
	if _, err := db.WriteIngest(ctx, []store.IngestItem{
		{Device: "d1", Kind: store.IngestState, State: &newHello, Received: now},
		{Device: "d1", Kind: store.IngestState, State: &oldWill, Received: now},
	}); err != nil {
		t.Fatal(err)
	}
	if d, _ := db.Device(ctx, "d1"); !d.Online {
		t.Fatal("stale will marked a reconnected device offline")
	}
	// The will of the current connection takes it offline.
	curWill := oldWill
	curWill.Conn = newHello.Conn
	db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestState, State: &curWill, Received: now}})
	if d, _ := db.Device(ctx, "d1"); d.Online {
		t.Fatal("will did not take the device offline")
	}
	// Heartbeat timeout: online again after a hello, offline once silent.
	db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestState, State: &newHello, Received: now}})
	on := true
	if ds, _ := db.Devices(ctx, store.DeviceFilter{Online: &on}); len(ds) != 1 {
		t.Fatalf("online filter: %d devices", len(ds))
	}
	clk.Add(2 * time.Minute)
	if d, _ := db.Device(ctx, "d1"); d.Online {
		t.Fatal("silent device still online after the heartbeat timeout")
	}
	if ds, _ := db.Devices(ctx, store.DeviceFilter{Online: &on}); len(ds) != 0 {
		t.Fatalf("online filter after timeout: %d devices", len(ds))
	}
}

func TestEventsAndFilters(t *testing.T) {
	db, clk := open(t)
	ctx := context.Background()
	enroll(t, db, "a", map[string]string{"hw": "rev-a", "base": "zurich"})
	enroll(t, db, "b", map[string]string{"hw": "rev-b", "base": "zurich"})
	ev, up := prototest.AlertEvent(), prototest.UpdateEvent()
	res, err := db.WriteIngest(ctx, []store.IngestItem{
		{Device: "a", Kind: store.IngestEvent, Event: &ev, Received: clk.Now()},
		{Device: "a", Kind: store.IngestEvent, Event: &ev, Received: clk.Now()},
		{Device: "b", Kind: store.IngestEvent, Event: &up, Received: clk.Now()},
	})
	if err != nil || res.Events != 2 || res.Duplicates != 1 {
		t.Fatalf("%+v %v", res, err)
	}
	evs, err := db.Events(ctx, "", 0, 10)
	if err != nil || len(evs) != 2 {
		t.Fatalf("events: %v %v", evs, err)
	}
	if evs[1].Update == nil || evs[1].Update.State != proto.UpdateDownloading || evs[0].Kind != "alert" {
		t.Errorf("events %+v", evs)
	}
	ds, _ := db.Devices(ctx, store.DeviceFilter{Labels: map[string]string{"hw": "rev-b", "base": "zurich"}})
	if len(ds) != 1 || ds[0].ID != "b" {
		t.Fatalf("label filter: %+v", ds)
	}
	ds, _ = db.Devices(ctx, store.DeviceFilter{Labels: map[string]string{"base": "zurich"}})
	if len(ds) != 2 {
		t.Fatalf("label filter base: %d", len(ds))
	}
}

func TestPrune(t *testing.T) {
	db, clk := open(t)
	ctx := context.Background()
	enroll(t, db, "a", nil)
	old := prototest.Batch(1, 2)
	fresh := prototest.Batch(2, 2)
	fresh.Base += int64(48 * time.Hour / time.Millisecond)
	db.WriteIngest(ctx, []store.IngestItem{
		{Device: "a", Kind: store.IngestBatch, Batch: &old, Received: clk.Now()},
		{Device: "a", Kind: store.IngestBatch, Batch: &fresh, Received: clk.Now().Add(48 * time.Hour)},
	})
	n, err := db.PruneTelemetry(ctx, clk.Now().Add(24*time.Hour))
	if err != nil || n != 2 {
		t.Fatalf("pruned %d, %v", n, err)
	}
	rows, _ := db.Telemetry(ctx, "a", time.Unix(0, 0), clk.Now().Add(100*time.Hour), 10)
	if len(rows) != 2 || rows[0].Seq != 2 {
		t.Fatalf("after prune: %+v", rows)
	}
}

func TestFleetHealth(t *testing.T) {
	db, clk := open(t)
	ctx := context.Background()
	for _, id := range []string{"a", "b", "c"} {
		enroll(t, db, id, nil)
	}
	hello := prototest.State()
	low := prototest.Batch(1, 1)
	v := uint8(10)
	low.Samples[0].Battery = &v
	high := prototest.Batch(1, 1)
	db.WriteIngest(ctx, []store.IngestItem{
		{Device: "a", Kind: store.IngestState, State: &hello, Received: clk.Now()},
		{Device: "a", Kind: store.IngestBatch, Batch: &low, Received: clk.Now()},
		{Device: "b", Kind: store.IngestState, State: &hello, Received: clk.Now()},
		{Device: "b", Kind: store.IngestBatch, Batch: &high, Received: clk.Now()},
	})
	db.Revoke(ctx, "c")
	h, err := db.FleetHealth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h.Devices != 3 || h.Online != 2 || h.Revoked != 1 || h.LowBatt != 1 || h.Flying != 2 || h.Versions["1.4.2"] != 2 {
		t.Fatalf("health %+v", h)
	}
	if h.Battery[0].Count != 1 || h.Battery[4].Count != 1 {
		t.Fatalf("battery histogram %+v", h.Battery)
	}
}

// A brief listing agrees with the full one on what it fills.
func TestDevicesBrief(t *testing.T) {
	db, _ := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", map[string]string{"hw": "rev-b", "base": "oslo"})
	enroll(t, db, "d2", map[string]string{"hw": "rev-a"})
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "d2", Labels: map[string]string{"base": "lyon"}, Operator: true, CredHash: []byte("x"), Now: time.UnixMilli(prototest.Base)}); err != nil {
		t.Fatal(err)
	}
	db.Revoke(ctx, "d1")
	full, err := db.Devices(ctx, store.DeviceFilter{})
	if err != nil {
		t.Fatal(err)
	}
	brief, err := db.Devices(ctx, store.DeviceFilter{Brief: true})
	if err != nil || len(brief) != len(full) || len(full) != 2 {
		t.Fatalf("brief %d, full %d, %v", len(brief), len(full), err)
	}
	for i := range full {
		f, b := full[i], brief[i]
		if f.ID != b.ID || f.Version != b.Version || f.Revoked != b.Revoked || f.Online != b.Online || fmt.Sprint(f.Labels) != fmt.Sprint(b.Labels) {
			t.Errorf("brief %+v\nfull %+v", b, f)
		}
	}
	if brief[1].Labels["base"] != "lyon" || brief[1].Labels["hw"] != "rev-a" {
		t.Errorf("operator labels not merged: %v", brief[1].Labels)
	}
	if brief[0].Hardware != full[0].Hardware || brief[1].AwaitingEnrollment || !brief[1].HardwareMismatch {
		t.Errorf("brief hardware %q (full %q), awaiting %v, mismatch %v (labelled rev-a, reports rev-b)",
			brief[0].Hardware, full[0].Hardware, brief[1].AwaitingEnrollment, brief[1].HardwareMismatch)
	}
}

// TestUpdateEventJSON: update reports are snake_case in the API's JSON, and
// events stored by earlier releases (Go field names in the stored body)
// still read.
func TestUpdateEventJSON(t *testing.T) {
	db, clk := open(t)
	ctx := context.Background()
	enroll(t, db, "a", nil)
	up := prototest.UpdateEvent()
	if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "a", Kind: store.IngestEvent, Event: &up, Received: clk.Now()}}); err != nil {
		t.Fatal(err)
	}
	raw := sqlstoretest.Raw(t, db)
	if _, err := raw.Exec(`UPDATE events SET body = '{"update":{"Target":"agent","Version":"1.0.9","Counter":9,"State":"committed","Reason":"old"}}'`); err != nil {
		t.Fatal(err)
	}
	evs, err := db.Events(ctx, "a", 0, 10)
	if err != nil || len(evs) != 1 || evs[0].Update == nil {
		t.Fatalf("%+v %v", evs, err)
	}
	if u := evs[0].Update; u.Target != "agent" || u.Version != "1.0.9" || u.Counter != 9 || u.State != proto.UpdateCommitted || u.Reason != "old" {
		t.Fatalf("an event stored by an earlier release reads as %+v", u)
	}
	b, _ := json.Marshal(evs[0])
	for _, want := range []string{`"target":"agent"`, `"version":"1.0.9"`, `"state":"committed"`, `"reason":"old"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("API JSON lacks %s: %s", want, b)
		}
	}
}
