package sensors

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// DefaultFlightMaxAge is how long a value from the flight stack stays in
// samples. The flight stack sends at least once a second, so this survives a
// few lost datagrams but not a dead flight stack.
const DefaultFlightMaxAge = 5 * time.Second

// flightBufSize is the read buffer. A FlightInput encodes to at most about 40
// bytes, so a datagram that fills the buffer is not one.
const flightBufSize = 4 << 10

// malformedLogEvery rate-limits the warning about bad datagrams: a broken
// flight stack sends them several times a second.
const malformedLogEvery = time.Minute

// socketMode lets the flight software in the agent's group write.
const socketMode = 0o660

// ErrNotLoopback is returned by ListenFlight for a UDP address that other
// hosts could reach: the flight input is not authenticated.
var ErrNotLoopback = errors.New("flight input must listen on a loopback address")

var errOversized = errors.New("oversized datagram")

// FlightStats counts datagrams since ListenFlight.
type FlightStats struct {
	Received  uint64 // all datagrams, including malformed ones
	Malformed uint64 // dropped: undecodable, invalid or oversized
}

// Flight receives proto.FlightInput datagrams from the flight software and
// keeps the latest value of each field; see the package documentation for the
// format and the freshness rule. Run and Fill may be called from different
// goroutines.
type Flight struct {
	// MaxAge is how long a received value is put in samples. Zero means
	// DefaultFlightMaxAge. Fill reads it unlocked: set it before calling Fill
	// from another goroutine.
	MaxAge time.Duration

	logger *slog.Logger
	conn   net.PacketConn
	addr   string      // in ListenFlight syntax
	path   string      // socket file to remove on Close, "" for UDP
	sock   os.FileInfo // the socket file we created, to remove only ours
	now    func() time.Time

	running   atomic.Bool
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error

	mu     sync.Mutex
	latest flightValues
	stats  FlightStats

	// Owned by Run.
	lastWarn   time.Time
	suppressed uint64
}

// stamped is a value with the time it was received. The zero time means
// never received.
type stamped[T any] struct {
	v  T
	at time.Time
}

type position struct {
	lat, lon, alt int32
	fix           uint8
}

type flightValues struct {
	battery stamped[uint8]
	voltage stamped[uint16]
	pos     stamped[position]
	flight  stamped[proto.FlightState]
	link    stamped[uint8]
}

// ListenFlight opens the flight input socket at addr, which is
// "unix:/path/to/socket" or "udp:127.0.0.1:port". Datagrams are read by Run.
// A nil logger discards logs.
func ListenFlight(addr string, logger *slog.Logger) (*Flight, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	network, address, err := parseFlightAddr(addr)
	if err != nil {
		return nil, err
	}
	f := &Flight{logger: logger.With("component", "flight"), now: time.Now}
	switch network {
	case "unixgram":
		if err := f.listenUnix(address); err != nil {
			return nil, fmt.Errorf("listen flight input %s: %w", addr, err)
		}
	case "udp":
		if err := f.listenUDP(address); err != nil {
			return nil, fmt.Errorf("listen flight input %s: %w", addr, err)
		}
	}
	return f, nil
}

// parseFlightAddr maps the address syntax to a net network and address.
func parseFlightAddr(addr string) (network, address string, err error) {
	scheme, rest, _ := strings.Cut(addr, ":")
	switch {
	case scheme == "unix" && rest != "":
		return "unixgram", rest, nil
	case scheme == "udp" && rest != "":
		return "udp", rest, nil
	}
	return "", "", fmt.Errorf("flight input address %q: want unix:/path/to/socket or udp:127.0.0.1:port", addr)
}

