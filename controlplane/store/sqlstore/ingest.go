package sqlstore

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// devSeen accumulates, within one group write, what the messages of one
// device change on its row, so that a device costs one UPDATE per group.
type devSeen struct {
	num      int64
	last     int64
	dropped  uint64
	sample   *proto.Sample
	sampleTS int64
}

// WriteIngest stores a group of device messages in one transaction. Batches
// and events already stored (same device, boot epoch and sequence) are
// skipped, so QoS1 redeliveries cost nothing. Messages of unknown or revoked
// devices are counted and dropped.
func (db *DB) WriteIngest(ctx context.Context, items []store.IngestItem) (store.IngestResult, error) {
	var res store.IngestResult
	tx, err := db.w.unlocked().BeginTx(ctx, nil)
	if err != nil {
		return res, fmt.Errorf("ingest: %w", err)
	}
	defer tx.Rollback()
	w := ingestTx{db: db, tx: tx, seen: map[string]*devSeen{}}
	if db.d == postgresDialect {
		// Replicas ingest beside each other, often for the same devices
		// (a shared subscription deals a device's messages to all of
		// them): lock the device rows this transaction may update, in one
		// order, so that two of them wait for each other instead of
		// deadlocking.
		if err := w.lockDevices(ctx, items); err != nil {
			return res, fmt.Errorf("ingest: %w", err)
		}
	}
	for i := range items {
		if err := w.apply(ctx, &items[i], &res); err != nil {
			return store.IngestResult{}, fmt.Errorf("ingest %s: %w", items[i].Device, err)
		}
	}
	if err := w.insertBatches(ctx, &res); err != nil {
		return store.IngestResult{}, fmt.Errorf("ingest: %w", err)
	}
	db.seenMu.Lock()
	defer db.seenMu.Unlock()
	for _, s := range w.seen {
		db.mergeSeen(s)
	}
	flushed, err := db.flushSeenLocked(ctx, tx, false, w.locked)
	if err != nil {
		return store.IngestResult{}, fmt.Errorf("ingest: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return store.IngestResult{}, fmt.Errorf("ingest commit: %w", err)
	}
	db.forgetSeenLocked(flushed)
	return res, nil
}

// mergeSeen folds what one group saw of a device into what is waiting to
// be written to its row.
func (db *DB) mergeSeen(s *devSeen) {
	p := db.pending[s.num]
	if p == nil {
		db.pending[s.num] = s
		return
	}
	p.last = max(p.last, s.last)
	p.dropped += s.dropped
	ahead := db.opts.Now().Add(db.opts.ClockAllowance).UnixMilli()
	if s.sample != nil && (p.sample == nil || s.sampleTS >= p.sampleTS || p.sampleTS > ahead) {
		p.sample, p.sampleTS = s.sample, s.sampleTS
	}
}

// flushSeenLocked writes the device rows that are due: a device row
// (last seen, latest sample) is rewritten at most once per
// SeenFlushInterval, not for every message, because at thousands of
// messages a second these updates would cost more than the telemetry
// itself. Drop counts are written at once. It returns the devices written.
//
// With locked (PostgreSQL's ingest), only the rows this transaction locked
// are written; the others wait for a later one.
func (db *DB) flushSeenLocked(ctx context.Context, tx *Tx, all bool, locked map[int64]bool) ([]int64, error) {
	now := time.Now()
	st := tx.StmtContext(ctx, db.seenStmt)
	var done []int64
	nums := make([]int64, 0, len(db.pending))
	for num := range db.pending {
		nums = append(nums, num)
	}
	slices.Sort(nums) // one order of row locks for every writer
	for _, num := range nums {
		s := db.pending[num]
		if locked != nil && !locked[num] {
			continue
		}
		if !all && s.dropped == 0 && now.Sub(db.flushedAt[num]) < db.opts.SeenFlushInterval {
			continue
		}
		var sample []byte
		var sampleTS any
		if s.sample != nil {
			sample, _ = proto.Marshal(s.sample)
			sampleTS = s.sampleTS
		}
		// A latest sample dated beyond the clock allowance gives way to
		// any later one: a clock far ahead must not pin the reading.
		ahead := db.opts.Now().Add(db.opts.ClockAllowance).UnixMilli()
		if _, err := st.ExecContext(ctx, s.last, s.dropped, sampleTS, sample, num, ahead); err != nil {
			return nil, err
		}
		done = append(done, num)
	}
	return done, nil
}

func (db *DB) forgetSeenLocked(nums []int64) {
	now := time.Now()
	for _, n := range nums {
		delete(db.pending, n)
		db.flushedAt[n] = now
	}
}

// CompactDue moves the inbox into the telemetry table when the last move
// is CompactInterval old, and returns how many batches it found already
// stored. The ingest writer calls it between group writes.
func (db *DB) CompactDue(ctx context.Context) (int64, error) {
	db.compactMu.Lock()
	due := time.Since(db.lastCompact) >= db.opts.CompactInterval
	db.compactMu.Unlock()
	if !due {
		return 0, nil
	}
	return db.Compact(ctx)
}

// Compact moves every inbox row into the telemetry table, sorted by device
// and time, in one transaction. Batches already in telemetry (QoS1
// redeliveries, whenever they came) are dropped and counted.
func (db *DB) Compact(ctx context.Context) (dups int64, err error) {
	if db.d == postgresDialect {
		return 0, nil // no inbox
	}
	db.compactMu.Lock()
	defer db.compactMu.Unlock()
	db.lastCompact = time.Now()
	tx, err := db.begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("compact: %w", err)
	}
	defer tx.Rollback()
	var last sql.NullInt64
	var n int64
	if err := tx.QueryRowContext(ctx, `SELECT max(id), count(*) FROM inbox`).Scan(&last, &n); err != nil || !last.Valid {
		return 0, err
	}
	r, err := tx.ExecContext(ctx, `INSERT OR IGNORE INTO telemetry (dev, boot, seq, ts, last_ts, samples, body)
		SELECT dev, boot, seq, ts, last_ts, samples, body FROM inbox WHERE id <= ? ORDER BY dev, ts, boot, seq`, last.Int64)
	if err != nil {
		return 0, fmt.Errorf("compact: %w", err)
	}
	moved, _ := r.RowsAffected()
	if _, err := tx.ExecContext(ctx, `DELETE FROM inbox WHERE id <= ?`, last.Int64); err != nil {
		return 0, fmt.Errorf("compact: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("compact: %w", err)
	}
	return n - moved, nil
}

// FlushSeen writes every pending device row now.
func (db *DB) FlushSeen(ctx context.Context) error {
	db.seenMu.Lock()
	defer db.seenMu.Unlock()
	if len(db.pending) == 0 {
		return nil
	}
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("flush devices: %w", err)
	}
	defer tx.Rollback()
	done, err := db.flushSeenLocked(ctx, tx, true, nil)
	if err != nil {
		return fmt.Errorf("flush devices: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("flush devices: %w", err)
	}
	db.forgetSeenLocked(done)
	return nil
}

type ingestTx struct {
	db   *DB
	tx   *Tx
	seen map[string]*devSeen
	// locked are the device rows locked for this transaction (PostgreSQL).
	locked map[int64]bool
	// batches wait to be inserted together (PostgreSQL).
	batches []pendingBatch
	// statements prepared once on the writer connection, bound to tx
	sample, event *sql.Stmt
}

// stmt binds a statement prepared at Open to this transaction, once.
func (w *ingestTx) stmt(ctx context.Context, p **sql.Stmt, prepared *sql.Stmt) *sql.Stmt {
	if *p == nil {
		*p = w.tx.StmtContext(ctx, prepared)
	}
	return *p
}

// lockDevices locks, in row order, the device rows this transaction will
// update: those of its hellos and goodbyes, and those whose latest-seen
// update is due (a device's first message here, or one a flush interval
// after the last). Rows it did not lock it leaves for a later one.
func (w *ingestTx) lockDevices(ctx context.Context, items []store.IngestItem) error {
	set := map[int64]bool{}
	now := time.Now()
	w.db.seenMu.Lock()
	due := func(n int64) bool {
		p := w.db.pending[n]
		return (p != nil && p.dropped > 0) || now.Sub(w.db.flushedAt[n]) >= w.db.opts.SeenFlushInterval
	}
	for n := range w.db.pending {
		if due(n) {
			set[n] = true
		}
	}
	w.db.seenMu.Unlock()
	for i := range items {
		n, err := w.devNum(ctx, items[i].Device)
		if err != nil {
			return err
		}
		if n == 0 {
			continue
		}
		w.db.seenMu.Lock()
		d := due(n) || (items[i].Batch != nil && items[i].Batch.Dropped > 0)
		w.db.seenMu.Unlock()
		if items[i].Kind == store.IngestState || d {
			set[n] = true
		}
	}
	w.locked = set
	if len(set) == 0 {
		return nil
	}
	nums := make([]int64, 0, len(set))
	for n := range set {
		nums = append(nums, n)
	}
	slices.Sort(nums)
	rows, err := w.tx.QueryContext(ctx, `SELECT num FROM devices WHERE num = ANY(?) ORDER BY num FOR UPDATE`, nums)
	if err != nil {
		return err
	}
	return rows.Close()
}

// devNum resolves a device id to its row number, caching hits. It returns 0
// for a device that is unknown or revoked.
func (w *ingestTx) devNum(ctx context.Context, id string) (int64, error) {
	w.db.mu.Lock()
	n, ok := w.db.devNums[id]
	w.db.mu.Unlock()
	if ok {
		return n, nil
	}
	var revoked bool
	err := w.tx.QueryRowContext(ctx, `SELECT num, revoked FROM devices WHERE id = ?`, id).Scan(&n, &revoked)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && revoked) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	w.db.mu.Lock()
	w.db.devNums[id] = n
	w.db.mu.Unlock()
	return n, nil
}

