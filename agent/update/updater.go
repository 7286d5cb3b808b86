// Package update applies signed releases on a device: it verifies an offer
// before writing anything, downloads the artifact resumably, installs it
// power-safely when the drone allows it (landed, charged, not locked),
// trial-boots the new build, and commits it once the new build proves
// healthy or rolls back by itself when it does not.
//
// Every step is persisted in the state directory before it acts, so a
// power cut or a crash at any moment resumes, cleans up or rolls back at
// the next start (Boot).
package update

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/proto"
)

// Store keeps the updater's state file (the agent's state directory).
type Store interface {
	Load(name string) ([]byte, error)
	Save(name string, data []byte) error
}

// Conditions is what the drone is doing, from its latest sample.
type Conditions struct {
	Flight  proto.FlightState
	Battery *uint8
	// Why is the flight source's own word for the state, when installs
	// must wait ("landing", "no heartbeat from the flight controller for
	// 4s"): the deferral reason says it.
	Why string
}

// Policy says when an install may start.
type Policy struct {
	MinBattery uint8  // percent; an install waits below it (when the battery is known)
	LockFile   string // an install waits while this file exists (maintenance lock)
	// AllowUnknownFlight installs even when no flight stack reports the
	// flight state (bench units, companion computers without one).
	AllowUnknownFlight bool
}

// Defaults of Options.
const (
	DefaultTrialDeadline = 2 * time.Minute
	DefaultTrialSoak     = 30 * time.Second
	DefaultMaxTrialBoots = 3
	DefaultMinBattery    = 30
	DefaultMaxArtifact   = 1 << 30
	stateFile            = "update.json"
)

// Options configure an Updater.
type Options struct {
	Roots     []ed25519.PublicKey // pinned root keys
	Hardware  string
	Arch      string    // default runtime.GOARCH
	BuildTime time.Time // the clock is not trusted before it
	Store     Store
	Dir       string // staging directory
	Clock     clock.Clock
	HTTP      *http.Client
	BaseURL   string              // control plane URL, for relative artifact URLs
	Auth      func(*http.Request) // adds the device's credential to downloads
	// Installers by target; TargetAgent is the agent's own binary.
	Installers map[string]Installer
	// Report sends an update report to the control plane (as an event).
	Report func(r proto.UpdateReport, cmd string)
	// Conditions returns what the drone is doing now.
	Conditions func() Conditions
	Policy     Policy
	// SelfTest is the agent's own health check during a trial.
	SelfTest      func(ctx context.Context) error
	TrialDeadline time.Duration
	// TrialSoak is how long a new build must stay up, healthy, before it is
	// committed: a build that passes its checks and crashes a second later
	// must not be kept (default 30 s; negative: none).
	TrialSoak       time.Duration
	MaxTrialBoots   int
	MaxArtifactSize uint64
	// MaxDeltaResult is the largest build the agent makes of a patch
	// (default DefaultMaxDeltaResult); NoDelta takes full artifacts only
	// (the agent tells the control plane, which then offers no delta, and
	// a delta offered anyway is fetched whole).
	MaxDeltaResult uint64
	NoDelta        bool
	// FS is the file system the delta path stages its result through
	// (default OSFS; crash tests cut it).
	FS FS
	// RetryMin and RetryMax bound the wait between download attempts.
	RetryMin, RetryMax time.Duration
	Logger             *slog.Logger
}

// state is persisted in the state directory.
type state struct {
	// Targets is the anti-rollback state of each target: release counters
	// are a sequence per target.
	Targets   map[string]counters  `json:"targets,omitempty"`
	TimeFloor int64                `json:"time_floor"` // unix seconds the clock may not read below
	KeyList   []byte               `json:"key_list,omitempty"`
	Installed map[string]installed `json:"installed"`
	Job       *job                 `json:"job,omitempty"`

	// Written by agents before per-target state; read once, then dropped.
	LegacyHighestSeen uint64 `json:"highest_seen,omitempty"`
	LegacyHighestSHA  []byte `json:"highest_sha,omitempty"`
	LegacySpent       uint64 `json:"spent,omitempty"`
}

