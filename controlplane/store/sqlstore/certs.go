package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// metaPasswords is the meta key that turns password authentication on
// ("on") or off ("off") for the whole fleet. Absent: off, except that a
// database migrated with password devices in it starts "on".
const metaPasswords = "device_passwords"

// DeviceAuth returns what the broker checks a device's CONNECT against, in
// one read.
func (db *DB) DeviceAuth(ctx context.Context, id string) (store.DeviceAuth, error) {
	var (
		a           store.DeviceAuth
		cur, prev   sql.NullString
		enrolled    sql.NullInt64
		passwordsOn sql.NullString
	)
	err := db.r.QueryRowContext(ctx, `SELECT cred_hash, cert_serial, cert_prev, revoked, auth, enrolled_at,
		(SELECT value FROM meta WHERE key = ?) FROM devices WHERE id = ?`, metaPasswords, id).
		Scan(&a.PasswordHash, &cur, &prev, &a.Revoked, &a.Auth, &enrolled, &passwordsOn)
	if errors.Is(err, sql.ErrNoRows) {
		return a, store.ErrNotFound
	}
	if err != nil {
		return a, fmt.Errorf("device auth %s: %w", id, err)
	}
	if a.Revoked {
		return a, store.ErrRevoked
	}
	if a.PasswordHash == nil && !cur.Valid {
		return a, store.ErrNotFound // pre-provisioned or pending, not enrolled yet
	}
	for _, s := range []sql.NullString{cur, prev} {
		if s.Valid && s.String != "" {
			a.Serials = append(a.Serials, s.String)
		}
	}
	a.Passwords = passwordsOn.String == "on"
	return a, nil
}

// Credential returns the password hash of an enrolled, unrevoked device
// that has one.
func (db *DB) Credential(ctx context.Context, id string) ([]byte, error) {
	a, err := db.DeviceAuth(ctx, id)
	if err != nil {
		return nil, err
	}
	if a.PasswordHash == nil {
		return nil, store.ErrNotFound
	}
	return a.PasswordHash, nil
}

// NoteAuth records how a device authenticated. The first connection with
// its current certificate retires what came before it: its password (a
// device that moved to a certificate) and the certificate it renewed.
func (db *DB) NoteAuth(ctx context.Context, id, method, serial string) error {
	var err error
	if method == store.AuthCert {
		_, err = db.w.ExecContext(ctx, `UPDATE devices SET auth = ?,
			cred_hash = CASE WHEN cert_serial = ? THEN NULL ELSE cred_hash END,
			cert_prev = CASE WHEN cert_serial = ? THEN NULL ELSE cert_prev END
			WHERE id = ? AND revoked = 0`, method, serial, serial, id)
	} else {
		_, err = db.w.ExecContext(ctx, `UPDATE devices SET auth = ? WHERE id = ? AND revoked = 0`, method, id)
	}
	if err != nil {
		return fmt.Errorf("note auth %s: %w", id, err)
	}
	return nil
}

