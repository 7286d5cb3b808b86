package sqlstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// RecordFleetHealth keeps a fleet health summary in the history, at its
// time.
func (db *DB) RecordFleetHealth(ctx context.Context, h store.FleetHealth) error {
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if _, err := db.w.ExecContext(ctx, `INSERT INTO fleet_history (ts, body) VALUES (?, ?) ON CONFLICT (ts) DO UPDATE SET body = excluded.body`, ms(h.Time), string(b)); err != nil {
		return fmt.Errorf("record fleet health: %w", err)
	}
	return nil
}

// FleetHistory returns the summaries kept in [from, to], oldest first, at
// most points of them (evenly thinned when there are more).
func (db *DB) FleetHistory(ctx context.Context, from, to time.Time, points int) ([]store.FleetHealth, error) {
	if points <= 0 {
		points = 500
	}
	var n int64
	if err := db.r.QueryRowContext(ctx, `SELECT count(*) FROM fleet_history WHERE ts BETWEEN ? AND ?`, ms(from), ms(to)).Scan(&n); err != nil {
		return nil, fmt.Errorf("fleet history: %w", err)
	}
	step := (n + int64(points) - 1) / int64(points)
	if step < 1 {
		step = 1
	}
	// Every step-th row by position, and always the newest.
	rows, err := db.r.QueryContext(ctx, `SELECT body FROM (
		SELECT body, ts, row_number() OVER (ORDER BY ts) - 1 AS i FROM fleet_history WHERE ts BETWEEN ? AND ?) AS h
		WHERE i % ? = 0 OR i = ? - 1 ORDER BY ts`, ms(from), ms(to), step, n)
	if err != nil {
		return nil, fmt.Errorf("fleet history: %w", err)
	}
	defer rows.Close()
	out := []store.FleetHealth{}
	for rows.Next() {
		var body string
		if err := rows.Scan(&body); err != nil {
			return nil, fmt.Errorf("fleet history: %w", err)
		}
		var h store.FleetHealth
		if err := json.Unmarshal([]byte(body), &h); err != nil {
			continue // written by this store; a damaged row is skipped
		}
		out = append(out, h)
	}
	return out, rows.Err()
}

// PruneFleetHistory drops summaries older than cutoff.
func (db *DB) PruneFleetHistory(ctx context.Context, cutoff time.Time) (int64, error) {
	r, err := db.w.ExecContext(ctx, `DELETE FROM fleet_history WHERE ts < ?`, ms(cutoff))
	if err != nil {
		return 0, fmt.Errorf("prune fleet history: %w", err)
	}
	return r.RowsAffected()
}

// LiveMarks reads the store's watermarks (a handful of indexed maxima and
// one pass over the devices table's version column).
func (db *DB) LiveMarks(ctx context.Context) (store.LiveMarks, error) {
	var m store.LiveMarks
	err := db.r.QueryRowContext(ctx, `SELECT
		coalesce((SELECT max(id) FROM events), 0),
		coalesce((SELECT max(id) FROM audit), 0),
		coalesce((SELECT max(updated) FROM rollouts), 0),
		(SELECT count(*) FROM releases) + (SELECT count(*) FROM release_deltas),
		coalesce((SELECT max(last_seen) FROM devices), 0)`).Scan(&m.Event, &m.Audit, &m.Rollouts, &m.Releases, &m.LastSeen)
	if err != nil {
		return m, fmt.Errorf("live marks: %w", err)
	}
	rows, err := db.r.QueryContext(ctx, `SELECT version, revoked, count(*), sum(CASE WHEN connected = 1 AND coalesce(last_seen, 0) >= ? THEN 1 ELSE 0 END)
		FROM devices GROUP BY version, revoked ORDER BY version, revoked`, ms(db.onlineCutoff()))
	if err != nil {
		return m, fmt.Errorf("live marks: %w", err)
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var v string
		var revoked bool
		var n, online int64
		if err := rows.Scan(&v, &revoked, &n, &online); err != nil {
			return m, fmt.Errorf("live marks: %w", err)
		}
		fmt.Fprintf(&b, "%q/%v/%d/%d;", v, revoked, n, online)
	}
	m.Fleet = b.String()
	return m, rows.Err()
}

// TelemetryPoints returns at most about points samples of a device over
// [from, to), spread evenly: one sample of every step-th stored batch
// (and all of the batches not yet compacted, the newest few), so that a
// chart of a week reads a few hundred rows, not every sample.
func (db *DB) TelemetryPoints(ctx context.Context, id string, from, to time.Time, points int) ([]store.TelemetryRow, error) {
	if points <= 0 {
		points = 500
	}
	num, err := db.num(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	f, t := ms(from), ms(to)
	var n int64
	if err := db.r.QueryRowContext(ctx, `SELECT count(*) FROM telemetry WHERE dev = ? AND ts >= ? AND ts < ?`, num, f, t).Scan(&n); err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	step := max(1, (n+int64(points)-1)/int64(points))
	rows, err := db.r.QueryContext(ctx, `SELECT boot, seq, body FROM (
			SELECT boot, seq, body, row_number() OVER (ORDER BY ts) - 1 AS i FROM telemetry WHERE dev = ?1 AND ts >= ?2 AND ts < ?3) AS t
		WHERE i % ?4 = 0
		UNION ALL SELECT boot, seq, body FROM inbox WHERE dev = ?1 AND ts >= ?2 AND ts < ?3`, num, f, t, step)
	if err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	// One sample a batch when thinning; every sample otherwise.
	out, err := decodeTelemetry(rows, f, t, step > 1)
	if err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	return out, nil
}
