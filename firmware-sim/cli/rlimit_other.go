//go:build !unix

package cli

// No RLIMIT_NOFILE here: the descriptor check is skipped.
func fileLimit() (soft, hard uint64, ok bool) { return 0, 0, false }

func raiseFileLimit() error { return nil }