// Renew records a certificate issued over the device's authenticated
// connection: it becomes current, and the one the request came with stays
// valid until the device connects with the new one. A request that came
// with neither the current nor the previous certificate (a stale
// connection) is refused with store.ErrInvalid.
func (db *DB) Renew(ctx context.Context, r store.Renewal) error {
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("renew %s: %w", r.Device, err)
	}
	defer tx.Rollback()
	var (
		cur, prev sql.NullString
		hash      []byte
		revoked   bool
	)
	err = tx.QueryRowContext(ctx, `SELECT cert_serial, cert_prev, cred_hash, revoked FROM devices WHERE id = ?`, r.Device).Scan(&cur, &prev, &hash, &revoked)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("renew %s: %w", r.Device, store.ErrNotFound)
	case err != nil:
		return fmt.Errorf("renew %s: %w", r.Device, err)
	case revoked:
		return fmt.Errorf("renew %s: %w", r.Device, store.ErrRevoked)
	}
	keep := sql.NullString{}
	switch {
	case r.From == "" && hash != nil:
		// A password device moving to a certificate: the password stays
		// until it connects with the certificate.
	case r.From != "" && (r.From == cur.String || r.From == prev.String):
		keep = sql.NullString{String: r.From, Valid: true}
	default:
		return fmt.Errorf("renew %s: %w: the request came with a credential the device no longer holds", r.Device, store.ErrInvalid)
	}
	if _, err := tx.ExecContext(ctx, `UPDATE devices SET cert_serial = ?, cert_prev = ?, cert_not_after = ?, cert_key = nullif(?, '') WHERE id = ?`,
		r.Serial, keep, ms(r.NotAfter), r.Key, r.Device); err != nil {
		return fmt.Errorf("renew %s: %w", r.Device, err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO certs (serial, dev, issued, not_after) VALUES (?, ?, ?, ?)`,
		r.Serial, r.Device, ms(r.Now), ms(r.NotAfter)); err != nil {
		return fmt.Errorf("renew %s: %w", r.Device, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("renew %s: %w", r.Device, err)
	}
	return nil
}

// Pend holds an enrollment for an operator's approval, bound to the
// requesting key's fingerprint. A new id gets a record awaiting enrollment;
// a known one keeps its credentials until the approved key enrolls. It
// returns the pending request as stored; store.ErrExists when another key
// is already pending for the id (the first one stays; an operator who
// wants the second removes the first with a revocation), store.ErrRevoked
// for a revoked device.
func (db *DB) Pend(ctx context.Context, id, key, hardware, remote string, now time.Time) (store.Pending, error) {
	tx, err := db.begin(ctx)
	if err != nil {
		return store.Pending{}, fmt.Errorf("pend %s: %w", id, err)
	}
	defer tx.Rollback()
	var (
		revoked   bool
		pending   sql.NullString
		at        sql.NullInt64
		approved  bool
		remoteWas string
	)
	err = tx.QueryRowContext(ctx, `SELECT revoked, pending_key, pending_at, approved, pending_remote FROM devices WHERE id = ?`, id).
		Scan(&revoked, &pending, &at, &approved, &remoteWas)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		_, err = tx.ExecContext(ctx, `INSERT INTO devices (id, hardware, pending_key, pending_at, pending_remote) VALUES (?, ?, ?, ?, ?)`,
			id, hardware, key, ms(now), remote)
	case err != nil:
	case revoked:
		return store.Pending{}, fmt.Errorf("pend %s: %w", id, store.ErrRevoked)
	case pending.Valid && pending.String != key:
		return store.Pending{}, fmt.Errorf("pend %s: %w: another key is waiting for approval", id, store.ErrExists)
	case pending.Valid:
		return store.Pending{Key: key, Since: time.UnixMilli(at.Int64).UTC(), Remote: remoteWas, Approved: approved}, nil
	default:
		_, err = tx.ExecContext(ctx, `UPDATE devices SET pending_key = ?, pending_at = ?, pending_remote = ?, approved = 0 WHERE id = ?`,
			key, ms(now), remote, id)
	}
	if err != nil {
		return store.Pending{}, fmt.Errorf("pend %s: %w", id, err)
	}
	if err := tx.Commit(); err != nil {
		return store.Pending{}, fmt.Errorf("pend %s: %w", id, err)
	}
	return store.Pending{Key: key, Since: now.UTC(), Remote: remote, New: true}, nil
}

// Approve lets the pending enrollment of id complete, for the key it was
// made with. key, when given, must be that key's fingerprint (or a prefix
// of it of at least 16 characters, 64 bits: too long to grind a key to
// match): the operator approves what they compared with the device. It
// returns the fingerprint approved.
func (db *DB) Approve(ctx context.Context, id, key string) (string, error) {
	var pending sql.NullString
	var revoked bool
	err := db.w.QueryRowContext(ctx, `SELECT pending_key, revoked FROM devices WHERE id = ?`, id).Scan(&pending, &revoked)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return "", fmt.Errorf("approve %s: %w", id, store.ErrNotFound)
	case err != nil:
		return "", fmt.Errorf("approve %s: %w", id, err)
	case revoked || !pending.Valid:
		return "", fmt.Errorf("approve %s: %w: no enrollment is waiting for approval", id, store.ErrNotFound)
	case key != "" && (len(key) < 16 || len(key) > len(pending.String) || pending.String[:len(key)] != key):
		return "", fmt.Errorf("approve %s: %w: the waiting key is %s, not %s", id, store.ErrInvalid, pending.String, key)
	}
	res, err := db.w.ExecContext(ctx, `UPDATE devices SET approved = 1 WHERE id = ? AND pending_key = ?`, id, pending.String)
	if err != nil {
		return "", fmt.Errorf("approve %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return "", fmt.Errorf("approve %s: %w: the waiting enrollment changed", id, store.ErrNotFound)
	}
	return pending.String, nil
}

// Deny drops the pending enrollment of id (the device keeps what it had;
// a new id pending approval stays awaiting enrollment, with no key).
func (db *DB) Deny(ctx context.Context, id string) (string, error) {
	var pending sql.NullString
	err := db.w.QueryRowContext(ctx, `SELECT pending_key FROM devices WHERE id = ?`, id).Scan(&pending)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && !pending.Valid) {
		return "", fmt.Errorf("deny %s: %w: no enrollment is waiting for approval", id, store.ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("deny %s: %w", id, err)
	}
	if _, err := db.w.ExecContext(ctx, `UPDATE devices SET pending_key = NULL, pending_at = NULL, pending_remote = '', approved = 0 WHERE id = ? AND pending_key = ?`,
		id, pending.String); err != nil {
		return "", fmt.Errorf("deny %s: %w", id, err)
	}
	return pending.String, nil
}

// PasswordAuth says whether password authentication is on for the fleet.
func (db *DB) PasswordAuth(ctx context.Context) (bool, error) {
	var v string
	err := db.r.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, metaPasswords).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("password auth: %w", err)
	}
	return v == "on", nil
}

// SetPasswordAuth turns password authentication on or off for the fleet.
func (db *DB) SetPasswordAuth(ctx context.Context, on bool) error {
	v := "off"
	if on {
		v = "on"
	}
	if _, err := db.w.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`, metaPasswords, v); err != nil {
		return fmt.Errorf("set password auth: %w", err)
	}
	return nil
}

// RevokedSerials lists the serials of unexpired certificates that no
// longer authenticate a device (superseded, re-keyed or revoked): the
// revocation list for a broker that reads one.
func (db *DB) RevokedSerials(ctx context.Context, now time.Time) ([]string, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT c.serial FROM certs c LEFT JOIN devices d ON d.id = c.dev
		WHERE c.not_after > ? AND (d.id IS NULL OR d.revoked != 0 OR (c.serial IS DISTINCT FROM d.cert_serial AND c.serial IS DISTINCT FROM d.cert_prev))
		ORDER BY c.serial`, ms(now))
	if err != nil {
		return nil, fmt.Errorf("revoked serials: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, fmt.Errorf("revoked serials: %w", err)
		}
		out = append(out, s)
	}
	return out, rows.Err()
}
