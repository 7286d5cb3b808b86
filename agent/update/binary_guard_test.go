package update

import (
	"errors"
	"io"
	"slices"
	"testing"

	"github.com/hangarfleet/hangar/agent/guard"
)

// Under the trial guard, the agent starts a new build through it: by exec
// of the guard (restart mode exec), or by exiting for the guard that runs
// it as a child on trial to start the next one.
func TestBinaryActivateThroughGuard(t *testing.T) {
	m := crashManifest()
	var got []string
	var gotEnv []string
	b := &Binary{
		Path: crashTarget, Mode: RestartExec, Guard: Guard{Path: "/usr/local/libexec/hangar-guard", Version: guard.Version},
		Args: []string{"hangar-agent", "--config", "/etc/hangar/agent.conf"},
		Env:  []string{"A=1", guard.EnvNotify + "=3", guard.EnvGuard + "=/usr/local/libexec/hangar-guard"},
		exec: func(argv0 string, argv, env []string) error {
			got, gotEnv = append([]string{argv0}, argv...), env
			return nil
		},
	}
	if err := b.Activate(t.Context(), m); err != nil {
		t.Fatal(err)
	}
	want := []string{"/usr/local/libexec/hangar-guard", "/usr/local/libexec/hangar-guard", crashTarget, "--config", "/etc/hangar/agent.conf"}
	if !slices.Equal(got, want) {
		t.Errorf("exec %q, want %q", got, want)
	}
	if slices.Contains(gotEnv, guard.EnvNotify+"=3") || !slices.Contains(gotEnv, "A=1") {
		t.Errorf("exec env %q: the guard's pipe must not be passed on, the rest must", gotEnv)
	}

	b.Guard.Notify = io.Discard
	got = nil
	if err := b.Activate(t.Context(), m); !errors.Is(err, ErrRestart) || got != nil {
		t.Errorf("on trial under the guard: Activate %v, exec %q; want ErrRestart and no exec", err, got)
	}

	b.Guard = Guard{}
	if err := b.Activate(t.Context(), m); err != nil || got[0] != crashTarget {
		t.Errorf("without a guard: exec %q (%v), want the binary itself", got, err)
	}
}