// counters is the anti-rollback state of one target.
type counters struct {
	// Spent is the highest counter whose install began: never again. Only
	// an install moves it: a release that was only offered (whatever
	// counter a leaked key gave it) blocks nothing once it is gone.
	Spent uint64 `json:"spent,omitempty"`
	// Seen and SeenSHA are the latest release accepted: the same counter
	// may come again (its download failed, it was cancelled), but never
	// for another artifact.
	Seen    uint64 `json:"seen,omitempty"`
	SeenSHA []byte `json:"seen_sha,omitempty"`
}

// MaxCounterJump bounds how far above the installed release a counter may
// be: a leaked key cannot spend the counter space (2^64-1) and leave the
// fix no number above it.
const MaxCounterJump = 1 << 40

// CreatedAllowance is how far in the future (by the trusted clock) a
// manifest may say it was created: release engineers' clocks are not
// exact, but a manifest from years ahead would push the device's time
// floor there.
const CreatedAllowance = 24 * time.Hour

func (s *state) target(t string) counters { return s.Targets[t] }

func (s *state) setTarget(t string, c counters) {
	if s.Targets == nil {
		s.Targets = map[string]counters{}
	}
	s.Targets[t] = c
}

// upgradeLegacy carries the single counters of earlier agents over to
// every target this device installs: what was spent stays spent (the
// counters were shared, so which target spent them is unknown).
func (s *state) upgradeLegacy(targets []string) {
	if s.LegacySpent == 0 && s.LegacyHighestSeen == 0 {
		return
	}
	for _, t := range targets {
		c := s.target(t)
		c.Spent = max(c.Spent, s.LegacySpent)
		s.setTarget(t, c)
	}
	if s.LegacyHighestSeen > 0 {
		c := s.target(proto.TargetAgent)
		if c.Seen < s.LegacyHighestSeen {
			c.Seen, c.SeenSHA = s.LegacyHighestSeen, s.LegacyHighestSHA
		}
		s.setTarget(proto.TargetAgent, c)
	}
	s.LegacySpent, s.LegacyHighestSeen, s.LegacyHighestSHA = 0, 0, nil
}

type installed struct {
	Version string `json:"version"`
	Counter uint64 `json:"counter"`
	SHA256  []byte `json:"sha256"`
}

// Phases of a job.
const (
	phaseDownload = "downloading"
	phaseVerified = "verified"
	phaseInstall  = "installing"
	phaseTrial    = "trial"
	phaseRollback = "rolling_back"
)

type job struct {
	Manifest     []byte `json:"manifest"` // signed
	URL          string `json:"url"`
	Rollout      string `json:"rollout,omitempty"`
	Cmd          string `json:"cmd,omitempty"`
	Phase        string `json:"phase"`
	TrialBoots   int    `json:"trial_boots,omitempty"`
	TrialStarted int64  `json:"trial_started,omitempty"`
	Reason       string `json:"reason,omitempty"`
	Deferred     string `json:"deferred,omitempty"`
	// FullURL is the full artifact of a delta offer; Fallback, once set,
	// says why the delta was given up for it (and URL is FullURL).
	FullURL  string `json:"full_url,omitempty"`
	Fallback string `json:"fallback,omitempty"`
	// NoPatch: the delta was given up before any of the patch was fetched
	// (it could not apply here).
	NoPatch bool `json:"no_patch,omitempty"`
	m       proto.Manifest
}

// Updater runs the update sequence.
type Updater struct {
	opts Options
	log  *slog.Logger

	started time.Time // this process's start, for the trial's soak

	mu        sync.Mutex
	st        state
	wake      chan struct{}
	confirmed map[uint64]bool
	furthest  map[string]uint64 // download progress per file (digest), across attempts (Run only)
	// waiting is the last offer deferred for a condition of the device,
	// not a verdict on the release: the clock could not be trusted (it read
	// before the floor), or another update was installing. It passed every
	// check that does not need trusted time, and is verified again from
	// the start once the condition clears. Kept in memory only (a deferred
	// offer writes nothing).
	waiting *waitingOffer
	basesMu sync.Mutex
	bases   map[string]baseStamp // digests of the installed files, by target
}

func (u *Updater) fs() FS {
	if u.opts.FS == nil {
		return OSFS{}
	}
	return u.opts.FS
}

// waitingOffer is an offer deferred until a device condition clears.
type waitingOffer struct {
	cmd proto.Command
	j   *job // for its reports
}

