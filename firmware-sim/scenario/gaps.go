package scenario

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"

	_ "github.com/jackc/pgx/v5/stdlib" // or PostgreSQL's (clustered runs)
	_ "github.com/mattn/go-sqlite3"    // the control plane's database, read only
)

// GapReport says whether every message the drones sent (and so, with
// acknowledgement after storage, every message they deleted from their
// outboxes) is in the control plane's database.
type GapReport struct {
	Devices        int   `json:"devices"`         // devices with at least one stored message
	Messages       int64 `json:"messages"`        // stored (device, boot, seq), telemetry and events
	Missing        int64 `json:"missing"`         // sequence numbers absent below a boot's highest stored one
	DevicesMissing int   `json:"devices_missing"` // devices with a gap
	Dropped        int64 `json:"dropped"`         // samples the agents reported dropping (outbox full)
}

// gaps reads the control plane's database (its SQLite file read only,
// beside the running control plane, or the run's PostgreSQL database) and looks for holes in each device boot's
// sequence numbers: batches and events share one counter from 1.
func (r *runner) gaps(ctx context.Context) (*GapReport, error) {
	if r.cp == nil {
		return nil, fmt.Errorf("needs the control plane this run starts")
	}
	driver, dsn := "sqlite3", "file:"+filepath.Join(r.cp.dir, "hangar.db")+"?mode=ro&_busy_timeout=10000"
	if r.cluster != nil && r.cluster.pgURL != "" {
		driver, dsn = "pgx", r.cluster.pgURL
	}
	db, err := sql.Open(driver, dsn)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, `SELECT dev, boot, count(*), max(seq) FROM (
			SELECT dev, boot, seq FROM telemetry UNION SELECT dev, boot, seq FROM inbox UNION SELECT dev, boot, seq FROM events) AS s
		GROUP BY dev, boot`)
	if err != nil {
		return nil, fmt.Errorf("gaps: %w", err)
	}
	defer rows.Close()
	rep := &GapReport{}
	devs, gapped := map[int64]bool{}, map[int64]bool{}
	for rows.Next() {
		var dev, boot, n, top int64
		if err := rows.Scan(&dev, &boot, &n, &top); err != nil {
			return nil, err
		}
		devs[dev] = true
		rep.Messages += n
		if top > n {
			rep.Missing += top - n
			gapped[dev] = true
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rep.Devices, rep.DevicesMissing = len(devs), len(gapped)
	_ = db.QueryRowContext(ctx, `SELECT coalesce(sum(dropped), 0) FROM devices`).Scan(&rep.Dropped)
	return rep, nil
}
