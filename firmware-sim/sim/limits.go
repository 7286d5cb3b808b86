package sim

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// What a simulated fleet costs the process in file descriptors. Measured
// by counting /proc/PID/fd of hangar-sim (Go 1.26, Linux) against `hangar
// serve` once the fleet was online:
//
//   - `hangar-sim --devices N`, N = 1 and 100: 16 and 610 descriptors with
//     the on-disk outbox, 110 with --memory-outbox, the same with
//     --mqtt-client paho and lite (one socket either way); 2,011 for 2,000
//     drones with --memory-outbox. Per drone: the MQTT socket, and with the
//     on-disk outbox its directory, the segment being written in each lane
//     (events, telemetry) and the two state slots. Enrollment and the idle
//     HTTP connections are pooled (the shared transport keeps two idle per
//     host): no more sockets than drones plus one or two.
//   - `hangar-sim run` at 300 drones, peaks sampled every 200 ms:
//     good-release 2,044 (124 downloads in flight: a socket and a .part
//     file each), power-cuts 1,989, link-loss-and-power-cuts (through the
//     runner's link proxies) 4,270: 1,531 sockets (three per proxied
//     connection) and 1,021 pipes (io.Copy between two TCP connections
//     splices through a pipe pair), so a proxied connection costs four
//     more. The child control plane peaked at 448 and 531: one per drone,
//     one per download, about 25 of its own.
//   - At the edge of what CheckLimits lets through under a limit of
//     20,000: 3,200 drones with the on-disk outbox held 19,211, all
//     online, and came back from a 40 s broker outage without an error.
//
// Above the sum (with the margins below) the process fails with "too many
// open files": accept, open and dial each need a descriptor.
const (
	// FilesPerDroneDiskOutbox: the MQTT socket and five outbox files. A
	// lane draining a backlog of several segments opens one more, the
	// oldest, while it sends it (FilesHeadroomPerDrones covers those).
	FilesPerDroneDiskOutbox = 6
	// FilesPerDroneMemoryOutbox: the MQTT socket.
	FilesPerDroneMemoryOutbox = 1
	// FilesPerDownload: a download in flight holds its HTTP connection and
	// the .part file it writes.
	FilesPerDownload = 2
	// FilesPerProxiedConn: a connection through the scenario runner's link
	// proxies adds, in this process, the proxy's accepted and upstream
	// sockets and the pipe pair of the splice between them.
	FilesPerProxiedConn = 4
	// FilesProcess is a margin for the process itself: standard streams,
	// the poller, cgroup files, the log, listeners, operator requests and
	// pipes to the child control plane (16 to 25 measured).
	FilesProcess = 64
	// FilesControlPlane is the same for the child `hangar serve`
	// (database, WAL, listeners; 18 to 25 measured), which also holds one
	// descriptor per connected drone and per download.
	FilesControlPlane = 64
	// FilesHeadroomPerDrones: one descriptor more per this many drones,
	// for what comes and goes (state files being replaced, outbox segments
	// read while a backlog drains, enrollment connections): at most 19 for
	// 300 drones measured.
	FilesHeadroomPerDrones = 20
	// idleHTTPPerLink is how many idle HTTP connections the drones sharing
	// one HTTP transport keep (net/http's default per host).
	idleHTTPPerLink = 2
)

// Limits are the operating system's limits on this process. A zero field
// is unknown and not checked.
type Limits struct {
	// FilesSoft and FilesHard are RLIMIT_NOFILE: the soft limit is what
	// the process may open; it can raise it up to the hard limit without
	// privileges. Go raises the soft limit to the hard one less one at
	// startup (syscall's init); child processes inherit it.
	FilesSoft, FilesHard uint64
	// Ports is the number of ephemeral ports: how many connections one
	// source address can have open to one destination address and port
	// (net.ipv4.ip_local_port_range, less ip_local_reserved_ports).
	Ports int
	// PortRange is that range as the kernel shows it, for messages.
	PortRange string
}

