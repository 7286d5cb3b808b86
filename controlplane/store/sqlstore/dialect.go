package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/mattn/go-sqlite3"
)

// The store's queries are written once, in the SQL SQLite and PostgreSQL
// share: ON CONFLICT upserts, IS DISTINCT FROM, RETURNING, integers for
// flags and unix-millisecond times. What still differs is translated when a
// query is first run on PostgreSQL (and cached): positional placeholders
// (? and ?N become $k and $N), and the scalar two-argument max and min
// (GREATEST and LEAST). The few statements that cannot be shared (JSON
// access, schema, maintenance) branch on the dialect where they are.

// dialect is the database engine behind a store.
type dialect uint8

const (
	sqliteDialect dialect = iota
	postgresDialect
)

func (d dialect) String() string {
	if d == postgresDialect {
		return "postgres"
	}
	return "sqlite"
}

// rebinds caches the PostgreSQL form of each query.
var (
	rebinds     sync.Map // string -> string
	rebindCount atomic.Int64
)

const maxRebinds = 4096

// rebind returns q in the dialect's form.
func (d dialect) rebind(q string) string {
	if d != postgresDialect {
		return q
	}
	if v, ok := rebinds.Load(q); ok {
		return v.(string)
	}
	out := toPostgres(q)
	// The store's queries are a few hundred; a bound keeps a caller that
	// builds many (none should) from growing the cache.
	if rebindCount.Add(1) <= maxRebinds {
		rebinds.Store(q, out)
	}
	return out
}

// toPostgres rewrites placeholders and scalar max/min outside string
// literals and quoted identifiers.
func toPostgres(q string) string {
	var b strings.Builder
	b.Grow(len(q) + 16)
	n := 0
	for i := 0; i < len(q); i++ {
		c := q[i]
		switch {
		case c == '\'' || c == '"':
			j := i + 1
			for j < len(q) && q[j] != c {
				j++
			}
			if j < len(q) {
				j++
			}
			b.WriteString(q[i:j])
			i = j - 1
		case c == '-' && i+1 < len(q) && q[i+1] == '-':
			j := strings.IndexByte(q[i:], '\n')
			if j < 0 {
				j = len(q) - i
			}
			b.WriteString(q[i : i+j])
			i += j - 1
		case c == '?':
			j := i + 1
			for j < len(q) && q[j] >= '0' && q[j] <= '9' {
				j++
			}
			b.WriteByte('$')
			if j > i+1 {
				b.WriteString(q[i+1 : j])
			} else {
				n++
				b.WriteString(itoa(n))
			}
			i = j - 1
		case (c == 'm' || c == 'M') && scalarMinMax(q, i):
			if strings.EqualFold(q[i:i+3], "max") {
				b.WriteString("GREATEST")
			} else {
				b.WriteString("LEAST")
			}
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}

// scalarMinMax says whether q[i:] starts a call max(a, b) or min(a, b):
// the word, not part of a longer identifier, with a comma at the top level
// of its parentheses (the one-argument forms are aggregates in both).
func scalarMinMax(q string, i int) bool {
	if i+4 > len(q) || q[i+3] != '(' {
		return false
	}
	w := strings.ToLower(q[i : i+3])
	if w != "max" && w != "min" {
		return false
	}
	if i > 0 && isIdent(q[i-1]) {
		return false
	}
	depth := 0
	for j := i + 3; j < len(q); j++ {
		switch q[j] {
		case '(':
			depth++
		case ')':
			depth--
			if depth == 0 {
				return false
			}
		case ',':
			if depth == 1 {
				return true
			}
		case '\'':
			for j++; j < len(q) && q[j] != '\''; j++ {
			}
		}
	}
	return false
}

func isIdent(c byte) bool {
	return c == '_' || c == '.' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
}

// args converts arguments to what both engines store for them: flags are
// integers.
func (d dialect) args(a []any) []any {
	if d != postgresDialect {
		return a
	}
	for i, v := range a {
		if b, ok := v.(bool); ok {
			if b {
				a[i] = int64(1)
			} else {
				a[i] = int64(0)
			}
		}
	}
	return a
}

// handle is a connection pool that speaks the store's dialect.
type handle struct {
	*sql.DB
	d dialect
	// lock: transactions begun on this handle take the store's write lock
	// first (PostgreSQL: one writer at a time across every replica, the
	// discipline the store's read-then-write transactions were written
	// for, as SQLite's single writer gives it).
	lock bool
}

func (h handle) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	return h.DB.ExecContext(ctx, h.d.rebind(q), h.d.args(args)...)
}

func (h handle) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	return h.DB.QueryContext(ctx, h.d.rebind(q), h.d.args(args)...)
}

func (h handle) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	return h.DB.QueryRowContext(ctx, h.d.rebind(q), h.d.args(args)...)
}

func (h handle) Prepare(q string) (*sql.Stmt, error) { return h.DB.Prepare(h.d.rebind(q)) }

// writeLockKey is the PostgreSQL advisory lock the store's writers take.
const writeLockKey = 0x68616e676172 // "hangar"

func (h handle) BeginTx(ctx context.Context, opts *sql.TxOptions) (*Tx, error) {
	tx, err := h.DB.BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	t := &Tx{Tx: tx, d: h.d}
	if h.lock && h.d == postgresDialect {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, writeLockKey); err != nil {
			tx.Rollback()
			return nil, err
		}
	}
	return t, nil
}

// unlocked is the handle without the write lock: for writes that are
// correct beside any other (ingest: inserts that skip what is stored, and
// row updates that only move forward).
func (h handle) unlocked() handle { h.lock = false; return h }

// Tx is a transaction in the store's dialect.
type Tx struct {
	*sql.Tx
	d dialect
	// beforeCommit runs last in the transaction; its error rolls it back.
	beforeCommit func() error
}

// Commit runs beforeCommit, then commits.
func (t *Tx) Commit() error {
	if t.beforeCommit != nil {
		if err := t.beforeCommit(); err != nil {
			t.Tx.Rollback()
			return err
		}
	}
	return t.Tx.Commit()
}

func (t *Tx) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	return t.Tx.ExecContext(ctx, t.d.rebind(q), t.d.args(args)...)
}

func (t *Tx) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	return t.Tx.QueryContext(ctx, t.d.rebind(q), t.d.args(args)...)
}

func (t *Tx) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	return t.Tx.QueryRowContext(ctx, t.d.rebind(q), t.d.args(args)...)
}

func (t *Tx) PrepareContext(ctx context.Context, q string) (*sql.Stmt, error) {
	return t.Tx.PrepareContext(ctx, t.d.rebind(q))
}

// forUpdate and forShare lock the rows a SELECT reads (PostgreSQL; SQLite
// has one writer and no row locks).
func (d dialect) forUpdate() string {
	if d == postgresDialect {
		return ` FOR UPDATE`
	}
	return ``
}

func (d dialect) forShare() string {
	if d == postgresDialect {
		return ` FOR SHARE`
	}
	return ``
}

// isUnique says whether err is a unique-constraint violation, on either
// engine.
func isUnique(err error) bool {
	if err == nil {
		return false
	}
	var se sqlite3.Error
	if errors.As(err, &se) {
		return se.Code == sqlite3.ErrConstraint
	}
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505"
}
