package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
)

// IsPostgresURL says whether a --store value names a PostgreSQL database
// rather than a SQLite file.
func IsPostgresURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// OpenPostgres opens the PostgreSQL database at url (postgres://...) and
// migrates it to the current schema. Several control planes may share it:
// migrations run under an advisory lock, and the store's write
// transactions take a second one (see handle), so they see the database as
// SQLite's single writer would show it; ingest writes go beside them.
func OpenPostgres(url string, opts Options) (*DB, error) {
	opts = withDefaults(opts)
	pool, err := sql.Open("pgx", url)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	pool.SetMaxOpenConns(16)
	pool.SetMaxIdleConns(16)
	pool.SetConnMaxIdleTime(5 * time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := pool.PingContext(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open store %s: %w", redactURL(url), err)
	}
	db := newDB(opts, redactURL(url), handle{DB: pool, d: postgresDialect, lock: true})
	db.r = handle{DB: pool, d: postgresDialect}
	if err := db.init(); err != nil {
		pool.Close()
		return nil, err
	}
	if err := db.MaintainPartitions(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return db, nil
}

// redactURL drops the password from a database URL (logs, errors).
func redactURL(u string) string {
	at := strings.LastIndexByte(u, '@')
	scheme := strings.Index(u, "://")
	if at < 0 || scheme < 0 {
		return u
	}
	cred := u[scheme+3 : at]
	if i := strings.IndexByte(cred, ':'); i >= 0 {
		return u[:scheme+3] + cred[:i] + ":xxxxx" + u[at:]
	}
	return u
}

// pgMigrations are PostgreSQL's steps, numbered as SQLite's: schema N is
// the same tables and meaning in both. A new database starts at schema 11
// in one step (pgSchema11); later entries follow SQLite's migrations one
// for one.
var pgMigrations = map[int]string{
	11: pgSchema11,
}

const pgSchema11 = `
CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE tokens (name TEXT COLLATE "C" PRIMARY KEY, hash BYTEA NOT NULL, created BIGINT NOT NULL, labels TEXT COLLATE "C" NOT NULL DEFAULT '{}');
` + pgTables

// schemaVersionPG reads the schema version (0: a new database).
func (db *DB) migratePostgres(ctx context.Context) error {
	conn, err := db.w.DB.Conn(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Close()
	// One replica migrates; the others wait, then find it done.
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, writeLockKey+1); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.ExecContext(context.Background(), `SELECT pg_advisory_unlock($1)`, writeLockKey+1)
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var v int
	err = conn.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		v = 0
		if _, err := conn.ExecContext(ctx, `INSERT INTO schema_version (version) VALUES (0)`); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if v > len(migrations) {
		return fmt.Errorf("migrate: database schema %d is newer than this build (%d)", v, len(migrations))
	}
	for next := v + 1; next <= len(migrations); next++ {
		q, ok := pgMigrations[next]
		if !ok {
			if v == 0 {
				continue // below the first PostgreSQL schema: it is made whole
			}
			return fmt.Errorf("migrate to %d: no PostgreSQL step", next)
		}
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		if _, err := tx.ExecContext(ctx, q); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to %d: %w", next, err)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = $1`, next); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to %d: %w", next, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate to %d: %w", next, err)
		}
		v = next
	}
	return nil
}

// Telemetry on PostgreSQL is partitioned by day of the batch's first
// sample. Retention drops whole days, and a device's recent telemetry is
// read from the few partitions of its time range whatever the table's
// size. Partitions are made ahead of time (partitionsAhead days); a batch
// dated outside them (a device clock far off) goes to the default
// partition, which retention prunes row by row.
const (
	partitionDay    = 24 * time.Hour
	partitionsAhead = 3
)

func partitionName(day time.Time) string { return "telemetry_p" + day.UTC().Format("20060102") }

// MaintainPartitions makes the telemetry partitions of today and the next
// days (PostgreSQL; nothing on SQLite). It runs at open and with retention.
func (db *DB) MaintainPartitions(ctx context.Context) error {
	if db.d != postgresDialect {
		return nil
	}
	today := db.opts.Now().UTC().Truncate(partitionDay)
	for i := -1; i <= partitionsAhead; i++ {
		day := today.Add(time.Duration(i) * partitionDay)
		q := fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s PARTITION OF telemetry FOR VALUES FROM (%d) TO (%d)`,
			partitionName(day), day.UnixMilli(), day.Add(partitionDay).UnixMilli())
		if _, err := db.w.DB.ExecContext(ctx, q); err != nil {
			// The default partition already holds rows of that day (a
			// device clock ahead): they stay there, pruned row by row.
			if strings.Contains(err.Error(), "default partition") {
				continue
			}
			return fmt.Errorf("telemetry partitions: %w", err)
		}
	}
	return nil
}

// dropPartitions drops the telemetry partitions that end before cutoff
// and returns the samples they held.
func (db *DB) dropPartitions(ctx context.Context, cutoff int64) (int64, error) {
	rows, err := db.r.DB.QueryContext(ctx, `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry' AND c.relname LIKE 'telemetry_p%'`)
	if err != nil {
		return 0, err
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return 0, err
		}
		names = append(names, n)
	}
	rows.Close()
	var total int64
	for _, n := range names {
		day, err := time.Parse("20060102", strings.TrimPrefix(n, "telemetry_p"))
		if err != nil || day.Add(partitionDay).UnixMilli() > cutoff {
			continue
		}
		var samples int64
		if err := db.r.DB.QueryRowContext(ctx, `SELECT coalesce(sum(samples), 0)::bigint FROM `+n).Scan(&samples); err != nil {
			return total, err
		}
		if _, err := db.w.DB.ExecContext(ctx, `DROP TABLE `+n); err != nil {
			return total, err
		}
		total += samples
	}
	return total, nil
}

// pgTables is schema 11 as SQLite has it (store.go), in PostgreSQL's types:
// BIGINT for integers and unix-millisecond times, BYTEA for blobs, binary
// collation for text (ids sort as on SQLite).
const pgTables = `
CREATE TABLE devices (
        num BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id TEXT COLLATE "C" NOT NULL UNIQUE,
        hardware TEXT COLLATE "C" NOT NULL DEFAULT '',
        arch TEXT COLLATE "C" NOT NULL DEFAULT '',
        version TEXT COLLATE "C" NOT NULL DEFAULT '',
        release BIGINT NOT NULL DEFAULT 0,
        reported_labels TEXT COLLATE "C" NOT NULL DEFAULT '{}',
        labels TEXT COLLATE "C" NOT NULL DEFAULT '{}',
        payloads TEXT COLLATE "C" NOT NULL DEFAULT '{}',
        cred_hash BYTEA,
        revoked BIGINT NOT NULL DEFAULT 0,
        enrolled_at BIGINT,
        first_seen BIGINT,
        last_seen BIGINT,
        connected BIGINT NOT NULL DEFAULT 0,
        boot BIGINT NOT NULL DEFAULT 0,
        conn BIGINT NOT NULL DEFAULT 0,
        proto BIGINT NOT NULL DEFAULT 0,
        dropped BIGINT NOT NULL DEFAULT 0,
        sample_ts BIGINT,
        sample BYTEA
    , reinstated BIGINT NOT NULL DEFAULT 0, rekey_until BIGINT, cert_serial TEXT COLLATE "C", cert_prev TEXT COLLATE "C", cert_not_after BIGINT, cert_key TEXT COLLATE "C", auth TEXT COLLATE "C" NOT NULL DEFAULT '', pending_key TEXT COLLATE "C", pending_at BIGINT, pending_remote TEXT COLLATE "C" NOT NULL DEFAULT '', approved BIGINT NOT NULL DEFAULT 0, builds TEXT COLLATE "C" NOT NULL DEFAULT '{}', delta_max BIGINT NOT NULL DEFAULT 0);
CREATE INDEX devices_version ON devices(version);
CREATE TABLE inbox (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        dev BIGINT NOT NULL,
        ts BIGINT NOT NULL,
        boot BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        last_ts BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        body BYTEA NOT NULL
    );
CREATE TABLE telemetry (
        dev BIGINT NOT NULL,
        boot BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        ts BIGINT NOT NULL,      -- first sample, unix ms
        last_ts BIGINT NOT NULL, -- last sample, unix ms
        samples BIGINT NOT NULL,
        body BYTEA NOT NULL,       -- the CBOR batch
        -- A redelivered batch has the same first sample, so the same
        -- partition: the key still drops it.
        PRIMARY KEY (dev, boot, seq, ts)
    ) PARTITION BY RANGE (ts);
-- Batches dated outside every day's partition (a device clock far off).
CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
CREATE INDEX telemetry_dev_ts ON telemetry(dev, ts);
CREATE TABLE events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        dev BIGINT NOT NULL,
        boot BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        ts BIGINT NOT NULL,
        received BIGINT NOT NULL,
        kind BIGINT NOT NULL,
        severity BIGINT NOT NULL,
        code TEXT COLLATE "C" NOT NULL,
        message TEXT COLLATE "C" NOT NULL,
        cmd TEXT COLLATE "C" NOT NULL,
        body BYTEA,
        UNIQUE (dev, boot, seq)
    );
CREATE INDEX events_dev ON events(dev, id);
CREATE TABLE audit (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        ts BIGINT NOT NULL,
        actor TEXT COLLATE "C" NOT NULL,
        action TEXT COLLATE "C" NOT NULL,
        target TEXT COLLATE "C" NOT NULL,
        reason TEXT COLLATE "C" NOT NULL,
        attrs TEXT COLLATE "C" NOT NULL DEFAULT '{}'
    , hash BYTEA);
CREATE INDEX audit_target ON audit(target, id);
CREATE TABLE releases (
        target TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        counter BIGINT NOT NULL,
        size BIGINT NOT NULL,
        sha256 BYTEA NOT NULL,
        hardware TEXT COLLATE "C" NOT NULL,
        arch TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        key_id TEXT COLLATE "C" NOT NULL,
        notes TEXT COLLATE "C" NOT NULL,
        pushed_at BIGINT NOT NULL,
        pushed_by TEXT COLLATE "C" NOT NULL,
        manifest BYTEA NOT NULL,
        keys BYTEA NOT NULL,
        PRIMARY KEY (target, version)
    );
CREATE UNIQUE INDEX releases_counter ON releases(target, counter);
CREATE TABLE commands (
        id TEXT COLLATE "C" PRIMARY KEY,
        dev BIGINT NOT NULL,
        kind TEXT COLLATE "C" NOT NULL,
        body BYTEA NOT NULL,
        rollout TEXT COLLATE "C" NOT NULL DEFAULT '',
        created BIGINT NOT NULL,
        sent BIGINT,
        attempts BIGINT NOT NULL DEFAULT 0,
        acked BIGINT
    , withdrawn BIGINT);
CREATE INDEX commands_pending ON commands(dev, created) WHERE acked IS NULL;
CREATE TABLE device_updates (
        dev BIGINT NOT NULL,
        target TEXT COLLATE "C" NOT NULL,
        counter BIGINT NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        reason TEXT COLLATE "C" NOT NULL,
        check_name TEXT COLLATE "C" NOT NULL,
        progress BIGINT NOT NULL,
        rollout TEXT COLLATE "C" NOT NULL,
        boot BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        updated BIGINT NOT NULL, committed BIGINT, patch BIGINT NOT NULL DEFAULT 0, fallback TEXT COLLATE "C" NOT NULL DEFAULT '',
        PRIMARY KEY (dev, target, counter)
    );
CREATE TABLE rollouts (
        id TEXT COLLATE "C" PRIMARY KEY,
        spec TEXT COLLATE "C" NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL,
        created_by TEXT COLLATE "C" NOT NULL,
        updated BIGINT NOT NULL
    , rev BIGINT NOT NULL DEFAULT 0);
CREATE INDEX rollouts_status ON rollouts(status);
CREATE TABLE rollout_members (
        rollout TEXT COLLATE "C" NOT NULL,
        device TEXT COLLATE "C" NOT NULL,
        stage BIGINT NOT NULL,
        offered BIGINT NOT NULL DEFAULT 0,
        reverted BIGINT NOT NULL DEFAULT 0,
        canceled BIGINT NOT NULL DEFAULT 0, offers BIGINT NOT NULL DEFAULT 0, withdrawn BIGINT NOT NULL DEFAULT 0, replaced_by TEXT COLLATE "C" NOT NULL DEFAULT '', replaces TEXT COLLATE "C" NOT NULL DEFAULT '',
        PRIMARY KEY (rollout, device)
    );
CREATE INDEX rollout_members_device ON rollout_members(device);
CREATE INDEX commands_rollout ON commands(rollout) WHERE rollout != '';
CREATE TABLE certs (serial TEXT COLLATE "C" PRIMARY KEY, dev TEXT COLLATE "C" NOT NULL, issued BIGINT NOT NULL, not_after BIGINT NOT NULL);
CREATE INDEX certs_not_after ON certs(not_after);
CREATE TABLE api_tokens (
        name TEXT COLLATE "C" PRIMARY KEY,
        role TEXT COLLATE "C" NOT NULL,
        hash BYTEA NOT NULL UNIQUE,
        created BIGINT NOT NULL,
        created_by TEXT COLLATE "C" NOT NULL DEFAULT '',
        expires BIGINT,
        revoked BIGINT,
        last_used BIGINT);
CREATE TABLE fleet_history (ts BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, body TEXT COLLATE "C" NOT NULL);
CREATE TABLE release_deltas (
        target TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        base_sha256 BYTEA NOT NULL,
        base_size BIGINT NOT NULL,
        base_version TEXT COLLATE "C" NOT NULL DEFAULT '',
        patch_sha256 BYTEA NOT NULL,
        patch_size BIGINT NOT NULL,
        manifest BYTEA NOT NULL,
        pushed_at BIGINT NOT NULL,
        pushed_by TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (target, version, base_sha256)
    );
CREATE TABLE leases (name TEXT COLLATE "C" PRIMARY KEY, holder TEXT COLLATE "C" NOT NULL, token BIGINT NOT NULL, expires BIGINT NOT NULL, acquired BIGINT NOT NULL);
`

// OpenURL opens the store a --store value names: a postgres:// URL, or
// the path of a SQLite file.
func OpenURL(loc string, opts Options) (*DB, error) {
	if IsPostgresURL(loc) {
		return OpenPostgres(loc, opts)
	}
	return Open(loc, opts)
}

// Engine is "sqlite" or "postgres".
func (db *DB) Engine() string { return db.d.String() }

// Backup writes a consistent copy of the SQLite store at path to out (a
// new file, mode 0600), beside a running control plane: one read
// transaction (VACUUM INTO), so writers go on. A PostgreSQL store is
// backed up with PostgreSQL's own tools (pg_dump, pg_basebackup).
func Backup(ctx context.Context, path, out string) error {
	if IsPostgresURL(path) {
		return errors.New("backup: a PostgreSQL store is backed up with pg_dump or pg_basebackup (docs/operations.md)")
	}
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("backup: %s exists", out)
	}
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=ro&_busy_timeout=10000")
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	defer db.Close()
	// Made private before SQLite writes into it: it holds credential
	// hashes.
	f, err := os.OpenFile(out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	f.Close()
	if _, err := db.ExecContext(ctx, `VACUUM INTO ?`, out); err != nil {
		os.Remove(out)
		return fmt.Errorf("backup: %w", err)
	}
	return nil
}