// Load is a fleet about to be started in this process.
type Load struct {
	Devices      int
	MemoryOutbox bool
	// SourceAddrs is how many local addresses the drones connect from
	// (FleetOptions.SourceAddrs; 0: the system's choice).
	SourceAddrs int
	// Downloads is how many drones may download an update at once (0:
	// updates are not configured). A rollout bounds it with its
	// --max-in-flight.
	Downloads int
	// Proxied: the drones reach the control plane through the scenario
	// runner's link proxies, which connect to it from one address whatever
	// SourceAddrs says.
	Proxied bool
	// ControlPlane: the scenario runner starts the control plane as a child
	// process, which inherits the descriptor limit.
	ControlPlane bool
	// Scenario words the fixes for `hangar-sim run` (the scenario's
	// fleet.memory_outbox, --devices) instead of the plain fleet's flags
	// (--memory-outbox, --prefix).
	Scenario bool
}

// Need is what a Load takes.
type Need struct {
	Files             uint64 // descriptors in this process
	ControlPlaneFiles uint64 // descriptors in the child control plane (0: none)
	// DronePorts is the most connections the drones open from one source
	// address: to one destination without SourceAddrs, to all of them
	// with (a dial from a given address binds it first, so its port is
	// taken for every destination).
	DronePorts int
	// ProxyPorts is the most connections the link proxies open to one
	// destination of the control plane, from one address (0: no proxies).
	ProxyPorts int
}

// Need computes what l takes.
func (l Load) Need() Need {
	n, d := l.Devices, min(l.Downloads, l.Devices)
	perDrone, perDownload := FilesPerDroneMemoryOutbox, FilesPerDownload
	if !l.MemoryOutbox {
		perDrone = FilesPerDroneDiskOutbox
	}
	if l.Proxied {
		perDrone += FilesPerProxiedConn
		perDownload += FilesPerProxiedConn
	}
	links := max(l.SourceAddrs, 1)
	headroom := ceilDiv(n, FilesHeadroomPerDrones)
	var need Need
	need.Files = uint64(FilesProcess + idleHTTPPerLink*links + n*perDrone + d*perDownload + headroom)
	if l.ControlPlane {
		need.ControlPlaneFiles = uint64(FilesControlPlane + n + d + headroom)
	}
	if l.SourceAddrs > 0 {
		need.DronePorts = ceilDiv(n, l.SourceAddrs) + ceilDiv(d, l.SourceAddrs) + idleHTTPPerLink
	} else {
		need.DronePorts = max(n, d+idleHTTPPerLink)
	}
	if l.Proxied {
		need.ProxyPorts = max(n, d)
	}
	return need
}

// fitsFiles reports whether need fits a descriptor limit.
func (n Need) fitsFiles(limit uint64) bool {
	return n.Files <= limit && n.ControlPlaneFiles <= limit
}

func (n Need) fitsPorts(ports int) bool {
	return n.DronePorts <= ports && n.ProxyPorts <= ports
}

