package update

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/proto"
)

func (u *Updater) job() *job {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.st.Job
}

func (u *Updater) hasWaiting() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.waiting != nil
}

// retryWaiting offers again the release that waited for a device
// condition (a trustworthy clock, the end of another update), once it
// cleared; it reports whether it did. An offer may replace a job that has
// not started installing, so it is retried then too.
func (u *Updater) retryWaiting() bool {
	u.mu.Lock()
	w := u.waiting
	if w == nil {
		u.mu.Unlock()
		return false
	}
	if j := u.st.Job; j != nil && j.Phase != phaseDownload && j.Phase != phaseVerified {
		u.mu.Unlock()
		return false
	}
	if _, err := u.trustedNow(); err != nil {
		u.mu.Unlock()
		return false
	}
	u.waiting = nil
	u.mu.Unlock()
	u.log.Info("verifying the release that waited", "cmd", w.cmd.ID, "version", w.j.m.Version)
	u.Offer(w.cmd)
	return true
}

// set changes the job under the lock (Offer reads it from the command
// goroutine) and persists it before anything acts on the change.
func (u *Updater) set(j *job, change func(*job)) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.st.Job != j {
		return errors.New("job superseded")
	}
	change(j)
	return u.saveLocked()
}

// view returns a copy of the job's mutable fields, read under the lock.
func (u *Updater) view(j *job) job {
	u.mu.Lock()
	defer u.mu.Unlock()
	return *j
}

// finish ends the current job, recording an installed build.
func (u *Updater) finish(j *job, done *installed) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.st.Job == j {
		u.st.Job = nil
	}
	if done != nil {
		u.st.Installed[j.m.Target] = *done
	}
	return u.saveLocked()
}

// Boot settles, at agent start and before anything else runs, an update
// that a crash, a power cut or a restart interrupted. It may not return:
// when the build that must run is not the running one, it starts it.
func (u *Updater) Boot(ctx context.Context) error {
	j := u.job()
	if j == nil {
		// No job: a guard's record left over for another build goes. One
		// that still watches the build in place stays (this build cannot
		// account for its trial: the guard decides).
		for t, inst := range u.opts.Installers {
			if g, ok := inst.(guarded); ok {
				if err := g.Settle(); err != nil {
					u.log.Warn("stale trial record not removed", "target", t, "err", err)
				}
			}
		}
		return nil
	}
	inst := u.opts.Installers[j.m.Target]
	if inst == nil {
		u.log.Error("interrupted update of a target without installer, dropped", "target", j.m.Target)
		return u.finish(j, nil)
	}
	switch j.Phase {
	case phaseInstall:
		switch {
		case inst.Running(j.m):
			// The new build is up: the swap happened before the cut.
			os.Remove(u.stagedPath(j.m))
			if err := u.set(j, func(j *job) {
				j.Phase = phaseTrial
				if j.TrialStarted == 0 {
					j.TrialStarted = u.opts.Clock.Now().Unix()
				}
			}); err != nil {
				return err
			}
		case inst.Installed(j.m):
			// Swapped, but the old build still runs: start the new one.
			if err := u.set(j, func(j *job) { j.Phase, j.TrialStarted, j.TrialBoots = phaseTrial, u.opts.Clock.Now().Unix(), 0 }); err != nil {
				return err
			}
			return inst.Activate(ctx, j.m)
		case verdictOf(inst, j.m) != "":
			// Swapped, then the new build died before its own code ran,
			// and the guard put the previous build back.
			return u.restoredByGuard(j, inst)
		default:
			// The swap never happened: install again when allowed.
			if err := u.set(j, func(j *job) { j.Phase = phaseVerified }); err != nil {
				return err
			}
		}
	case phaseRollback:
		// Rollback again even when the previous build is back: it makes
		// the restore durable (a rename not yet synced is lost at a power
		// cut) before the job is forgotten.
		if err := u.rollback(ctx, j, j.Reason); err != nil {
			return err
		}
		u.log.Info("rollback complete", "target", j.m.Target, "from", j.m.Version, "reason", j.Reason)
		return nil
	}
	if j.Phase != phaseTrial {
		return nil
	}
	if !inst.Running(j.m) {
		if inst.Installed(j.m) {
			return inst.Activate(ctx, j.m)
		}
		// The previous build is back in place without our rollback: the
		// trial guard restored it (the new build kept dying), or an
		// operator did. The trial failed.
		return u.restoredByGuard(j, inst)
	}
	if err := u.set(j, func(j *job) { j.TrialBoots++ }); err != nil {
		return err
	}
	if boots := u.view(j).TrialBoots; boots > u.opts.MaxTrialBoots {
		return u.rollback(ctx, j, fmt.Sprintf("crash loop: started %d times without passing the trial", boots))
	}
	if g, ok := inst.(guarded); ok {
		g.TrialRunning(j.m)
	}
	return nil
}

