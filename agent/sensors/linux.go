package sensors

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// DefaultRoot is where Linux finds /proc and /sys.
const DefaultRoot = "/"

// rediscoverEvery bounds how long a hot-plugged thermal zone or battery goes
// unnoticed. Listing sysfs directories on every sample would cost more than
// reading the values.
const rediscoverEvery = time.Minute

// Temperatures outside this range (millidegrees Celsius) are ignored: drivers
// report sentinels such as -273150 or 255000 for sensors that are absent or
// not yet read.
const (
	minMilliC = -60_000
	maxMilliC = 200_000
)

// readBufSize holds the first line of /proc/stat and all of /proc/meminfo.
const readBufSize = 8 << 10

// Error sources, as reported by Linux.Errors.
const (
	srcStat    = "stat"
	srcMeminfo = "meminfo"
	srcUptime  = "uptime"
	srcThermal = "thermal"
	srcPower   = "power_supply"
)

// LinuxOptions configures NewLinux. The zero value reads the real system.
type LinuxOptions struct {
	// Root is prepended to /proc and /sys paths, so tests can use a fake
	// tree. Empty means DefaultRoot.
	Root string
	// Logger, if set, gets one Debug line for the first error of each source.
	Logger *slog.Logger
}

// Linux reads system sensors from /proc and /sys. It never fails: a sensor
// that cannot be read leaves its fields unset, and its first error is kept
// for Errors. It is safe for concurrent use, although the agent calls Fill
// from its single sampler goroutine.
type Linux struct {
	root   string
	logger *slog.Logger
	now    func() time.Time // for tests of rediscovery

	mu  sync.Mutex
	buf []byte

	// CPU counters of the previous call, in USER_HZ ticks.
	prevTotal, prevIdle uint64
	havePrev            bool
	cpu                 uint16 // last computed value, reused when no tick passed
	haveCPU             bool

	zones []string // paths of thermal_zone*/temp
	// Files of the battery power supply, "" when absent.
	capacity, voltage string
	discoveredAt      time.Time
	stale             bool // a discovered file vanished: discover again

	errs map[string]error
}

// NewLinux returns system sensors rooted at opts.Root.
func NewLinux(opts LinuxOptions) *Linux {
	root := opts.Root
	if root == "" {
		root = DefaultRoot
	}
	return &Linux{
		root:   root,
		logger: opts.Logger,
		now:    time.Now,
		buf:    make([]byte, readBufSize),
		errs:   make(map[string]error),
	}
}

// Fill sets CPU, Mem, Temp, Uptime, Battery and Voltage of s from what the
// system provides, and leaves the fields it cannot read as they are. CPU is
// the busy share since the previous call (since boot on the first call).
func (l *Linux) Fill(s *proto.Sample) {
	l.mu.Lock()
	defer l.mu.Unlock()

	if now := l.now(); l.stale || l.discoveredAt.IsZero() || now.Sub(l.discoveredAt) >= rediscoverEvery {
		l.discover()
		l.discoveredAt = now
		l.stale = false
	}
	l.fillCPU(s)
	l.fillMem(s)
	l.fillUptime(s)
	l.fillTemp(s)
	l.fillBattery(s)
}

// Errors returns the first error of each source that failed at least once,
// sorted by source. Missing thermal zones and batteries are not errors.
func (l *Linux) Errors() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	srcs := make([]string, 0, len(l.errs))
	for src := range l.errs {
		srcs = append(srcs, src)
	}
	slices.Sort(srcs)
	errs := make([]error, 0, len(srcs))
	for _, src := range srcs {
		errs = append(errs, l.errs[src])
	}
	return errs
}

func (l *Linux) fail(src string, err error) {
	if _, ok := l.errs[src]; ok {
		return
	}
	err = fmt.Errorf("%s: %w", src, err)
	l.errs[src] = err
	if l.logger != nil {
		l.logger.Debug("sensor unavailable", "source", src, "err", err)
	}
}

