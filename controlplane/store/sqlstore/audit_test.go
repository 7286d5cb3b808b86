package sqlstore_test

import (
	"database/sql"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
)

// Each kind of tampering with the audit log's rows is found, at the entry
// where it starts.
func TestAuditChainDetectsTampering(t *testing.T) {
	for _, c := range []struct {
		name   string
		tamper string
		at     int64
	}{
		{"edited", `UPDATE audit SET actor = 'alice' WHERE id = 3`, 3},
		{"attribute edited", `UPDATE audit SET attrs = '{"remote":"10.0.0.9"}' WHERE id = 4`, 4},
		{"deleted", `DELETE FROM audit WHERE id = 2`, 3},
		{"inserted", `INSERT INTO audit (id, ts, actor, action, target, reason, attrs, hash) SELECT 100, ts, actor, 'device.add', 'ghost', '', '{}', hash FROM audit WHERE id = 5`, 100},
		{"reordered", `UPDATE audit SET ts = CASE id WHEN 2 THEN (SELECT ts FROM audit WHERE id = 3) ELSE (SELECT ts FROM audit WHERE id = 2) END,
			action = CASE id WHEN 2 THEN (SELECT action FROM audit WHERE id = 3) ELSE (SELECT action FROM audit WHERE id = 2) END,
			hash = CASE id WHEN 2 THEN (SELECT hash FROM audit WHERE id = 3) ELSE (SELECT hash FROM audit WHERE id = 2) END WHERE id IN (2, 3)`, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "h.db")
			db, err := sqlstore.Open(path, sqlstore.Options{})
			if err != nil {
				t.Fatal(err)
			}
			ctx := t.Context()
			base := time.Unix(1_800_000_000, 0)
			for i := range 5 {
				if _, err := db.AddAudit(ctx, store.Audit{Time: base.Add(time.Duration(i) * time.Minute), Actor: "admin",
					Action: fmt.Sprintf("device.action%d", i), Target: "d1", Attrs: map[string]string{"remote": "127.0.0.1"}}); err != nil {
					t.Fatal(err)
				}
			}
			v, err := db.VerifyAudit(ctx, 0)
			if err != nil || v.Broken != nil || v.Entries != 5 || v.HeadID != 5 || len(v.Head) != 32 {
				t.Fatalf("untouched log: %+v, %v", v, err)
			}
			db.Close()
			raw, err := sql.Open("sqlite3", path)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := raw.Exec(c.tamper); err != nil {
				t.Fatal(err)
			}
			raw.Close()
			db, err = sqlstore.Open(path, sqlstore.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			v, err = db.VerifyAudit(ctx, 0)
			if err != nil || v.Broken == nil || v.Broken.ID != c.at {
				t.Fatalf("after the tampering: %+v (%v), want the break at entry %d", v, err, c.at)
			}
			t.Logf("%s: %s", c.name, v.Broken.Why)
		})
	}
}

// A log written before the chain (a store upgraded in place) is chained
// when the store opens, in order; later entries extend it.
func TestAuditChainUpgrade(t *testing.T) {
	path := filepath.Join(t.TempDir(), "h.db")
	db, err := sqlstore.Open(path, sqlstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for i := range 3 {
		db.AddAudit(ctx, store.Audit{Time: time.Unix(1_800_000_000+int64(i), 0), Actor: "admin", Action: "a", Target: "d"})
	}
	db.Close()
	raw, _ := sql.Open("sqlite3", path)
	if _, err := raw.Exec(`UPDATE audit SET hash = NULL`); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	db, err = sqlstore.Open(path, sqlstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.AddAudit(ctx, store.Audit{Time: time.Unix(1_800_000_100, 0), Actor: "admin", Action: "b", Target: "d"})
	if v, err := db.VerifyAudit(ctx, 0); err != nil || v.Broken != nil || v.Entries != 4 {
		t.Fatalf("upgraded log: %+v, %v", v, err)
	}
}