// guarded is an installer whose trials something outside the new build
// watches too: the agent's Binary under the trial guard, which restores
// the previous build when the new one keeps dying, even before its own
// code runs.
type guarded interface {
	// TrialRunning says that the new build's own trial code runs.
	TrialRunning(m proto.Manifest)
	// Verdict is the guard's reason for restoring the previous build
	// instead of m ("" when it did not).
	Verdict(m proto.Manifest) string
	// EndWatch tells the guard that the trial passed (at commit).
	EndWatch() error
	// Settle forgets the record of a trial that is over, with no job to
	// account for it; a record still watching the build in place stays.
	Settle() error
}

func verdictOf(inst Installer, m proto.Manifest) string {
	if g, ok := inst.(guarded); ok {
		return g.Verdict(m)
	}
	return ""
}

// restoredByGuard ends a job whose previous build came back without the
// agent's rollback, and reports why.
func (u *Updater) restoredByGuard(j *job, inst Installer) error {
	reason := verdictOf(inst, j.m)
	if reason == "" {
		reason = "the previous build was restored outside the agent"
	}
	u.log.Warn("the new build was rolled back by the trial guard", "target", j.m.Target, "version", j.m.Version, "reason", reason)
	u.report(j, proto.UpdateRolledBack, func(r *proto.UpdateReport) { r.Reason = reason })
	if err := u.finish(j, nil); err != nil {
		return err
	}
	if g, ok := inst.(guarded); ok {
		if err := g.Settle(); err != nil {
			u.log.Warn("trial record not removed", "err", err)
		}
	}
	return nil
}

// Run drives the current job until ctx ends. It returns ErrRestart when
// the agent must exit for its supervisor to start another build.
func (u *Updater) Run(ctx context.Context) error {
	tick := u.opts.Clock.NewTicker(time.Second)
	defer tick.Stop()
	retry := u.opts.RetryMin
	stalled := 0
	tidied, first := (*job)(nil), true
	for ctx.Err() == nil {
		if u.retryWaiting() {
			continue
		}
		j := u.job()
		if j != tidied || first {
			// Another job (or none): what the previous one staged goes.
			u.tidy()
			tidied, first = j, false
		}
		if j == nil {
			var clockCheck <-chan time.Time
			if u.hasWaiting() {
				clockCheck = tick.C()
			}
			select {
			case <-ctx.Done():
			case <-u.wake:
			case <-clockCheck:
			}
			continue
		}
		var err error
		cur := u.view(j)
		switch cur.Phase {
		case phaseDownload:
			var progressed bool
			progressed, err = u.runDownload(ctx, j)
			if err == nil {
				retry, stalled = u.opts.RetryMin, 0
				continue
			}
			if errors.Is(err, errTransient) {
				if progressed {
					stalled = 0
				} else if stalled++; stalled >= 20 {
					if cur := u.view(j); cur.patching() {
						// A patch that will not come: the full artifact may.
						stalled = 0
						fetched := u.furthest[string(cur.m.Delta.PatchSHA256)] > 0
						if ferr := u.fallback(j, "the patch download makes no progress: "+err.Error(), fetched); errors.Is(ferr, errFellBack) {
							continue
						}
						break
					}
					u.report(j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = "download makes no progress: " + err.Error() })
					err = u.finish(j, nil)
					break
				}
				u.log.Info("download interrupted, will resume", "err", err, "retry_in", retry)
				if !clock.Sleep(u.opts.Clock, retry, ctx.Done()) {
					return nil
				}
				retry = min(2*retry, u.opts.RetryMax)
				continue
			}
		case phaseVerified:
			if reason := u.blocked(); reason != "" {
				if reason != cur.Deferred {
					_ = u.set(j, func(j *job) { j.Deferred = reason })
					u.report(j, proto.UpdateDeferred, func(r *proto.UpdateReport) { r.Reason = reason })
					u.log.Info("install deferred", "version", j.m.Version, "reason", reason)
				}
				select {
				case <-ctx.Done():
				case <-u.wake:
				case <-tick.C():
				}
				continue
			}
			err = u.install(ctx, j)
		case phaseInstall:
			err = u.install(ctx, j)
		case phaseTrial:
			err = u.trial(ctx, j, tick)
		case phaseRollback:
			err = u.rollback(ctx, j, cur.Reason)
		default:
			err = u.finish(j, nil)
		}
		if errors.Is(err, ErrRestart) {
			return err
		}
		if err != nil && ctx.Err() == nil {
			u.log.Error("update step failed", "phase", cur.Phase, "err", err)
			if !clock.Sleep(u.opts.Clock, retry, ctx.Done()) {
				return nil
			}
		}
	}
	return nil
}

