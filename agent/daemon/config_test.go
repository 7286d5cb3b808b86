package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "agent.conf")
	os.WriteFile(file, []byte(`# drone 42
server = https://file.example
device-id = from-file
sample-interval = 5s
label = base=zurich
label = hw=rev-b
`), 0o644)
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("hge_secret\n"), 0o600)
	env := map[string]string{"HANGAR_AGENT_DEVICE_ID": "from-env", "HANGAR_AGENT_BATCH_SIZE": "7"}
	c, err := ParseConfig([]string{"--config", file, "--batch-size", "3", "--enroll-token-file", tokenFile},
		func(k string) string { return env[k] }, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	if c.Server != "https://file.example" || c.DeviceID != "from-env" || c.BatchSize != 3 || c.SampleInterval != 5*time.Second {
		t.Fatalf("config %+v", c)
	}
	if c.Labels["base"] != "zurich" || c.Labels["hw"] != "rev-b" || c.EnrollToken != "hge_secret" {
		t.Fatalf("labels %v token %q", c.Labels, c.EnrollToken)
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.conf")
	os.WriteFile(bad, []byte("colour = blue\n"), 0o644)
	noeq := filepath.Join(dir, "noeq.conf")
	os.WriteFile(noeq, []byte("server\n"), 0o644)
	none := func(string) string { return "" }
	for _, args := range [][]string{
		{"--config", bad}, {"--config", noeq}, {"--config", filepath.Join(dir, "missing")},
		{"--label", "a b=c"}, {"--batch-size", "many"}, {"stray"}, {"--enroll-token-file", filepath.Join(dir, "missing")},
	} {
		if _, err := ParseConfig(args, none, os.Stderr); err == nil {
			t.Errorf("ParseConfig(%q) accepted", args)
		}
	}
}

func TestSanitizeID(t *testing.T) {
	for in, want := range map[string]string{"drone 7": "drone-7", ".local": "local", "a/b": "a-b", strings.Repeat("x", 70): strings.Repeat("x", 64)} {
		if got := sanitizeID(in); got != want {
			t.Errorf("sanitizeID(%q) = %q, want %q", in, got, want)
		}
	}
}