// CheckLimits decides whether load fits lim. raise, when not 0, is the
// soft descriptor limit the process must set first (the hard limit: the
// soft one is too low, the hard one enough). Otherwise the error says what
// does not fit, by how much, and what to do about it.
func CheckLimits(lim Limits, load Load) (raise uint64, err error) {
	if load.Devices <= 0 {
		return 0, nil
	}
	need := load.Need()
	filesOK := lim.FilesHard == 0 || need.fitsFiles(lim.FilesHard)
	portsOK := lim.Ports == 0 || need.fitsPorts(lim.Ports)
	if filesOK && portsOK {
		if lim.FilesHard != 0 && !need.fitsFiles(lim.FilesSoft) {
			raise = lim.FilesHard
		}
		return raise, nil
	}

	var b strings.Builder
	fmt.Fprintf(&b, "%s drones do not fit in one hangar-sim process.", num(load.Devices))
	fixes := func(fs ...string) {
		b.WriteString(" Any one of:")
		for _, f := range fs {
			if f != "" {
				b.WriteString("\n    ")
				b.WriteString(f)
			}
		}
	}
	// The largest fleet with these options that fits (descriptors up to
	// the hard limit, ports).
	most := maxDevices(load, func(n Need) bool {
		return (lim.FilesHard == 0 || n.fitsFiles(lim.FilesHard)) && (lim.Ports == 0 || n.fitsPorts(lim.Ports))
	})
	fewer := ""
	if load.Scenario && most > 0 {
		fewer = fmt.Sprintf("a smaller fleet: --devices %d is the most that fits", most)
	}

	if !filesOK {
		per, kind := FilesPerDroneDiskOutbox, "with the on-disk outbox"
		if load.MemoryOutbox {
			per, kind = FilesPerDroneMemoryOutbox, "with the outbox in memory"
		}
		fmt.Fprintf(&b, "\n  File descriptors: this process needs about %s (%d per drone %s", num(need.Files), per, kind)
		perDownload := FilesPerDownload
		if load.Proxied {
			fmt.Fprintf(&b, ", %d more through the link proxies that link_loss and slow_link need", FilesPerProxiedConn)
			perDownload += FilesPerProxiedConn
		}
		if d := min(load.Downloads, load.Devices); d > 0 {
			fmt.Fprintf(&b, "; up to %s downloads at once, %d each", num(d), perDownload)
		}
		b.WriteString("; plus a margin)")
		if need.ControlPlaneFiles > 0 {
			fmt.Fprintf(&b, " and the control plane (a child process, same limit) about %s", num(need.ControlPlaneFiles))
		}
		fmt.Fprintf(&b, "; the limit (RLIMIT_NOFILE) is %s.", num(lim.FilesHard))
		var memory, split string
		if !load.MemoryOutbox {
			m := load
			m.MemoryOutbox = true
			mn := m.Need()
			verdict := "not enough alone"
			if mn.fitsFiles(lim.FilesHard) {
				verdict = "fits"
			}
			flag := "--memory-outbox"
			if load.Scenario {
				flag = "memory_outbox: true under fleet: in the scenario"
			}
			memory = fmt.Sprintf("%s: %d descriptor per drone instead of %d, about %s in all (%s)",
				flag, FilesPerDroneMemoryOutbox, FilesPerDroneDiskOutbox, num(max(mn.Files, mn.ControlPlaneFiles)), verdict)
		}
		n := roundUp(max(need.Files, need.ControlPlaneFiles), 100)
		ulimit := fmt.Sprintf("ulimit -n %d in the shell that starts hangar-sim (above the hard limit, %s, only as root: nofile in /etc/security/limits.conf, LimitNOFILE=%d under systemd, docker run --ulimit nofile=%d)",
			n, num(lim.FilesHard), n, n)
		if !load.Scenario && most > 0 {
			k := ceilDiv(load.Devices, most)
			split = fmt.Sprintf("%d processes of --devices %d, each with its own --prefix (--prefix sim-a-, --prefix sim-b-, ...)", k, ceilDiv(load.Devices, k))
		}
		fixes(memory, ulimit, split, fewer)
	}
	if !portsOK {
		var more string
		if need.DronePorts > lim.Ports {
			from := "one source address to one destination"
			switch {
			case load.SourceAddrs == 1:
				from = "its source address (a dial from a given address takes its port for every destination)"
			case load.SourceAddrs > 1:
				from = fmt.Sprintf("each of their %d source addresses (a dial from a given address takes its port for every destination)", load.SourceAddrs)
			}
			fmt.Fprintf(&b, "\n  Ephemeral ports: the drones open up to %s connections from %s", num(need.DronePorts), from)
			if s := sourceAddrsFor(load, lim.Ports); s > 0 {
				more = fmt.Sprintf("--source-addrs with %d local addresses, e.g. %s (all of 127.0.0.0/8 is local on Linux; towards another machine, addresses of this one)", s, loopbackList(s))
			}
		} else {
			b.WriteString("\n  Ephemeral ports:")
		}
		if need.ProxyPorts > lim.Ports {
			if need.DronePorts > lim.Ports {
				b.WriteString(", and")
			}
			fmt.Fprintf(&b, " the link proxies that link_loss and slow_link need open %s connections to the control plane from one address, whatever --source-addrs says", num(need.ProxyPorts))
		}
		fmt.Fprintf(&b, "; there are %s ports (net.ipv4.ip_local_port_range %s).", num(lim.Ports), lim.PortRange)
		split := ""
		if !load.Scenario && most > 0 {
			split = "several processes with their own --prefix on several machines"
		}
		fixes(more, `a wider port range (as root): sysctl -w net.ipv4.ip_local_port_range="1024 65535"`, split, fewer)
	}
	return 0, errors.New(b.String())
}

