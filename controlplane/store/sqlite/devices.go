package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Enroll creates the device or gives it a new credential. A revoked device
// is refused unless the enrollment comes from an operator.
func (db *DB) Enroll(ctx context.Context, e store.Enrollment) (store.Device, error) {
	labels, err := json.Marshal(orEmpty(e.Labels))
	if err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	defer tx.Rollback()
	var revoked bool
	err = tx.QueryRowContext(ctx, `SELECT revoked FROM devices WHERE id = ?`, e.ID).Scan(&revoked)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		col := "labels"
		if e.Operator {
			col = "op_labels"
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO devices (id, hardware, `+col+`, cred_hash, enrolled_at) VALUES (?, ?, ?, ?, ?)`,
			e.ID, e.Hardware, string(labels), e.CredHash, ms(e.Now))
	case err != nil:
	case revoked && !e.Operator:
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, store.ErrRevoked)
	case e.Operator:
		_, err = tx.ExecContext(ctx, `UPDATE devices SET op_labels = ?, cred_hash = ?, revoked = 0, enrolled_at = ?,
			hardware = CASE WHEN ? != '' THEN ? ELSE hardware END WHERE id = ?`,
			string(labels), e.CredHash, ms(e.Now), e.Hardware, e.Hardware, e.ID)
	default:
		_, err = tx.ExecContext(ctx, `UPDATE devices SET labels = ?, cred_hash = ?, enrolled_at = ?,
			hardware = CASE WHEN ? != '' THEN ? ELSE hardware END WHERE id = ?`,
			string(labels), e.CredHash, ms(e.Now), e.Hardware, e.Hardware, e.ID)
	}
	if err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	d, err := getDevice(ctx, tx, e.ID, db.onlineCutoff())
	if err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	if err := tx.Commit(); err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	return d, nil
}

// Revoke removes the device's credential and marks it revoked; its history
// stays. Enrollment with the fleet token is refused from then on.
func (db *DB) Revoke(ctx context.Context, id string) error {
	res, err := db.w.ExecContext(ctx, `UPDATE devices SET revoked = 1, cred_hash = NULL, connected = 0 WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("revoke %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("revoke %s: %w", id, store.ErrNotFound)
	}
	db.mu.Lock()
	delete(db.devNums, id)
	db.mu.Unlock()
	return nil
}

// Credential returns the credential hash of an enrolled, unrevoked device.
func (db *DB) Credential(ctx context.Context, id string) ([]byte, error) {
	var h []byte
	var revoked bool
	err := db.r.QueryRowContext(ctx, `SELECT cred_hash, revoked FROM devices WHERE id = ?`, id).Scan(&h, &revoked)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, store.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("credential %s: %w", id, err)
	}
	if revoked || h == nil {
		return nil, store.ErrRevoked
	}
	return h, nil
}

const deviceCols = `id, hardware, arch, version, release, labels, op_labels, payloads, revoked, enrolled_at,
	first_seen, last_seen, connected, boot, proto, dropped, sample_ts, sample`

type rowScanner interface{ Scan(...any) error }

// parseLabels reads a stored label map ({"k":"v",...}, as this store
// writes it) without reflection; anything unusual (escapes, spaces) goes
// to encoding/json.
func parseLabels(s string) map[string]string {
	out := map[string]string{}
	if s == "" || s == "{}" || s == "null" {
		return out
	}
	slow := func() map[string]string {
		m := map[string]string{}
		_ = json.Unmarshal([]byte(s), &m)
		return m
	}
	if strings.IndexByte(s, '\\') >= 0 || len(s) < 2 || s[0] != '{' || s[len(s)-1] != '}' {
		return slow()
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] >= 0x80 { // control bytes, non-ASCII: JSON's rules
			return slow()
		}
	}
	rest := s[1 : len(s)-1]
	str := func() (string, bool) {
		if len(rest) < 2 || rest[0] != '"' {
			return "", false
		}
		end := strings.IndexByte(rest[1:], '"')
		if end < 0 {
			return "", false
		}
		v := rest[1 : 1+end]
		rest = rest[end+2:]
		return v, true
	}
	for len(rest) > 0 {
		k, ok := str()
		if !ok || len(rest) == 0 || rest[0] != ':' {
			return slow()
		}
		rest = rest[1:]
		v, ok := str()
		if !ok {
			return slow()
		}
		out[k] = v
		if len(rest) > 0 {
			if rest[0] != ',' || len(rest) == 1 {
				return slow()
			}
			rest = rest[1:]
		}
	}
	return out
}

const briefCols = `id, version, labels, op_labels, revoked, last_seen, connected`

func scanBrief(r rowScanner, cutoff time.Time) (store.Device, error) {
	var (
		d                store.Device
		labels, opLabels string
		last             sql.NullInt64
		connected        bool
	)
	if err := r.Scan(&d.ID, &d.Version, &labels, &opLabels, &d.Revoked, &last, &connected); err != nil {
		return d, err
	}
	d.ReportedLabels = parseLabels(labels)
	if opLabels != "" && opLabels != "{}" && opLabels != "null" {
		d.OperatorLabels = parseLabels(opLabels)
	}
	d.Labels = d.ReportedLabels
	if len(d.OperatorLabels) > 0 {
		d.Labels = store.MergeLabels(d.ReportedLabels, d.OperatorLabels)
	}
	d.Online = connected && last.Valid && last.Int64 >= ms(cutoff)
	return d, nil
}