// ErrNoUpdater is returned for an offer of a target without installer.
var ErrNoUpdater = errors.New("no installer for target")

// New loads the updater's state.
func New(opts Options) (*Updater, error) {
	if len(opts.Roots) == 0 {
		return nil, errors.New("update: no root keys")
	}
	if opts.Arch == "" {
		opts.Arch = runtime.GOARCH
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	if opts.HTTP == nil {
		opts.HTTP = &http.Client{Timeout: 0}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.TrialDeadline == 0 {
		opts.TrialDeadline = DefaultTrialDeadline
	}
	switch {
	case opts.TrialSoak == 0:
		opts.TrialSoak = DefaultTrialSoak
	case opts.TrialSoak < 0:
		opts.TrialSoak = 0 // no soak
	}
	if opts.MaxTrialBoots == 0 {
		opts.MaxTrialBoots = DefaultMaxTrialBoots
	}
	if opts.MaxArtifactSize == 0 {
		opts.MaxArtifactSize = DefaultMaxArtifact
	}
	if opts.MaxDeltaResult == 0 {
		opts.MaxDeltaResult = DefaultMaxDeltaResult
	}
	if opts.RetryMin == 0 {
		opts.RetryMin = time.Second
	}
	if opts.RetryMax == 0 {
		opts.RetryMax = time.Minute
	}
	if opts.Report == nil {
		opts.Report = func(proto.UpdateReport, string) {}
	}
	if opts.Conditions == nil {
		opts.Conditions = func() Conditions { return Conditions{} }
	}
	u := &Updater{started: opts.Clock.Now(), opts: opts, log: opts.Logger.With("component", "update"), wake: make(chan struct{}, 1), confirmed: map[uint64]bool{}, furthest: map[string]uint64{}, bases: map[string]baseStamp{}}
	b, err := opts.Store.Load(stateFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("update state: %w", err)
	default:
		if err := json.Unmarshal(b, &u.st); err != nil {
			// A state file the agent cannot read must not stop it: start
			// afresh, but never below the build time.
			u.log.Error("update state unreadable, starting afresh", "err", err)
			u.st = state{}
		}
	}
	if u.st.Installed == nil {
		u.st.Installed = map[string]installed{}
	}
	targets := make([]string, 0, len(opts.Installers))
	for t := range opts.Installers {
		targets = append(targets, t)
	}
	u.st.upgradeLegacy(targets)
	if u.st.Job != nil {
		if m, err := proto.DecodeManifestUnverified(u.st.Job.Manifest); err == nil {
			u.st.Job.m = m
		} else {
			u.st.Job = nil
		}
	}
	return u, nil
}

func (u *Updater) saveLocked() error {
	b, err := json.Marshal(&u.st)
	if err != nil {
		return err
	}
	return u.opts.Store.Save(stateFile, b)
}

// Installed returns the installed version of each target known to the
// updater (from releases it installed).
func (u *Updater) Installed() map[string]installed {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make(map[string]installed, len(u.st.Installed))
	for k, v := range u.st.Installed {
		out[k] = v
	}
	return out
}

// AgentCounter is the counter of the installed agent release (0: none).
func (u *Updater) AgentCounter() uint64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.st.Installed[proto.TargetAgent].Counter
}

func (u *Updater) report(j *job, st proto.UpdateState, mutate func(*proto.UpdateReport)) {
	r := proto.UpdateReport{Target: j.m.Target, Version: j.m.Version, Counter: j.m.Counter, State: st, Rollout: j.Rollout, Size: j.m.Size, Fallback: j.Fallback}
	if j.m.Delta != nil && !j.NoPatch {
		r.Patch = j.m.Delta.PatchSize
	}
	if mutate != nil {
		mutate(&r)
	}
	u.opts.Report(r, j.Cmd)
}

// trustedNow is the clock, unless it reads before the floor (the build
// time, or the creation of the newest metadata accepted): then there is no
// trusted time, and nothing that expires can be judged.
func (u *Updater) trustedNow() (time.Time, error) {
	now := u.opts.Clock.Now()
	floor := u.floor().Unix()
	if now.Unix() < floor {
		return now, &proto.VerifyError{Check: proto.CheckClock,
			Err: fmt.Errorf("the clock reads %s, before %s", now.UTC().Format(time.RFC3339), time.Unix(floor, 0).UTC().Format(time.RFC3339))}
	}
	return now, nil
}

// floor is the earliest the time can be: the build time, or the creation
// of the newest metadata accepted.
func (u *Updater) floor() time.Time {
	return time.Unix(max(u.opts.BuildTime.Unix(), u.st.TimeFloor), 0)
}

// Offer handles an update command: verify it completely before anything
// is written, then start (or continue) the job. Every offer is answered
// with a report before Offer returns: offered, committed (already
// installed), the state of the job it repeats, deferred (a condition of
// the device: untrusted clock, another update installing), rejected (a
// verdict on the offer, with its check) or failed (the device could not
// record it). It returns the refusal or deferral, if any.
func (u *Updater) Offer(cmd proto.Command) error {
	o := cmd.Update
	if o == nil {
		err := &proto.VerifyError{Check: proto.CheckFormat, Err: errors.New("update command without an offer")}
		u.log.Warn("release refused", "check", proto.CheckFormat, "err", err)
		u.opts.Report(RefusalReport(cmd, proto.CheckFormat, err.Error()), cmd.ID)
		return err
	}
	builds := u.Builds() // before the lock: it may hash the files in place
	u.mu.Lock()
	defer u.mu.Unlock()
	m, clockErr, err := u.verifyLocked(o.Manifest, o.Keys)
	j := &job{Manifest: o.Manifest, URL: o.URL, FullURL: o.FullURL, Rollout: cmd.Rollout, Cmd: cmd.ID, m: m}
	if err != nil {
		if j.m.Counter == 0 && identify(&j.m, o.Manifest) && u.holdsLocked(j.m) {
			// The claims name a release this device holds (installed,
			// pending, waiting): a refused copy of it must not be filed
			// over that release's own state.
			j.m = proto.Manifest{}
		}
		check := proto.CheckOf(err)
		if check == "" {
			// Not a verdict on the release: the device could not keep
			// what it verified (its state directory).
			u.log.Error("offer not handled", "err", err)
			u.report(j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = err.Error() })
			return err
		}
		u.log.Warn("release refused", "check", check, "err", err)
		u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(check), err.Error() })
		return err
	}
	inst := u.st.Installed[m.Target]
	installer := u.opts.Installers[m.Target]
	switch {
	case inst.Counter == m.Counter && slices.Equal(inst.SHA256, m.SHA256),
		u.st.Job == nil && installer.Running(m) && installer.Installed(m):
		// Already installed: acknowledge, install nothing.
		var err error
		if inst.Counter != m.Counter {
			u.st.Installed[m.Target] = installed{Version: m.Version, Counter: m.Counter, SHA256: m.SHA256}
			if err = u.saveLocked(); err != nil {
				err = fmt.Errorf("update state: %w", err)
				u.log.Error("installed release not recorded", "version", m.Version, "err", err)
			}
		}
		u.report(j, proto.UpdateCommitted, func(r *proto.UpdateReport) { r.Reason = "already installed" })
		return err
	case u.st.Job != nil && u.st.Job.m.Counter == m.Counter && slices.Equal(u.st.Job.m.SHA256, m.SHA256):
		// The same offer again (the control plane re-sends until it hears
		// back): say where it stands.
		cur := u.st.Job
		if cur.FullURL == "" && o.FullURL != "" && cur.m.Delta != nil && u.checkURL(o.FullURL) == nil {
			// The offer comes again with a full artifact to fall back to.
			cur.FullURL = o.FullURL
			_ = u.saveLocked()
		}
		u.report(cur, cur.state(), func(r *proto.UpdateReport) {
			r.Reason = cur.Deferred
			if cur.Phase == phaseRollback {
				r.Reason = cur.Reason
			}
		})
		u.poke()
		return nil
	}
	if err := u.counterLocked(m); err != nil {
		u.log.Warn("release refused", "check", proto.CheckCounter, "err", err)
		u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckCounter), err.Error() })
		return err
	}
	if err := u.checkURL(o.URL); err != nil {
		u.log.Warn("release refused", "check", proto.CheckFormat, "err", err)
		u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckFormat), err.Error() })
		return err
	}
	if m.Delta == nil {
		j.FullURL = "" // the artifact is the full one
	} else if o.FullURL != "" {
		if err := u.checkURL(o.FullURL); err != nil {
			u.log.Warn("release refused", "check", proto.CheckFormat, "err", err)
			u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) {
				r.Check, r.Reason = string(proto.CheckFormat), "full artifact: "+err.Error()
			})
			return err
		}
	}
	if m.Delta != nil {
		// A delta this device cannot apply (another base in place, deltas
		// turned off, no known installed file) is fetched whole at once,
		// or refused when the offer names no full artifact.
		if reason := u.deltaBlocker(m, builds); reason != "" {
			if o.FullURL == "" {
				err := &proto.VerifyError{Check: proto.CheckDelta, Err: errors.New(reason)}
				u.log.Warn("release refused", "check", proto.CheckDelta, "err", err)
				u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckDelta), err.Error() })
				return err
			}
			u.log.Info("delta not applicable, fetching the full artifact", "version", m.Version, "reason", reason)
			j.Fallback, j.URL, j.NoPatch = reason, o.FullURL, true
		}
	}
	if clockErr != nil {
		// Not a refusal: every check that does not need the time passed.
		// Wait for the clock (NTP, GPS time) and verify again. Deferred,
		// so that a rollout counts it as not done rather than as a
		// failure of the release.
		u.log.Warn("release deferred until the clock can be trusted", "err", clockErr)
		u.unwaitLocked(j)
		u.waiting = &waitingOffer{cmd: cmd, j: j}
		u.report(j, proto.UpdateDeferred, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckClock), clockErr.Error() })
		u.poke()
		return clockErr
	}
	if cur := u.st.Job; cur != nil && cur.Phase != phaseDownload && cur.Phase != phaseVerified {
		// Another update is past the point of no return: this one waits
		// for it to end (commit or roll back), then starts over.
		doing := map[string]string{phaseInstall: "installing", phaseTrial: "on trial", phaseRollback: "rolling back"}[cur.Phase]
		err := fmt.Errorf("another update is in progress: %s %s is %s; this release follows when it ends", cur.m.Target, cur.m.Version, doing)
		u.log.Info("release deferred", "version", m.Version, "reason", err)
		u.unwaitLocked(j)
		u.waiting = &waitingOffer{cmd: cmd, j: j}
		u.report(j, proto.UpdateDeferred, func(r *proto.UpdateReport) { r.Reason = err.Error() })
		return err
	}
	// Accepted: it replaces a job that had not started installing, and an
	// offer that waited. Its counter becomes the highest seen (nothing
	// older is accepted any more), but only an install spends it: the
	// same release may be offered again if its download fails or is
	// cancelled.
	if u.st.Job != nil {
		u.report(u.st.Job, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = "superseded by " + m.Version })
	}
	u.unwaitLocked(j)
	prev, prevTarget := u.st, u.st.target(m.Target)
	u.st.setTarget(m.Target, counters{Spent: prevTarget.Spent, Seen: m.Counter, SeenSHA: m.SHA256})
	// The floor follows the metadata, but never past the trusted clock: a
	// manifest created a little ahead (an engineer's clock) must not make
	// the device distrust its own time.
	if now, err := u.trustedNow(); err == nil {
		u.st.TimeFloor = max(u.st.TimeFloor, min(m.Created, now.Unix()))
	}
	j.Phase = phaseDownload
	u.st.Job = j
	if err := u.saveLocked(); err != nil {
		// Nothing was recorded: the device goes on as before the offer,
		// and says so (the same release may be offered again).
		u.st.TimeFloor, u.st.Job = prev.TimeFloor, prev.Job
		u.st.setTarget(m.Target, prevTarget)
		err = fmt.Errorf("update state: %w", err)
		u.log.Error("offer not recorded", "version", m.Version, "err", err)
		u.report(j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = "could not record the offer: " + err.Error() })
		return err
	}
	u.report(j, proto.UpdateOffered, nil)
	u.poke()
	return nil
}

