package commands

import (
	"testing"

	"github.com/hangarfleet/hangar/internal/pgtest"
)

// With HANGAR_TEST_STORE=postgres the tests run on PostgreSQL.
func TestMain(m *testing.M) { pgtest.Main(m) }