func (w *ingestTx) apply(ctx context.Context, it *store.IngestItem, res *store.IngestResult) error {
	num, err := w.devNum(ctx, it.Device)
	if err != nil {
		return err
	}
	if num == 0 {
		res.Unknown++
		return nil
	}
	seen := w.seen[it.Device]
	if seen == nil {
		seen = &devSeen{num: num}
		w.seen[it.Device] = seen
	}
	seen.last = max(seen.last, ms(it.Received))
	switch it.Kind {
	case store.IngestState:
		res.States++
		return w.applyState(ctx, num, it)
	case store.IngestBatch:
		return w.applyBatch(ctx, num, it, seen, res)
	case store.IngestEvent:
		return w.applyEvent(ctx, num, it, res)
	}
	return fmt.Errorf("unknown ingest kind %d", it.Kind)
}

func (w *ingestTx) applyState(ctx context.Context, num int64, it *store.IngestItem) error {
	s := it.State
	if !s.Online {
		// A last will or goodbye counts only for the connection it belongs
		// to: when a device reconnects and takes over its client id, the old
		// connection's will arrives after the new hello and must not mark
		// the device offline.
		_, err := w.tx.ExecContext(ctx, `UPDATE devices SET connected = 0 WHERE num = ? AND boot = ? AND conn = ?`, num, s.Boot, s.Conn)
		return err
	}
	// The device's current connection is its latest: boot epochs only
	// grow on a device, and within one boot connection numbers do. So a
	// hello of an older boot, or an older connection, arriving late (held
	// by a replica that died, with several ingesting) changes nothing. An
	// epoch beyond the clock allowance is no reason to refuse the next
	// hello, though: a device whose clock ran far ahead once is followed
	// again as soon as it connects with its real epoch.
	labels, _ := json.Marshal(orEmpty(s.Labels))
	payloads, _ := json.Marshal(orEmpty(s.Payloads))
	builds, _ := json.Marshal(buildDigests(s.Builds))
	_, err := w.tx.ExecContext(ctx, `UPDATE devices SET connected = 1, boot = ?, conn = ?, proto = ?,
		version = CASE WHEN ? != '' THEN ? ELSE version END,
		arch = CASE WHEN ? != '' THEN ? ELSE arch END,
		hardware = CASE WHEN ? != '' THEN ? ELSE hardware END,
		release = ?, payloads = ?, builds = ?, delta_max = ?,
		reported_labels = CASE WHEN ? != 0 THEN ? ELSE reported_labels END
		WHERE num = ? AND revoked = 0 AND NOT (boot = ? AND conn > ?) AND NOT (boot > ? AND boot <= ?)`,
		s.Boot, s.Conn, s.Proto, s.Version, s.Version, s.Arch, s.Arch, s.Hardware, s.Hardware,
		s.Release, string(payloads), string(builds), int64(min(s.Deltas, math.MaxInt64)), len(s.Labels) > 0, string(labels),
		num, s.Boot, s.Conn, s.Boot, w.db.plausibleBoot(it.Received))
	return err
}

