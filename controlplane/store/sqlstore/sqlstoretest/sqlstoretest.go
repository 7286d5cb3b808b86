// Package sqlstoretest opens stores for tests on the engine the
// environment names: HANGAR_TEST_STORE=postgres runs them on a PostgreSQL
// database of their own (internal/pgtest), anything else on a SQLite file.
// The same tests thus run against both engines.
package sqlstoretest

import (
	"database/sql"
	"os"
	"path/filepath"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/internal/pgtest"
)

// Postgres says whether tests run on PostgreSQL.
func Postgres() bool { return os.Getenv("HANGAR_TEST_STORE") == "postgres" }

// Location returns where a new store lives: a PostgreSQL URL of a new
// database, or a SQLite file in dir (t.TempDir() when empty).
func Location(t testing.TB, dir string) string {
	t.Helper()
	if Postgres() {
		return pgtest.URL(t)
	}
	if dir == "" {
		dir = t.TempDir()
	}
	return filepath.Join(dir, "hangar.db")
}

// Open opens a new store, closed when the test ends.
func Open(t testing.TB, opts sqlstore.Options) *sqlstore.DB {
	t.Helper()
	db, err := sqlstore.OpenURL(Location(t, ""), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// SQLiteOnly skips a test of SQLite's own mechanics on PostgreSQL.
func SQLiteOnly(t testing.TB) {
	t.Helper()
	if Postgres() {
		t.Skip("SQLite mechanics: not run on PostgreSQL")
	}
}

// Raw opens a plain connection to db's database, for tests that change
// rows behind the store's back (data written by an earlier release, say).
// Its queries are the engine's own SQL.
func Raw(t testing.TB, db *sqlstore.DB) *sql.DB {
	t.Helper()
	driver, dsn := "sqlite3", "file:"+db.Path()
	if db.Engine() == "postgres" {
		driver, dsn = "pgx", db.Path()
	}
	raw, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	return raw
}
