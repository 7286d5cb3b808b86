package daemon

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// FuzzConfigFile: any config file is read without a panic, and what the
// agent accepts from it is a configuration ParseConfig can check.
func FuzzConfigFile(f *testing.F) {
	f.Add("server = https://h\n# comment\ndevice-id = d1\nlabel = a=b\nlabel = c=d\n")
	f.Add("--heartbeat=\"5s\"\n\n")
	f.Add("bogus\n")
	f.Add("hook = fc=/bin/true\nunknown = 1\n")
	f.Fuzz(func(t *testing.T, content string) {
		path := filepath.Join(t.TempDir(), "agent.conf")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := readConfigFile(path); err != nil {
			return
		}
		_, _ = ParseConfig([]string{"--config", path}, func(string) string { return "" }, io.Discard)
	})
}