// blocked says why an install may not start now ("" when it may).
func (u *Updater) blocked() string {
	p := u.opts.Policy
	if p.LockFile != "" {
		if _, err := os.Stat(p.LockFile); err == nil {
			return "maintenance lock " + p.LockFile
		}
	}
	c := u.opts.Conditions()
	say := func(state string) string {
		if c.Why == "" || c.Why == state {
			return state
		}
		return state + ": " + c.Why
	}
	switch c.Flight {
	case proto.FlightFlying:
		return say("flying")
	case proto.FlightArmed:
		return say("armed")
	case proto.FlightUnknown:
		if !p.AllowUnknownFlight {
			return say("flight state unknown")
		}
	}
	if c.Battery != nil && *c.Battery < p.MinBattery {
		return fmt.Sprintf("battery at %d%%, below %d%%", *c.Battery, p.MinBattery)
	}
	// The install re-checks expiry against trusted time: a clock that went
	// wrong since the offer (set back, reset to 1970) defers the install
	// rather than failing the release.
	u.mu.Lock()
	_, err := u.trustedNow()
	u.mu.Unlock()
	if err != nil {
		return "clock not trusted: " + err.Error()
	}
	return ""
}

// runDownload fetches and checks the artifact; it reports whether it got
// any byte further.
func (u *Updater) runDownload(ctx context.Context, j *job) (bool, error) {
	src, err := u.resolve(j.URL)
	if err != nil {
		u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckFormat), err.Error() })
		return false, u.finish(j, nil)
	}
	cur := u.view(j)
	size := j.m.Size
	if cur.patching() {
		size = j.m.Delta.PatchSize
	}
	step := max(size/4, 1)
	var last, high uint64
	first := true
	progress := func(n uint64) {
		high = max(high, n)
		if first {
			last, first = n, false
			u.report(j, proto.UpdateDownloading, func(r *proto.UpdateReport) { r.Progress = n })
		}
		if n-last >= step {
			last = n
			u.report(j, proto.UpdateDownloading, func(r *proto.UpdateReport) { r.Progress = n })
		}
	}
	key := string(j.m.SHA256) // progress is per file fetched: the patch, or the build
	if cur.patching() {
		key = string(j.m.Delta.PatchSHA256)
		err = u.runDelta(ctx, j, src, progress, func() bool { return high > 0 || u.furthest[key] > 0 })
		if errors.Is(err, errFellBack) {
			return true, nil // the next attempt fetches the full artifact
		}
		if proto.CheckOf(err) == proto.CheckDelta {
			return true, nil // refused, reported and ended by fallback
		}
	} else {
		_, err = u.download(ctx, u.artifact(j.m), src, progress)
	}
	// Progress is a byte beyond the furthest any attempt reached: a server
	// that cuts every response at the same point makes none.
	progressed := high > u.furthest[key]
	if progressed {
		u.furthest[key] = high
	}
	if err != nil {
		if errors.Is(err, errTransient) || ctx.Err() != nil {
			return progressed, err
		}
		check := proto.CheckOf(err)
		if check == "" {
			u.report(j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = err.Error() })
		} else {
			u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(check), err.Error() })
		}
		u.log.Warn("download refused", "version", j.m.Version, "check", check, "err", err)
		return progressed, u.finish(j, nil)
	}
	if err := u.set(j, func(j *job) { j.Phase = phaseVerified }); err != nil {
		return true, err
	}
	u.report(j, proto.UpdateVerified, func(r *proto.UpdateReport) { r.Progress = j.m.Size })
	return true, nil
}

