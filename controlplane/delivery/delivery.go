// Package delivery computes the four DORA keys of software delivery from
// hangar's own records: releases pushed, rollouts and their transitions,
// and where each device stands with each release.
//
//   - Deployment frequency: rollouts completed per week.
//   - Lead time for changes: from a release's push to the moment 95% of
//     the devices its rollouts targeted had committed it; and from its
//     build (the signed manifest's creation time) to that moment.
//   - Change failure rate: finished rollouts that failed (paused by a
//     failing gate, aborted, or reverted) over all finished.
//   - Time to restore: from the failure to the moment every affected
//     device (one that tried the release) runs a good build again: it
//     rolled back by itself, its install failed before switching, or it
//     committed another release of the same target since.
//
// Each is computed overall and per hardware revision. Compute is a pure
// function of its Input, so that fixture histories give known answers.
package delivery

import (
	"math"
	"sort"
	"time"
)

// Release is a pushed release.
type Release struct {
	Target  string
	Version string
	Counter uint64
	Built   time.Time // the manifest's creation; zero: unknown
	Pushed  time.Time
}

// Rollout is a rollout as the metrics read it.
type Rollout struct {
	ID            string
	Target        string
	Counter       uint64 // the release it rolls out
	RevertCounter uint64 // its revert release, if any
	Created       time.Time
	Ended         time.Time // when it became final (completed or aborted); zero: not yet
	Completed     bool      // ended completed (otherwise aborted)
	Failed        time.Time // its first failure: a gate paused or aborted it, or an operator aborted or reverted it; zero: none
	Members       []string
}

// Update is where a device stands with a release (its latest report).
type Update struct {
	Device  string
	Target  string
	Counter uint64
	State   string // proto.UpdateState
	Time    time.Time
}

// Input is the history the metrics are computed from.
type Input struct {
	From, To time.Time
	Releases []Release
	Rollouts []Rollout
	Updates  []Update
	// Hardware maps a device to its hardware revision.
	Hardware map[string]string
}

// Report is the metrics over a window.
type Report struct {
	From       time.Time          `json:"from"`
	To         time.Time          `json:"to"`
	Overall    Metrics            `json:"overall"`
	ByHardware map[string]Metrics `json:"by_hardware"`
}

// Metrics are the four keys over one population.
type Metrics struct {
	DeploymentFrequency Frequency `json:"deployment_frequency"`
	LeadTime            LeadTime  `json:"lead_time"`
	ChangeFailureRate   Rate      `json:"change_failure_rate"`
	TimeToRestore       Restore   `json:"time_to_restore"`
}

// Frequency is deployments per week.
type Frequency struct {
	PerWeek   float64 `json:"per_week"`
	Completed int     `json:"completed"`
}

// LeadTime is in seconds; medians over the releases that reached 95%.
type LeadTime struct {
	MedianSeconds             *float64 `json:"median_seconds"`
	P90Seconds                *float64 `json:"p90_seconds"`
	BuildToFleetMedianSeconds *float64 `json:"build_to_fleet_median_seconds"`
	Releases                  int      `json:"releases"` // pushed in the window and reached 95%
	Pending                   int      `json:"pending"`  // pushed in the window, not at 95% yet
}

// Rate is failed over finished.
type Rate struct {
	Rate     *float64 `json:"rate"`
	Failed   int      `json:"failed"`
	Finished int      `json:"finished"`
}

// Restore is in seconds; the median over restored failures.
type Restore struct {
	MedianSeconds *float64 `json:"median_seconds"`
	Restored      int      `json:"restored"`
	Unrestored    int      `json:"unrestored"` // failures whose devices are not all on a good build yet
}

// Quantile is the share of targeted devices whose commit ends lead time.
const Quantile = 0.95

func within(t time.Time, from, to time.Time) bool {
	return !t.IsZero() && !t.Before(from) && !t.After(to)
}

type relKey struct {
	target  string
	counter uint64
}

// Compute computes the report.
func Compute(in Input) Report {
	hwOf := func(d string) string {
		if h := in.Hardware[d]; h != "" {
			return h
		}
		return "unknown"
	}
	byRel := map[relKey]map[string]Update{}
	byTarget := map[string]map[string][]Update{} // target, device
	for _, u := range in.Updates {
		k := relKey{u.Target, u.Counter}
		if byRel[k] == nil {
			byRel[k] = map[string]Update{}
		}
		byRel[k][u.Device] = u
		if byTarget[u.Target] == nil {
			byTarget[u.Target] = map[string][]Update{}
		}
		byTarget[u.Target][u.Device] = append(byTarget[u.Target][u.Device], u)
	}
	hws := map[string]bool{}
	for _, r := range in.Rollouts {
		for _, d := range r.Members {
			hws[hwOf(d)] = true
		}
	}
	rep := Report{From: in.From, To: in.To, ByHardware: map[string]Metrics{}}
	rep.Overall = compute(in, byRel, byTarget, func(string) bool { return true })
	for hw := range hws {
		rep.ByHardware[hw] = compute(in, byRel, byTarget, func(d string) bool { return hwOf(d) == hw })
	}
	return rep
}

