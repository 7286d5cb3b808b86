package sim

import (
	"strings"
	"testing"
)

// This machine's limits when the figures were measured: 20,000
// descriptors (Go raised the soft limit to the hard one less one), the
// default port range.
var measured = Limits{FilesSoft: 19999, FilesHard: 20000, Ports: 28232, PortRange: "32768-60999"}

func TestCheckLimits(t *testing.T) {
	big := Limits{FilesSoft: 1 << 20, FilesHard: 1 << 20, Ports: 28232, PortRange: "32768-60999"}
	for _, c := range []struct {
		name  string
		lim   Limits
		load  Load
		raise uint64
		want  []string // in the error, in this order; nil: no error
		not   []string // not in the error
	}{
		{
			name: "the reported failure: 10,000 drones with the on-disk outbox",
			lim:  measured, load: Load{Devices: 10000},
			want: []string{"10,000 drones do not fit", "needs about 60,566 (6 per drone with the on-disk outbox", "the limit (RLIMIT_NOFILE) is 20,000",
				"--memory-outbox: 1 descriptor per drone instead of 6, about 10,566 in all (fits)",
				"ulimit -n 60600", "4 processes of --devices 2500, each with its own --prefix"},
			not: []string{"Ephemeral ports", "memory_outbox: true", "--devices 3"},
		},
		{name: "10,000 in memory fit", lim: measured, load: Load{Devices: 10000, MemoryOutbox: true}},
		{name: "3,000 on disk fit", lim: measured, load: Load{Devices: 3000}},
		{
			name: "soft limit too low, hard enough: raise", lim: Limits{FilesSoft: 1024, FilesHard: 20000},
			load: Load{Devices: 2000, MemoryOutbox: true}, raise: 20000,
		},
		{name: "soft limit enough: no raise", lim: Limits{FilesSoft: 4096, FilesHard: 20000}, load: Load{Devices: 2000, MemoryOutbox: true}},
		{
			name: "the memory outbox alone is not enough", lim: measured, load: Load{Devices: 40000},
			want: []string{"needs about 242,066", "about 42,066 in all (not enough alone)", "ulimit -n 242100", "13 processes of --devices 3077",
				"Ephemeral ports: the drones open up to 40,000 connections", "--source-addrs with 2 local addresses"},
		},
		{
			name: "ports: one source address", lim: big, load: Load{Devices: 30000, MemoryOutbox: true},
			want: []string{"Ephemeral ports: the drones open up to 30,000 connections from one source address to one destination; there are 28,232 ports (net.ipv4.ip_local_port_range 32768-60999)",
				"--source-addrs with 2 local addresses, e.g. 127.0.0.2,127.0.0.3", "ip_local_port_range=\"1024 65535\"", "on several machines"},
			not: []string{"File descriptors"},
		},
		{name: "ports: two source addresses", lim: big, load: Load{Devices: 30000, MemoryOutbox: true, SourceAddrs: 2}},
		{
			name: "ports: one address given, more needed", lim: big, load: Load{Devices: 100000, MemoryOutbox: true, SourceAddrs: 1},
			want: []string{"up to 100,002 connections from its source address", "--source-addrs with 4 local addresses, e.g. 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"},
		},
		{
			name: "ports: many addresses", lim: big, load: Load{Devices: 200000, MemoryOutbox: true},
			want: []string{"--source-addrs with 8 local addresses, e.g. 127.0.0.2,127.0.0.3,...,127.0.0.9"},
		},
		{
			name: "scenario through the link proxies, with a control plane and downloads", lim: measured,
			load: Load{Devices: 10000, Proxied: true, ControlPlane: true, Downloads: 300, Scenario: true},
			want: []string{"needs about 102,366 (6 per drone with the on-disk outbox, 4 more through the link proxies", "300 downloads at once, 6 each",
				"control plane (a child process, same limit) about 10,864",
				"memory_outbox: true under fleet: in the scenario: 1 descriptor per drone instead of 6, about 52,366 in all (not enough alone)",
				"ulimit -n 102400", "a smaller fleet: --devices 1804 is the most that fits"},
			not: []string{"--prefix", "--memory-outbox"},
		},
		{
			name: "scenario: the proxies' ports, whatever the source addresses", lim: big,
			load: Load{Devices: 30000, MemoryOutbox: true, Proxied: true, ControlPlane: true, SourceAddrs: 4, Scenario: true},
			want: []string{"Ephemeral ports: the link proxies that link_loss and slow_link need open 30,000 connections to the control plane from one address",
				"ip_local_port_range", "--devices 28232 is the most that fits"},
			not: []string{"--source-addrs with"},
		},
		{
			name: "scenario: the control plane child fits too", lim: measured,
			load: Load{Devices: 10000, MemoryOutbox: true, ControlPlane: true, Scenario: true},
		},
		{name: "limits unknown (not Linux, not unix)", lim: Limits{}, load: Load{Devices: 1000000}},
		{name: "no drones", lim: Limits{FilesSoft: 10, FilesHard: 10, Ports: 10}, load: Load{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			raise, err := CheckLimits(c.lim, c.load)
			if raise != c.raise {
				t.Errorf("raise = %d, want %d", raise, c.raise)
			}
			if c.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("not refused")
			}
			msg := err.Error()
			t.Log(msg)
			rest := msg
			for _, w := range c.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("error lacks %q (in order):\n%s", w, msg)
				}
				rest = rest[i+len(w):]
			}
			for _, w := range c.not {
				if strings.Contains(msg, w) {
					t.Errorf("error has %q:\n%s", w, msg)
				}
			}
		})
	}
}