// counterLocked refuses a release that is not newer than what the device
// installed, spent (an install began: it committed or rolled back),
// accepted, or has pending, naming which.
func (u *Updater) counterLocked(m proto.Manifest) error {
	inst := u.st.Installed[m.Target]
	c := u.st.target(m.Target)
	var why string
	switch {
	case m.Counter < inst.Counter:
		why = fmt.Sprintf("counter %d is older than the installed %s %s (counter %d)", m.Counter, m.Target, inst.Version, inst.Counter)
	case m.Counter == inst.Counter:
		why = fmt.Sprintf("counter %d is the installed %s %s, but this is another artifact under that counter", m.Counter, m.Target, inst.Version)
	case m.Counter <= c.Spent:
		why = fmt.Sprintf("counter %d was installed before and rolled back (or its install failed): a spent release is never installed again, a fix needs a new release", m.Counter)
		if m.Counter < c.Spent {
			why = fmt.Sprintf("counter %d is below the last installed or rolled-back %s release %d", m.Counter, m.Target, c.Spent)
		}
	case m.Counter-max(inst.Counter, c.Spent) > MaxCounterJump:
		why = fmt.Sprintf("counter %d is more than 2^40 above the installed %s release (%d): it would leave no counter for later releases", m.Counter, m.Target, max(inst.Counter, c.Spent))
	case m.Counter == c.Seen && !slices.Equal(m.SHA256, c.SeenSHA):
		why = fmt.Sprintf("counter %d was already accepted for another artifact", m.Counter)
	case u.st.Job != nil && u.st.Job.m.Target == m.Target && m.Counter < u.st.Job.m.Counter:
		why = fmt.Sprintf("counter %d is below the pending %s %s (counter %d)", m.Counter, u.st.Job.m.Target, u.st.Job.m.Version, u.st.Job.m.Counter)
	default:
		return nil
	}
	return &proto.VerifyError{Check: proto.CheckCounter, Err: errors.New(why)}
}