func (l *Linux) path(p string) string { return filepath.Join(l.root, p) }

// read returns the start of file p in l.buf, valid until the next read. When
// the file does not fit, the incomplete last line is dropped so that parsers
// never see a cut number.
func (l *Linux) read(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n, err := io.ReadFull(f, l.buf)
	switch {
	case err == nil: // buffer full
		if i := bytes.LastIndexByte(l.buf, '\n'); i >= 0 {
			n = i + 1
		}
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
	default:
		return nil, err
	}
	return l.buf[:n], nil
}

func (l *Linux) fillCPU(s *proto.Sample) {
	b, err := l.read(l.path("proc/stat"))
	if err != nil {
		l.fail(srcStat, err)
		return
	}
	total, idle, err := parseStat(b)
	if err != nil {
		l.fail(srcStat, err)
		return
	}
	dTotal, dIdle := total, idle
	if l.havePrev {
		dTotal, dIdle = total-l.prevTotal, idle-l.prevIdle
		if total < l.prevTotal {
			dTotal = 0 // counters reset: nothing to compare with
		}
		// iowait is known to go backwards on some kernels.
		if idle < l.prevIdle {
			dIdle = 0
		}
	}
	l.prevTotal, l.prevIdle, l.havePrev = total, idle, true
	if dTotal == 0 {
		// Called again within one tick: repeat the last value.
		if l.haveCPU {
			s.CPU = l.cpu
		}
		return
	}
	busy := uint64(0)
	if dIdle < dTotal {
		busy = dTotal - dIdle
	}
	l.cpu = perMille(busy, dTotal)
	l.haveCPU = true
	s.CPU = l.cpu
}

// parseStat returns the total and idle (idle + iowait) ticks of the aggregate
// "cpu" line of /proc/stat. guest and guest_nice are left out of the total
// because user and nice already include them.
func parseStat(b []byte) (total, idle uint64, err error) {
	line, _, _ := bytes.Cut(b, []byte{'\n'})
	f := strings.Fields(string(line))
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, errors.New("no aggregate cpu line")
	}
	f = f[1:]
	if len(f) > 8 {
		f = f[:8] // user nice system idle iowait irq softirq steal
	}
	for i, v := range f {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("cpu field %d: %w", i+1, err)
		}
		if total+n < total {
			return 0, 0, errors.New("cpu counters overflow")
		}
		total += n
		if i == 3 || i == 4 {
			idle += n
		}
	}
	return total, idle, nil
}

func (l *Linux) fillMem(s *proto.Sample) {
	b, err := l.read(l.path("proc/meminfo"))
	if err != nil {
		l.fail(srcMeminfo, err)
		return
	}
	m, err := parseMeminfo(b)
	if err != nil {
		l.fail(srcMeminfo, err)
		return
	}
	s.Mem = m
}

// parseMeminfo returns memory used in per mille. Kernels before 3.14 have no
// MemAvailable; free + buffers + cache is the usual estimate there.
func parseMeminfo(b []byte) (uint16, error) {
	var total, avail, free, buffers, cached uint64
	var haveTotal, haveAvail bool
	for line := range bytes.Lines(b) {
		key, rest, ok := bytes.Cut(line, []byte{':'})
		if !ok {
			continue
		}
		var dst *uint64
		switch string(key) {
		case "MemTotal":
			dst, haveTotal = &total, true
		case "MemAvailable":
			dst, haveAvail = &avail, true
		case "MemFree":
			dst = &free
		case "Buffers":
			dst = &buffers
		case "Cached":
			dst = &cached
		default:
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) == 0 {
			return 0, fmt.Errorf("%s: no value", key)
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", key, err)
		}
		*dst = n
	}
	if !haveTotal || total == 0 {
		return 0, errors.New("no MemTotal")
	}
	if !haveAvail {
		avail = free + buffers + cached
	}
	if avail >= total {
		return 0, nil
	}
	return perMille(total-avail, total), nil
}

