package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// CreateRollout stores a new rollout, its members and its audit entry in
// one transaction.
func (db *DB) CreateRollout(ctx context.Context, r store.RolloutRow, members []store.MemberRow, a store.Audit) error {
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("create rollout: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO rollouts (id, spec, state, status, created, created_by, updated) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		r.ID, string(r.Spec), string(r.State), r.Status, ms(r.Created), r.CreatedBy, ms(r.Updated)); err != nil {
		return fmt.Errorf("create rollout: %w", err)
	}
	if err := insertMembers(ctx, tx, r.ID, members); err != nil {
		return err
	}
	if err := addAudit(ctx, tx, a); err != nil {
		return err
	}
	return tx.Commit()
}

const rolloutCols = `id, spec, state, status, created, created_by, updated, rev`

func scanRollout(r rowScanner) (store.RolloutRow, error) {
	var row store.RolloutRow
	var spec, state string
	var created, updated int64
	if err := r.Scan(&row.ID, &spec, &state, &row.Status, &created, &row.CreatedBy, &updated, &row.Rev); err != nil {
		return row, err
	}
	row.Spec, row.State = []byte(spec), []byte(state)
	row.Created, row.Updated = time.UnixMilli(created).UTC(), time.UnixMilli(updated).UTC()
	return row, nil
}