// checkURL refuses an artifact URL that cannot be downloaded: the offer is
// refused at once rather than after the download's retries.
func (u *Updater) checkURL(raw string) error {
	if raw == "" {
		return &proto.VerifyError{Check: proto.CheckFormat, Err: errors.New("the offer has no artifact URL")}
	}
	abs, err := u.resolve(raw)
	if err != nil {
		return &proto.VerifyError{Check: proto.CheckFormat, Err: fmt.Errorf("artifact URL %q: %v", raw, err)}
	}
	if p, err := url.Parse(abs); err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
		return &proto.VerifyError{Check: proto.CheckFormat, Err: fmt.Errorf("artifact URL %q is not an http(s) URL (relative to the control plane %q)", raw, u.opts.BaseURL)}
	}
	return nil
}

// unwaitLocked drops the waiting offer. Unless it is next's own (the same
// manifest, offered again), it is reported failed: next superseded it.
func (u *Updater) unwaitLocked(next *job) {
	if w := u.waiting; w != nil && !bytes.Equal(w.j.Manifest, next.Manifest) {
		u.report(w.j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = "superseded by " + next.m.Version })
	}
	u.waiting = nil
}

// identify fills the release's identity (target, version, counter, size)
// from a manifest that did not pass verification, so that the refusal is
// filed under the release the control plane offered. These are the
// manifest's claims, unverified: they address a report, nothing else.
func identify(m *proto.Manifest, signed []byte) bool {
	if m.Target != "" && m.Counter != 0 {
		return true
	}
	claimed, err := proto.DecodeManifestUnverified(signed)
	if err != nil {
		return false
	}
	m.Target, m.Version, m.Counter, m.Size = claimed.Target, claimed.Version, claimed.Counter, claimed.Size
	return true
}

