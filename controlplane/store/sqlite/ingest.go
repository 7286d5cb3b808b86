package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

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
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return res, fmt.Errorf("ingest: %w", err)
	}
	defer tx.Rollback()
	w := ingestTx{db: db, tx: tx, seen: map[string]*devSeen{}}
	defer w.close()
	for i := range items {
		if err := w.apply(ctx, &items[i], &res); err != nil {
			return store.IngestResult{}, fmt.Errorf("ingest %s: %w", items[i].Device, err)
		}
	}
	if err := w.flushSeen(ctx); err != nil {
		return store.IngestResult{}, fmt.Errorf("ingest: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return store.IngestResult{}, fmt.Errorf("ingest commit: %w", err)
	}
	return res, nil
}

type ingestTx struct {
	db                            *DB
	tx                            *sql.Tx
	seen                          map[string]*devSeen
	batchStmt, sampleStmt, evStmt *sql.Stmt
}

func (w *ingestTx) close() {
	for _, s := range []*sql.Stmt{w.batchStmt, w.sampleStmt, w.evStmt} {
		if s != nil {
			s.Close()
		}
	}
}

func (w *ingestTx) stmt(ctx context.Context, p **sql.Stmt, q string) (*sql.Stmt, error) {
	if *p == nil {
		s, err := w.tx.PrepareContext(ctx, q)
		if err != nil {
			return nil, err
		}
		*p = s
	}
	return *p, nil
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
	labels, _ := json.Marshal(orEmpty(s.Labels))
	payloads, _ := json.Marshal(orEmpty(s.Payloads))
	_, err := w.tx.ExecContext(ctx, `UPDATE devices SET connected = 1, boot = ?, conn = ?, proto = ?,
		version = CASE WHEN ? != '' THEN ? ELSE version END,
		arch = CASE WHEN ? != '' THEN ? ELSE arch END,
		hardware = CASE WHEN ? != '' THEN ? ELSE hardware END,
		release = ?, payloads = ?,
		labels = CASE WHEN ? THEN ? ELSE labels END
		WHERE num = ? AND (boot < ? OR (boot = ? AND conn <= ?))`,
		s.Boot, s.Conn, s.Proto, s.Version, s.Version, s.Arch, s.Arch, s.Hardware, s.Hardware,
		s.Release, string(payloads), len(s.Labels) > 0, string(labels),
		num, s.Boot, s.Boot, s.Conn)
	return err
}

func (w *ingestTx) applyBatch(ctx context.Context, num int64, it *store.IngestItem, seen *devSeen, res *store.IngestResult) error {
	b := it.Batch
	bs, err := w.stmt(ctx, &w.batchStmt, `INSERT OR IGNORE INTO batches (dev, boot, seq, received) VALUES (?, ?, ?, ?)`)
	if err != nil {
		return err
	}
	r, err := bs.ExecContext(ctx, num, b.Boot, b.Seq, ms(it.Received))
	if err != nil {
		return err
	}
	if n, _ := r.RowsAffected(); n == 0 {
		res.Duplicates++
		return nil
	}
	ss, err := w.stmt(ctx, &w.sampleStmt, `INSERT INTO telemetry (dev, ts, boot, seq, battery, voltage, temp, cpu, mem,
		lat, lon, alt, fix, flight, link, errors, reboots, uptime, ext) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return err
	}
	for i := range b.Samples {
		s := &b.Samples[i]
		ts := b.Base + int64(s.T)
		var bat, temp, volt, lat, lon, alt any
		if s.Battery != nil {
			bat = *s.Battery
		}
		if s.Temp != nil {
			temp = *s.Temp
		}
		if s.Voltage != 0 {
			volt = s.Voltage
		}
		if s.Fix > 0 {
			lat, lon, alt = s.Lat, s.Lon, s.Alt
		}
		var ext []byte
		if len(s.Ext) > 0 {
			ext, _ = proto.Marshal(s.Ext)
		}
		if _, err := ss.ExecContext(ctx, num, ts, b.Boot, b.Seq, bat, volt, temp, s.CPU, s.Mem, lat, lon, alt,
			s.Fix, s.Flight, s.Link, s.Errors, s.Reboots, s.Uptime, ext); err != nil {
			return err
		}
		if seen.sample == nil || ts >= seen.sampleTS {
			seen.sample, seen.sampleTS = s, ts
		}
	}
	seen.dropped += b.Dropped
	res.Samples += len(b.Samples)
	return nil
}

func (w *ingestTx) applyEvent(ctx context.Context, num int64, it *store.IngestItem, res *store.IngestResult) error {
	e := it.Event
	st, err := w.stmt(ctx, &w.evStmt, `INSERT OR IGNORE INTO events (dev, boot, seq, ts, received, kind, severity, code, message, cmd, body)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return err
	}
	var body []byte
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
	return nil
}

type eventBody struct {
	Update *proto.UpdateReport `json:"update,omitempty"`
	Attrs  map[string]string   `json:"attrs,omitempty"`
}

func (w *ingestTx) flushSeen(ctx context.Context) error {
	for _, s := range w.seen {
		var sample []byte
		var sampleTS any
		if s.sample != nil {
			sample, _ = proto.Marshal(s.sample)
			sampleTS = s.sampleTS
		}
		_, err := w.tx.ExecContext(ctx, `UPDATE devices SET
			last_seen = max(coalesce(last_seen, 0), ?1),
			first_seen = coalesce(first_seen, ?1),
			dropped = dropped + ?2,
			sample = CASE WHEN ?3 IS NOT NULL AND ?3 >= coalesce(sample_ts, 0) THEN ?4 ELSE sample END,
			sample_ts = CASE WHEN ?3 IS NOT NULL AND ?3 >= coalesce(sample_ts, 0) THEN ?3 ELSE sample_ts END
			WHERE num = ?5`,
			s.last, s.dropped, sampleTS, sample, s.num)
		if err != nil {
			return err
		}
	}
	return nil
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
	for _, num := range nums {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		r, err := db.w.ExecContext(ctx, `DELETE FROM telemetry WHERE dev = ? AND ts < ?`, num, c)
		if err != nil {
			return total, fmt.Errorf("prune: %w", err)
		}
		n, _ := r.RowsAffected()
		total += n
		if _, err := db.w.ExecContext(ctx, `DELETE FROM batches WHERE dev = ? AND received < ?`, num, c); err != nil {
			return total, fmt.Errorf("prune: %w", err)
		}
		if _, err := db.w.ExecContext(ctx, `DELETE FROM events WHERE dev = ? AND received < ?`, num, c); err != nil {
			return total, fmt.Errorf("prune: %w", err)
		}
	}
	return total, nil
}