func scanDevice(r rowScanner, cutoff time.Time) (store.Device, error) {
	var (
		d                               store.Device
		labels, opLabels, payloads      string
		enrolled, first, last, sampleTS sql.NullInt64
		connected                       bool
		sample                          []byte
	)
	err := r.Scan(&d.ID, &d.Hardware, &d.Arch, &d.Version, &d.Release, &labels, &opLabels, &payloads, &d.Revoked,
		&enrolled, &first, &last, &connected, &d.Boot, &d.Proto, &d.Dropped, &sampleTS, &sample)
	if err != nil {
		return d, err
	}
	_ = json.Unmarshal([]byte(labels), &d.ReportedLabels)
	_ = json.Unmarshal([]byte(opLabels), &d.OperatorLabels)
	_ = json.Unmarshal([]byte(payloads), &d.Payloads)
	d.Labels = store.MergeLabels(d.ReportedLabels, d.OperatorLabels)
	d.EnrolledAt, d.FirstSeen, d.LastSeen = fromMS(enrolled), fromMS(first), fromMS(last)
	d.Online = connected && last.Valid && last.Int64 >= ms(cutoff)
	if sample != nil && sampleTS.Valid {
		var s proto.Sample
		if proto.Unmarshal(sample, &s) == nil {
			r := s.Reading(sampleTS.Int64)
			d.Latest = &r
		}
	}
	return d, nil
}

type querier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func getDevice(ctx context.Context, q querier, id string, cutoff time.Time) (store.Device, error) {
	d, err := scanDevice(q.QueryRowContext(ctx, `SELECT `+deviceCols+` FROM devices WHERE id = ?`, id), cutoff)
	if errors.Is(err, sql.ErrNoRows) {
		return d, store.ErrNotFound
	}
	return d, err
}

// Device returns one device.
func (db *DB) Device(ctx context.Context, id string) (store.Device, error) {
	d, err := getDevice(ctx, db.r, id, db.onlineCutoff())
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return d, fmt.Errorf("device %s: %w", id, err)
	}
	return d, err
}

// Devices lists devices matching f, ordered by id.
func (db *DB) Devices(ctx context.Context, f store.DeviceFilter) ([]store.Device, error) {
	var where []string
	var args []any
	for k, v := range f.Labels {
		path := `$."` + strings.ReplaceAll(k, `"`, ``) + `"`
		where = append(where, `coalesce(json_extract(op_labels, ?), json_extract(labels, ?)) = ?`)
		args = append(args, path, path, v)
	}
	if f.Online != nil {
		if *f.Online {
			where = append(where, `(connected = 1 AND last_seen >= ?)`)
		} else {
			where = append(where, `NOT (connected = 1 AND coalesce(last_seen, 0) >= ?)`)
		}
		args = append(args, ms(db.onlineCutoff()))
	}
	if f.Version != "" {
		where = append(where, `version = ?`)
		args = append(args, f.Version)
	}
	cols, scan := deviceCols, scanDevice
	if f.Brief {
		cols, scan = briefCols, scanBrief
	}
	q := `SELECT ` + cols + ` FROM devices`
	if len(where) > 0 {
		q += ` WHERE ` + strings.Join(where, ` AND `)
	}
	q += ` ORDER BY id`
	if f.Limit > 0 {
		q += fmt.Sprintf(` LIMIT %d`, f.Limit)
	}
	rows, err := db.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	defer rows.Close()
	out := []store.Device{}
	cutoff := db.onlineCutoff()
	for rows.Next() {
		d, err := scan(rows, cutoff)
		if err != nil {
			return nil, fmt.Errorf("list devices: %w", err)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// MarkAllOffline clears the online flag of every device: after the embedded
// broker starts, no device is connected yet.
func (db *DB) MarkAllOffline(ctx context.Context) error {
	_, err := db.w.ExecContext(ctx, `UPDATE devices SET connected = 0 WHERE connected = 1`)
	if err != nil {
		return fmt.Errorf("mark offline: %w", err)
	}
	return nil
}

// SetToken stores the hash of a named API token.
func (db *DB) SetToken(ctx context.Context, name string, hash []byte, now time.Time) error {
	_, err := db.w.ExecContext(ctx, `INSERT INTO tokens (name, hash, created) VALUES (?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, created = excluded.created`, name, hash, ms(now))
	if err != nil {
		return fmt.Errorf("set token %s: %w", name, err)
	}
	return nil
}

// TokenHash returns the hash of a named token.
func (db *DB) TokenHash(ctx context.Context, name string) ([]byte, error) {
	var h []byte
	err := db.r.QueryRowContext(ctx, `SELECT hash FROM tokens WHERE name = ?`, name).Scan(&h)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, store.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("token %s: %w", name, err)
	}
	return h, nil
}

func orEmpty(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}