// holdsLocked reports whether m's target and counter are of a release the
// device installed, is installing or keeps waiting.
func (u *Updater) holdsLocked(m proto.Manifest) bool {
	same := func(o proto.Manifest) bool { return o.Target == m.Target && o.Counter == m.Counter }
	return u.st.Installed[m.Target].Counter == m.Counter ||
		(u.st.Job != nil && same(u.st.Job.m)) || (u.waiting != nil && same(u.waiting.j.m))
}

// RefusalReport is the rejected report of an offer refused before its
// manifest was verified (the agent has no root key to verify it with, the
// command is malformed), addressed with the manifest's unverified claims.
func RefusalReport(cmd proto.Command, check proto.Check, reason string) proto.UpdateReport {
	r := proto.UpdateReport{State: proto.UpdateRejected, Check: string(check), Reason: reason, Rollout: cmd.Rollout}
	if cmd.Update != nil {
		var m proto.Manifest
		if identify(&m, cmd.Update.Manifest) {
			r.Target, r.Version, r.Counter, r.Size = m.Target, m.Version, m.Counter, m.Size
		}
	}
	return r
}

// verifyLocked runs every check on a manifest (and the key list that
// comes with it, or the one held), in the order of the trust model.
//
// When the clock cannot be trusted (it reads before the floor), the checks
// run at the floor instead, the earliest the time can really be: what
// fails there (a bad signature, the wrong hardware, metadata expired even
// then) is refused for good, and clockErr says that what passed still
// needs trusted time. Nothing is written then.
func (u *Updater) verifyLocked(signed, keys []byte) (m proto.Manifest, clockErr, err error) {
	if len(signed) > proto.MaxManifestSize {
		return m, nil, &proto.VerifyError{Check: proto.CheckSize, Err: fmt.Errorf("manifest of %d bytes", len(signed))}
	}
	now, clockErr := u.trustedNow()
	if clockErr != nil {
		now = u.floor()
	}
	var held *proto.KeyList
	if u.st.KeyList != nil {
		if k, err := proto.OpenKeyList(u.st.KeyList, u.opts.Roots); err == nil {
			held = &k
		}
	}
	kl := proto.KeyList{}
	switch {
	case len(keys) > 0:
		if kl, err = proto.OpenKeyList(keys, u.opts.Roots); err != nil {
			return m, clockErr, err
		}
		if err := kl.Check(held, now); err != nil {
			return m, clockErr, err
		}
		if held == nil || kl.Version > held.Version {
			// A newer list (rotations, revocations) holds from now on,
			// whatever becomes of the manifest that brought it, and also
			// when the clock cannot be trusted (it is the root's word, and
			// versions only go up): a device that a leaked key tried to
			// freeze still learns that the key is revoked.
			u.st.KeyList = keys
			u.dropRevokedLocked(kl)
			if err := u.saveLocked(); err != nil {
				return m, clockErr, fmt.Errorf("update state: %w", err)
			}
		}
	case held != nil:
		kl = *held
		if err := kl.Check(nil, now); err != nil {
			return m, clockErr, err
		}
	default:
		return m, clockErr, &proto.VerifyError{Check: proto.CheckKeyList, Err: errors.New("no release key list offered or held")}
	}
	if m, err = proto.OpenManifest(signed, kl, now); err != nil {
		return m, clockErr, err
	}
	if clockErr == nil && m.Created > now.Add(CreatedAllowance).Unix() {
		return m, clockErr, &proto.VerifyError{Check: proto.CheckCreated, Err: fmt.Errorf("the manifest says it was created %s, more than %v after now (%s)",
			time.Unix(m.Created, 0).UTC().Format(time.RFC3339), CreatedAllowance, now.UTC().Format(time.RFC3339))}
	}
	if _, ok := u.opts.Installers[m.Target]; !ok {
		return m, clockErr, &proto.VerifyError{Check: proto.CheckTarget, Err: fmt.Errorf("%w %q: this device installs %s", ErrNoUpdater, m.Target, u.targets())}
	}
	if !slices.Contains(m.Hardware, u.opts.Hardware) {
		this := fmt.Sprintf("this device is hardware %q", u.opts.Hardware)
		if u.opts.Hardware == "" {
			this = "this device has no hardware revision configured"
		}
		return m, clockErr, &proto.VerifyError{Check: proto.CheckHardware, Err: fmt.Errorf("%s, the release is for %s", this, strings.Join(m.Hardware, ", "))}
	}
	if len(m.Arch) > 0 && !slices.Contains(m.Arch, u.opts.Arch) {
		return m, clockErr, &proto.VerifyError{Check: proto.CheckHardware, Err: fmt.Errorf("this device is %s, the release is for %s", u.opts.Arch, strings.Join(m.Arch, ", "))}
	}
	if m.Size > u.opts.MaxArtifactSize || m.ArtifactSize() > u.opts.MaxArtifactSize {
		return m, clockErr, &proto.VerifyError{Check: proto.CheckSize, Err: fmt.Errorf("artifact of %d bytes, more than %d", max(m.Size, m.ArtifactSize()), u.opts.MaxArtifactSize)}
	}
	return m, clockErr, nil
}

