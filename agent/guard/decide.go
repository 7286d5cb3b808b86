package guard

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/hangarfleet/hangar/agent/safefs"
)

// Action is what the guard does at a start.
type Action int

const (
	// Exec runs the agent binary as it is, in place of the guard: there is
	// no trial to watch (no record, the swap has not happened, the trial
	// ended, or the previous build is back).
	Exec Action = iota
	// Start runs the new build as the guard's child, and watches it.
	Start
	// Restore puts the previous build back.
	Restore
)

func (a Action) String() string { return [...]string{"exec", "start", "restore"}[a] }

// Decide is the guard's decision at a start, from the trial record (nil:
// none), the digest of the binary in place and whether the previous build
// is still kept beside it. It reads no clock: the trial's time is the run
// time the guard measured, so a wall clock that jumps (no RTC, NTP
// catching up) never restores a build, nor keeps one.
func Decide(r *Record, sum []byte, prevKept bool) (Action, string) {
	switch {
	case !r.Live(sum):
		return Exec, ""
	case r.GaveUp:
		return Exec, ""
	case r.Verdict != "":
		return Restore, r.Verdict
	case !prevKept:
		// Every build drops the previous one when it commits, also a
		// build from before the guard that leaves the record alone.
		return Exec, ""
	case r.Starts >= r.MaxStarts:
		return Restore, r.failed(fmt.Sprintf("started %d times without committing", r.Starts))
	case r.Used >= r.Budget:
		return Restore, r.failed(fmt.Sprintf("did not commit within %v of run time", r.Budget))
	}
	return Start, ""
}

// failed is the verdict on a new build: what happened, whether it ever ran
// its own trial code, and how its latest start ended.
func (r *Record) failed(what string) string {
	v := "trial guard: the new build " + r.Version + " " + what
	if !r.Reached {
		v += "; it never reached its trial (the new build's own code did not run)"
	}
	if r.Last != "" {
		v += "; last start: " + r.Last
	}
	return v
}

// ErrCannotRestore: the previous build is missing or not the one the
// record names; the guard lets the new build run rather than leave the
// device without an agent.
var ErrCannotRestore = errors.New("cannot restore the previous build")

// DoRestore puts the previous build back in place of the new one, power-
// safely, for the reason given:
//
//  1. the verdict goes into the record, durably (a cut from here on comes
//     back to the restore at the next start);
//  2. the kept previous build is checked against the record's digest;
//  3. it is renamed over the agent's path (atomic) and the directory is
//     fsynced.
//
// At every instant the agent's path holds a complete binary, old or new.
func DoRestore(fsys safefs.FS, agent string, r *Record, reason string) error {
	if r.Verdict == "" {
		r.Verdict = reason
		if err := Save(fsys, agent, r); err != nil {
			return fmt.Errorf("restore: record the verdict: %w", err)
		}
	}
	prev := PrevPath(agent)
	sum, err := safefs.Digest(fsys, prev)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		err = fmt.Errorf("%w: %s is gone", ErrCannotRestore, prev)
	case err != nil:
		return fmt.Errorf("restore: read %s: %w", prev, err)
	case len(r.PrevSHA256) == 0:
		err = fmt.Errorf("%w: the record names no previous build", ErrCannotRestore)
	case !bytes.Equal(sum, r.PrevSHA256):
		err = fmt.Errorf("%w: %s has sha256 %x, the record says %x", ErrCannotRestore, prev, sum, r.PrevSHA256)
	}
	if err != nil {
		r.GaveUp = true
		r.Verdict += "; " + err.Error()
		if serr := Save(fsys, agent, r); serr != nil {
			return fmt.Errorf("restore: %w", serr)
		}
		return err
	}
	if err := fsys.Rename(prev, agent); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	if err := fsys.SyncDir(safefs.Dir(agent)); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	return nil
}

// roundRun formats a run time for messages.
func roundRun(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Millisecond)
}
