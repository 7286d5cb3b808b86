package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

func (db *DB) num(ctx context.Context, id string) (int64, error) {
	var n int64
	err := db.r.QueryRowContext(ctx, `SELECT num FROM devices WHERE id = ?`, id).Scan(&n)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, store.ErrNotFound
	}
	return n, err
}

// Telemetry returns the samples of device id taken in [from, to), oldest
// first, at most limit of them.
func (db *DB) Telemetry(ctx context.Context, id string, from, to time.Time, limit int) ([]store.TelemetryRow, error) {
	num, err := db.num(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	f, t := ms(from), ms(to)
	// A batch starts at most MaxBatchSpan before its last sample.
	rows, err := db.r.QueryContext(ctx, `SELECT boot, seq, body FROM telemetry
		WHERE dev = ?1 AND ts >= ?2 AND ts < ?3 AND last_ts >= ?4
		UNION ALL SELECT boot, seq, body FROM inbox WHERE dev = ?1 AND ts >= ?2 AND ts < ?3 AND last_ts >= ?4`,
		num, f-proto.MaxBatchSpan.Milliseconds(), t, f)
	if err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	out, err := decodeTelemetry(rows, f, t, false)
	if err != nil {
		return nil, fmt.Errorf("telemetry %s: %w", id, err)
	}
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

// decodeTelemetry reads (boot, seq, body) rows of batches: their samples
// in [f, t), in time order, each batch once (the inbox may hold a
// redelivered batch twice); with firstOnly, one sample a batch.
func decodeTelemetry(rows *sql.Rows, f, t int64, firstOnly bool) ([]store.TelemetryRow, error) {
	defer rows.Close()
	out := []store.TelemetryRow{}
	seen := map[[2]uint64]bool{}
	for rows.Next() {
		var boot, seq uint64
		var body []byte
		if err := rows.Scan(&boot, &seq, &body); err != nil {
			return nil, err
		}
		if seen[[2]uint64{boot, seq}] {
			continue
		}
		seen[[2]uint64{boot, seq}] = true
		b, err := proto.DecodeBatch(body)
		if err != nil || len(b.Samples) == 0 {
			continue // stored by a newer version with rules this one lacks
		}
		samples := b.Samples
		if firstOnly {
			samples = samples[:1]
		}
		for _, s := range samples {
			if ts := b.Base + int64(s.T); ts >= f && ts < t {
				out = append(out, store.TelemetryRow{Boot: boot, Seq: seq, Sample: s, Base: b.Base})
			}
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	sort.SliceStable(out, func(i, j int) bool {
		return out[i].Base+int64(out[i].Sample.T) < out[j].Base+int64(out[j].Sample.T)
	})
	return out, nil
}

// Events returns events of device id (all devices when id is empty) with an
// id above after, oldest first.
func (db *DB) Events(ctx context.Context, id string, after int64, limit int) ([]store.Event, error) {
	return db.QueryEvents(ctx, store.EventFilter{Device: id, After: after, Limit: limit})
}

var eventKinds = map[string]proto.EventKind{"alert": proto.EventAlert, "update": proto.EventUpdate, "ack": proto.EventAck, "message": proto.EventMessage}
var severities = map[string]proto.Severity{"info": proto.SevInfo, "warning": proto.SevWarning, "critical": proto.SevCritical}

// QueryEvents lists the events a filter selects.
func (db *DB) QueryEvents(ctx context.Context, f store.EventFilter) ([]store.Event, error) {
	q := `SELECT e.id, d.id, e.boot, e.seq, e.ts, e.received, e.kind, e.severity, e.code, e.message, e.cmd, e.body
		FROM events e JOIN devices d ON d.num = e.dev WHERE e.id > ?`
	args := []any{f.After}
	if f.Device != "" {
		num, err := db.num(ctx, f.Device)
		if err != nil {
			return nil, fmt.Errorf("events %s: %w", f.Device, err)
		}
		q += ` AND e.dev = ?`
		args = append(args, num)
	}
	if f.Before > 0 {
		q += ` AND e.id < ?`
		args = append(args, f.Before)
	}
	if !f.Since.IsZero() {
		q += ` AND e.received >= ?`
		args = append(args, ms(f.Since))
	}
	if !f.Until.IsZero() {
		q += ` AND e.received < ?`
		args = append(args, ms(f.Until))
	}
	if f.Kind != "" {
		k, ok := eventKinds[f.Kind]
		if !ok {
			return nil, fmt.Errorf("%w: event kind must be alert, update, ack or message, not %q", store.ErrInvalid, f.Kind)
		}
		q += ` AND e.kind = ?`
		args = append(args, uint8(k))
	}
	if f.MinSeverity != "" {
		s, ok := severities[f.MinSeverity]
		if !ok {
			return nil, fmt.Errorf("%w: severity must be info, warning or critical, not %q", store.ErrInvalid, f.MinSeverity)
		}
		q += ` AND e.severity >= ?`
		args = append(args, uint8(s))
	}
	if f.Newest {
		q += ` ORDER BY e.id DESC`
	} else {
		q += ` ORDER BY e.id`
	}
	limit := f.Limit
	if limit <= 0 {
		limit = 100
	}
	q += ` LIMIT ?`
	args = append(args, limit)
	rows, err := db.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	defer rows.Close()
	out := []store.Event{}
	for rows.Next() {
		var (
			e            store.Event
			ts, received int64
			kind, sev    uint8
			body         []byte
		)
		if err := rows.Scan(&e.ID, &e.Device, &e.Boot, &e.Seq, &ts, &received, &kind, &sev, &e.Code, &e.Message, &e.Cmd, &body); err != nil {
			return nil, fmt.Errorf("events: %w", err)
		}
		e.Time, e.Received = time.UnixMilli(ts).UTC(), time.UnixMilli(received).UTC()
		e.Kind, e.Severity = proto.EventKind(kind).String(), proto.Severity(sev).String()
		if len(body) > 0 {
			var b eventBody
			if json.Unmarshal(body, &b) == nil {
				e.Update, e.Attrs = b.Update, b.Attrs
			}
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// AddAudit records something the control plane or an operator did.
func (db *DB) AddAudit(ctx context.Context, a store.Audit) (int64, error) {
	tx, err := db.begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("audit %s: %w", a.Action, err)
	}
	defer tx.Rollback()
	id, err := appendAudit(ctx, tx, a)
	if err != nil {
		return 0, err
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("audit %s: %w", a.Action, err)
	}
	return id, nil
}

func addAudit(ctx context.Context, tx *Tx, a store.Audit) error {
	_, err := appendAudit(ctx, tx, a)
	return err
}

// AuditLog returns audit entries about target (all when empty), newest first.
func (db *DB) AuditLog(ctx context.Context, target string, limit int) ([]store.Audit, error) {
	q := `SELECT id, ts, actor, action, target, reason, attrs FROM audit`
	var args []any
	if target != "" {
		q += ` WHERE target = ?`
		args = append(args, target)
	}
	q += ` ORDER BY id DESC LIMIT ?`
	args = append(args, limit)
	rows, err := db.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	defer rows.Close()
	out := []store.Audit{}
	for rows.Next() {
		var a store.Audit
		var ts int64
		var attrs string
		if err := rows.Scan(&a.ID, &ts, &a.Actor, &a.Action, &a.Target, &a.Reason, &attrs); err != nil {
			return nil, fmt.Errorf("audit log: %w", err)
		}
		a.Time = time.UnixMilli(ts).UTC()
		_ = json.Unmarshal([]byte(attrs), &a.Attrs)
		out = append(out, a)
	}
	return out, rows.Err()
}

// FleetHealth summarises the fleet from each device's latest sample.
func (db *DB) FleetHealth(ctx context.Context) (store.FleetHealth, error) {
	now := db.opts.Now()
	h := store.FleetHealth{Versions: map[string]int{}, Time: now.UTC()}
	rows, err := db.r.QueryContext(ctx, `SELECT version, revoked, connected, last_seen, sample FROM devices`)
	if err != nil {
		return h, fmt.Errorf("fleet health: %w", err)
	}
	defer rows.Close()
	battEdges := []int{20, 40, 60, 80, 101}
	battLabels := []string{"0-19", "20-39", "40-59", "60-79", "80-100"}
	battCounts := make([]int, len(battEdges))
	errEdges := []uint32{1, 10, 100, 1 << 31}
	errLabels := []string{"0", "1-9", "10-99", "100+"}
	errCounts := make([]int, len(errEdges))
	cutoff := ms(db.onlineCutoff())
	for rows.Next() {
		var (
			version   string
			revoked   bool
			connected bool
			last      sql.NullInt64
			sample    []byte
		)
		if err := rows.Scan(&version, &revoked, &connected, &last, &sample); err != nil {
			return h, fmt.Errorf("fleet health: %w", err)
		}
		h.Devices++
		if revoked {
			h.Revoked++
			continue
		}
		if version == "" {
			version = "unknown"
		}
		h.Versions[version]++
		if !connected || !last.Valid || last.Int64 < cutoff {
			continue
		}
		h.Online++
		var s proto.Sample
		if sample == nil || proto.Unmarshal(sample, &s) != nil {
			continue
		}
		if s.Flight == proto.FlightFlying {
			h.Flying++
		}
		if s.Battery != nil {
			b := int(*s.Battery)
			if b < 20 {
				h.LowBatt++
			}
			battCounts[sort.SearchInts(battEdges, b+1)]++
		}
		for i, e := range errEdges {
			if s.Errors < e {
				errCounts[i]++
				break
			}
		}
	}
	for i := range battLabels {
		h.Battery = append(h.Battery, store.Bucket{Label: battLabels[i], Count: battCounts[i]})
	}
	for i := range errLabels {
		h.Errors = append(h.Errors, store.Bucket{Label: errLabels[i], Count: errCounts[i]})
	}
	return h, rows.Err()
}
