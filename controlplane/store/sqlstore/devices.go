package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Enroll creates the device or gives it a new credential. A revoked device
// is refused unless the enrollment comes from an operator. What a device
// says about itself at enrollment (hardware, labels) is kept as reported;
// the operator labels are those pre-provisioned for it, else those of its
// enrollment profile, and a device's enrollment never changes them once
// it has enrolled.
func (db *DB) Enroll(ctx context.Context, e store.Enrollment) (store.Device, error) {
	labels, err := json.Marshal(orEmpty(e.Labels))
	if err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	tx, err := db.begin(ctx)
	if err != nil {
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, err)
	}
	defer tx.Rollback()
	var (
		revoked  bool
		enrolled sql.NullInt64
		rekey    sql.NullInt64
		opLabels string
		pending  sql.NullString
		approved bool
	)
	var enrolledAt any = ms(e.Now)
	if e.Operator && e.CredHash == nil {
		enrolledAt = nil // pre-provisioned: awaiting the device's enrollment
	}
	var certKey sql.NullString
	err = tx.QueryRowContext(ctx, `SELECT revoked, enrolled_at, rekey_until, labels, pending_key, approved, cert_key FROM devices WHERE id = ?`, e.ID).Scan(&revoked, &enrolled, &rekey, &opLabels, &pending, &approved, &certKey)
	var certNotAfter any
	if e.CertSerial != "" {
		certNotAfter = ms(e.CertNotAfter)
	}
	auth := ""
	if e.CredHash != nil {
		auth = store.AuthPassword
	}
	switch {
	case errors.Is(err, sql.ErrNoRows) && e.Operator:
		op := orEmpty(maps.Clone(e.Labels))
		if e.Hardware != "" && op[store.HardwareLabel] == "" {
			op[store.HardwareLabel] = e.Hardware
		}
		opJSON, _ := json.Marshal(op)
		_, err = tx.ExecContext(ctx, `INSERT INTO devices (id, labels, cred_hash, enrolled_at) VALUES (?, ?, ?, ?)`,
			e.ID, string(opJSON), e.CredHash, enrolledAt)
	case errors.Is(err, sql.ErrNoRows):
		profile, _ := json.Marshal(orEmpty(e.Profile))
		_, err = tx.ExecContext(ctx, `INSERT INTO devices (id, hardware, reported_labels, labels, cred_hash, enrolled_at, cert_serial, cert_not_after, cert_key, auth)
			VALUES (?, ?, ?, ?, ?, ?, nullif(?, ''), ?, nullif(?, ''), ?)`,
			e.ID, e.Hardware, string(labels), string(profile), e.CredHash, ms(e.Now), e.CertSerial, certNotAfter, certKeyOf(e), auth)
	case err != nil:
	case revoked && !e.Operator:
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, store.ErrRevoked)
	case enrolled.Valid && !e.Operator && !(rekey.Valid && rekey.Int64 > ms(e.Now)) &&
		!(approved && e.Key != "" && pending.String == e.Key) &&
		// The same key enrolling again (its reply was lost, or a power
		// cut came before the device kept it) gets its certificate again:
		// only that device holds the key.
		!(e.Key != "" && certKey.Valid && certKey.String == e.Key):
		// Whoever holds the fleet token must not take an enrolled
		// device's place: only an operator's rekey lets it enroll again.
		return store.Device{}, fmt.Errorf("enroll %s: %w", e.ID, store.ErrEnrolled)
	case e.Operator:
		op := parseLabels(opLabels)
		maps.Copy(op, e.Labels)
		if e.Hardware != "" {
			op[store.HardwareLabel] = e.Hardware
		}
		if err = proto.ValidateLabels(op); err != nil {
			return store.Device{}, fmt.Errorf("enroll %s: %w: %v", e.ID, store.ErrInvalid, err)
		}
		opJSON, _ := json.Marshal(op)
		// A reinstated device starts a new history: nothing it reported
		// before it was revoked (a boot epoch far ahead, say) outranks
		// what it reports now. A device that was not revoked keeps its
		// connection and the order of its reports.
		_, err = tx.ExecContext(ctx, `UPDATE devices SET labels = ?, cred_hash = coalesce(?, cred_hash), revoked = 0,
			enrolled_at = CASE WHEN CAST(? AS BIGINT) IS NULL THEN (CASE WHEN revoked != 0 THEN NULL ELSE enrolled_at END) ELSE ? END,
			boot = CASE WHEN revoked != 0 THEN 0 ELSE boot END, conn = CASE WHEN revoked != 0 THEN 0 ELSE conn END,
			reinstated = CASE WHEN revoked != 0 THEN ? ELSE reinstated END WHERE id = ?`,
			string(opJSON), e.CredHash, enrolledAt, enrolledAt, ms(e.Now), e.ID)
	default:
		// The device's own enrollment: what it reports is kept as
		// reported; a pre-provisioned record takes the profile's labels
		// where an operator set none.
		op := parseLabels(opLabels)
		if !enrolled.Valid {
			for k, v := range e.Profile {
				if _, ok := op[k]; !ok {
					op[k] = v
				}
			}
		}
		opJSON, _ := json.Marshal(op)
		// A new key replaces every credential the device had: the old
		// password and certificates stop working at once. It is a new
		// device as far as its numbers go (replaced hardware, a wiped
		// state directory: its boot epochs start again from its clock),
		// so its reports start a new history, as a reinstated device's.
		_, err = tx.ExecContext(ctx, `UPDATE devices SET reported_labels = ?, labels = ?, cred_hash = ?, enrolled_at = ?, rekey_until = NULL,
			boot = CASE WHEN enrolled_at IS NOT NULL THEN 0 ELSE boot END, conn = CASE WHEN enrolled_at IS NOT NULL THEN 0 ELSE conn END,
			reinstated = CASE WHEN enrolled_at IS NOT NULL THEN ? ELSE reinstated END,
			hardware = CASE WHEN ? != '' THEN ? ELSE hardware END,
			cert_serial = nullif(?, ''), cert_prev = NULL, cert_not_after = ?, cert_key = nullif(?, ''), auth = ?,
			pending_key = NULL, pending_at = NULL, pending_remote = '', approved = 0 WHERE id = ?`,
			string(labels), string(opJSON), e.CredHash, ms(e.Now), ms(e.Now), e.Hardware, e.Hardware, e.CertSerial, certNotAfter, certKeyOf(e), auth, e.ID)
	}
	if err == nil && e.CertSerial != "" {
		_, err = tx.ExecContext(ctx, `INSERT INTO certs (serial, dev, issued, not_after) VALUES (?, ?, ?, ?)`, e.CertSerial, e.ID, ms(e.Now), certNotAfter)
	}
	if err == nil && e.CredHash != nil {
		// A password was issued: passwords are in use, so they stay on
		// (until an operator turns them off) even when a device CA comes
		// later.
		_, err = tx.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, 'on') ON CONFLICT DO NOTHING`, metaPasswords)
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

func certKeyOf(e store.Enrollment) string {
	if e.CertSerial == "" {
		return ""
	}
	return e.Key
}

// AllowRekey lets the device's own enrollment re-key it once, until the
// given time: an operator's answer to a device that lost its credential.
// A revoked device is reinstated by an operator's add instead.
func (db *DB) AllowRekey(ctx context.Context, id string, until time.Time) error {
	res, err := db.w.ExecContext(ctx, `UPDATE devices SET rekey_until = ? WHERE id = ? AND revoked = 0`, ms(until), id)
	if err != nil {
		return fmt.Errorf("allow rekey %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		if _, err := db.Device(ctx, id); err != nil {
			return fmt.Errorf("allow rekey %s: %w", id, err)
		}
		return fmt.Errorf("allow rekey %s: %w", id, store.ErrRevoked)
	}
	return nil
}

// SetLabels applies operators' label changes. Every device must exist: a
// typo in an id is an error (store.ErrNotFound, naming it), and nothing is
// changed then.
func (db *DB) SetLabels(ctx context.Context, changes []store.LabelChange) error {
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("set labels: %w", err)
	}
	defer tx.Rollback()
	if err := db.lockByID(ctx, tx, changes); err != nil {
		return fmt.Errorf("set labels: %w", err)
	}
	for _, c := range changes {
		var cur string
		err := tx.QueryRowContext(ctx, `SELECT labels FROM devices WHERE id = ?`, c.Device).Scan(&cur)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("set labels: device %s: %w", c.Device, store.ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("set labels %s: %w", c.Device, err)
		}
		l, err := applyLabels(cur, c)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE devices SET labels = ? WHERE id = ?`, l, c.Device); err != nil {
			return fmt.Errorf("set labels %s: %w", c.Device, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("set labels: %w", err)
	}
	return nil
}