// dropRevokedLocked ends a job that has not started installing, and the
// waiting offer, when a newer key list no longer accepts the key that
// signed them (it was revoked, or left out): what a leaked key offered
// must not stay pending once its revocation arrives.
func (u *Updater) dropRevokedLocked(kl proto.KeyList) {
	signedBy := func(manifest []byte) error {
		// Time is not the question here: the list's own check of the
		// signing key is (with a date far back, no expiry applies).
		_, err := proto.OpenManifest(manifest, kl, time.Unix(0, 0))
		if c := proto.CheckOf(err); c == proto.CheckRevoked || c == proto.CheckKey || c == proto.CheckSignature {
			return err
		}
		return nil
	}
	if j := u.st.Job; j != nil && (j.Phase == phaseDownload || j.Phase == phaseVerified) {
		if err := signedBy(j.Manifest); err != nil {
			u.log.Warn("pending release dropped: the new key list refuses its signer", "version", j.m.Version, "err", err)
			u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckOf(err)), err.Error() })
			u.st.Job = nil
			_ = os.Remove(u.stagedPath(j.m))
		}
	}
	if w := u.waiting; w != nil {
		if err := signedBy(w.j.Manifest); err != nil {
			u.report(w.j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckOf(err)), err.Error() })
			u.waiting = nil
		}
	}
}

