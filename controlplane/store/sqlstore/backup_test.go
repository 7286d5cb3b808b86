package sqlstore_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
)

// A backup taken while the store is open and written to holds what was
// committed, opens as a store, is private, and never overwrites a file.
func TestBackup(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "hangar.db")
	db, err := sqlstore.Open(path, sqlstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	enroll(t, db, "d1", map[string]string{"base": "zurich"})
	out := filepath.Join(dir, "backup.db")
	if err := sqlstore.Backup(t.Context(), path, out); err != nil {
		t.Fatal(err)
	}
	enroll(t, db, "d2", nil) // after the copy
	if st, err := os.Stat(out); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v %v", st.Mode(), err)
	}
	if err := sqlstore.Backup(t.Context(), path, out); err == nil {
		t.Fatal("a second backup overwrote the first")
	}
	b, err := sqlstore.Open(out, sqlstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if d, err := b.Device(t.Context(), "d1"); err != nil || d.Labels["base"] != "zurich" {
		t.Fatalf("d1 in the backup: %+v %v", d, err)
	}
	if _, err := b.Device(t.Context(), "d2"); err == nil {
		t.Fatal("the backup holds what came after it")
	}
	if err := sqlstore.Backup(t.Context(), "postgres://x@y/z", filepath.Join(dir, "pg.db")); err == nil {
		t.Fatal("a PostgreSQL store backed up as a file")
	}
}
