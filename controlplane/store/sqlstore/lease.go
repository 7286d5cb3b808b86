package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// Leases are decided by the database's clock: on PostgreSQL the server's,
// so that replicas with skewed clocks agree on when a lease lapsed; on
// SQLite (one machine) the store's.
func (db *DB) nowMS(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) (int64, error) {
	if db.d != postgresDialect {
		return ms(db.opts.Now()), nil
	}
	var now int64
	err := q.QueryRowContext(ctx, `SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint`).Scan(&now)
	return now, err
}

// AcquireLease takes the lease name for holder for ttl, renews it if holder
// has it, and otherwise returns who has it. The returned lease is holder's
// when its Holder is holder; a new holder gets a token above every earlier
// one.
func (db *DB) AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (store.Lease, error) {
	// Not under the store's write lock (a long write must not make the
	// leader miss its renewal): the lease row's own lock orders renewals,
	// takeovers and the fence checks of writes (checkFence).
	tx, err := db.w.unlocked().BeginTx(ctx, nil)
	if err != nil {
		return store.Lease{}, fmt.Errorf("lease: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO leases (name, holder, token, expires, acquired) VALUES (?, '', 0, 0, 0)
		ON CONFLICT DO NOTHING`, name); err != nil {
		return store.Lease{}, fmt.Errorf("lease: %w", err)
	}
	l := store.Lease{Name: name}
	var expires int64
	err = tx.QueryRowContext(ctx, `SELECT holder, token, expires FROM leases WHERE name = ?`+db.d.forUpdate(), name).Scan(&l.Holder, &l.Token, &expires)
	if err != nil {
		return store.Lease{}, fmt.Errorf("lease: %w", err)
	}
	// The clock is read once the row is ours.
	now, err := db.nowMS(ctx, tx)
	if err != nil {
		return store.Lease{}, fmt.Errorf("lease: %w", err)
	}
	switch {
	case l.Holder == holder && expires > now:
		expires = now + ttl.Milliseconds()
		_, err = tx.ExecContext(ctx, `UPDATE leases SET expires = ? WHERE name = ?`, expires, name)
	case expires <= now:
		// Lapsed (or released): a new term, even for the same holder,
		// so that writes of its earlier term stay refused.
		l.Holder, l.Token, expires = holder, l.Token+1, now+ttl.Milliseconds()
		_, err = tx.ExecContext(ctx, `UPDATE leases SET holder = ?, token = ?, expires = ?, acquired = ? WHERE name = ?`,
			l.Holder, l.Token, expires, now, name)
	}
	if err != nil {
		return store.Lease{}, fmt.Errorf("lease: %w", err)
	}
	l.Expires = time.UnixMilli(expires).UTC()
	if err := tx.Commit(); err != nil {
		return store.Lease{}, fmt.Errorf("lease: %w", err)
	}
	return l, nil
}

// ReleaseLease gives the lease up at once (a replica shutting down), if l
// is still the current term.
func (db *DB) ReleaseLease(ctx context.Context, l store.Lease) error {
	_, err := db.w.ExecContext(ctx, `UPDATE leases SET expires = 0 WHERE name = ? AND holder = ? AND token = ?`, l.Name, l.Holder, l.Token)
	if err != nil {
		return fmt.Errorf("release lease: %w", err)
	}
	return nil
}

// Lease returns the lease name as stored.
func (db *DB) Lease(ctx context.Context, name string) (store.Lease, error) {
	l := store.Lease{Name: name}
	var expires int64
	err := db.r.QueryRowContext(ctx, `SELECT holder, token, expires FROM leases WHERE name = ?`, name).Scan(&l.Holder, &l.Token, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return l, store.ErrNotFound
	}
	if err != nil {
		return l, fmt.Errorf("lease: %w", err)
	}
	l.Expires = time.UnixMilli(expires).UTC()
	return l, nil
}

// begin starts a write transaction. Writes made under a lease
// (store.WithFence) check in it that the lease is still that holder's term
// and has not lapsed: the write lock (SQLite's single writer, PostgreSQL's
// advisory lock) orders this check before any later takeover, so a
// replica that lost its lease cannot store a decision.
func (db *DB) begin(ctx context.Context) (*Tx, error) {
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	db.fence(ctx, tx)
	return tx, nil
}

// fence makes tx check, last before it commits, that the lease ctx
// writes under (if any) still holds: a takeover either is seen by the
// check or waits for the commit, and the lease row is locked only for
// that last moment (a long write does not hold up the renewal).
func (db *DB) fence(ctx context.Context, tx *Tx) {
	if f, ok := store.FenceFrom(ctx); ok {
		tx.beforeCommit = func() error { return db.checkFence(ctx, tx, f) }
	}
}

func (db *DB) checkFence(ctx context.Context, tx *Tx, f store.Lease) error {
	now, err := db.nowMS(ctx, tx)
	if err != nil {
		return err
	}
	var holder string
	var token, expires int64
	// FOR SHARE: a takeover waits for this write to commit; a write
	// after the takeover sees the new term.
	err = tx.QueryRowContext(ctx, `SELECT holder, token, expires FROM leases WHERE name = ?`+db.d.forShare(), f.Name).Scan(&holder, &token, &expires)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && (holder != f.Holder || token != f.Token || expires <= now)) {
		return fmt.Errorf("%w (%s term %d of %s)", store.ErrFenced, f.Name, f.Token, f.Holder)
	}
	return err
}