// targets lists the targets this device has installers for.
func (u *Updater) targets() string {
	var ts []string
	for t := range u.opts.Installers {
		ts = append(ts, t)
	}
	slices.Sort(ts)
	return strings.Join(ts, ", ")
}

// Confirm records the control plane's acknowledgement of a trial.
func (u *Updater) Confirm(counter uint64) {
	u.mu.Lock()
	u.confirmed[counter] = true
	u.mu.Unlock()
	u.poke()
}

// Cancel abandons a job that has not started installing, and an offer
// that waits for a device condition.
func (u *Updater) Cancel() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if w := u.waiting; w != nil {
		u.report(w.j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = "cancelled by the control plane" })
		u.waiting = nil
	}
	if j := u.st.Job; j != nil && (j.Phase == phaseDownload || j.Phase == phaseVerified) {
		u.report(j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = "cancelled by the control plane" })
		u.st.Job = nil
		_ = u.saveLocked()
	}
}

func (u *Updater) poke() {
	select {
	case u.wake <- struct{}{}:
	default:
	}
}

// resolve makes the offer's URL absolute against the control plane's.
func (u *Updater) resolve(raw string) (string, error) {
	ref, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	if ref.IsAbs() {
		return raw, nil
	}
	base, err := url.Parse(strings.TrimRight(u.opts.BaseURL, "/") + "/")
	if err != nil {
		return "", err
	}
	return base.ResolveReference(ref).String(), nil
}

var _ = os.Remove

// state is how a job's phase is reported.
func (j *job) state() proto.UpdateState {
	switch j.Phase {
	case phaseDownload:
		return proto.UpdateDownloading
	case phaseVerified:
		if j.Deferred != "" {
			return proto.UpdateDeferred
		}
		return proto.UpdateVerified
	case phaseInstall:
		return proto.UpdateInstalling
	case phaseTrial:
		return proto.UpdateTrial
	}
	return proto.UpdateRolledBack
}

// recheck verifies a staged job again, just before it is installed: the
// manifest against the held key list and trusted time, and the staged
// file's digest.
func (u *Updater) recheck(j *job) error {
	u.mu.Lock()
	now, err := u.trustedNow()
	held := u.st.KeyList
	u.mu.Unlock()
	if err != nil {
		return err
	}
	kl, err := proto.OpenKeyList(held, u.opts.Roots)
	if err != nil {
		return err
	}
	if err := kl.Check(nil, now); err != nil {
		return err
	}
	if _, err := proto.OpenManifest(j.Manifest, kl, now); err != nil {
		return err
	}
	if err := fileHasDigest(OSFS{}, u.stagedPath(j.m), j.m.SHA256); err != nil {
		os.Remove(u.stagedPath(j.m))
		return err
	}
	return nil
}
