package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

func nullMS(t *time.Time) any {
	if t == nil {
		return nil
	}
	return ms(*t)
}

// CreateAPIToken stores a new named token; store.ErrExists when the name
// is taken (by a live, expired or revoked token: names are not reused, so
// that the audit log's actors stay unambiguous).
func (db *DB) CreateAPIToken(ctx context.Context, t store.APIToken) error {
	_, err := db.w.ExecContext(ctx, `INSERT INTO api_tokens (name, role, hash, created, created_by, expires) VALUES (?, ?, ?, ?, ?, ?)`,
		t.Name, t.Role, t.Hash, ms(t.Created), t.CreatedBy, nullMS(t.Expires))
	if err != nil {
		if isUnique(err) {
			return fmt.Errorf("token %s: %w", t.Name, store.ErrExists)
		}
		return fmt.Errorf("create token %s: %w", t.Name, err)
	}
	return nil
}

const apiTokenCols = `name, role, hash, created, created_by, expires, revoked, last_used`

func scanAPIToken(sc interface{ Scan(...any) error }) (store.APIToken, error) {
	var t store.APIToken
	var created int64
	var expires, revoked, used sql.NullInt64
	if err := sc.Scan(&t.Name, &t.Role, &t.Hash, &created, &t.CreatedBy, &expires, &revoked, &used); err != nil {
		return t, err
	}
	t.Created = time.UnixMilli(created).UTC()
	t.Expires, t.Revoked, t.LastUsed = fromMS(expires), fromMS(revoked), fromMS(used)
	return t, nil
}

// APITokenByHash finds the token whose secret hashes to hash (expired and
// revoked ones too: the caller says why it is refused).
func (db *DB) APITokenByHash(ctx context.Context, hash []byte) (store.APIToken, error) {
	t, err := scanAPIToken(db.r.QueryRowContext(ctx, `SELECT `+apiTokenCols+` FROM api_tokens WHERE hash = ?`, hash))
	if errors.Is(err, sql.ErrNoRows) {
		return t, store.ErrNotFound
	}
	if err != nil {
		return t, fmt.Errorf("token: %w", err)
	}
	return t, nil
}

// APITokens lists the named tokens by name.
func (db *DB) APITokens(ctx context.Context) ([]store.APIToken, error) {
	rows, err := db.r.QueryContext(ctx, `SELECT `+apiTokenCols+` FROM api_tokens ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	defer rows.Close()
	out := []store.APIToken{}
	for rows.Next() {
		t, err := scanAPIToken(rows)
		if err != nil {
			return nil, fmt.Errorf("tokens: %w", err)
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// RevokeAPIToken ends a token at now. It returns the token as it was:
// its Revoked set means it had been revoked already (nothing changed).
func (db *DB) RevokeAPIToken(ctx context.Context, name string, now time.Time) (store.APIToken, error) {
	t, err := scanAPIToken(db.w.QueryRowContext(ctx, `SELECT `+apiTokenCols+` FROM api_tokens WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return t, fmt.Errorf("token %s: %w", name, store.ErrNotFound)
	}
	if err != nil {
		return t, fmt.Errorf("revoke token %s: %w", name, err)
	}
	if t.Revoked != nil {
		return t, nil
	}
	if _, err := db.w.ExecContext(ctx, `UPDATE api_tokens SET revoked = ? WHERE name = ? AND revoked IS NULL`, ms(now), name); err != nil {
		return t, fmt.Errorf("revoke token %s: %w", name, err)
	}
	return t, nil
}

// TouchAPIToken records that the token was used at now.
func (db *DB) TouchAPIToken(ctx context.Context, name string, now time.Time) error {
	_, err := db.w.ExecContext(ctx, `UPDATE api_tokens SET last_used = ? WHERE name = ?`, ms(now), name)
	return err
}