// perMille returns part/whole in per mille; part <= whole, whole > 0. Floats
// because part*1000 can overflow with garbage input.
func perMille(part, whole uint64) uint16 {
	return uint16(float64(part) * 1000 / float64(whole))
}

func (l *Linux) fillUptime(s *proto.Sample) {
	b, err := l.read(l.path("proc/uptime"))
	if err != nil {
		l.fail(srcUptime, err)
		return
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		l.fail(srcUptime, errors.New("empty"))
		return
	}
	up, err := strconv.ParseFloat(f[0], 64)
	if err != nil || up < 0 || math.IsNaN(up) {
		l.fail(srcUptime, fmt.Errorf("bad value %q", f[0]))
		return
	}
	s.Uptime = uint32(min(up, math.MaxUint32))
}

func (l *Linux) fillTemp(s *proto.Sample) {
	best, found := int64(0), false
	for _, p := range l.zones {
		v, err := l.readInt(p)
		if err != nil {
			l.sysfsFail(srcThermal, err)
			continue
		}
		if v < minMilliC || v > maxMilliC {
			continue
		}
		if !found || v > best {
			best, found = v, true
		}
	}
	if found {
		t := int16(best / 100)
		s.Temp = &t
	}
}

func (l *Linux) fillBattery(s *proto.Sample) {
	if l.capacity != "" {
		if v, err := l.readInt(l.capacity); err != nil {
			l.sysfsFail(srcPower, err)
		} else {
			c := uint8(min(max(v, 0), 100))
			s.Battery = &c
		}
	}
	if l.voltage != "" {
		if v, err := l.readInt(l.voltage); err != nil {
			l.sysfsFail(srcPower, err)
		} else if v > 0 {
			s.Voltage = uint16(min(v/1000, math.MaxUint16)) // µV to mV
		}
	}
}

// sysfsFail handles a failed sysfs read. A file that vanished means the
// device went away (the zone list or the battery changed): discover again
// next time rather than report it. Other errors (EIO, ENODATA from a sensor
// that is switched off) are kept, and do not trigger discovery on every call.
func (l *Linux) sysfsFail(src string, err error) {
	if errors.Is(err, fs.ErrNotExist) {
		l.stale = true
		return
	}
	l.fail(src, err)
}

func (l *Linux) readInt(p string) (int64, error) {
	b, err := l.read(p)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	return v, nil
}

// discover lists thermal zones and picks the battery. Only files that exist
// now are kept, so that a later read that finds them gone means a change.
func (l *Linux) discover() {
	l.zones = l.zones[:0]
	dir := l.path("sys/class/thermal")
	if ents, err := os.ReadDir(dir); err == nil {
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), "thermal_zone") {
				continue
			}
			p := filepath.Join(dir, e.Name(), "temp")
			if _, err := os.Stat(p); err == nil {
				l.zones = append(l.zones, p)
			}
		}
	}

	l.capacity, l.voltage = "", ""
	dir = l.path("sys/class/power_supply")
	ents, err := os.ReadDir(dir) // sorted by name: the first battery wins
	if err != nil {
		return
	}
	for _, e := range ents {
		d := filepath.Join(dir, e.Name())
		if l.readWord(filepath.Join(d, "type")) != "Battery" {
			continue
		}
		// Scope "Device" marks the battery of a peripheral (a wireless
		// mouse, a gamepad), not the one powering this computer.
		if l.readWord(filepath.Join(d, "scope")) == "Device" {
			continue
		}
		capacity, voltage := filepath.Join(d, "capacity"), filepath.Join(d, "voltage_now")
		if !exists(capacity) {
			capacity = ""
		}
		if !exists(voltage) {
			voltage = ""
		}
		if capacity != "" || voltage != "" {
			l.capacity, l.voltage = capacity, voltage
			return
		}
	}
}

func (l *Linux) readWord(p string) string {
	b, err := l.read(p)
	if err != nil {
		return ""
	}
	return string(bytes.TrimSpace(b))
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
