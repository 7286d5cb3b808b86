// Command hangar-guard is the trial guard: the systemd unit starts the
// agent through it, and it restores the previous build of the agent when a
// new one keeps dying before it commits (see package guard).
package main

import (
	"os"

	"github.com/hangarfleet/hangar/agent/guard"
)

func main() { os.Exit(guard.Run(os.Args[1:], guard.Options{})) }
