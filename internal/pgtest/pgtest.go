// Package pgtest gives tests a PostgreSQL database of their own on a
// server this process starts (internal/pgserver): Debian's postgresql
// binaries, a throwaway data directory, loopback only.
// HANGAR_TEST_POSTGRES_URL names a server to use instead (its URL with a
// role that may create databases).
//
// Without PostgreSQL, tests that need it skip; under CI (CI=true) they
// fail.
package pgtest

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hangarfleet/hangar/internal/pgserver"
)

var (
	once    sync.Once
	srv     *pgserver.Server
	srvErr  error
	counter atomic.Int64
)

// Main runs the tests, then stops the server if one was started.
func Main(m *testing.M) {
	code := m.Run()
	Stop()
	os.Exit(code)
}

// Stop stops the server this process started (if any).
func Stop() { srv.Stop() }

// Available says whether PostgreSQL can be had (starting it if needed).
func Available() error {
	once.Do(func() {
		if u := os.Getenv("HANGAR_TEST_POSTGRES_URL"); u != "" {
			srv, srvErr = pgserver.FromURL(u)
			return
		}
		srv, srvErr = pgserver.Start()
	})
	return srvErr
}

// URL creates a new empty database and returns its URL. It skips the test
// when PostgreSQL is not available, and fails it under CI.
func URL(t testing.TB) string {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("PostgreSQL needed under CI: %v", err)
		}
		t.Skipf("PostgreSQL not available: %v", err)
	}
	name := fmt.Sprintf("hangar_t%d_%d", os.Getpid(), counter.Add(1))
	u, err := srv.CreateDatabase(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.DropDatabase(name) })
	return u
}
