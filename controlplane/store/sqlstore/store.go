// Package sqlite is the control plane's default store: one SQLite file in
// WAL mode. Writes go through a single connection (SQLite has one writer);
// reads use a pool of read-only connections that WAL lets run beside it.
package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver
)

// DefaultOnlineTimeout is how long a device stays online after its last
// message when no last will says otherwise.
const DefaultOnlineTimeout = 90 * time.Second

// Options tune the store. Zero values mean the defaults.
type Options struct {
	// OnlineTimeout: a connected device that sent nothing for this long is
	// reported offline (the heartbeat timeout).
	OnlineTimeout time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// SeenFlushInterval is how often at most a device's row (last seen,
	// latest sample) is rewritten while it streams (default 1 s; negative
	// writes it with every message).
	SeenFlushInterval time.Duration
	// CompactInterval is how often the inbox is moved into the telemetry
	// table (default 2 s).
	CompactInterval time.Duration
	// CheckpointInterval is how often a background connection copies the
	// WAL into the database, instead of the writer doing it in the middle
	// of an ingest commit (default 1 s).
	CheckpointInterval time.Duration
	// ClockAllowance is how far ahead of the control plane's clock a
	// device's clock may be before what it dates by it (boot epochs of
	// update reports, the time of its latest sample) is not believed
	// (default DefaultClockAllowance).
	ClockAllowance time.Duration
}

// DefaultClockAllowance bounds device clocks ahead of the control plane's.
const DefaultClockAllowance = time.Hour

// DB is the SQLite store.
type DB struct {
	opts Options
	path string
	d    dialect
	w    handle // SQLite: one connection, every write
	r    handle // read-only pool (SQLite)

	mu      sync.Mutex       // guards devNums
	devNums map[string]int64 // device id -> row number, for ingest

	sampleStmt, eventStmt, seenStmt *sql.Stmt

	seenMu    sync.Mutex
	pending   map[int64]*devSeen  // device row updates not yet written
	flushedAt map[int64]time.Time // when each device row was last written

	compactMu   sync.Mutex
	lastCompact time.Time

	ckpt     *sql.DB
	stopCkpt chan struct{}
	ckptDone chan struct{}
}

// Open opens (creating if needed) the database at path and migrates it to
// the current schema.
func Open(path string, opts Options) (*DB, error) {
	opts = withDefaults(opts)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	// The database holds credential hashes: create it private. SQLite gives
	// its -wal and -shm files the same mode.
	if f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o600); err == nil {
		f.Close()
	}
	// Page cache per connection, in KiB: the writer keeps the hot pages
	// of every table; readers and the checkpointer need little.
	dsn := func(cacheKiB int, extra string) string {
		q := url.Values{}
		q.Set("_journal_mode", "WAL")
		q.Set("_synchronous", "NORMAL")
		q.Set("_busy_timeout", "10000")
		q.Set("_foreign_keys", "on")
		q.Set("_txlock", "immediate")
		q.Set("_cache_size", fmt.Sprint(-cacheKiB))
		return "file:" + path + "?" + q.Encode() + extra
	}
	w, err := sql.Open("sqlite3", dsn(16<<10, ""))
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	w.SetMaxOpenConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)
	if err := w.Ping(); err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db := newDB(opts, path, handle{DB: w, d: sqliteDialect})
	if err := db.init(); err != nil {
		w.Close()
		return nil, err
	}
	r, err := sql.Open("sqlite3", dsn(4<<10, "&mode=ro&_query_only=1"))
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("open store: %w", err)
	}
	r.SetMaxOpenConns(4)
	db.r = handle{DB: r, d: sqliteDialect}
	// The writer never checkpoints; a second connection does, off the
	// ingest path.
	if _, err := w.Exec(`PRAGMA wal_autocheckpoint = 0`); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store: %w", err)
	}
	if db.ckpt, err = sql.Open("sqlite3", dsn(256, "")); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store: %w", err)
	}
	db.ckpt.SetMaxOpenConns(1)
	db.stopCkpt, db.ckptDone = make(chan struct{}), make(chan struct{})
	go db.checkpointLoop()
	return db, nil
}

