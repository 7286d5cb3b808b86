package sqlstore

import (
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// AddRelease records a verified release. A target's version and counter
// are each unique.
func (db *DB) AddRelease(ctx context.Context, r store.Release) error {
	sum, err := hex.DecodeString(r.SHA256)
	if err != nil {
		return fmt.Errorf("add release: %w", err)
	}
	hw, _ := json.Marshal(r.Hardware)
	arch, _ := json.Marshal(r.Arch)
	_, err = db.w.ExecContext(ctx, `INSERT INTO releases (target, version, counter, size, sha256, hardware, arch, created, expires,
		key_id, notes, pushed_at, pushed_by, manifest, keys) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.Target, r.Version, r.Counter, r.Size, sum, string(hw), string(arch), r.Created.Unix(), r.Expires.Unix(),
		r.KeyID, r.Notes, ms(r.PushedAt), r.PushedBy, r.Manifest, r.Keys)
	if err != nil && isUnique(err) {
		return fmt.Errorf("add release %s %s: %w (same version or counter)", r.Target, r.Version, store.ErrExists)
	}
	if err != nil {
		return fmt.Errorf("add release: %w", err)
	}
	return nil
}

const releaseCols = `target, version, counter, size, sha256, hardware, arch, created, expires, key_id, notes, pushed_at, pushed_by, manifest, keys`

func scanRelease(r rowScanner) (store.Release, error) {
	var rel store.Release
	var sum []byte
	var hw, arch string
	var created, expires, pushed int64
	err := r.Scan(&rel.Target, &rel.Version, &rel.Counter, &rel.Size, &sum, &hw, &arch, &created, &expires, &rel.KeyID,
		&rel.Notes, &pushed, &rel.PushedBy, &rel.Manifest, &rel.Keys)
	if err != nil {
		return rel, err
	}
	rel.SHA256 = hex.EncodeToString(sum)
	_ = json.Unmarshal([]byte(hw), &rel.Hardware)
	_ = json.Unmarshal([]byte(arch), &rel.Arch)
	rel.Created, rel.Expires = time.Unix(created, 0).UTC(), time.Unix(expires, 0).UTC()
	rel.PushedAt = time.UnixMilli(pushed).UTC()
	return rel, nil
}

// Releases lists releases, newest counter first (of target, or all).
func (db *DB) Releases(ctx context.Context, target string) ([]store.Release, error) {
	q := `SELECT ` + releaseCols + ` FROM releases`
	var args []any
	if target != "" {
		q += ` WHERE target = ?`
		args = append(args, target)
	}
	rows, err := db.r.QueryContext(ctx, q+` ORDER BY target, counter DESC`, args...)
	if err != nil {
		return nil, fmt.Errorf("releases: %w", err)
	}
	defer rows.Close()
	out := []store.Release{}
	for rows.Next() {
		r, err := scanRelease(rows)
		if err != nil {
			return nil, fmt.Errorf("releases: %w", err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("releases: %w", err)
	}
	rows.Close()
	ds, err := db.deltas(ctx, target, "")
	if err != nil {
		return nil, fmt.Errorf("releases: %w", err)
	}
	for i := range out {
		out[i].Deltas = ds[out[i].Target+"@"+out[i].Version]
	}
	return out, nil
}

// Release returns one release. An empty target matches any target when
// the version is unambiguous.
func (db *DB) Release(ctx context.Context, target, version string) (store.Release, error) {
	q := `SELECT ` + releaseCols + ` FROM releases WHERE version = ?`
	args := []any{version}
	if target != "" {
		q += ` AND target = ?`
		args = append(args, target)
	}
	rows, err := db.r.QueryContext(ctx, q+` LIMIT 2`, args...)
	if err != nil {
		return store.Release{}, fmt.Errorf("release: %w", err)
	}
	defer rows.Close()
	var found []store.Release
	for rows.Next() {
		r, err := scanRelease(rows)
		if err != nil {
			return store.Release{}, err
		}
		found = append(found, r)
	}
	switch len(found) {
	case 0:
		return store.Release{}, store.ErrNotFound
	case 1:
		rows.Close()
		r := found[0]
		ds, err := db.deltas(ctx, r.Target, r.Version)
		if err != nil {
			return r, fmt.Errorf("release: %w", err)
		}
		r.Deltas = ds[r.Target+"@"+r.Version]
		return r, nil
	}
	return store.Release{}, fmt.Errorf("release %s exists for several targets: name one (target@version)", version)
}

// AddReleaseDelta records a verified delta of a pushed release: one per
// base build (store.ErrExists for a second), of a release that exists
// (store.ErrNotFound).
func (db *DB) AddReleaseDelta(ctx context.Context, d store.ReleaseDelta) error {
	base, err1 := hex.DecodeString(d.BaseSHA256)
	patch, err2 := hex.DecodeString(d.PatchSHA256)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("add release delta: %w", err)
	}
	res, err := db.w.ExecContext(ctx, `INSERT INTO release_deltas (target, version, base_sha256, base_size, base_version,
		patch_sha256, patch_size, manifest, pushed_at, pushed_by)
		SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM releases WHERE target = ? AND version = ?)`,
		d.Target, d.Version, base, d.BaseSize, d.BaseVersion, patch, d.PatchSize, d.Manifest, ms(d.PushedAt), d.PushedBy,
		d.Target, d.Version)
	if err != nil && isUnique(err) {
		return fmt.Errorf("add release delta %s %s from %.12s: %w", d.Target, d.Version, d.BaseSHA256, store.ErrExists)
	}
	if err != nil {
		return fmt.Errorf("add release delta: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("add release delta: release %s %s: %w", d.Target, d.Version, store.ErrNotFound)
	}
	return nil
}

// deltas returns the deltas of a release (target and version), of every
// release of a target (version ""), or of all (both ""), by
// target@version, in the order they were pushed.
func (db *DB) deltas(ctx context.Context, target, version string) (map[string][]store.ReleaseDelta, error) {
	q := `SELECT target, version, base_sha256, base_size, base_version, patch_sha256, patch_size, manifest, pushed_at, pushed_by
		FROM release_deltas WHERE 1 = 1`
	var args []any
	if target != "" {
		q += ` AND target = ?`
		args = append(args, target)
	}
	if version != "" {
		q += ` AND version = ?`
		args = append(args, version)
	}
	rows, err := db.r.QueryContext(ctx, q+` ORDER BY pushed_at, base_sha256`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string][]store.ReleaseDelta{}
	for rows.Next() {
		var d store.ReleaseDelta
		var base, patch []byte
		var pushed int64
		if err := rows.Scan(&d.Target, &d.Version, &base, &d.BaseSize, &d.BaseVersion, &patch, &d.PatchSize, &d.Manifest,
			&pushed, &d.PushedBy); err != nil {
			return nil, err
		}
		d.BaseSHA256, d.PatchSHA256 = hex.EncodeToString(base), hex.EncodeToString(patch)
		d.PushedAt = time.UnixMilli(pushed).UTC()
		k := d.Target + "@" + d.Version
		out[k] = append(out[k], d)
	}
	return out, rows.Err()
}

// AddCommand records a command before it is sent. Pending commands of the
// same kind for the device are superseded (marked acknowledged).
func (db *DB) AddCommand(ctx context.Context, c store.Command, supersede bool) error {
	_, err := db.addCommand(ctx, c, supersede, false)
	return err
}

// AddCommandOnce stores c unless a command with its id exists; it reports
// whether it stored it. Commands whose id is derived from what they answer
// (a device's trial, a rollout's decision) are so created exactly once,
// however often the reason to create them is seen.
func (db *DB) AddCommandOnce(ctx context.Context, c store.Command, supersede bool) (bool, error) {
	return db.addCommand(ctx, c, supersede, true)
}

func (db *DB) addCommand(ctx context.Context, c store.Command, supersede, once bool) (bool, error) {
	tx, err := db.begin(ctx)
	if err != nil {
		return false, fmt.Errorf("add command: %w", err)
	}
	defer tx.Rollback()
	if once {
		var one int
		switch err := tx.QueryRowContext(ctx, `SELECT 1 FROM commands WHERE id = ?`, c.ID).Scan(&one); {
		case err == nil:
			return false, nil
		case !errors.Is(err, sql.ErrNoRows):
			return false, fmt.Errorf("add command: %w", err)
		}
	}
	var num int64
	if err := tx.QueryRowContext(ctx, `SELECT num FROM devices WHERE id = ? AND revoked = 0`, c.Device).Scan(&num); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return false, fmt.Errorf("add command: device %s: %w", c.Device, store.ErrNotFound)
		}
		return false, fmt.Errorf("add command: %w", err)
	}
	if supersede {
		if _, err := tx.ExecContext(ctx, `UPDATE commands SET acked = ? WHERE dev = ? AND kind = ? AND acked IS NULL`,
			ms(c.Created), num, c.Kind); err != nil {
			return false, fmt.Errorf("add command: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO commands (id, dev, kind, body, rollout, created) VALUES (?, ?, ?, ?, ?, ?)`,
		c.ID, num, c.Kind, c.Body, c.Rollout, ms(c.Created)); err != nil {
		return false, fmt.Errorf("add command: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("add command: %w", err)
	}
	return true, nil
}

// MarkSent records a (re)send.
// MarkSentAll records that the commands were handed to the broker, in one
// transaction.
func (db *DB) MarkSentAll(ctx context.Context, ids []string, at time.Time) error {
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("mark sent: %w", err)
	}
	defer tx.Rollback()
	st, err := tx.PrepareContext(ctx, `UPDATE commands SET sent = ?, attempts = attempts + 1 WHERE id = ?`)
	if err != nil {
		return fmt.Errorf("mark sent: %w", err)
	}
	defer st.Close()
	for _, id := range ids {
		if _, err := st.ExecContext(ctx, ms(at), id); err != nil {
			return fmt.Errorf("mark sent: %w", err)
		}
	}
	return tx.Commit()
}

