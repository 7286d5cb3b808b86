// Package guard is hangar's trial guard: a tiny launcher, outside every
// agent release, that decides whether a new build of the agent ever ran
// its trial, and restores the previous build when it did not.
//
// The unit starts the agent through it:
//
//	hangar-guard /usr/local/bin/hangar-agent --config /etc/hangar/agent.conf
//
// Without a live trial record beside the agent's binary the guard simply
// executes the agent in its place (same process, nothing left running).
// After a swap, the agent that installed the new build has written the
// record (see Record); the guard then runs the new build as its child,
// counts its starts and its run time in the record, durably, and restarts
// it when it dies. When it has died MaxStarts times, or has run for the
// record's Budget without committing, the guard puts the previous build
// back (DoRestore) and executes it; the previous build reads the guard's
// verdict from the record and reports the rollback.
//
// The guard links only the standard library and safefs, and is versioned
// on its own (Version): agent releases never replace it.
package guard

// Version is the guard's own version, reported by the agent as the
// payload "hangar-guard". It changes rarely; a change to the record's
// format (RecordFormat) is a new version that agent releases say they need.
const Version = "1"

// Environment the guard gives the agent.
const (
	// EnvGuard is the guard's executable: an agent in restart mode exec
	// restarts through it, so that the new build starts under its watch.
	EnvGuard = "HANGAR_GUARD"
	// EnvVersion is the guard's Version.
	EnvVersion = "HANGAR_GUARD_VERSION"
	// EnvNotify is set, to a file descriptor number, only in a new build
	// that the guard runs as its child during a trial. The build writes a
	// line ("trial") on it once its own trial code runs, and exits (status
	// 75) rather than exec when it must restart.
	EnvNotify = "HANGAR_GUARD_FD"
)

// ExitRestart is the status with which an agent asks to be started again
// (the agent's update.ExitRestart).
const ExitRestart = 75