func withDefaults(opts Options) Options {
	if opts.OnlineTimeout <= 0 {
		opts.OnlineTimeout = DefaultOnlineTimeout
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.SeenFlushInterval == 0 {
		opts.SeenFlushInterval = time.Second
	}
	if opts.CompactInterval <= 0 {
		opts.CompactInterval = 2 * time.Second
	}
	if opts.CheckpointInterval <= 0 {
		opts.CheckpointInterval = time.Second
	}
	if opts.ClockAllowance <= 0 {
		opts.ClockAllowance = DefaultClockAllowance
	}
	return opts
}

func newDB(opts Options, path string, w handle) *DB {
	return &DB{opts: opts, path: path, d: w.d, w: w, devNums: map[string]int64{},
		pending: map[int64]*devSeen{}, flushedAt: map[int64]time.Time{}}
}

// init migrates the schema, chains the audit log and prepares the ingest
// statements.
func (db *DB) init() error {
	if err := db.migrate(context.Background()); err != nil {
		return err
	}
	if err := db.chainAudit(context.Background()); err != nil {
		return err
	}
	return db.prepare()
}

func (db *DB) prepare() error {
	sample := `INSERT INTO inbox (dev, ts, boot, seq, last_ts, samples, body) VALUES (?, ?, ?, ?, ?, ?, ?)`
	if db.d == postgresDialect {
		// No inbox: PostgreSQL appends to the partition of the batch's
		// day, and a redelivery is skipped at once.
		sample = `INSERT INTO telemetry (dev, ts, boot, seq, last_ts, samples, body) VALUES (?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT DO NOTHING`
	}
	for _, p := range []struct {
		dst **sql.Stmt
		q   string
	}{
		{&db.sampleStmt, sample},
		{&db.eventStmt, `INSERT INTO events (dev, boot, seq, ts, received, kind, severity, code, message, cmd, body)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`},
		{&db.seenStmt, `UPDATE devices SET
			last_seen = max(coalesce(last_seen, 0), ?1),
			first_seen = coalesce(first_seen, ?1),
			dropped = dropped + ?2,
			sample = CASE WHEN CAST(?3 AS BIGINT) IS NOT NULL AND (?3 >= coalesce(sample_ts, 0) OR sample_ts > ?6) THEN ?4 ELSE sample END,
			sample_ts = CASE WHEN CAST(?3 AS BIGINT) IS NOT NULL AND (?3 >= coalesce(sample_ts, 0) OR sample_ts > ?6) THEN ?3 ELSE sample_ts END
			WHERE num = ?5 AND revoked = 0`},
	} {
		s, err := db.w.Prepare(p.q)
		if err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		*p.dst = s
	}
	return nil
}

func (db *DB) checkpointLoop() {
	defer close(db.ckptDone)
	t := time.NewTicker(db.opts.CheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-db.stopCkpt:
			return
		case <-t.C:
			// PASSIVE never blocks the writer; a busy reader just makes
			// it copy less this time.
			_, _ = db.ckpt.Exec(`PRAGMA wal_checkpoint(PASSIVE)`)
		}
	}
}