func (db *DB) MarkSent(ctx context.Context, id string, at time.Time) error {
	_, err := db.w.ExecContext(ctx, `UPDATE commands SET sent = ?, attempts = attempts + 1 WHERE id = ?`, ms(at), id)
	return err
}

// AckCommand records that the device received a command.
func (db *DB) AckCommand(ctx context.Context, device, id string, at time.Time) error {
	_, err := db.w.ExecContext(ctx, `UPDATE commands SET acked = ? WHERE id = ? AND acked IS NULL
		AND dev = (SELECT num FROM devices WHERE id = ?)`, ms(at), id, device)
	return err
}

// PendingCommands returns unacknowledged commands, oldest first: of one
// device, or (device "") of every device, sent before sentBefore.
func (db *DB) PendingCommands(ctx context.Context, device string, sentBefore time.Time) ([]store.Command, error) {
	q := `SELECT c.id, d.id, c.kind, c.body, c.rollout, c.created, c.sent, c.attempts FROM commands c
		JOIN devices d ON d.num = c.dev WHERE c.acked IS NULL AND c.withdrawn IS NULL AND d.revoked = 0 AND coalesce(c.sent, 0) < ?`
	args := []any{ms(sentBefore)}
	if device != "" {
		q += ` AND d.id = ?`
		args = append(args, device)
	}
	rows, err := db.r.QueryContext(ctx, q+` ORDER BY c.created LIMIT 10000`, args...)
	if err != nil {
		return nil, fmt.Errorf("pending commands: %w", err)
	}
	defer rows.Close()
	var out []store.Command
	for rows.Next() {
		var c store.Command
		var created int64
		var sent sql.NullInt64
		if err := rows.Scan(&c.ID, &c.Device, &c.Kind, &c.Body, &c.Rollout, &created, &sent, &c.Attempts); err != nil {
			return nil, err
		}
		c.Created, c.Sent = time.UnixMilli(created).UTC(), fromMS(sent)
		out = append(out, c)
	}
	return out, rows.Err()
}