// plausibleBoot is the latest boot epoch (unix seconds) a device can have
// started at by the time received, within the clock allowance.
func (db *DB) plausibleBoot(received time.Time) int64 {
	return received.Add(db.opts.ClockAllowance).Unix()
}

// maxFallbackText bounds the fallback reason a device reports.
const maxFallbackText = 256

// truncateText cuts s to at most n bytes, on a rune boundary.
func truncateText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// buildDigests are the build digests a hello reports, in hex; anything
// that is not a SHA-256 of a valid target name is dropped (a delta is
// never chosen for it).
func buildDigests(in map[string][]byte) map[string]string {
	out := make(map[string]string, len(in))
	for target, sum := range in {
		if len(sum) == sha256.Size && proto.ValidTarget(target) {
			out[target] = hex.EncodeToString(sum)
		}
	}
	return out
}

func (w *ingestTx) applyBatch(ctx context.Context, num int64, it *store.IngestItem, seen *devSeen, res *store.IngestResult) error {
	b := it.Batch
	var err error
	body := it.Raw
	if body == nil {
		if body, err = proto.Marshal(b); err != nil {
			return err
		}
	}
	first, last := b.Base+int64(b.Samples[0].T), b.Base
	for i := range b.Samples {
		s := &b.Samples[i]
		ts := b.Base + int64(s.T)
		first, last = min(first, ts), max(last, ts)
		if seen.sample == nil || ts >= seen.sampleTS || seen.sampleTS > it.Received.Add(w.db.opts.ClockAllowance).UnixMilli() {
			seen.sample, seen.sampleTS = s, ts
		}
	}
	if w.db.d == postgresDialect {
		// Written with the group's other batches, many rows a statement:
		// a statement is a round trip to the server.
		w.batches = append(w.batches, pendingBatch{num: num, boot: b.Boot, seq: b.Seq, first: first, last: last,
			samples: len(b.Samples), body: body, dropped: b.Dropped, seen: seen})
		return nil
	}
	r, err := w.stmt(ctx, &w.sample, w.db.sampleStmt).ExecContext(ctx, num, first, b.Boot, b.Seq, last, len(b.Samples), body)
	if err != nil {
		return err
	}
	if n, _ := r.RowsAffected(); n == 0 {
		// Stored already (PostgreSQL writes telemetry directly; SQLite's
		// inbox finds duplicates when compacted).
		res.Duplicates++
		return nil
	}
	seen.dropped += b.Dropped
	res.Samples += len(b.Samples)
	return nil
}

