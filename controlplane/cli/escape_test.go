package cli_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/cli"
)

// What a device supplies cannot drive the operator's terminal: clear
// screen, window title, cursor moves and C1 controls come out as escapes,
// newlines and tabs of the output itself stay.
func TestEscaperNeutralisesTerminalControls(t *testing.T) {
	var out bytes.Buffer
	w := &cli.Escaper{W: &out}
	in := "ok\tcol\n\x1b[2J\x1b]0;pwned\x07 v1.2\rX \u009b31m \x7f é\n"
	n, err := w.Write([]byte(in))
	if err != nil || n != len(in) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	got := out.String()
	for _, bad := range []string{"\x1b", "\x07", "\r", "\u009b", "\x7f"} {
		if strings.Contains(got, bad) {
			t.Errorf("output still holds %q: %q", bad, got)
		}
	}
	for _, keep := range []string{"ok\tcol\n", `\u001b[2J`, `\u001b]0;pwned\u0007`, "é\n"} {
		if !strings.Contains(got, keep) {
			t.Errorf("output lacks %q: %q", keep, got)
		}
	}
}

// --help never prints the token from the environment.
func TestHelpHidesToken(t *testing.T) {
	var out, errb bytes.Buffer
	secret := "hga_supersecret"
	_ = cli.Run(t.Context(), []string{"device", "ls", "--help"}, cli.Env{Stdout: &out, Stderr: &errb,
		Getenv: func(k string) string {
			if k == "HANGAR_TOKEN" {
				return secret
			}
			return ""
		}})
	if strings.Contains(out.String()+errb.String(), secret) {
		t.Fatalf("--help printed the token:\n%s%s", out.String(), errb.String())
	}
	if !strings.Contains(errb.String()+out.String(), "from HANGAR_TOKEN") {
		t.Errorf("--help does not say where the token comes from:\n%s%s", out.String(), errb.String())
	}
}

// The hangar binary calls Run with no writers: they default to the
// process's, escaped.
func TestRunDefaultWriters(t *testing.T) {
	if err := cli.Run(t.Context(), []string{"--version"}, cli.Env{}); err != nil {
		t.Fatal(err)
	}
	if err := cli.Run(t.Context(), []string{"device", "ls", "--no-such-flag"}, cli.Env{}); err == nil {
		t.Fatal("a bad flag passed")
	}
}