func (f *Flight) listenUnix(path string) error {
	if strings.HasPrefix(path, "@") {
		// Anyone in the network namespace can write to an abstract socket.
		return errors.New("abstract sockets have no file permissions; use a path")
	}
	if err := removeStaleSocket(path); err != nil {
		return err
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	// The socket exists with the umask's mode until this chmod. With the
	// usual umask that is more restrictive (no group write), never less.
	if err := os.Chmod(path, socketMode); err != nil {
		conn.Close()
		os.Remove(path)
		return fmt.Errorf("chmod socket: %w", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		conn.Close()
		os.Remove(path)
		return fmt.Errorf("stat socket: %w", err)
	}
	f.conn, f.path, f.sock, f.addr = conn, path, fi, "unix:"+path
	return nil
}

// removeStaleSocket removes the socket file a crashed agent left behind. It
// refuses to remove anything but a socket, or a socket that a live process
// still receives on (a second agent, or another program configured with the
// same path).
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if c, err := net.Dial("unixgram", path); err == nil {
		c.Close()
		return fmt.Errorf("%s is in use by another process", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

func (f *Flight) listenUDP(address string) error {
	ua, err := net.ResolveUDPAddr("udp", address)
	if err != nil {
		return err
	}
	// An empty host resolves to no IP, which binds every interface.
	if ua.IP == nil || !ua.IP.IsLoopback() {
		return fmt.Errorf("%w: %s is not loopback (use 127.0.0.1 or [::1])", ErrNotLoopback, address)
	}
	conn, err := net.ListenUDP("udp", ua)
	if err != nil {
		return err
	}
	f.conn, f.addr = conn, "udp:"+conn.LocalAddr().String()
	return nil
}

// Addr returns the address Run receives on, in ListenFlight syntax, with the
// port the system chose when ListenFlight was given port 0.
func (f *Flight) Addr() string { return f.addr }

// Stats returns the datagram counters.
func (f *Flight) Stats() FlightStats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// Run receives datagrams until ctx is done, then closes the socket, removes
// the socket file and returns nil. It returns an error only if the socket
// fails. Run may be called once.
func (f *Flight) Run(ctx context.Context) error {
	if !f.running.CompareAndSwap(false, true) {
		return errors.New("flight input: run called twice")
	}
	defer f.Close()
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()

	f.logger.Debug("receiving flight input", "addr", f.addr)
	buf := make([]byte, flightBufSize)
	for {
		n, _, err := f.conn.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil || f.closed.Load() {
				return nil
			}
			return fmt.Errorf("read flight input: %w", err)
		}
		f.receive(buf[:n], n == len(buf), f.now())
	}
}

// Close closes the socket and removes the socket file. Run calls it when its
// context is done; call it directly only when Run is never started.
func (f *Flight) Close() error {
	f.closeOnce.Do(func() {
		f.closed.Store(true)
		f.closeErr = f.conn.Close()
		if f.path == "" {
			return
		}
		// A newer agent may already have replaced the file with its own.
		if fi, err := os.Lstat(f.path); err == nil && os.SameFile(fi, f.sock) {
			if err := os.Remove(f.path); err != nil && f.closeErr == nil {
				f.closeErr = fmt.Errorf("remove socket: %w", err)
			}
		}
	})
	return f.closeErr
}

func (f *Flight) receive(b []byte, full bool, at time.Time) {
	var in proto.FlightInput
	err := errOversized
	if !full {
		in, err = decodeFlight(b)
	}
	f.mu.Lock()
	f.stats.Received++
	if err != nil {
		f.stats.Malformed++
	} else {
		f.latest.apply(&in, at)
	}
	malformed := f.stats.Malformed
	f.mu.Unlock()

	if err == nil {
		return
	}
	if !f.lastWarn.IsZero() && at.Sub(f.lastWarn) < malformedLogEvery {
		f.suppressed++
		return
	}
	f.logger.Warn("dropped malformed flight input", "err", err, "bytes", len(b),
		"malformed_total", malformed, "not_logged", f.suppressed)
	f.lastWarn, f.suppressed = at, 0
}

// decodeFlight decodes a datagram and rejects what would make the samples it
// goes into invalid: FlightInput.Validate does not check the position range
// that Sample.Validate enforces, and one bad position must not get whole
// telemetry batches rejected by the control plane.
func decodeFlight(b []byte) (proto.FlightInput, error) {
	in, err := proto.DecodeFlightInput(b)
	if err != nil {
		return in, err
	}
	s := proto.Sample{Lat: in.Lat, Lon: in.Lon, Fix: in.Fix}
	if err := s.Validate(); err != nil {
		return in, fmt.Errorf("%w: %w", proto.ErrMalformed, err)
	}
	return in, nil
}

// apply installs the fields in carries; see "Freshness" in the package
// documentation for why zero values count as absent.
func (v *flightValues) apply(in *proto.FlightInput, at time.Time) {
	if in.Battery != nil {
		v.battery = stamped[uint8]{*in.Battery, at}
	}
	if in.Voltage > 0 {
		v.voltage = stamped[uint16]{in.Voltage, at}
	}
	if in.Fix > 0 || in.Lat != 0 || in.Lon != 0 {
		v.pos = stamped[position]{position{in.Lat, in.Lon, in.Alt, in.Fix}, at}
	}
	if in.Flight != proto.FlightUnknown {
		v.flight = stamped[proto.FlightState]{in.Flight, at}
	}
	if in.Link != nil {
		v.link = stamped[uint8]{*in.Link, at}
	}
}

// Fill overlays onto s the latest values received at most MaxAge before now.
// Fields with no fresh value are left as they are.
func (f *Flight) Fill(s *proto.Sample, now time.Time) {
	maxAge := f.MaxAge
	if maxAge <= 0 {
		maxAge = DefaultFlightMaxAge
	}
	fresh := func(at time.Time) bool { return !at.IsZero() && now.Sub(at) <= maxAge }

	f.mu.Lock()
	defer f.mu.Unlock()
	v := &f.latest
	if fresh(v.battery.at) {
		b := v.battery.v // a copy: s must not alias our state
		s.Battery = &b
	}
	if fresh(v.voltage.at) {
		s.Voltage = v.voltage.v
	}
	if fresh(v.pos.at) {
		p := v.pos.v
		s.Lat, s.Lon, s.Alt, s.Fix = p.lat, p.lon, p.alt, p.fix
	}
	if fresh(v.flight.at) {
		s.Flight = v.flight.v
	}
	if fresh(v.link.at) {
		s.Link = v.link.v
	}
}

// SendFlight sends in as one datagram to addr, in ListenFlight syntax. It is
// what a flight stack integration does, for tests, the simulator and as a
// reference.
func SendFlight(addr string, in proto.FlightInput) error {
	network, address, err := parseFlightAddr(addr)
	if err != nil {
		return err
	}
	if err := in.Validate(); err != nil {
		return fmt.Errorf("send flight input: %w", err)
	}
	b, err := proto.Marshal(&in)
	if err != nil {
		return fmt.Errorf("send flight input: %w", err)
	}
	c, err := net.Dial(network, address)
	if err != nil {
		return fmt.Errorf("send flight input: %w", err)
	}
	defer c.Close()
	if _, err := c.Write(b); err != nil {
		return fmt.Errorf("send flight input: %w", err)
	}
	return nil
}