// pendingBatch is a telemetry batch of a group, not inserted yet.
type pendingBatch struct {
	num, first, last int64
	boot, seq        uint64
	samples          int
	body             []byte
	dropped          uint64
	seen             *devSeen
}

// batchRows is how many batches one INSERT carries (7 parameters each,
// far below PostgreSQL's 65,535).
const batchRows = 500

// insertBatches inserts the group's batches, batchRows a statement, and
// counts those already stored (the key drops them; RETURNING names the
// rows that went in).
func (w *ingestTx) insertBatches(ctx context.Context, res *store.IngestResult) error {
	type key struct {
		num       int64
		boot, seq uint64
	}
	for len(w.batches) > 0 {
		chunk := w.batches[:min(batchRows, len(w.batches))]
		w.batches = w.batches[len(chunk):]
		q := `INSERT INTO telemetry (dev, ts, boot, seq, last_ts, samples, body) VALUES ` +
			strings.TrimSuffix(strings.Repeat(`(?, ?, ?, ?, ?, ?, ?),`, len(chunk)), `,`) +
			` ON CONFLICT DO NOTHING RETURNING dev, boot, seq`
		args := make([]any, 0, 7*len(chunk))
		for _, b := range chunk {
			args = append(args, b.num, b.first, b.boot, b.seq, b.last, b.samples, b.body)
		}
		rows, err := w.tx.QueryContext(ctx, q, args...)
		if err != nil {
			return err
		}
		in := map[key]bool{}
		for rows.Next() {
			var k key
			if err := rows.Scan(&k.num, &k.boot, &k.seq); err != nil {
				rows.Close()
				return err
			}
			in[k] = true
		}
		if err := rows.Close(); err != nil {
			return err
		}
		for _, b := range chunk {
			k := key{b.num, b.boot, b.seq}
			if !in[k] {
				res.Duplicates++ // stored before, or twice in this group
				continue
			}
			delete(in, k)
			b.seen.dropped += b.dropped
			res.Samples += b.samples
		}
	}
	return nil
}