// maxDevices is the largest fleet like l (at most l.Devices) for which
// fits holds.
func maxDevices(l Load, fits func(Need) bool) int {
	lo, hi := 0, l.Devices // fits at lo (an empty fleet), not at hi
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		m := l
		m.Devices = mid
		if fits(m.Need()) {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo
}

// sourceAddrsFor is how many source addresses the drones need for their
// connections to fit in ports each (0: none are enough).
func sourceAddrsFor(l Load, ports int) int {
	for s := max(l.SourceAddrs+1, 2); s <= 254; s++ {
		m := l
		m.SourceAddrs = s
		if m.Need().DronePorts <= ports {
			return s
		}
	}
	return 0
}

func loopbackList(n int) string {
	if n <= 4 {
		addrs := make([]string, n)
		for i := range addrs {
			addrs[i] = fmt.Sprintf("127.0.0.%d", i+2)
		}
		return strings.Join(addrs, ",")
	}
	return fmt.Sprintf("127.0.0.2,127.0.0.3,...,127.0.0.%d", n+1)
}

// ReadPortRange reads the ephemeral port range of Linux; elsewhere it
// returns 0 (unknown: not checked).
func ReadPortRange() (ports int, text string, err error) {
	if runtime.GOOS != "linux" {
		return 0, "", nil
	}
	r, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, "", err
	}
	reserved, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_reserved_ports")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, "", err
	}
	return ParsePortRange(string(r), string(reserved))
}

// ParsePortRange counts the ports of net.ipv4.ip_local_port_range ("32768
// 60999") that net.ipv4.ip_local_reserved_ports ("8080,9000-9100", may be
// empty) does not take away.
func ParsePortRange(rangeText, reservedText string) (ports int, text string, err error) {
	f := strings.Fields(rangeText)
	if len(f) != 2 {
		return 0, "", fmt.Errorf("ip_local_port_range %q: want two numbers", strings.TrimSpace(rangeText))
	}
	lo, err1 := strconv.Atoi(f[0])
	hi, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || lo < 1 || hi > 65535 || lo > hi {
		return 0, "", fmt.Errorf("ip_local_port_range %q: not a port range", strings.TrimSpace(rangeText))
	}
	ports = hi - lo + 1
	for _, part := range strings.Split(strings.TrimSpace(reservedText), ",") {
		if part = strings.TrimSpace(part); part == "" {
			continue
		}
		a, b, isRange := strings.Cut(part, "-")
		rlo, err1 := strconv.Atoi(a)
		rhi, err2 := rlo, error(nil)
		if isRange {
			rhi, err2 = strconv.Atoi(b)
		}
		if err1 != nil || err2 != nil || rlo > rhi {
			return 0, "", fmt.Errorf("ip_local_reserved_ports %q: not a port list", strings.TrimSpace(reservedText))
		}
		if overlap := min(rhi, hi) - max(rlo, lo) + 1; overlap > 0 {
			ports -= overlap
		}
	}
	return ports, fmt.Sprintf("%d-%d", lo, hi), nil
}

func ceilDiv(a, b int) int {
	if a <= 0 {
		return 0
	}
	return (a + b - 1) / b
}

func roundUp(n uint64, to uint64) uint64 { return (n + to - 1) / to * to }

// num writes n with thousands separators: 60,564.
func num[T int | uint64](n T) string {
	s := strconv.FormatUint(uint64(n), 10)
	var b strings.Builder
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
