package cli_test

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/cli"
)

// Every verb the commands table (and so the completion) lists is one the
// command takes: "VERB -h" prints its usage, not "unknown".
func TestCompletionVerbsExist(t *testing.T) {
	var out bytes.Buffer
	env := cli.Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }}
	if err := cli.Run(context.Background(), []string{"completion", "bash"}, env); err != nil {
		t.Fatal(err)
	}
	script := out.String()
	n := 0
	for _, line := range strings.Split(script, "\n") {
		l := strings.TrimSpace(line)
		cmd, rest, ok := strings.Cut(l, `) words="`)
		if !ok || strings.HasPrefix(cmd, "if") {
			continue
		}
		for _, verb := range strings.Fields(strings.TrimSuffix(rest, `" ;;`)) {
			if cmd == "completion" {
				continue
			}
			var o bytes.Buffer
			err := cli.Run(context.Background(), []string{cmd, verb, "-h"}, cli.Env{Stdout: &o, Stderr: &o, Getenv: func(string) string { return "" }})
			if err != nil && !strings.Contains(err.Error(), "flag: help requested") || strings.Contains(o.String(), "unknown") {
				t.Errorf("hangar %s %s -h: %v\n%s", cmd, verb, err, o.String())
			}
			n++
		}
	}
	if n < 30 {
		t.Errorf("only %d verbs in the completion", n)
	}
	if bash, err := exec.LookPath("bash"); err == nil {
		c := exec.Command(bash, "-c", `eval "$SCRIPT"; COMP_WORDS=(hangar rollout pa); COMP_CWORD=2; _hangar; echo "${COMPREPLY[@]}"`)
		c.Env = append(c.Environ(), "SCRIPT="+script)
		got, err := c.Output()
		if err != nil || strings.TrimSpace(string(got)) != "pause" {
			t.Errorf("completing 'hangar rollout pa': %q %v", got, err)
		}
	}
}
