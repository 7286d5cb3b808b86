package delivery

import (
	"context"
	"encoding/json"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// Source is what Load reads (the SQLite store).
type Source interface {
	Releases(ctx context.Context, target string) ([]store.Release, error)
	Rollouts(ctx context.Context, statuses ...string) ([]store.RolloutRow, error)
	Members(ctx context.Context, rollout string) ([]store.MemberRow, error)
	AuditLog(ctx context.Context, target string, limit int) ([]store.Audit, error)
	DeviceUpdates(ctx context.Context, device, target string, counter uint64) ([]store.DeviceUpdate, error)
	Devices(ctx context.Context, f store.DeviceFilter) ([]store.Device, error)
}

// HardwareLabel is the operators' label that names a device's hardware
// revision; a device without it counts as "unknown".
const HardwareLabel = "hw"

// Load reads the history the metrics of [from, to] need: rollouts created
// before to, the releases they roll out, and every device's report on
// those releases (a rollout created before the window may finish in it).
func Load(ctx context.Context, src Source, from, to time.Time) (Input, error) {
	in := Input{From: from, To: to, Hardware: map[string]string{}}
	rows, err := src.Rollouts(ctx)
	if err != nil {
		return in, err
	}
	needTargets := map[string]bool{}
	for _, row := range rows {
		if !row.Created.Before(to) {
			continue
		}
		var spec rollout.Spec
		var st rollout.State
		if json.Unmarshal(row.Spec, &spec) != nil || json.Unmarshal(row.State, &st) != nil {
			continue
		}
		r := Rollout{ID: row.ID, Target: spec.Release.Target, Counter: spec.Release.Counter, Created: row.Created,
			Completed: st.Status == rollout.StatusCompleted}
		if spec.Revert != nil {
			r.RevertCounter = spec.Revert.Counter
		}
		if st.Status.Final() && st.Ended > 0 {
			r.Ended = time.UnixMilli(st.Ended).UTC()
			if r.Ended.Before(from) {
				continue // over before the window: counts for none of its keys
			}
		}
		audit, err := src.AuditLog(ctx, row.ID, 10000)
		if err != nil {
			return in, err
		}
		for i := len(audit) - 1; i >= 0; i-- { // oldest first
			if failure(audit[i]) {
				r.Failed = audit[i].Time
				break
			}
		}
		members, err := src.Members(ctx, row.ID)
		if err != nil {
			return in, err
		}
		for _, m := range members {
			r.Members = append(r.Members, m.Device)
		}
		in.Rollouts = append(in.Rollouts, r)
		needTargets[r.Target] = true
	}
	for target := range needTargets {
		rels, err := src.Releases(ctx, target)
		if err != nil {
			return in, err
		}
		for _, rel := range rels {
			in.Releases = append(in.Releases, Release{Target: rel.Target, Version: rel.Version, Counter: rel.Counter,
				Built: rel.Created, Pushed: rel.PushedAt})
		}
		ups, err := src.DeviceUpdates(ctx, "", target, 0)
		if err != nil {
			return in, err
		}
		for _, u := range ups {
			at := u.Updated
			if u.State == "committed" && u.Committed != nil {
				at = *u.Committed // not a later "already installed" report's time
			}
			in.Updates = append(in.Updates, Update{Device: u.Device, Target: u.Target, Counter: u.Counter, State: u.State, Time: at})
		}
	}
	// The operators' label, not what a device reports: grouping by
	// operators' labels only, and a bounded number of revisions.
	devs, err := src.Devices(ctx, store.DeviceFilter{Brief: true})
	if err != nil {
		return in, err
	}
	for _, d := range devs {
		if hw := d.Labels[HardwareLabel]; hw != "" {
			in.Hardware[d.ID] = hw
		}
	}
	return in, nil
}

// failure says whether an audit entry of a rollout is a failure: the
// engine paused or aborted it (a gate failed), or an operator aborted or
// reverted it.
func failure(a store.Audit) bool {
	switch a.Action {
	case "rollout.abort", "rollout.revert":
		return true
	case "rollout.transition":
		to := a.Attrs["to"]
		return a.Actor == "rollout-engine" && (to == string(rollout.StatusPaused) || to == string(rollout.StatusAborted))
	}
	return false
}
