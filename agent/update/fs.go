package update

import (
	"github.com/hangarfleet/hangar/agent/guard"
	"github.com/hangarfleet/hangar/agent/safefs"
)

// FS is the file system seam of the install sequence (see safefs): every
// write, fsync, link and rename of an install goes through it.
type FS = safefs.FS

// File is a file being written.
type File = safefs.File

// OSFS is the real file system.
type OSFS = safefs.OS

// siblings are the files an install keeps beside the agent's binary: the
// staged new build and the previous build the trial guard restores.
func siblings(path string) (dir, next, prev string) {
	return safefs.Dir(path), guard.NextPath(path), guard.PrevPath(path)
}
