// Package rollout decides staged canary rollouts. Plan is a pure function
// of a rollout's spec, its state, what the devices report and the time: it
// returns the next state, the commands to send and the transitions to
// record. The applier (apply.go) persists the result before it sends
// anything, so a crash never sends a command the state does not record.
package rollout

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ReleaseRef names a signed release.
type ReleaseRef struct {
	Target  string `json:"target"`
	Version string `json:"version"`
	Counter uint64 `json:"counter"`
}

func (r ReleaseRef) String() string { return r.Target + "@" + r.Version }

// Stage is one step of a rollout: a cumulative share of the target, as a
// percentage or a device count.
type Stage struct {
	Percent float64 `json:"percent,omitempty"`
	Count   int     `json:"count,omitempty"`
}

func (s Stage) String() string {
	if s.Count > 0 {
		return fmt.Sprint(s.Count)
	}
	return strconv.FormatFloat(s.Percent, 'f', -1, 64) + "%"
}

// ParseStages reads "1%,10%,50%,100%" or "5,50,100%".
func ParseStages(s string) ([]Stage, error) {
	var out []Stage
	for _, p := range strings.Split(s, ",") {
		p = strings.TrimSpace(p)
		var st Stage
		if v, ok := strings.CutSuffix(p, "%"); ok {
			var err error
			st.Percent, err = strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil || !(st.Percent > 0 && st.Percent <= 100) { // NaN fails both
				return nil, fmt.Errorf("stage %q: a percentage in (0, 100]", p)
			}
		} else if n, err := strconv.Atoi(p); err != nil || n <= 0 {
			return nil, fmt.Errorf("stage %q: a percentage (10%%) or a device count", p)
		} else {
			st.Count = n
		}
		out = append(out, st)
	}
	return out, nil
}

// Gates decide whether a stage may be left for the next.
type Gates struct {
	// MinCommitted is the share of the stage's devices that must have
	// committed (deferred devices past DeferredDeadline count as not done).
	MinCommitted float64 `json:"min_committed"`
	// MaxFailed is the share of finished devices that may have failed,
	// rolled back, been rejected or timed out; judged once MinFinished
	// devices finished (or all of the stage).
	MaxFailed   float64 `json:"max_failed"`
	MinFinished int     `json:"min_finished"`
	// Soak is how long the stage's devices run the release, after the
	// other gates hold, before the next stage starts.
	Soak Duration `json:"soak"`
	// HealthMargin: the updated devices fail the health gate when one of
	// their rates (reboots, errors, link loss, battery drain per flight
	// hour) over the soak exceeds the not-yet-updated devices' by more
	// than this share (0.5 = 50% worse) and by more than a floor.
	HealthMargin float64 `json:"health_margin"`
	// HealthOff turns the health comparison off.
	HealthOff bool `json:"health_off,omitempty"`
	// DeviceTimeout: a device silent this long after it acknowledged the
	// offer (no report since its acknowledgement or its latest report)
	// counts as failed (timed out): a build that bricks a drone makes it
	// silent. It never runs before the acknowledgement: a device that is
	// switched off is waiting, not failing. Time deferred does not count.
	DeviceTimeout Duration `json:"device_timeout"`
	// ReplaceAfter: a canary member that has been unreachable this long
	// (offline, never offered) since its stage started is replaced by a
	// reachable device of the same stratum.
	ReplaceAfter Duration `json:"replace_after"`
}

// Budget keeps a minimum of devices not updating for each value of a
// label (e.g. at least 2 drones of each base ready to fly).
type Budget struct {
	Label       string  `json:"label"`
	KeepMin     int     `json:"keep_min,omitempty"`
	KeepPercent float64 `json:"keep_percent,omitempty"`
}

// Window is a time of day (UTC) when devices may be offered the release.
type Window struct {
	Start int `json:"start"` // minutes after midnight UTC
	End   int `json:"end"`   // may be below Start: the window spans midnight
}

// In reports whether t falls in the window.
func (w Window) In(t time.Time) bool {
	m := t.UTC().Hour()*60 + t.UTC().Minute()
	if w.Start <= w.End {
		return m >= w.Start && m < w.End
	}
	return m >= w.Start || m < w.End
}

// ParseWindow reads "22:00-06:00" (UTC; an end of 24:00 is midnight).
func ParseWindow(s string) (Window, error) {
	bad := fmt.Errorf("window %q: want HH:MM-HH:MM (UTC)", s)
	from, to, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return Window{}, bad
	}
	start, ok1 := clockMinutes(from, false)
	end, ok2 := clockMinutes(to, true)
	if !ok1 || !ok2 {
		return Window{}, bad
	}
	return Window{Start: start, End: end}, nil
}