// install re-checks the staged artifact, swaps it in and starts it.
func (u *Updater) install(ctx context.Context, j *job) error {
	if reason := u.blocked(); reason != "" {
		return u.set(j, func(j *job) { j.Phase = phaseVerified })
	}
	inst := u.opts.Installers[j.m.Target]
	staged := u.stagedPath(j.m)
	// Check again just before the install: the metadata may have expired
	// (or its key been revoked) while the install waited, and the staged
	// file may have changed since it was verified (a swap on disk, a
	// failing flash).
	if err := u.recheck(j); err != nil {
		check := proto.CheckOf(err)
		if check == "" {
			check = proto.CheckHash
		}
		u.log.Warn("release refused at install", "check", check, "err", err)
		u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(check), err.Error() })
		return u.finish(j, nil)
	}
	// From here the release's counter is spent: if it fails its trial it
	// is never installed again.
	if err := u.set(j, func(j *job) {
		j.Phase = phaseInstall
		c := u.st.target(j.m.Target)
		c.Spent = max(c.Spent, j.m.Counter)
		u.st.setTarget(j.m.Target, c)
	}); err != nil {
		return err
	}
	u.report(j, proto.UpdateInstalling, nil)
	if err := inst.Install(ctx, j.m, staged); err != nil && !inst.Installed(j.m) {
		check := proto.CheckOf(err)
		u.log.Error("install failed, previous build kept", "version", j.m.Version, "err", err)
		if check != "" {
			u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(check), err.Error() })
		} else {
			u.report(j, proto.UpdateFailed, func(r *proto.UpdateReport) { r.Reason = err.Error() })
		}
		return u.finish(j, nil)
	}
	if err := u.set(j, func(j *job) { j.Phase, j.TrialStarted, j.TrialBoots = phaseTrial, u.opts.Clock.Now().Unix(), 0 }); err != nil {
		return err
	}
	os.Remove(staged)
	u.log.Info("installed, starting the new build", "target", j.m.Target, "version", j.m.Version)
	if err := inst.Activate(ctx, j.m); err != nil {
		if errors.Is(err, ErrRestart) {
			return err
		}
		return u.rollback(ctx, j, "could not start the new build: "+err.Error())
	}
	return nil
}

// trial waits for the new build to prove healthy: the control plane
// confirmed hearing from it, the agent's self-test and the build's own
// check pass. Then it commits; past the deadline it rolls back.
func (u *Updater) trial(ctx context.Context, j *job, tick clock.Ticker) error {
	inst := u.opts.Installers[j.m.Target]
	cur := u.view(j)
	u.report(j, proto.UpdateTrial, func(r *proto.UpdateReport) { r.Progress = uint64(cur.TrialBoots) })
	deadline := time.Unix(cur.TrialStarted, 0).Add(u.opts.TrialDeadline)
	var lastErr error
	for {
		u.mu.Lock()
		confirmed := u.confirmed[j.m.Counter]
		u.mu.Unlock()
		if confirmed {
			lastErr = nil
			if u.opts.SelfTest != nil {
				lastErr = u.opts.SelfTest(ctx)
			}
			if lastErr == nil {
				lastErr = inst.Check(ctx, j.m)
			}
			if lastErr == nil {
				if up := u.opts.Clock.Now().Sub(u.started); up >= u.opts.TrialSoak {
					return u.commit(ctx, j)
				} else {
					lastErr = fmt.Errorf("up for %v, soaking for %v", up.Round(time.Second), u.opts.TrialSoak)
				}
			}
		} else {
			lastErr = errors.New("no confirmation from the control plane")
		}
		if !u.opts.Clock.Now().Before(deadline) {
			return u.rollback(ctx, j, fmt.Sprintf("health check not passed within %v: %v", u.opts.TrialDeadline, lastErr))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-u.wake:
		case <-tick.C():
		}
	}
}

func (u *Updater) commit(ctx context.Context, j *job) error {
	inst := u.opts.Installers[j.m.Target]
	// End the guard's watch before the commit is recorded: a cut in
	// between leaves a trial that the agent goes on with (and commits
	// again), never a committed build that the guard would restore over.
	if g, ok := inst.(guarded); ok {
		if err := g.EndWatch(); err != nil {
			return fmt.Errorf("commit: %w", err)
		}
	}
	// Record the commit before dropping the previous build: a cut in
	// between leaves a harmless leftover, never a trial without a way back.
	if err := u.finish(j, &installed{Version: j.m.Version, Counter: j.m.Counter, SHA256: j.m.SHA256}); err != nil {
		return err
	}
	if err := inst.Commit(ctx, j.m); err != nil {
		u.log.Warn("previous build not removed after commit", "target", j.m.Target, "err", err)
	}
	u.log.Info("update committed", "target", j.m.Target, "version", j.m.Version)
	u.report(j, proto.UpdateCommitted, nil)
	return nil
}

// rollback restores the previous build. The report goes out first: for the
// agent, Rollback starts the previous binary and does not come back.
func (u *Updater) rollback(ctx context.Context, j *job, reason string) error {
	inst := u.opts.Installers[j.m.Target]
	if u.view(j).Phase != phaseRollback {
		if err := u.set(j, func(j *job) { j.Phase, j.Reason = phaseRollback, reason }); err != nil {
			return err
		}
		u.log.Warn("rolling back", "target", j.m.Target, "version", j.m.Version, "reason", reason)
		u.report(j, proto.UpdateRolledBack, func(r *proto.UpdateReport) { r.Reason = reason })
	}
	if err := inst.Rollback(ctx, j.m); err != nil {
		if errors.Is(err, ErrRestart) {
			return err
		}
		return fmt.Errorf("rollback: %w", err)
	}
	return u.finish(j, nil)
}
