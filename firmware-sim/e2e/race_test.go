//go:build race

package e2e

// raceEnabled: child processes are built with -race as well, which also
// reuses the packages this test binary was built from.
const raceEnabled = true
