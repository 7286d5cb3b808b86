package sqlstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// The audit log is a hash chain: each entry's hash is SHA-256 over the
// previous entry's hash and the entry's own fields, in a fixed encoding.
// An entry edited, deleted, inserted or moved breaks the chain from there
// on, unless whoever changed it recomputed every later hash: the chain's
// head (VerifyAudit's Head), kept outside the control plane, is what
// catches that, and a truncated tail.

// auditHash is the chain step.
func auditHash(prev []byte, ts int64, actor, action, target, reason, attrs string) []byte {
	h := sha256.New()
	h.Write([]byte("hangar audit v1\x00"))
	h.Write(prev)
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(ts))
	h.Write(n[:])
	for _, f := range []string{actor, action, target, reason, canonicalAttrs(attrs)} {
		binary.BigEndian.PutUint64(n[:], uint64(len(f)))
		h.Write(n[:])
		h.Write([]byte(f))
	}
	return h.Sum(nil)
}

// canonicalAttrs re-encodes stored attributes with sorted keys, so that
// the hash does not depend on how the JSON was written.
func canonicalAttrs(s string) string {
	m := map[string]string{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return s
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	for _, k := range keys {
		fmt.Fprintf(&b, "%d:%s%d:%s", len(k), k, len(m[k]), m[k])
	}
	return b.String()
}

// appendAudit adds an entry at the end of the chain, in tx (the single
// writer connection serialises appends).
func appendAudit(ctx context.Context, tx *Tx, a store.Audit) (int64, error) {
	attrs, _ := json.Marshal(orEmpty(a.Attrs))
	var prev []byte
	err := tx.QueryRowContext(ctx, `SELECT hash FROM audit ORDER BY id DESC LIMIT 1`).Scan(&prev)
	if err != nil && err != sql.ErrNoRows {
		return 0, fmt.Errorf("audit %s: %w", a.Action, err)
	}
	ts := ms(a.Time)
	h := auditHash(prev, ts, a.Actor, a.Action, a.Target, a.Reason, string(attrs))
	var id int64
	// The id is the last one plus one (the write lock makes it safe): a
	// gap in the ids is a deleted entry, so none may come from a
	// sequence that skips (PostgreSQL's, after a rollback or a crash).
	err = tx.QueryRowContext(ctx, `INSERT INTO audit (id, ts, actor, action, target, reason, attrs, hash)
		VALUES ((SELECT coalesce(max(id), 0) + 1 FROM audit), ?, ?, ?, ?, ?, ?, ?) RETURNING id`,
		ts, a.Actor, a.Action, a.Target, a.Reason, string(attrs), h).Scan(&id)
	if err != nil {
		return 0, fmt.Errorf("audit %s: %w", a.Action, err)
	}
	return id, nil
}

// auditRow is an entry as the chain covers it.
type auditRow struct {
	id, ts                               int64
	actor, action, target, reason, attrs string
	hash                                 []byte
}

const auditRowCols = `id, ts, actor, action, target, reason, attrs, hash`

func scanAuditRow(rows *sql.Rows) (auditRow, error) {
	var r auditRow
	err := rows.Scan(&r.id, &r.ts, &r.actor, &r.action, &r.target, &r.reason, &r.attrs, &r.hash)
	return r, err
}

func (r auditRow) chained(prev []byte) []byte {
	return auditHash(prev, r.ts, r.actor, r.action, r.target, r.reason, r.attrs)
}

// chainAudit chains entries written before the log was a chain (a store
// upgraded in place), in their order.
func (db *DB) chainAudit(ctx context.Context) error {
	var unchained int
	if err := db.w.QueryRowContext(ctx, `SELECT count(*) FROM audit WHERE hash IS NULL`).Scan(&unchained); err != nil || unchained == 0 {
		return err
	}
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("chain audit log: %w", err)
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT `+auditRowCols+` FROM audit ORDER BY id`)
	if err != nil {
		return fmt.Errorf("chain audit log: %w", err)
	}
	type fix struct {
		id   int64
		hash []byte
	}
	var fixes []fix
	var prev []byte
	for rows.Next() {
		r, err := scanAuditRow(rows)
		if err != nil {
			rows.Close()
			return fmt.Errorf("chain audit log: %w", err)
		}
		if r.hash == nil {
			r.hash = r.chained(prev)
			fixes = append(fixes, fix{r.id, r.hash})
		}
		prev = r.hash
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("chain audit log: %w", err)
	}
	for _, f := range fixes {
		if _, err := tx.ExecContext(ctx, `UPDATE audit SET hash = ? WHERE id = ?`, f.hash, f.id); err != nil {
			return fmt.Errorf("chain audit log: %w", err)
		}
	}
	return tx.Commit()
}

// VerifyAudit walks the whole chain and says where it first breaks; with
// at > 0 it also returns the hash of entry at (to compare with a head
// recorded earlier: a log cut short, or rewritten from there with every
// hash recomputed, no longer has it).
func (db *DB) VerifyAudit(ctx context.Context, at int64) (store.AuditVerification, error) {
	var v store.AuditVerification
	rows, err := db.r.QueryContext(ctx, `SELECT `+auditRowCols+` FROM audit ORDER BY id`)
	if err != nil {
		return v, fmt.Errorf("verify audit log: %w", err)
	}
	defer rows.Close()
	var prev []byte
	var lastID int64
	for rows.Next() {
		r, err := scanAuditRow(rows)
		if err != nil {
			return v, fmt.Errorf("verify audit log: %w", err)
		}
		if v.Broken == nil {
			switch {
			case !bytes.Equal(r.hash, r.chained(prev)):
				v.Broken = &store.AuditBreak{ID: r.id, Why: fmt.Sprintf("entry %d (%s %s, %s) does not match its hash: it was changed, or an entry before it was changed, deleted, inserted or moved",
					r.id, r.action, r.target, time.UnixMilli(r.ts).UTC().Format(time.RFC3339))}
			case lastID != 0 && r.id != lastID+1:
				v.Broken = &store.AuditBreak{ID: r.id, Why: fmt.Sprintf("entries %d to %d are missing before entry %d, and the chain was recomputed over the gap", lastID+1, r.id-1, r.id)}
			}
		}
		if r.id == at {
			v.At = r.hash
		}
		prev, lastID = r.hash, r.id
		v.Entries++
		v.HeadID, v.Head = r.id, r.hash
	}
	return v, rows.Err()
}