func (w *ingestTx) applyEvent(ctx context.Context, num int64, it *store.IngestItem, res *store.IngestResult) error {
	e := it.Event
	st := w.stmt(ctx, &w.event, w.db.eventStmt)
	var body []byte
	var err error
	if e.Update != nil || len(e.Attrs) > 0 {
		body, err = json.Marshal(eventBody{Update: e.Update, Attrs: e.Attrs})
		if err != nil {
			return err
		}
	}
	r, err := st.ExecContext(ctx, num, e.Boot, e.Seq, e.Time, ms(it.Received), e.Kind, e.Severity, e.Code, e.Message, e.Cmd, body)
	if err != nil {
		return err
	}
	if n, _ := r.RowsAffected(); n == 0 {
		res.Duplicates++
		return nil
	}
	res.Events++
	if u := e.Update; u != nil {
		return w.applyUpdate(ctx, num, it, res)
	}
	return nil
}

// applyUpdate keeps the latest update report per release. Reports are
// ordered by (boot epoch, sequence), numbers the device chooses, so they
// are bounded by what the control plane saw itself: the boot epoch of the
// device's current connection (its latest hello). A report from a boot
// above that, beyond the clock allowance, is refused; a stored report from
// a boot above the current one and still ahead of the control plane's
// clock (the device claimed an epoch it no longer runs) is beaten by any
// report. So a report with an epoch far ahead pins nothing past the
// device's next connection, while a genuine report of a new boot whose
// hello is not in yet (replicas ingest a device's messages in any order)
// keeps its place.
func (w *ingestTx) applyUpdate(ctx context.Context, num int64, it *store.IngestItem, res *store.IngestResult) error {
	e, u := it.Event, it.Event.Update
	var current uint64
	var reinstated int64
	if err := w.tx.QueryRowContext(ctx, `SELECT boot, reinstated FROM devices WHERE num = ?`, num).Scan(&current, &reinstated); err != nil {
		return err
	}
	if e.Boot > current && e.Boot > uint64(it.Received.Add(w.db.opts.ClockAllowance).Unix()) {
		res.Refused++
		return nil
	}
	// committed is the first time the device reported the release
	// committed (a later "already installed" report keeps it): what lead
	// time measures.
	committed := any(nil)
	if u.State == proto.UpdateCommitted {
		committed = ms(it.Received)
	}
	// How the device fetches the release (patch, fallback) comes with
	// every report of an attempt, from the agent's job: the latest says.
	// The reason a device gives is its text, bounded.
	_, err := w.tx.ExecContext(ctx, `INSERT INTO device_updates (dev, target, counter, version, state, reason, check_name,
		progress, rollout, boot, seq, updated, committed, patch, fallback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (dev, target, counter) DO UPDATE SET version = excluded.version, state = excluded.state,
			reason = excluded.reason, check_name = excluded.check_name, progress = excluded.progress,
			rollout = CASE WHEN excluded.rollout != '' THEN excluded.rollout ELSE device_updates.rollout END,
			boot = excluded.boot, seq = excluded.seq, updated = excluded.updated,
			committed = coalesce(device_updates.committed, excluded.committed),
			patch = excluded.patch, fallback = excluded.fallback
		WHERE (device_updates.boot > ? AND device_updates.boot > ?) OR device_updates.updated < ? OR excluded.boot > device_updates.boot
			OR (excluded.boot = device_updates.boot AND excluded.seq > device_updates.seq)`,
		num, u.Target, u.Counter, u.Version, string(u.State), u.Reason, u.Check, u.Progress, u.Rollout, e.Boot, e.Seq, ms(it.Received),
		committed, int64(min(u.Patch, math.MaxInt64)), truncateText(u.Fallback, maxFallbackText), current, it.Received.Unix(), reinstated)
	return err
}