// Close writes pending device rows, checkpoints and closes the database.
func (db *DB) Close() error {
	var errs []error
	if db.stopCkpt != nil {
		close(db.stopCkpt)
		<-db.ckptDone
		errs = append(errs, db.FlushSeen(context.Background()))
		_, err := db.Compact(context.Background())
		errs = append(errs, err)
		_, err = db.ckpt.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`)
		errs = append(errs, err, db.ckpt.Close())
	} else if db.d == postgresDialect {
		errs = append(errs, db.FlushSeen(context.Background()))
	}
	for _, s := range []*sql.Stmt{db.sampleStmt, db.eventStmt, db.seenStmt} {
		if s != nil {
			s.Close()
		}
	}
	if db.r.DB != nil && db.r.DB != db.w.DB {
		errs = append(errs, db.r.Close())
	}
	errs = append(errs, db.w.Close())
	return errors.Join(errs...)
}

// Path is the file the store lives in.
func (db *DB) Path() string { return db.path }

// migrations are applied in order; PRAGMA user_version records how many ran.
var migrations = []string{
	`CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
	CREATE TABLE tokens (name TEXT PRIMARY KEY, hash BLOB NOT NULL, created INTEGER NOT NULL);
	CREATE TABLE devices (
		num INTEGER PRIMARY KEY,
		id TEXT NOT NULL UNIQUE,
		hardware TEXT NOT NULL DEFAULT '',
		arch TEXT NOT NULL DEFAULT '',
		version TEXT NOT NULL DEFAULT '',
		release INTEGER NOT NULL DEFAULT 0,
		labels TEXT NOT NULL DEFAULT '{}',
		op_labels TEXT NOT NULL DEFAULT '{}',
		payloads TEXT NOT NULL DEFAULT '{}',
		cred_hash BLOB,
		revoked INTEGER NOT NULL DEFAULT 0,
		enrolled_at INTEGER,
		first_seen INTEGER,
		last_seen INTEGER,
		connected INTEGER NOT NULL DEFAULT 0,
		boot INTEGER NOT NULL DEFAULT 0,
		conn INTEGER NOT NULL DEFAULT 0,
		proto INTEGER NOT NULL DEFAULT 0,
		dropped INTEGER NOT NULL DEFAULT 0,
		sample_ts INTEGER,
		sample BLOB
	);
	CREATE INDEX devices_version ON devices(version);
	-- Telemetry arrives interleaved from every device. Group commits append
	-- it to the inbox, which touches only new pages; the compactor moves it
	-- to telemetry in large sorted chunks, so that each device's newest
	-- telemetry page is rewritten once per chunk instead of once per commit.
	CREATE TABLE inbox (
		id INTEGER PRIMARY KEY,
		dev INTEGER NOT NULL,
		ts INTEGER NOT NULL,
		boot INTEGER NOT NULL,
		seq INTEGER NOT NULL,
		last_ts INTEGER NOT NULL,
		samples INTEGER NOT NULL,
		body BLOB NOT NULL
	);
	-- One row per telemetry batch, as the device encoded it, whatever its
	-- number of samples. (dev, boot, seq) is unique: the compactor's INSERT
	-- OR IGNORE is where QoS1 redeliveries are dropped, whatever order they
	-- arrive in. A batch spans at most proto.MaxBatchSpan.
	CREATE TABLE telemetry (
		dev INTEGER NOT NULL,
		boot INTEGER NOT NULL,
		seq INTEGER NOT NULL,
		ts INTEGER NOT NULL,      -- first sample, unix ms
		last_ts INTEGER NOT NULL, -- last sample, unix ms
		samples INTEGER NOT NULL,
		body BLOB NOT NULL,       -- the CBOR batch
		PRIMARY KEY (dev, boot, seq)
	) WITHOUT ROWID;
	CREATE INDEX telemetry_dev_ts ON telemetry(dev, ts);
	CREATE TABLE events (
		id INTEGER PRIMARY KEY,
		dev INTEGER NOT NULL,
		boot INTEGER NOT NULL,
		seq INTEGER NOT NULL,
		ts INTEGER NOT NULL,
		received INTEGER NOT NULL,
		kind INTEGER NOT NULL,
		severity INTEGER NOT NULL,
		code TEXT NOT NULL,
		message TEXT NOT NULL,
		cmd TEXT NOT NULL,
		body BLOB,
		UNIQUE (dev, boot, seq)
	);
	CREATE INDEX events_dev ON events(dev, id);
	CREATE TABLE audit (
		id INTEGER PRIMARY KEY,
		ts INTEGER NOT NULL,
		actor TEXT NOT NULL,
		action TEXT NOT NULL,
		target TEXT NOT NULL,
		reason TEXT NOT NULL,
		attrs TEXT NOT NULL DEFAULT '{}'
	);
	CREATE INDEX audit_target ON audit(target, id);`,
	`CREATE TABLE releases (
		target TEXT NOT NULL,
		version TEXT NOT NULL,
		counter INTEGER NOT NULL,
		size INTEGER NOT NULL,
		sha256 BLOB NOT NULL,
		hardware TEXT NOT NULL,
		arch TEXT NOT NULL,
		created INTEGER NOT NULL,
		expires INTEGER NOT NULL,
		key_id TEXT NOT NULL,
		notes TEXT NOT NULL,
		pushed_at INTEGER NOT NULL,
		pushed_by TEXT NOT NULL,
		manifest BLOB NOT NULL,
		keys BLOB NOT NULL,
		PRIMARY KEY (target, version)
	);
	CREATE UNIQUE INDEX releases_counter ON releases(target, counter);
	CREATE TABLE commands (
		id TEXT PRIMARY KEY,
		dev INTEGER NOT NULL,
		kind TEXT NOT NULL,
		body BLOB NOT NULL,
		rollout TEXT NOT NULL DEFAULT '',
		created INTEGER NOT NULL,
		sent INTEGER,
		attempts INTEGER NOT NULL DEFAULT 0,
		acked INTEGER
	);
	CREATE INDEX commands_pending ON commands(dev, created) WHERE acked IS NULL;
	-- Where each device stands with each release, from its latest report.
	CREATE TABLE device_updates (
		dev INTEGER NOT NULL,
		target TEXT NOT NULL,
		counter INTEGER NOT NULL,
		version TEXT NOT NULL,
		state TEXT NOT NULL,
		reason TEXT NOT NULL,
		check_name TEXT NOT NULL,
		progress INTEGER NOT NULL,
		rollout TEXT NOT NULL,
		boot INTEGER NOT NULL,
		seq INTEGER NOT NULL,
		updated INTEGER NOT NULL,
		PRIMARY KEY (dev, target, counter)
	) WITHOUT ROWID;`,
	`CREATE TABLE rollouts (
		id TEXT PRIMARY KEY,
		spec TEXT NOT NULL,
		state TEXT NOT NULL,
		status TEXT NOT NULL,
		created INTEGER NOT NULL,
		created_by TEXT NOT NULL,
		updated INTEGER NOT NULL
	);
	CREATE INDEX rollouts_status ON rollouts(status);
	CREATE TABLE rollout_members (
		rollout TEXT NOT NULL,
		device TEXT NOT NULL,
		stage INTEGER NOT NULL,
		offered INTEGER NOT NULL DEFAULT 0,
		reverted INTEGER NOT NULL DEFAULT 0,
		canceled INTEGER NOT NULL DEFAULT 0,
		PRIMARY KEY (rollout, device)
	) WITHOUT ROWID;
	CREATE INDEX rollout_members_device ON rollout_members(device);`,
	// Grouping labels are the operators': the labels in effect until now
	// (reported, overridden by operator labels) become operator labels,
	// and what devices report about themselves is kept apart from here on.
	`UPDATE devices SET
		labels = CASE WHEN json_valid(labels) AND json_type(labels) = 'object' THEN labels ELSE '{}' END,
		op_labels = CASE WHEN json_valid(op_labels) AND json_type(op_labels) = 'object' THEN op_labels ELSE '{}' END;
	UPDATE devices SET op_labels = json_patch(labels, op_labels);
	ALTER TABLE devices RENAME COLUMN labels TO reported_labels;
	ALTER TABLE devices RENAME COLUMN op_labels TO labels;
	ALTER TABLE rollout_members ADD COLUMN offers INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE rollout_members ADD COLUMN withdrawn INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE rollout_members ADD COLUMN replaced_by TEXT NOT NULL DEFAULT '';
	ALTER TABLE rollout_members ADD COLUMN replaces TEXT NOT NULL DEFAULT '';
	ALTER TABLE commands ADD COLUMN withdrawn INTEGER;
	CREATE INDEX commands_rollout ON commands(rollout) WHERE rollout != '';
	ALTER TABLE tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
	-- When an operator last reinstated the device: update reports stored
	-- before it no longer outrank new ones, whatever epoch they claimed.
	ALTER TABLE devices ADD COLUMN reinstated INTEGER NOT NULL DEFAULT 0;`,
	// Until when (unix ms) an operator allows the device's own enrollment
	// to re-key an enrolled device (hangar device rekey); NULL: never.
	`ALTER TABLE devices ADD COLUMN rekey_until INTEGER;`,
	// The audit log is a hash chain (audit.go); entries written before it
	// are chained when the store opens.
	`ALTER TABLE audit ADD COLUMN hash BLOB;`,
	// Device certificates (certs.go). A device authenticates with the
	// certificate whose serial is cert_serial, or with cert_prev (the one
	// it held before its latest renewal, until it connects with the new
	// one). auth is how it last authenticated. pending_* is an enrollment
	// held for an operator's approval, bound to the key that asked.
	// A database that already has password devices keeps password
	// authentication on until an operator turns it off; a new one has it
	// off once a device CA exists.
	`ALTER TABLE devices ADD COLUMN cert_serial TEXT;
	ALTER TABLE devices ADD COLUMN cert_prev TEXT;
	ALTER TABLE devices ADD COLUMN cert_not_after INTEGER;
	ALTER TABLE devices ADD COLUMN cert_key TEXT;
	ALTER TABLE devices ADD COLUMN auth TEXT NOT NULL DEFAULT '';
	ALTER TABLE devices ADD COLUMN pending_key TEXT;
	ALTER TABLE devices ADD COLUMN pending_at INTEGER;
	ALTER TABLE devices ADD COLUMN pending_remote TEXT NOT NULL DEFAULT '';
	ALTER TABLE devices ADD COLUMN approved INTEGER NOT NULL DEFAULT 0;
	UPDATE devices SET auth = 'password' WHERE cred_hash IS NOT NULL;
	CREATE TABLE certs (serial TEXT PRIMARY KEY, dev TEXT NOT NULL, issued INTEGER NOT NULL, not_after INTEGER NOT NULL);
	CREATE INDEX certs_not_after ON certs(not_after);
	INSERT INTO meta (key, value) SELECT 'device_passwords', 'on'
		WHERE EXISTS (SELECT 1 FROM devices WHERE cred_hash IS NOT NULL AND NOT revoked);`,
	// Named operator tokens with a role (apitokens.go). The bootstrap
	// admin token stays in tokens.
	`CREATE TABLE api_tokens (
		name TEXT PRIMARY KEY,
		role TEXT NOT NULL,
		hash BLOB NOT NULL UNIQUE,
		created INTEGER NOT NULL,
		created_by TEXT NOT NULL DEFAULT '',
		expires INTEGER,
		revoked INTEGER,
		last_used INTEGER);
	-- The fleet's health summary at regular times (history.go): what the
	-- console charts over time.
	CREATE TABLE fleet_history (ts INTEGER PRIMARY KEY, body TEXT NOT NULL);`,
	// When a device first reported a release committed (lead time);
	// reports stored before have their latest report's time.
	`ALTER TABLE device_updates ADD COLUMN committed INTEGER;
	UPDATE device_updates SET committed = updated WHERE state = 'committed';`,
	// Delta updates (releases.go): the patches pushed for a release, one
	// per base build, each with its signed manifest (the patch itself is
	// in the artifact directory, named by its digest); what devices report
	// of the builds in place and the largest result they patch; and how a
	// device fetched a release (the patch size, why it fell back to the
	// full artifact).
	`CREATE TABLE release_deltas (
		target TEXT NOT NULL,
		version TEXT NOT NULL,
		base_sha256 BLOB NOT NULL,
		base_size INTEGER NOT NULL,
		base_version TEXT NOT NULL DEFAULT '',
		patch_sha256 BLOB NOT NULL,
		patch_size INTEGER NOT NULL,
		manifest BLOB NOT NULL,
		pushed_at INTEGER NOT NULL,
		pushed_by TEXT NOT NULL,
		PRIMARY KEY (target, version, base_sha256)
	) WITHOUT ROWID;
	ALTER TABLE devices ADD COLUMN builds TEXT NOT NULL DEFAULT '{}';
	ALTER TABLE devices ADD COLUMN delta_max INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE device_updates ADD COLUMN patch INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE device_updates ADD COLUMN fallback TEXT NOT NULL DEFAULT '';`,
	// Several replicas (lease.go): the lease the rollout scheduler runs
	// under, and each rollout's revision, so that a change planned from a
	// state that changed meanwhile is refused.
	`CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires INTEGER NOT NULL, acquired INTEGER NOT NULL);
	ALTER TABLE rollouts ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;`,
}

func (db *DB) migrate(ctx context.Context) error {
	if db.d == postgresDialect {
		return db.migratePostgres(ctx)
	}
	var v int
	if err := db.w.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if v > len(migrations) {
		return fmt.Errorf("migrate: database schema %d is newer than this build (%d)", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := db.begin(ctx)
		if err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", i+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
	}
	return nil
}

func ms(t time.Time) int64 { return t.UnixMilli() }

func fromMS(v sql.NullInt64) *time.Time {
	if !v.Valid {
		return nil
	}
	t := time.UnixMilli(v.Int64).UTC()
	return &t
}

func (db *DB) onlineCutoff() time.Time { return db.opts.Now().Add(-db.opts.OnlineTimeout) }