// Rollout returns one rollout.
func (db *DB) Rollout(ctx context.Context, id string) (store.RolloutRow, error) {
	row, err := scanRollout(db.r.QueryRowContext(ctx, `SELECT `+rolloutCols+` FROM rollouts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return row, store.ErrNotFound
	}
	return row, err
}

// Rollouts lists rollouts, newest first; with statuses, only those.
func (db *DB) Rollouts(ctx context.Context, statuses ...string) ([]store.RolloutRow, error) {
	q := `SELECT ` + rolloutCols + ` FROM rollouts`
	var args []any
	if len(statuses) > 0 {
		q += ` WHERE status IN (?` + repeat(",?", len(statuses)-1) + `)`
		for _, s := range statuses {
			args = append(args, s)
		}
	}
	rows, err := db.r.QueryContext(ctx, q+` ORDER BY created DESC, id`, args...)
	if err != nil {
		return nil, fmt.Errorf("rollouts: %w", err)
	}
	defer rows.Close()
	var out []store.RolloutRow
	for rows.Next() {
		r, err := scanRollout(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func repeat(s string, n int) string {
	out := ""
	for range n {
		out += s
	}
	return out
}

// Members returns a rollout's members.
func (db *DB) Members(ctx context.Context, rollout string) ([]store.MemberRow, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT device, stage, offered, offers, withdrawn, reverted, canceled, replaced_by, replaces
		FROM rollout_members WHERE rollout = ?`, rollout)
	if err != nil {
		return nil, fmt.Errorf("rollout members: %w", err)
	}
	defer rows.Close()
	var out []store.MemberRow
	for rows.Next() {
		var m store.MemberRow
		if err := rows.Scan(&m.Device, &m.Stage, &m.Offered, &m.Offers, &m.Withdrawn, &m.Reverted, &m.Canceled, &m.ReplacedBy, &m.Replaces); err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// BusyDevices maps devices that are members of rollouts in one of
// statuses to their rollout (the oldest, if several).
func (db *DB) BusyDevices(ctx context.Context, statuses ...string) (map[string]string, error) {
	// Newest first: where a device is a member of two, the oldest
	// rollout, written last, owns it (whatever order rows come in).
	rows, err := db.r.QueryContext(ctx, `SELECT m.device, m.rollout FROM rollout_members m JOIN rollouts r ON r.id = m.rollout
		WHERE r.status IN (?`+repeat(",?", len(statuses)-1)+`) ORDER BY r.created DESC, r.id DESC`, toAny(statuses)...)
	if err != nil {
		return nil, fmt.Errorf("busy devices: %w", err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var d, r string
		if err := rows.Scan(&d, &r); err != nil {
			return nil, err
		}
		out[d] = r
	}
	return out, rows.Err()
}

func toAny(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

// ApplyRollout stores a rollout's new state, its changed members, the
// commands it decided, the offers it withdrew and the audit entries of its
// transitions in one transaction, with synchronous=FULL: once it returns, a
// power cut keeps all of it, and nothing is sent before it returns.
func (db *DB) ApplyRollout(ctx context.Context, c store.RolloutChange) error {
	var tx *Tx
	if db.d == sqliteDialect {
		// synchronous=FULL for this transaction only: its own connection.
		conn, err := db.w.Conn(ctx)
		if err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, `PRAGMA synchronous = FULL`); err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		defer conn.ExecContext(context.Background(), `PRAGMA synchronous = NORMAL`)
		raw, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		tx = &Tx{Tx: raw, d: db.d}
		db.fence(ctx, tx)
	} else {
		// PostgreSQL commits are durable (synchronous_commit on).
		var err error
		if tx, err = db.begin(ctx); err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
	}
	defer tx.Rollback()
	if c.State != nil {
		r, err := tx.ExecContext(ctx, `UPDATE rollouts SET state = ?, status = ?, updated = ?, rev = rev + 1 WHERE id = ? AND rev = ?`,
			string(c.State), c.Status, ms(c.Now), c.ID, c.Rev)
		if err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		if n, _ := r.RowsAffected(); n == 0 {
			return fmt.Errorf("apply rollout %s: %w", c.ID, store.ErrConflict)
		}
	}
	if err := insertMembers(ctx, tx, c.ID, c.Members); err != nil {
		return err
	}
	if len(c.Withdraw) > 0 {
		ws, err := tx.PrepareContext(ctx, `UPDATE commands SET withdrawn = ? WHERE id = ? AND acked IS NULL`)
		if err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		defer ws.Close()
		for _, id := range c.Withdraw {
			if _, err := ws.ExecContext(ctx, ms(c.Now), id); err != nil {
				return fmt.Errorf("apply rollout: %w", err)
			}
		}
	}
	if len(c.Commands) > 0 {
		// A decision already stored (an id seen) is not stored twice, and
		// does not fail the rest of this one.
		cs, err := tx.PrepareContext(ctx, `INSERT INTO commands (id, dev, kind, body, rollout, created)
			SELECT ?, num, ?, ?, ?, ? FROM devices WHERE id = ? ON CONFLICT (id) DO NOTHING`)
		if err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		defer cs.Close()
		for _, cmd := range c.Commands {
			if _, err := cs.ExecContext(ctx, cmd.ID, cmd.Kind, cmd.Body, cmd.Rollout, ms(cmd.Created), cmd.Device); err != nil {
				return fmt.Errorf("apply rollout: %w", err)
			}
		}
	}
	for _, a := range c.Audits {
		if err := addAudit(ctx, tx, a); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// RolloutAcks maps the commands of a rollout that their devices
// acknowledged to when they did (unix ms).
func (db *DB) RolloutAcks(ctx context.Context, rollout string) (map[string]int64, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT id, acked FROM commands WHERE rollout = ? AND acked IS NOT NULL AND withdrawn IS NULL`, rollout)
	if err != nil {
		return nil, fmt.Errorf("rollout acks: %w", err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var id string
		var at int64
		if err := rows.Scan(&id, &at); err != nil {
			return nil, fmt.Errorf("rollout acks: %w", err)
		}
		out[id] = at
	}
	return out, rows.Err()
}

// SetRolloutState records an operator's change of a rollout (start, pause,
// resume, abort, promote) with its audit entry.
func (db *DB) SetRolloutState(ctx context.Context, id string, rev int64, state []byte, status string, a store.Audit) error {
	return db.ApplyRollout(ctx, store.RolloutChange{ID: id, Rev: rev, State: state, Status: status, Audits: []store.Audit{a}, Now: a.Time})
}

type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// insertMembers writes members, many rows per statement: a rollout's
// first plan writes every member of the fleet, and one statement per row
// costs a cgo round trip each. In key order, the B-tree insertions append
// instead of splitting pages all over the tree.
func insertMembers(ctx context.Context, tx *Tx, rollout string, members []store.MemberRow) error {
	const memberRows = 300
	members = slices.Clone(members)
	slices.SortFunc(members, func(a, b store.MemberRow) int { return strings.Compare(a.Device, b.Device) })
	for len(members) > 0 {
		chunk := members[:min(memberRows, len(members))]
		members = members[len(chunk):]
		q := `INSERT INTO rollout_members (rollout, device, stage, offered, offers, withdrawn, reverted, canceled, replaced_by, replaces) VALUES ` +
			strings.TrimSuffix(strings.Repeat(`(?, ?, ?, ?, ?, ?, ?, ?, ?, ?),`, len(chunk)), `,`) +
			` ON CONFLICT (rollout, device) DO UPDATE SET stage = excluded.stage, offered = excluded.offered, offers = excluded.offers,
			withdrawn = excluded.withdrawn, reverted = excluded.reverted, canceled = excluded.canceled,
			replaced_by = excluded.replaced_by, replaces = excluded.replaces`
		args := make([]any, 0, 10*len(chunk))
		for _, m := range chunk {
			args = append(args, rollout, m.Device, m.Stage, m.Offered, m.Offers, m.Withdrawn, m.Reverted, m.Canceled, m.ReplacedBy, m.Replaces)
		}
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return fmt.Errorf("rollout members: %w", err)
		}
	}
	return nil
}