// clockMinutes reads HH:MM as minutes after midnight; 24:00 only as an end.
func clockMinutes(s string, end bool) (int, bool) {
	hs, ms, ok := strings.Cut(s, ":")
	if !ok || len(hs) == 0 || len(hs) > 2 || len(ms) != 2 {
		return 0, false
	}
	h, err1 := strconv.Atoi(hs)
	m, err2 := strconv.Atoi(ms)
	if err1 != nil || err2 != nil || h < 0 || m < 0 || m > 59 || hs[0] == '+' || ms[0] == '+' {
		return 0, false
	}
	if h < 24 || (end && h == 24 && m == 0) {
		return h*60 + m, true
	}
	return 0, false
}

// Limits bound the disruption a rollout causes.
type Limits struct {
	MaxInFlight      int      `json:"max_in_flight"` // devices offered and not finished, at most
	Budgets          []Budget `json:"budgets,omitempty"`
	Windows          []Window `json:"windows,omitempty"` // none: any time
	DeferredDeadline Duration `json:"deferred_deadline"`
	// OfflineDeadline: a completed rollout goes on offering the release
	// to members that were unreachable, as they come back, for this long.
	OfflineDeadline Duration `json:"offline_deadline"`
}

// Failure actions.
const (
	OnFailurePause = "pause"
	OnFailureAbort = "abort"
)

// Spec is what an operator asks for.
type Spec struct {
	ID string `json:"id"`
	// Seed places devices in stages (with the device id, in a hash). By
	// default it is derived from what the rollout targets, not from its id,
	// so that a dry run and the create that follows take the same devices.
	Seed     string            `json:"seed,omitempty"`
	Release  ReleaseRef        `json:"release"`
	Revert   *ReleaseRef       `json:"revert,omitempty"` // signed re-release of the previous build (higher counter)
	Selector map[string]string `json:"selector"`
	// FromVersions, when set, targets only devices running these versions.
	FromVersions []string `json:"from_versions,omitempty"`
	Hardware     []string `json:"hardware,omitempty"` // the release's hardware: others are not targeted
	Stages       []Stage  `json:"stages"`
	MinCanary    int      `json:"min_canary"`
	// Strata are the labels membership is stratified by. The canary holds
	// a device of every value of the first (the hardware revision by
	// default) and spreads over the next; the failure and health gates
	// are judged within each value of the first as well as overall.
	Strata     []string `json:"strata"`
	Gates      Gates    `json:"gates"`
	Limits     Limits   `json:"limits"`
	OnFailure  string   `json:"on_failure"`
	AutoRevert bool     `json:"auto_revert,omitempty"`
	// Full offers the full artifacts only, even to devices that could
	// take a delta (specs stored before deltas existed read false).
	Full bool `json:"full,omitempty"`
}

// Defaults.
var (
	DefaultStages = []Stage{{Percent: 1}, {Percent: 10}, {Percent: 50}, {Percent: 100}}
	DefaultGates  = Gates{MinCommitted: 0.9, MaxFailed: 0.05, MinFinished: 3, Soak: Duration(10 * time.Minute),
		HealthMargin: 0.5, DeviceTimeout: Duration(30 * time.Minute), ReplaceAfter: Duration(5 * time.Minute)}
	DefaultLimits = Limits{MaxInFlight: 100, DeferredDeadline: Duration(2 * time.Hour), OfflineDeadline: Duration(7 * 24 * time.Hour)}
	DefaultStrata = []string{"hw", "base"}
)

// DefaultMinCanary is the smallest first stage.
const DefaultMinCanary = 3