type eventBody struct {
	Update *proto.UpdateReport `json:"update,omitempty"`
	Attrs  map[string]string   `json:"attrs,omitempty"`
}

// PruneTelemetry deletes samples, batch records and events older than
// cutoff, one device per transaction so that ingest is never held up for
// long, and returns how many samples it removed.
func (db *DB) PruneTelemetry(ctx context.Context, cutoff time.Time) (int64, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT num FROM devices`)
	if err != nil {
		return 0, fmt.Errorf("prune: %w", err)
	}
	var nums []int64
	for rows.Next() {
		var n int64
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return 0, fmt.Errorf("prune: %w", err)
		}
		nums = append(nums, n)
	}
	rows.Close()
	c := ms(cutoff)
	var total int64
	if _, err := db.Compact(ctx); err != nil {
		return 0, fmt.Errorf("prune: %w", err)
	}
	if db.d == postgresDialect {
		// Whole days first; what is left before the cutoff (the day it
		// falls in, the default partition) row by row below.
		if err := db.MaintainPartitions(ctx); err != nil {
			return 0, fmt.Errorf("prune: %w", err)
		}
		n, err := db.dropPartitions(ctx, c)
		if err != nil {
			return n, fmt.Errorf("prune: %w", err)
		}
		total += n
	}
	for _, num := range nums {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		var n int64
		err := db.w.QueryRowContext(ctx, `SELECT coalesce(sum(samples), 0) FROM telemetry WHERE dev = ? AND ts < ?`, num, c).Scan(&n)
		if err == nil {
			_, err = db.w.ExecContext(ctx, `DELETE FROM telemetry WHERE dev = ? AND ts < ?`, num, c)
		}
		if err != nil {
			return total, fmt.Errorf("prune: %w", err)
		}
		total += n
		if _, err := db.w.ExecContext(ctx, `DELETE FROM events WHERE dev = ? AND received < ?`, num, c); err != nil {
			return total, fmt.Errorf("prune: %w", err)
		}
	}
	// Certificates expired before the cutoff need no revocation entry.
	if _, err := db.w.ExecContext(ctx, `DELETE FROM certs WHERE not_after < ?`, c); err != nil {
		return total, fmt.Errorf("prune: %w", err)
	}
	return total, nil
}
