package sqlite

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

// RolloutRow is a rollout as stored: spec and state as JSON (the rollout
// package owns their shape), members apart.
type RolloutRow struct {
	ID        string
	Spec      []byte
	State     []byte
	Status    string
	Created   time.Time
	CreatedBy string
	Updated   time.Time
}

// MemberRow is one device's place in a rollout.
type MemberRow struct {
	Device   string
	Stage    int
	Offered  int64
	Reverted int64
	Canceled int64
}

// CreateRollout stores a new rollout with its audit entry.
func (db *DB) CreateRollout(ctx context.Context, r RolloutRow, a store.Audit) error {
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create rollout: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO rollouts (id, spec, state, status, created, created_by, updated) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		r.ID, string(r.Spec), string(r.State), r.Status, ms(r.Created), r.CreatedBy, ms(r.Updated)); err != nil {
		return fmt.Errorf("create rollout: %w", err)
	}
	if err := addAudit(ctx, tx, a); err != nil {
		return err
	}
	return tx.Commit()
}

const rolloutCols = `id, spec, state, status, created, created_by, updated`

func scanRollout(r rowScanner) (RolloutRow, error) {
	var row RolloutRow
	var spec, state string
	var created, updated int64
	if err := r.Scan(&row.ID, &spec, &state, &row.Status, &created, &row.CreatedBy, &updated); err != nil {
		return row, err
	}
	row.Spec, row.State = []byte(spec), []byte(state)
	row.Created, row.Updated = time.UnixMilli(created).UTC(), time.UnixMilli(updated).UTC()
	return row, nil
}

// Rollout returns one rollout.
func (db *DB) Rollout(ctx context.Context, id string) (RolloutRow, error) {
	row, err := scanRollout(db.r.QueryRowContext(ctx, `SELECT `+rolloutCols+` FROM rollouts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return row, store.ErrNotFound
	}
	return row, err
}

// Rollouts lists rollouts, newest first; with statuses, only those.
func (db *DB) Rollouts(ctx context.Context, statuses ...string) ([]RolloutRow, error) {
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
	var out []RolloutRow
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
func (db *DB) Members(ctx context.Context, rollout string) ([]MemberRow, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT device, stage, offered, reverted, canceled FROM rollout_members WHERE rollout = ?`, rollout)
	if err != nil {
		return nil, fmt.Errorf("rollout members: %w", err)
	}
	defer rows.Close()
	var out []MemberRow
	for rows.Next() {
		var m MemberRow
		if err := rows.Scan(&m.Device, &m.Stage, &m.Offered, &m.Reverted, &m.Canceled); err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// BusyDevices maps devices that are members of rollouts in one of
// statuses to their rollout.
func (db *DB) BusyDevices(ctx context.Context, statuses ...string) (map[string]string, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT m.device, m.rollout FROM rollout_members m JOIN rollouts r ON r.id = m.rollout
		WHERE r.status IN (?`+repeat(",?", len(statuses)-1)+`)`, toAny(statuses)...)
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
// commands it decided and the audit entries of its transitions in one
// transaction, with synchronous=FULL: once it returns, a power cut keeps
// all of it, and nothing is sent before it returns.
func (db *DB) ApplyRollout(ctx context.Context, id string, state []byte, status string, members []MemberRow, cmds []store.Command, audits []store.Audit, now time.Time) error {
	conn, err := db.w.Conn(ctx)
	if err != nil {
		return fmt.Errorf("apply rollout: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `PRAGMA synchronous = FULL`); err != nil {
		return fmt.Errorf("apply rollout: %w", err)
	}
	defer conn.ExecContext(context.Background(), `PRAGMA synchronous = NORMAL`)
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("apply rollout: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `UPDATE rollouts SET state = ?, status = ?, updated = ? WHERE id = ?`, string(state), status, ms(now), id); err != nil {
		return fmt.Errorf("apply rollout: %w", err)
	}
	// Many rows per statement: a rollout's first plan writes every member
	// of the fleet, and one statement per row costs a cgo round trip each.
	// In key order, the B-tree insertions append instead of splitting
	// pages all over the tree.
	const memberRows = 500
	members = slices.Clone(members)
	slices.SortFunc(members, func(a, b MemberRow) int { return strings.Compare(a.Device, b.Device) })
	for len(members) > 0 {
		chunk := members[:min(memberRows, len(members))]
		members = members[len(chunk):]
		q := `INSERT INTO rollout_members (rollout, device, stage, offered, reverted, canceled) VALUES ` +
			strings.TrimSuffix(strings.Repeat(`(?, ?, ?, ?, ?, ?),`, len(chunk)), `,`) +
			` ON CONFLICT (rollout, device) DO UPDATE SET stage = excluded.stage, offered = excluded.offered, reverted = excluded.reverted, canceled = excluded.canceled`
		args := make([]any, 0, 6*len(chunk))
		for _, m := range chunk {
			args = append(args, id, m.Device, m.Stage, m.Offered, m.Reverted, m.Canceled)
		}
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
	}
	if len(cmds) > 0 {
		cs, err := tx.PrepareContext(ctx, `INSERT INTO commands (id, dev, kind, body, rollout, created)
			SELECT ?, num, ?, ?, ?, ? FROM devices WHERE id = ?`)
		if err != nil {
			return fmt.Errorf("apply rollout: %w", err)
		}
		defer cs.Close()
		for _, c := range cmds {
			if _, err := cs.ExecContext(ctx, c.ID, c.Kind, c.Body, c.Rollout, ms(c.Created), c.Device); err != nil {
				return fmt.Errorf("apply rollout: %w", err)
			}
		}
	}
	for _, a := range audits {
		if err := addAudit(ctx, tx, a); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// SetRolloutState records an operator's change of a rollout (start, pause,
// resume, abort, promote) with its audit entry.
func (db *DB) SetRolloutState(ctx context.Context, id string, state []byte, status string, a store.Audit) error {
	return db.ApplyRollout(ctx, id, state, status, nil, nil, []store.Audit{a}, a.Time)
}

type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}