// DeviceUpdates returns the update states of a device (or of every device
// for a target and counter).
func (db *DB) DeviceUpdates(ctx context.Context, device, target string, counter uint64) ([]store.DeviceUpdate, error) {
	q := `SELECT d.id, u.target, u.counter, u.version, u.state, u.reason, u.check_name, u.progress, u.rollout, u.updated, u.committed,
		u.patch, u.fallback FROM device_updates u JOIN devices d ON d.num = u.dev WHERE 1 = 1`
	var args []any
	if device != "" {
		q += ` AND d.id = ?`
		args = append(args, device)
	}
	if target != "" {
		q += ` AND u.target = ?`
		args = append(args, target)
	}
	if counter != 0 {
		q += ` AND u.counter = ?`
		args = append(args, counter)
	}
	rows, err := db.r.QueryContext(ctx, q+` ORDER BY d.id, u.counter DESC`, args...)
	if err != nil {
		return nil, fmt.Errorf("device updates: %w", err)
	}
	defer rows.Close()
	out := []store.DeviceUpdate{}
	for rows.Next() {
		var u store.DeviceUpdate
		var updated int64
		var committed sql.NullInt64
		if err := rows.Scan(&u.Device, &u.Target, &u.Counter, &u.Version, &u.State, &u.Reason, &u.Check, &u.Progress, &u.Rollout, &updated, &committed,
			&u.Patch, &u.Fallback); err != nil {
			return nil, err
		}
		u.Updated = time.UnixMilli(updated).UTC()
		u.Committed = fromMS(committed)
		out = append(out, u)
	}
	return out, rows.Err()
}

// Trials lists the devices whose latest report on a release, made since
// the given time, says they are trying it out (state trial), and that
// have no confirmation of that trial yet.
func (db *DB) Trials(ctx context.Context, since time.Time) ([]store.DeviceUpdate, error) {
	// Only trials without their confirmation (commands.Dispatcher names it
	// confirm:DEVICE:COUNTER:BOOT): the others need no write.
	rows, err := db.r.QueryContext(ctx, `SELECT d.id, u.target, u.counter, u.version, u.rollout, u.boot, u.updated
		FROM device_updates u JOIN devices d ON d.num = u.dev WHERE u.state = ? AND u.updated >= ? AND d.revoked = 0
		AND NOT EXISTS (SELECT 1 FROM commands c WHERE c.id = 'confirm:' || d.id || ':' || u.counter || ':' || u.boot)`,
		string(proto.UpdateTrial), ms(since))
	if err != nil {
		return nil, fmt.Errorf("trials: %w", err)
	}
	defer rows.Close()
	var out []store.DeviceUpdate
	for rows.Next() {
		u := store.DeviceUpdate{State: string(proto.UpdateTrial)}
		var updated int64
		if err := rows.Scan(&u.Device, &u.Target, &u.Counter, &u.Version, &u.Rollout, &u.Boot, &updated); err != nil {
			return nil, err
		}
		u.Updated = time.UnixMilli(updated).UTC()
		out = append(out, u)
	}
	return out, rows.Err()
}
