package sensors

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Fixture contents, shaped like a Raspberry Pi 4 running a recent kernel.
const (
	fakeStat = "cpu  1000 0 1000 7000 1000 0 0 0 0 0\n" +
		"cpu0 250 0 250 1750 250 0 0 0 0 0\n" +
		"intr 12345 0 0\nctxt 999\n"
	fakeMeminfo = "MemTotal:        4000000 kB\n" +
		"MemFree:          500000 kB\n" +
		"MemAvailable:    3000000 kB\n" +
		"Buffers:          100000 kB\n" +
		"Cached:          1000000 kB\n" +
		"SwapCached:            0 kB\n"
	fakeUptime = "12345.67 40000.00\n"
)

// writeTree creates files under root from a map of slash paths to contents.
func writeTree(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for p, content := range files {
		full := filepath.Join(root, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// fakeSystem returns the files of a healthy system with one thermal zone and
// no battery.
func fakeSystem() map[string]string {
	return map[string]string{
		"proc/stat":                              fakeStat,
		"proc/meminfo":                           fakeMeminfo,
		"proc/uptime":                            fakeUptime,
		"sys/class/thermal/thermal_zone0/temp":   "45678\n",
		"sys/class/thermal/thermal_zone0/type":   "cpu-thermal\n",
		"sys/class/thermal/cooling_device0/type": "gpio-fan\n",
		"sys/class/power_supply/AC/type":         "Mains\n",
		"sys/class/power_supply/AC/online":       "1\n",
	}
}

func newFakeLinux(t *testing.T, files map[string]string) (*Linux, string) {
	t.Helper()
	root := t.TempDir()
	writeTree(t, root, files)
	return NewLinux(LinuxOptions{Root: root}), root
}

func u8(v uint8) *uint8 { return &v }

func TestLinuxNormal(t *testing.T) {
	l, _ := newFakeLinux(t, fakeSystem())
	var s proto.Sample
	l.Fill(&s)

	// Since boot: busy = 10000 - 7000 - 1000 of 10000.
	if s.CPU != 200 {
		t.Errorf("CPU = %d, want 200", s.CPU)
	}
	if s.Mem != 250 {
		t.Errorf("Mem = %d, want 250", s.Mem)
	}
	if s.Uptime != 12345 {
		t.Errorf("Uptime = %d, want 12345", s.Uptime)
	}
	if s.Temp == nil || *s.Temp != 456 {
		t.Errorf("Temp = %v, want 456", s.Temp)
	}
	if s.Battery != nil || s.Voltage != 0 {
		t.Errorf("battery = %v, %d mV without a battery", s.Battery, s.Voltage)
	}
	if errs := l.Errors(); len(errs) != 0 {
		t.Errorf("Errors() = %v", errs)
	}
}

func TestLinuxCPUDelta(t *testing.T) {
	l, root := newFakeLinux(t, fakeSystem())
	var s proto.Sample
	l.Fill(&s)

	// 1000 more ticks: 300 user, 100 system, 500 idle, 100 iowait; the guest
	// columns (already in user) must not count twice.
	writeTree(t, root, map[string]string{
		"proc/stat": "cpu  1300 0 1100 7500 1100 0 0 0 300 0\n",
	})
	s = proto.Sample{}
	l.Fill(&s)
	if s.CPU != 400 {
		t.Errorf("CPU = %d, want 400", s.CPU)
	}

	// No tick since the last call: the last value is repeated.
	s = proto.Sample{}
	l.Fill(&s)
	if s.CPU != 400 {
		t.Errorf("CPU with no ticks = %d, want 400", s.CPU)
	}

	// iowait going backwards (a known kernel quirk) must not wrap around.
	writeTree(t, root, map[string]string{
		"proc/stat": "cpu  1400 0 1100 7500 1000 0 0 0 0 0\n",
	})
	s = proto.Sample{}
	l.Fill(&s)
	if s.CPU > 1000 {
		t.Errorf("CPU = %d after iowait went backwards", s.CPU)
	}
}

func TestLinuxMemFallback(t *testing.T) {
	files := fakeSystem()
	files["proc/meminfo"] = "MemTotal:        4000000 kB\n" +
		"MemFree:          500000 kB\n" +
		"Buffers:          100000 kB\n" +
		"Cached:          1400000 kB\n"
	l, _ := newFakeLinux(t, files)
	var s proto.Sample
	l.Fill(&s)
	// (4000000 - 2000000) / 4000000
	if s.Mem != 500 {
		t.Errorf("Mem = %d, want 500", s.Mem)
	}
}

func TestLinuxThermal(t *testing.T) {
	tests := []struct {
		name  string
		zones map[string]string // zone name to temp contents
		want  *int16
	}{
		{"no zones", nil, nil},
		{"max of several", map[string]string{
			"thermal_zone0": "41000\n", "thermal_zone1": "52300\n", "thermal_zone2": "38000\n",
		}, i16(523)},
		{"absurd values ignored", map[string]string{
			"thermal_zone0": "-273150\n", "thermal_zone1": "255000\n", "thermal_zone2": "38000\n",
		}, i16(380)},
		{"garbage zone ignored", map[string]string{
			"thermal_zone0": "hot\n", "thermal_zone1": "", "thermal_zone2": "-5500\n",
		}, i16(-55)},
		{"none readable", map[string]string{"thermal_zone0": "n/a\n"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := fakeSystem()
			delete(files, "sys/class/thermal/thermal_zone0/temp")
			for zone, temp := range tt.zones {
				files["sys/class/thermal/"+zone+"/temp"] = temp
			}
			l, _ := newFakeLinux(t, files)
			var s proto.Sample
			l.Fill(&s)
			switch {
			case tt.want == nil && s.Temp != nil:
				t.Errorf("Temp = %d, want nil", *s.Temp)
			case tt.want != nil && (s.Temp == nil || *s.Temp != *tt.want):
				t.Errorf("Temp = %v, want %d", s.Temp, *tt.want)
			}
		})
	}
}

func i16(v int16) *int16 { return &v }

func TestLinuxBattery(t *testing.T) {
	ps := "sys/class/power_supply/"
	tests := []struct {
		name        string
		files       map[string]string
		wantBattery *uint8
		wantMV      uint16
	}{
		{"absent", nil, nil, 0},
		{"present", map[string]string{
			ps + "BAT0/type": "Battery\n", ps + "BAT0/capacity": "76\n", ps + "BAT0/voltage_now": "16420000\n",
		}, u8(76), 16420},
		{"capacity clamped high", map[string]string{
			ps + "BAT0/type": "Battery\n", ps + "BAT0/capacity": "104\n",
		}, u8(100), 0},
		{"capacity clamped low", map[string]string{
			ps + "BAT0/type": "Battery\n", ps + "BAT0/capacity": "-3\n",
		}, u8(0), 0},
		{"voltage only", map[string]string{
			ps + "ups/type": "Battery\n", ps + "ups/voltage_now": "5123999\n",
		}, nil, 5123},
		{"peripheral battery ignored", map[string]string{
			ps + "hid-mouse/type": "Battery\n", ps + "hid-mouse/scope": "Device\n", ps + "hid-mouse/capacity": "12\n",
		}, nil, 0},
		{"first battery wins", map[string]string{
			ps + "BAT0/type": "Battery\n", ps + "BAT0/capacity": "50\n",
			ps + "BAT1/type": "Battery\n", ps + "BAT1/capacity": "90\n",
		}, u8(50), 0},
		{"garbage", map[string]string{
			ps + "BAT0/type": "Battery\n", ps + "BAT0/capacity": "full\n", ps + "BAT0/voltage_now": "12V\n",
		}, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := fakeSystem()
			for p, c := range tt.files {
				files[p] = c
			}
			l, _ := newFakeLinux(t, files)
			var s proto.Sample
			l.Fill(&s)
			switch {
			case tt.wantBattery == nil && s.Battery != nil:
				t.Errorf("Battery = %d, want nil", *s.Battery)
			case tt.wantBattery != nil && (s.Battery == nil || *s.Battery != *tt.wantBattery):
				t.Errorf("Battery = %v, want %d", s.Battery, *tt.wantBattery)
			}
			if s.Voltage != tt.wantMV {
				t.Errorf("Voltage = %d mV, want %d", s.Voltage, tt.wantMV)
			}
		})
	}
}

func TestLinuxGarbage(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
	}{
		{"empty root", nil},
		{"empty files", map[string]string{"proc/stat": "", "proc/meminfo": "", "proc/uptime": ""}},
		{"text", map[string]string{
			"proc/stat":    "cpu  a b c d e\n",
			"proc/meminfo": "MemTotal: lots kB\nMemAvailable: some kB\n",
			"proc/uptime":  "forever\n",
		}},
		{"truncated", map[string]string{
			"proc/stat":    "cpu  1 2\n",
			"proc/meminfo": "MemTotal:\n",
			"proc/uptime":  "-5 0\n",
		}},
		{"zero total", map[string]string{
			"proc/stat":    "cpu  0 0 0 0 0 0 0 0\n",
			"proc/meminfo": "MemTotal: 0 kB\nMemAvailable: 0 kB\n",
			"proc/uptime":  "NaN 0\n",
		}},
		{"overflow", map[string]string{
			"proc/stat":    "cpu  18446744073709551615 18446744073709551615 0 0 0\n",
			"proc/meminfo": "MemTotal: 18446744073709551615 kB\nMemAvailable: 1 kB\n",
			"proc/uptime":  "1e300 0\n",
		}},
		{"binary", map[string]string{
			"proc/stat":    "\x00\xff\xfe",
			"proc/meminfo": strings.Repeat("\xff", 20000),
			"proc/uptime":  "\x00",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, _ := newFakeLinux(t, tt.files)
			var s proto.Sample
			l.Fill(&s)
			l.Fill(&s)
			if err := s.Validate(); err != nil {
				t.Errorf("sample from garbage is invalid: %v", err)
			}
			if s.CPU > 1000 || s.Mem > 1000 {
				t.Errorf("CPU %d, Mem %d out of range", s.CPU, s.Mem)
			}
			if len(l.Errors()) == 0 && tt.name != "overflow" {
				t.Error("no errors reported")
			}
			t.Logf("errors: %v", l.Errors())
		})
	}
}

// TestLinuxErrorsOncePerSource checks that a failing source is remembered by
// its first error only.
func TestLinuxErrorsOncePerSource(t *testing.T) {
	files := fakeSystem()
	delete(files, "proc/uptime")
	l, root := newFakeLinux(t, files)
	var s proto.Sample
	l.Fill(&s)
	writeTree(t, root, map[string]string{"proc/uptime": "garbage\n"})
	l.Fill(&s)
	errs := l.Errors()
	if len(errs) != 1 || !errors.Is(errs[0], fs.ErrNotExist) {
		t.Fatalf("Errors() = %v, want the first (missing file) error of uptime", errs)
	}
}

func TestLinuxRediscovery(t *testing.T) {
	l, root := newFakeLinux(t, fakeSystem())
	now := time.Unix(1_800_000_000, 0)
	l.now = func() time.Time { return now }
	var s proto.Sample
	l.Fill(&s)

	// A hotter zone appearing is not noticed until the next discovery.
	writeTree(t, root, map[string]string{
		"sys/class/thermal/thermal_zone1/temp":         "61000\n",
		"sys/class/power_supply/BAT0/type":             "Battery\n",
		"sys/class/power_supply/BAT0/capacity":         "80\n",
		"sys/class/power_supply/BAT0/voltage_now":      "4100000\n",
		"sys/class/power_supply/BAT0/some_other_value": "1\n",
	})
	now = now.Add(30 * time.Second)
	s = proto.Sample{}
	l.Fill(&s)
	if *s.Temp != 456 || s.Battery != nil {
		t.Errorf("Temp %d, battery %v: rediscovered too early", *s.Temp, s.Battery)
	}
	now = now.Add(rediscoverEvery)
	s = proto.Sample{}
	l.Fill(&s)
	if *s.Temp != 610 || s.Battery == nil || *s.Battery != 80 || s.Voltage != 4100 {
		t.Errorf("Temp %d, battery %v, %d mV after a minute, want 610, 80, 4100", *s.Temp, s.Battery, s.Voltage)
	}

	// A zone vanishing triggers discovery at the next call, without an error.
	if err := os.RemoveAll(filepath.Join(root, "sys/class/thermal/thermal_zone1")); err != nil {
		t.Fatal(err)
	}
	l.Fill(&s)
	if !l.stale {
		t.Error("vanished zone did not mark discovery stale")
	}
	s = proto.Sample{}
	l.Fill(&s)
	if l.stale || len(l.zones) != 1 || s.Temp == nil || *s.Temp != 456 {
		t.Errorf("after rediscovery: stale %v, zones %v, Temp %v", l.stale, l.zones, s.Temp)
	}
	if errs := l.Errors(); len(errs) != 0 {
		t.Errorf("Errors() = %v", errs)
	}
}

// TestLinuxReal reads this machine's /proc.
func TestLinuxReal(t *testing.T) {
	if _, err := os.Stat("/proc/stat"); err != nil {
		t.Skip("no /proc:", err)
	}
	l := NewLinux(LinuxOptions{})
	var s proto.Sample
	l.Fill(&s)
	l.Fill(&s)
	t.Logf("CPU %d‰, Mem %d‰, Uptime %ds, Temp %v, Battery %v, Voltage %d mV, errors %v",
		s.CPU, s.Mem, s.Uptime, s.Temp, s.Battery, s.Voltage, l.Errors())
	if s.Mem == 0 || s.Mem > 1000 {
		t.Errorf("Mem = %d", s.Mem)
	}
	if s.Uptime == 0 {
		t.Error("Uptime = 0")
	}
	if s.CPU > 1000 {
		t.Errorf("CPU = %d", s.CPU)
	}
	if err := s.Validate(); err != nil {
		t.Error(err)
	}
}

func BenchmarkLinuxFill(b *testing.B) {
	l := NewLinux(LinuxOptions{})
	var s proto.Sample
	for b.Loop() {
		l.Fill(&s)
	}
}
