//go:build hangar_patchtest

package main

import "log/slog"

// Linked only by the end-to-end test of delta updates: a small code change
// between two builds of the agent, as a patch release makes.
func init() {
	slog.Debug("built with the patch test change", "pid", patchTestPID())
}

func patchTestPID() int { return len("hangar") * 7 }