// lockByID locks the device rows of changes in row order, the order
// ingest locks them in (PostgreSQL), so that a bulk change and ingest
// wait for each other instead of deadlocking.
func (db *DB) lockByID(ctx context.Context, tx *Tx, changes []store.LabelChange) error {
	if db.d != postgresDialect || len(changes) == 0 {
		return nil
	}
	ids := make([]string, len(changes))
	for i, c := range changes {
		ids[i] = c.Device
	}
	rows, err := tx.QueryContext(ctx, `SELECT num FROM devices WHERE id = ANY(?) ORDER BY num FOR UPDATE`, ids)
	if err != nil {
		return err
	}
	return rows.Close()
}

// applyLabels applies a label change to stored labels and checks the
// result (the limits hold for the labels a device ends with).
func applyLabels(cur string, c store.LabelChange) (string, error) {
	l := parseLabels(cur)
	for _, k := range c.Remove {
		delete(l, k)
	}
	maps.Copy(l, c.Set)
	if err := proto.ValidateLabels(l); err != nil {
		return "", fmt.Errorf("device %s: %w: %v", c.Device, store.ErrInvalid, err)
	}
	b, _ := json.Marshal(l)
	return string(b), nil
}

// Import pre-provisions the devices that are not known yet (operator
// labels, no credential: their first enrollment takes the record) and
// sets the labels of those that are. It reports how many it created.
func (db *DB) Import(ctx context.Context, devices []store.LabelChange, now time.Time) (created int, err error) {
	tx, err := db.begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("import: %w", err)
	}
	defer tx.Rollback()
	if err := db.lockByID(ctx, tx, devices); err != nil {
		return 0, fmt.Errorf("import: %w", err)
	}
	for _, c := range devices {
		var cur string
		switch err := tx.QueryRowContext(ctx, `SELECT labels FROM devices WHERE id = ?`, c.Device).Scan(&cur); {
		case errors.Is(err, sql.ErrNoRows):
			b, _ := json.Marshal(orEmpty(c.Set))
			if _, err := tx.ExecContext(ctx, `INSERT INTO devices (id, labels) VALUES (?, ?)`, c.Device, string(b)); err != nil {
				return 0, fmt.Errorf("import %s: %w", c.Device, err)
			}
			created++
		case err != nil:
			return 0, fmt.Errorf("import %s: %w", c.Device, err)
		default:
			l, err := applyLabels(cur, c)
			if err != nil {
				return 0, err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE devices SET labels = ? WHERE id = ?`, l, c.Device); err != nil {
				return 0, fmt.Errorf("import %s: %w", c.Device, err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("import: %w", err)
	}
	return created, nil
}

// Revoke removes the device's credential and marks it revoked; its history
// stays. Enrollment with the fleet token is refused from then on.
func (db *DB) Revoke(ctx context.Context, id string) error {
	res, err := db.w.ExecContext(ctx, `UPDATE devices SET revoked = 1, cred_hash = NULL, connected = 0,
		cert_serial = NULL, cert_prev = NULL, cert_not_after = NULL, pending_key = NULL, pending_at = NULL, approved = 0 WHERE id = ?`, id)
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

const deviceCols = `id, hardware, arch, version, release, labels, reported_labels, payloads, revoked, enrolled_at,
	cred_hash IS NULL, first_seen, last_seen, connected, boot, proto, dropped, sample_ts, sample,
	auth, cert_not_after, pending_key, pending_at, pending_remote, approved, builds, delta_max`

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

const briefCols = `id, version, hardware, labels, revoked, enrolled_at IS NULL AND cred_hash IS NULL, last_seen, connected`

func scanBrief(r rowScanner, cutoff time.Time) (store.Device, error) {
	var (
		d         store.Device
		labels    string
		last      sql.NullInt64
		connected bool
	)
	if err := r.Scan(&d.ID, &d.Version, &d.Hardware, &labels, &d.Revoked, &d.AwaitingEnrollment, &last, &connected); err != nil {
		return d, err
	}
	d.Labels = parseLabels(labels)
	d.AwaitingEnrollment = d.AwaitingEnrollment && !d.Revoked
	d.HardwareMismatch = store.Mismatch(d.Labels, d.Hardware)
	d.LastSeen = fromMS(last)
	d.Online = connected && last.Valid && last.Int64 >= ms(cutoff)
	return d, nil
}

func scanDevice(r rowScanner, cutoff time.Time) (store.Device, error) {
	var (
		d                               store.Device
		labels, reported, payloads      string
		builds                          string
		enrolled, first, last, sampleTS sql.NullInt64
		noCred, connected, approved     bool
		sample                          []byte
		notAfter, pendingAt             sql.NullInt64
		pendingKey                      sql.NullString
		pendingRemote                   string
	)
	err := r.Scan(&d.ID, &d.Hardware, &d.Arch, &d.Version, &d.Release, &labels, &reported, &payloads, &d.Revoked,
		&enrolled, &noCred, &first, &last, &connected, &d.Boot, &d.Proto, &d.Dropped, &sampleTS, &sample,
		&d.Auth, &notAfter, &pendingKey, &pendingAt, &pendingRemote, &approved, &builds, &d.DeltaMax)
	if err != nil {
		return d, err
	}
	d.CertNotAfter = fromMS(notAfter)
	if pendingKey.Valid && !d.Revoked {
		d.Pending = &store.Pending{Key: pendingKey.String, Since: time.UnixMilli(pendingAt.Int64).UTC(), Remote: pendingRemote, Approved: approved}
	}
	d.Labels = parseLabels(labels)
	if r := parseLabels(reported); len(r) > 0 {
		d.ReportedLabels = r
	}
	_ = json.Unmarshal([]byte(payloads), &d.Payloads)
	if b := parseLabels(builds); len(b) > 0 {
		d.Builds = b
	}
	d.HardwareMismatch = store.Mismatch(d.Labels, d.Hardware)
	d.AwaitingEnrollment = !d.Revoked && !enrolled.Valid && noCred
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

// deviceWhere is the WHERE clause of a device filter.
func (db *DB) deviceWhere(f store.DeviceFilter) (string, []any) {
	var where []string
	var args []any
	for k, v := range f.Labels {
		if db.d == postgresDialect {
			where = append(where, `CAST(labels AS jsonb) ->> ? = ?`)
			args = append(args, k, v)
			continue
		}
		path := `$."` + strings.ReplaceAll(k, `"`, ``) + `"`
		where = append(where, `json_extract(labels, ?) = ?`)
		args = append(args, path, v)
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
	if f.Pending {
		where = append(where, `pending_key IS NOT NULL AND revoked = 0`)
	}
	if f.Auth != "" {
		where = append(where, `auth = ? AND revoked = 0`)
		args = append(args, f.Auth)
	}
	if len(f.IDs) > 0 {
		// Through a JSON array: any number of ids, one bound parameter.
		ids, _ := json.Marshal(f.IDs)
		if db.d == postgresDialect {
			where = append(where, `id IN (SELECT jsonb_array_elements_text(CAST(? AS jsonb)))`)
		} else {
			where = append(where, `id IN (SELECT value FROM json_each(?))`)
		}
		args = append(args, string(ids))
	}
	if f.Search != "" {
		esc := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(strings.ToLower(f.Search))
		where = append(where, `lower(id) LIKE ? ESCAPE '\'`)
		args = append(args, "%"+esc+"%")
	}
	if len(where) == 0 {
		return "", args
	}
	return ` WHERE ` + strings.Join(where, ` AND `), args
}

var deviceOrder = map[string]string{
	"id": "id", "last_seen": "coalesce(last_seen, 0), id", "version": "version, id", "hardware": "hardware, id", "enrolled_at": "coalesce(enrolled_at, 0), id",
	"-id": "id DESC", "-last_seen": "coalesce(last_seen, 0) DESC, id", "-version": "version DESC, id", "-hardware": "hardware DESC, id", "-enrolled_at": "coalesce(enrolled_at, 0) DESC, id",
}

// CountDevices counts the devices a filter selects, paging aside.
func (db *DB) CountDevices(ctx context.Context, f store.DeviceFilter) (int, error) {
	where, args := db.deviceWhere(f)
	var n int
	if err := db.r.QueryRowContext(ctx, `SELECT count(*) FROM devices`+where, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("count devices: %w", err)
	}
	return n, nil
}

// Devices lists devices matching f, in f.Sort's order (by id by default).
func (db *DB) Devices(ctx context.Context, f store.DeviceFilter) ([]store.Device, error) {
	order := "id"
	if f.Sort != "" {
		var ok bool
		if order, ok = deviceOrder[f.Sort]; !ok {
			return nil, fmt.Errorf("%w: sort by one of %s, not %q", store.ErrInvalid, strings.Join(store.DeviceSorts, ", "), f.Sort)
		}
	}
	where, args := db.deviceWhere(f)
	cols, scan := deviceCols, scanDevice
	if f.Brief {
		cols, scan = briefCols, scanBrief
	}
	q := `SELECT ` + cols + ` FROM devices` + where + ` ORDER BY ` + order
	if f.Limit > 0 {
		q += fmt.Sprintf(` LIMIT %d`, f.Limit)
	}
	if f.Offset > 0 {
		if f.Limit <= 0 && db.d == sqliteDialect {
			q += ` LIMIT -1` // SQLite needs a LIMIT before OFFSET
		}
		q += fmt.Sprintf(` OFFSET %d`, f.Offset)
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

// profilePrefix names enrollment profiles among the tokens; the fleet's
// default enrollment token ("enroll") is the profile without labels.
const profilePrefix = "enroll:"

// SetProfile creates an enrollment profile: a token (its hash) whose
// devices get labels. An existing profile of that name is replaced (its
// old token stops working) only with replace; otherwise store.ErrExists.
func (db *DB) SetProfile(ctx context.Context, name string, hash []byte, labels map[string]string, replace bool, now time.Time) error {
	b, _ := json.Marshal(orEmpty(labels))
	q := `INSERT INTO tokens (name, hash, created, labels) VALUES (?, ?, ?, ?)`
	if replace {
		q += ` ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, created = excluded.created, labels = excluded.labels`
	}
	_, err := db.w.ExecContext(ctx, q, profilePrefix+name, hash, ms(now), string(b))
	if isUnique(err) {
		return fmt.Errorf("profile %s: %w", name, store.ErrExists)
	}
	if err != nil {
		return fmt.Errorf("set profile %s: %w", name, err)
	}
	return nil
}

// Profiles lists the enrollment profiles.
func (db *DB) Profiles(ctx context.Context) ([]store.Profile, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT name, labels, created FROM tokens WHERE name LIKE 'enroll:%' ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("profiles: %w", err)
	}
	defer rows.Close()
	out := []store.Profile{}
	for rows.Next() {
		var p store.Profile
		var labels string
		var created int64
		if err := rows.Scan(&p.Name, &labels, &created); err != nil {
			return nil, fmt.Errorf("profiles: %w", err)
		}
		p.Name = strings.TrimPrefix(p.Name, profilePrefix)
		p.Labels, p.Created = parseLabels(labels), time.UnixMilli(created).UTC()
		out = append(out, p)
	}
	return out, rows.Err()
}

// DeleteProfile removes an enrollment profile; its token stops working.
func (db *DB) DeleteProfile(ctx context.Context, name string) error {
	r, err := db.w.ExecContext(ctx, `DELETE FROM tokens WHERE name = ?`, profilePrefix+name)
	if err != nil {
		return fmt.Errorf("delete profile %s: %w", name, err)
	}
	if n, _ := r.RowsAffected(); n == 0 {
		return fmt.Errorf("profile %s: %w", name, store.ErrNotFound)
	}
	return nil
}

// ProfileByToken finds the enrollment profile whose token hashes to hash:
// the fleet's enrollment token ("enroll", no labels) or a named profile.
func (db *DB) ProfileByToken(ctx context.Context, hash []byte) (store.Profile, error) {
	var p store.Profile
	var labels string
	var created int64
	err := db.r.QueryRowContext(ctx, `SELECT name, labels, created FROM tokens WHERE hash = ? AND (name = 'enroll' OR name LIKE 'enroll:%')`, hash).
		Scan(&p.Name, &labels, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return p, store.ErrNotFound
	}
	if err != nil {
		return p, fmt.Errorf("profile: %w", err)
	}
	p.Name = strings.TrimPrefix(p.Name, profilePrefix)
	p.Labels, p.Created = parseLabels(labels), time.UnixMilli(created).UTC()
	return p, nil
}