// WithDefaults fills unset fields.
func (s Spec) WithDefaults() Spec {
	if len(s.Stages) == 0 {
		s.Stages = DefaultStages
	}
	if s.MinCanary == 0 {
		s.MinCanary = DefaultMinCanary
	}
	if s.Strata == nil {
		s.Strata = DefaultStrata
	}
	g, d := &s.Gates, DefaultGates
	if g.MinCommitted == 0 {
		g.MinCommitted = d.MinCommitted
	}
	if g.MaxFailed == 0 {
		g.MaxFailed = d.MaxFailed
	}
	if g.MinFinished == 0 {
		g.MinFinished = d.MinFinished
	}
	if g.Soak == 0 {
		g.Soak = d.Soak
	}
	if g.HealthMargin == 0 {
		g.HealthMargin = d.HealthMargin
	}
	if g.DeviceTimeout == 0 {
		g.DeviceTimeout = d.DeviceTimeout
	}
	if g.ReplaceAfter == 0 {
		g.ReplaceAfter = d.ReplaceAfter
	}
	if s.Limits.MaxInFlight == 0 {
		s.Limits.MaxInFlight = DefaultLimits.MaxInFlight
	}
	if s.Limits.DeferredDeadline == 0 {
		s.Limits.DeferredDeadline = DefaultLimits.DeferredDeadline
	}
	if s.Limits.OfflineDeadline == 0 {
		s.Limits.OfflineDeadline = DefaultLimits.OfflineDeadline
	}
	if s.OnFailure == "" {
		s.OnFailure = OnFailurePause
	}
	if s.Selector == nil {
		s.Selector = map[string]string{}
	}
	return s
}

// Validate checks a spec (after WithDefaults).
func (s Spec) Validate() error {
	var errs []error
	if s.Release.Target == "" || s.Release.Version == "" || s.Release.Counter == 0 {
		errs = append(errs, errors.New("no release"))
	}
	prev := 0.0
	for i, st := range s.Stages {
		if (st.Percent > 0) == (st.Count > 0) {
			errs = append(errs, fmt.Errorf("stage %d: a percentage or a count", i+1))
		}
		if st.Percent > 0 {
			if st.Percent < prev {
				errs = append(errs, fmt.Errorf("stage %d: percentages must not decrease", i+1))
			}
			prev = st.Percent
		}
	}
	if last := s.Stages[len(s.Stages)-1]; last.Percent != 100 && last.Count == 0 {
		errs = append(errs, errors.New("the last stage should be 100% (or a count)"))
	}
	g := s.Gates
	if g.MinCommitted < 0 || g.MinCommitted > 1 || g.MaxFailed < 0 || g.MaxFailed > 1 {
		errs = append(errs, errors.New("gate ratios are between 0 and 1"))
	}
	if s.OnFailure != OnFailurePause && s.OnFailure != OnFailureAbort {
		errs = append(errs, fmt.Errorf("on failure %q: pause or abort", s.OnFailure))
	}
	if s.AutoRevert && s.Revert == nil {
		errs = append(errs, errors.New("automatic revert needs a revert release (a signed re-release of the previous build)"))
	}
	if s.Revert != nil && s.Revert.Counter <= s.Release.Counter {
		errs = append(errs, fmt.Errorf("the revert release's counter %d must be above the release's %d: devices refuse lower counters", s.Revert.Counter, s.Release.Counter))
	}
	if g.DeviceTimeout < 0 || g.ReplaceAfter < 0 || g.Soak < 0 || s.Limits.DeferredDeadline < 0 || s.Limits.OfflineDeadline < 0 {
		errs = append(errs, errors.New("durations are not negative"))
	}
	if s.MinCanary < 0 || g.MinFinished < 0 {
		errs = append(errs, errors.New("counts are not negative"))
	}
	if s.Limits.MaxInFlight < 0 {
		errs = append(errs, errors.New("max in flight is negative"))
	}
	for _, b := range s.Limits.Budgets {
		if b.Label == "" || b.KeepMin < 0 || b.KeepPercent < 0 || b.KeepPercent > 100 {
			errs = append(errs, fmt.Errorf("bad budget %+v", b))
		}
	}
	return errors.Join(errs...)
}

// Duration is a time.Duration that reads and writes JSON as "10m".
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

func (d *Duration) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %s: %w", b, err)
	}
	*d = Duration(v)
	return nil
}

// D is the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// DeriveSeed is the default Seed: a digest of what the rollout targets
// (release, selector, hardware and version filters, strata), so that the
// same request takes the same devices, in a dry run and in earnest.
func (s Spec) DeriveSeed() string {
	h := sha256.New()
	fmt.Fprintf(h, "%s@%s#%d\x00", s.Release.Target, s.Release.Version, s.Release.Counter)
	keys := make([]string, 0, len(s.Selector))
	for k := range s.Selector {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "%s=%s\x00", k, s.Selector[k])
	}
	fmt.Fprintf(h, "\x01%s\x01%s\x01%s", strings.Join(s.Hardware, ","), strings.Join(s.FromVersions, ","), strings.Join(s.Strata, ","))
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// seed is what ranks hash: the rollout id for rollouts made before seeds
// existed, whose members were placed by it.
func (s Spec) seed() string {
	if s.Seed != "" {
		return s.Seed
	}
	return s.ID
}
