package scenario

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every shipped scenario parses and validates.
func TestShippedScenariosParse(t *testing.T) {
	files, _ := filepath.Glob("../scenarios/*.yaml")
	if len(files) < 6 {
		t.Fatalf("%d scenarios shipped, want at least 6", len(files))
	}
	for _, f := range files {
		if _, err := Load(f); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// A scenario with a mistake is refused with an error that says where.
func TestParseRefusesMistakes(t *testing.T) {
	base := `name: x
fleet: {devices: 10}
builds: [{version: 1.1.0, behaviour: good}]
timeline:
  - {at: 0s, push: 1.1.0}
  - {at: 1s, rollout: {name: r, release: 1.1.0}}
expect:
  - rollout_status: {rollout: r, status: completed}
`
	if _, err := Parse([]byte(base)); err != nil {
		t.Fatalf("valid scenario refused: %v", err)
	}
	for _, c := range []struct{ name, edit, old, want string }{
		{"typo in a field", "rollout_statuss", "rollout_status", "rollout_statuss"},
		{"unknown behaviour", "behaviour: goood", "behaviour: good", "unknown behaviour"},
		{"push of an unknown build", "push: 9.9.9", "push: 1.1.0", "unknown build"},
		{"expectation on an unknown rollout", "{rollout: q, status", "{rollout: r, status", `no rollout "q"`},
		{"bad status", "status: finished", "status: completed", `status "finished"`},
		{"bad duration", "at: 1 second", "at: 1s", "line"},
		{"no devices", "devices: 0", "devices: 10", "fleet.devices"},
		{"two actions in a step", "{at: 0s, push: 1.1.0, pause: r}", "{at: 0s, push: 1.1.0}", "2 actions"},
		{"steps out of order", "at: 5s, push", "at: 0s, push", "time order"},
	} {
		src := strings.Replace(base, c.old, c.edit, 1)
		if src == base {
			t.Fatalf("%s: edit did not apply", c.name)
		}
		_, err := Parse([]byte(src))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one mentioning %q", c.name, err, c.want)
		}
	}
}

func TestReportWrites(t *testing.T) {
	rep := &Report{Scenario: Scenario{Name: "t"}, Devices: 2, Passed: false,
		Results:  []Result{{Expectation: "x", OK: false, Detail: "<b>"}},
		Samples:  []Sample{{At: 0, Versions: map[string]int{"1.0.0": 2}}, {At: 1, Versions: map[string]int{"1.0.0": 1, "1.1.0": 1}}},
		Rollouts: map[string]RolloutReport{"r": {Events: []RolloutEvent{{At: 0.5, Action: "rollout.transition", To: "stage 2"}}}}}
	dir := t.TempDir()
	if err := rep.Write(dir); err != nil {
		t.Fatal(err)
	}
	html, _ := os.ReadFile(filepath.Join(dir, "report.html"))
	for _, want := range []string{"FAILED", "<polyline", "1.1.0", "stage 2", "&lt;b&gt;"} {
		if !strings.Contains(string(html), want) {
			t.Errorf("report.html lacks %q", want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "report.json")); err != nil {
		t.Error(err)
	}
}

func TestSumMetric(t *testing.T) {
	text := `# HELP hangar_mqtt_accept_rate_peak Most connections.
# TYPE hangar_mqtt_accept_rate_peak gauge
hangar_mqtt_accept_rate_peak 397
hangar_mqtt_accepted_total 10898
hangar_mqtt_auth_failures_total{reason="bad password"} 2
hangar_mqtt_auth_failures_total{reason="unknown device"} 3 1700000000000
hangar_mqtt_auth_failures_totally 100
`
	for _, tc := range []struct {
		name  string
		want  float64
		found bool
	}{
		{"hangar_mqtt_accept_rate_peak", 397, true},  // unlabelled
		{"hangar_mqtt_auth_failures_total", 5, true}, // labelled, with a timestamp; not the longer name
		{"hangar_mqtt_acl_denials_total", 0, false},
	} {
		got, found, err := sumMetric(text, tc.name)
		if err != nil || got != tc.want || found != tc.found {
			t.Errorf("%s: %v %v %v, want %v %v", tc.name, got, found, err, tc.want, tc.found)
		}
	}
	if _, _, err := sumMetric("hangar_x NaNa\n", "hangar_x"); err == nil {
		t.Error("an unparsable value gave no error")
	}
}