// The fleet the errors call the largest that fits does, and one more
// drone does not; so do the splits and source addresses they suggest.
func TestCheckLimitsSuggestionsFit(t *testing.T) {
	for _, l := range []Load{
		{Devices: 10000}, {Devices: 40000, MemoryOutbox: true}, {Devices: 7777, Proxied: true, ControlPlane: true, Downloads: 300, Scenario: true},
		{Devices: 90000, MemoryOutbox: true, SourceAddrs: 1},
	} {
		lim := measured
		fits := func(n Need) bool { return n.fitsFiles(lim.FilesHard) && n.fitsPorts(lim.Ports) }
		most := maxDevices(l, fits)
		m := l
		m.Devices = most
		if _, err := CheckLimits(lim, m); err != nil {
			t.Errorf("%+v: %d drones, the most that fit, refused: %v", l, most, err)
		}
		m.Devices++
		if _, err := CheckLimits(lim, m); err == nil {
			t.Errorf("%+v: %d drones, one more than the most that fit, accepted", l, m.Devices)
		}
		if s := sourceAddrsFor(l, lim.Ports); s > 0 {
			m := l
			m.SourceAddrs = s
			if m.Need().DronePorts > lim.Ports {
				t.Errorf("%+v: %d source addresses suggested, not enough", l, s)
			}
		}
	}
}

// docs/benchmarks.md quotes these.
func TestMostPerProcess(t *testing.T) {
	fits := func(n Need) bool { return n.fitsFiles(measured.FilesHard) && n.fitsPorts(measured.Ports) }
	for _, c := range []struct {
		load Load
		want int
	}{
		{Load{Devices: 1 << 20}, 3294},
		{Load{Devices: 1 << 20, MemoryOutbox: true}, 18984},
		{Load{Devices: 1 << 20, MemoryOutbox: true, SourceAddrs: 4}, 18979},
		{Load{Devices: 1 << 20, MemoryOutbox: true, Proxied: true, ControlPlane: true, Scenario: true}, 3947},
	} {
		if got := maxDevices(c.load, fits); got != c.want {
			t.Errorf("%+v: at most %d drones, want %d", c.load, got, c.want)
		}
	}
}

// The figures cover what was measured (see the constants), without
// asking for much more than it.
func TestNeedCoversMeasurements(t *testing.T) {
	for _, c := range []struct {
		name         string
		load         Load
		sim, control uint64 // descriptors counted in /proc/PID/fd
	}{
		{"hangar-sim --devices 100", Load{Devices: 100}, 610, 0},
		{"hangar-sim --devices 100 --memory-outbox", Load{Devices: 100, MemoryOutbox: true}, 110, 0},
		{"hangar-sim --devices 2000 --memory-outbox --mqtt-client lite", Load{Devices: 2000, MemoryOutbox: true}, 2011, 0},
		{"good-release --devices 300 (124 downloads at the peak)", Load{Devices: 300, ControlPlane: true, Downloads: 124}, 2044, 448},
		{"power-cuts --devices 300 (125 downloads)", Load{Devices: 300, ControlPlane: true, Downloads: 125}, 1989, 0},
		{"link-loss-and-power-cuts --devices 300 (209 downloads)", Load{Devices: 300, ControlPlane: true, Downloads: 209, Proxied: true}, 4270, 531},
	} {
		n := c.load.Need()
		if n.Files < c.sim || n.Files > c.sim*5/4+FilesProcess {
			t.Errorf("%s: need %d descriptors, measured %d", c.name, n.Files, c.sim)
		}
		if c.control > 0 && (n.ControlPlaneFiles < c.control || n.ControlPlaneFiles > c.control*5/4+FilesControlPlane) {
			t.Errorf("%s: control plane needs %d descriptors, measured %d", c.name, n.ControlPlaneFiles, c.control)
		}
	}
}

func TestParsePortRange(t *testing.T) {
	for _, c := range []struct {
		rng, reserved string
		ports         int
		text          string
		bad           bool
	}{
		{"32768\t60999\n", "\n", 28232, "32768-60999", false},
		{"32768 60999", "", 28232, "32768-60999", false},
		{"1024 65535", "8080,40000-40009,1-2000", 64512 - 10 - 1 - 977, "1024-65535", false},
		{"32768 60999", "61000-62000", 28232, "32768-60999", false},
		{"60999 32768", "", 0, "", true},
		{"32768", "", 0, "", true},
		{"32768 60999", "x", 0, "", true},
		{"32768 60999", "50-40", 0, "", true},
	} {
		ports, text, err := ParsePortRange(c.rng, c.reserved)
		if (err != nil) != c.bad || ports != c.ports || text != c.text {
			t.Errorf("ParsePortRange(%q, %q) = %d, %q, %v; want %d, %q, error %v", c.rng, c.reserved, ports, text, err, c.ports, c.text, c.bad)
		}
	}
}

func TestNum(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 60566: "60,566", 1234567: "1,234,567"} {
		if got := num(n); got != want {
			t.Errorf("num(%d) = %q, want %q", n, got, want)
		}
	}
}