func compute(in Input, byRel map[relKey]map[string]Update, byTarget map[string]map[string][]Update, keep func(string) bool) Metrics {
	var m Metrics
	weeks := in.To.Sub(in.From).Hours() / (24 * 7)
	targeted := map[relKey][]string{}
	for _, r := range in.Rollouts {
		members := filter(r.Members, keep)
		if len(members) == 0 {
			continue
		}
		k := relKey{r.Target, r.Counter}
		targeted[k] = append(targeted[k], members...)
		// A rollout counts once it ended in the window, or failed in it
		// and is still stopped there (paused on a failing gate).
		ended := within(r.Ended, in.From, in.To)
		if ended && r.Completed {
			m.DeploymentFrequency.Completed++
		}
		if ended || (r.Ended.IsZero() && within(r.Failed, in.From, in.To)) {
			m.ChangeFailureRate.Finished++
			if !r.Failed.IsZero() && failedFor(r, members, byRel[k]) {
				m.ChangeFailureRate.Failed++
			}
		}
	}
	if weeks > 0 {
		m.DeploymentFrequency.PerWeek = round(float64(m.DeploymentFrequency.Completed) / weeks)
	}
	if m.ChangeFailureRate.Finished > 0 {
		m.ChangeFailureRate.Rate = ptr(round(float64(m.ChangeFailureRate.Failed) / float64(m.ChangeFailureRate.Finished)))
	}
	// Lead time.
	var lead, build []float64
	for _, rel := range in.Releases {
		if !within(rel.Pushed, in.From, in.To) {
			continue
		}
		k := relKey{rel.Target, rel.Counter}
		devs := uniq(targeted[k])
		if len(devs) == 0 {
			continue
		}
		var commits []time.Time
		for _, d := range devs {
			if u, ok := byRel[k][d]; ok && u.State == "committed" {
				commits = append(commits, u.Time)
			}
		}
		need := int(math.Ceil(Quantile * float64(len(devs))))
		if len(commits) < need {
			m.LeadTime.Pending++
			continue
		}
		sort.Slice(commits, func(i, j int) bool { return commits[i].Before(commits[j]) })
		at := commits[need-1]
		m.LeadTime.Releases++
		lead = append(lead, at.Sub(rel.Pushed).Seconds())
		if !rel.Built.IsZero() {
			build = append(build, at.Sub(rel.Built).Seconds())
		}
	}
	m.LeadTime.MedianSeconds = quantile(lead, 0.5)
	m.LeadTime.P90Seconds = quantile(lead, 0.9)
	m.LeadTime.BuildToFleetMedianSeconds = quantile(build, 0.5)
	// Time to restore.
	var restore []float64
	for _, r := range in.Rollouts {
		if r.Failed.IsZero() || !within(r.Failed, in.From, in.To) {
			continue
		}
		members := filter(r.Members, keep)
		k := relKey{r.Target, r.Counter}
		if len(members) == 0 || !failedFor(r, members, byRel[k]) {
			continue
		}
		restoredAt, ok := restored(r, members, byRel[k], byTarget[r.Target])
		if !ok {
			m.TimeToRestore.Unrestored++
			continue
		}
		m.TimeToRestore.Restored++
		restore = append(restore, math.Max(0, restoredAt.Sub(r.Failed).Seconds()))
	}
	m.TimeToRestore.MedianSeconds = quantile(restore, 0.5)
	return m
}

// failedFor: a failed rollout counts against a population when one of its
// members there failed the release (rolled back, install failed,
// rejected), or when none of its members did (the failure is the whole
// rollout's: an operator's abort, a gate on telemetry).
func failedFor(r Rollout, members []string, ups map[string]Update) bool {
	bad := func(d string) bool {
		u, ok := ups[d]
		return ok && (u.State == "rolled_back" || u.State == "failed" || u.State == "rejected")
	}
	for _, d := range members {
		if bad(d) {
			return true
		}
	}
	for _, d := range r.Members {
		if bad(d) {
			return false
		}
	}
	return true
}

// restored is when the last affected member ran a good build again.
func restored(r Rollout, members []string, ups map[string]Update, target map[string][]Update) (time.Time, bool) {
	var last time.Time
	for _, d := range members {
		u, tried := ups[d]
		if !tried || u.State == "offered" || u.State == "deferred" || u.State == "rejected" {
			continue // never left its build
		}
		var at time.Time
		switch u.State {
		case "rolled_back", "failed":
			at = u.Time
		default:
			// Committed (or still trying) the bad build: restored by a
			// later commit of another release of the target.
			for _, o := range target[d] {
				if o.Counter != r.Counter && o.State == "committed" && o.Time.After(r.Failed.Add(-time.Second)) &&
					(at.IsZero() || o.Time.Before(at)) {
					at = o.Time
				}
			}
			if at.IsZero() {
				return time.Time{}, false
			}
		}
		if at.After(last) {
			last = at
		}
	}
	if last.IsZero() {
		return r.Failed, true // nobody had switched: restored at once
	}
	return last, true
}

func filter(ds []string, keep func(string) bool) []string {
	var out []string
	for _, d := range ds {
		if keep(d) {
			out = append(out, d)
		}
	}
	return out
}

func uniq(ds []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, d := range ds {
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

// quantile by the nearest rank; nil for no values.
func quantile(v []float64, q float64) *float64 {
	if len(v) == 0 {
		return nil
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	if i < 0 {
		i = 0
	}
	return ptr(round(s[i]))
}

func round(f float64) float64 { return math.Round(f*1000) / 1000 }

func ptr(f float64) *float64 { return &f }
