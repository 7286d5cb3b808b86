package sqlstore_test

import (
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/internal/pgtest"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// On PostgreSQL telemetry lives in one partition per day: retention drops
// whole days (and counts their samples), prunes the day the cutoff falls
// in row by row, and keeps what is newer.
func TestTelemetryPartitions(t *testing.T) {
	url := pgtest.URL(t)
	clk := &testClock{t: time.UnixMilli(prototest.Base)}
	db, err := sqlstore.OpenPostgres(url, sqlstore.Options{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := t.Context()
	enroll(t, db, "a", nil)
	day := 24 * time.Hour
	var items []store.IngestItem
	for i := range 4 { // today, then 1, 2 and 3 days later, 3 samples each
		b := prototest.Batch(uint64(i+1), 3)
		b.Base += int64(time.Duration(i) * day / time.Millisecond)
		items = append(items, store.IngestItem{Device: "a", Kind: store.IngestBatch, Batch: &b, Received: clk.Now()})
	}
	// and one dated a year ahead: no partition, the default one takes it
	far := prototest.Batch(9, 2)
	far.Base += int64(365 * day / time.Millisecond)
	items = append(items, store.IngestItem{Device: "a", Kind: store.IngestBatch, Batch: &far, Received: clk.Now()})
	if _, err := db.WriteIngest(ctx, items); err != nil {
		t.Fatal(err)
	}
	raw := sqlstoretest.Raw(t, db)
	parts := func() map[string]int {
		rows, err := raw.Query(`SELECT tableoid::regclass::text, count(*) FROM telemetry GROUP BY 1`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		out := map[string]int{}
		for rows.Next() {
			var n string
			var c int
			rows.Scan(&n, &c)
			out[n] = c
		}
		return out
	}
	p := parts()
	if len(p) != 5 || p["telemetry_default"] != 1 {
		t.Fatalf("batches by partition: %v (want four days and the default)", p)
	}
	// The cutoff: two days and a half later. Days 0 and 1 go whole; day 2
	// starts before the cutoff and its batch is older: deleted row by row.
	clk.Add(3 * day)
	n, err := db.PruneTelemetry(ctx, time.UnixMilli(prototest.Base).Add(2*day+day/2))
	if err != nil || n != 9 {
		t.Fatalf("pruned %d samples, %v (want 9)", n, err)
	}
	p = parts()
	if len(p) != 2 || p["telemetry_default"] != 1 {
		t.Fatalf("after retention: %v (want day 3 and the default)", p)
	}
	var tables int
	raw.QueryRow(`SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry'`).Scan(&tables)
	if tables < 2+3 {
		t.Fatalf("%d partitions after retention: the days ahead must have been made", tables)
	}
	rows, err := db.Telemetry(ctx, "a", time.Unix(0, 0), clk.Now().Add(400*day), 100)
	if err != nil || len(rows) != 3+2 {
		t.Fatalf("telemetry after retention: %d samples, %v", len(rows), err)
	}
}
