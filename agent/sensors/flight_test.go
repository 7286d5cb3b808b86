package sensors

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// fakeClock is the receive clock of a Flight under test.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// runFlight listens on addr and runs the Flight with a fake receive clock
// until the test ends.
func runFlight(t *testing.T, addr string, logger *slog.Logger) (*Flight, *fakeClock) {
	t.Helper()
	f, err := ListenFlight(addr, logger)
	if err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	f.now = clock.Now
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return f, clock
}

// send sends in and waits until the Flight has received it.
func send(t *testing.T, f *Flight, in proto.FlightInput) {
	t.Helper()
	sendRaw(t, f, mustMarshal(t, in))
}

func sendRaw(t *testing.T, f *Flight, b []byte) {
	t.Helper()
	n := f.Stats().Received
	network, address, err := parseFlightAddr(f.Addr())
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial(network, address)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "datagram", func() bool { return f.Stats().Received > n })
}

func mustMarshal(t *testing.T, in proto.FlightInput) []byte {
	t.Helper()
	b, err := proto.Marshal(&in)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// flightAddrs returns one address of each kind, private to the test.
func flightAddrs(t *testing.T) map[string]string {
	return map[string]string{
		"unix": "unix:" + filepath.Join(t.TempDir(), "f.sock"),
		"udp":  "udp:127.0.0.1:0",
	}
}

func TestFlightFill(t *testing.T) {
	for kind, addr := range flightAddrs(t) {
		t.Run(kind, func(t *testing.T) {
			f, clock := runFlight(t, addr, nil)
			if !strings.HasPrefix(f.Addr(), kind+":") || strings.HasSuffix(f.Addr(), ":0") {
				t.Errorf("Addr() = %q", f.Addr())
			}

			// Before any datagram, Fill changes nothing.
			s := proto.Sample{Battery: u8(99), Voltage: 5000}
			f.Fill(&s, clock.Now())
			if *s.Battery != 99 || s.Voltage != 5000 || s.Flight != proto.FlightUnknown {
				t.Errorf("Fill without input changed the sample: %+v", s)
			}

			// Sent through SendFlight, the helper integrations copy.
			in := prototest.FlightInput()
			n := f.Stats().Received
			if err := SendFlight(f.Addr(), in); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "datagram", func() bool { return f.Stats().Received > n })

			s = proto.Sample{Battery: u8(99), CPU: 123}
			f.Fill(&s, clock.Now())
			want := proto.Sample{
				Battery: in.Battery, Voltage: in.Voltage, Lat: in.Lat, Lon: in.Lon, Alt: in.Alt,
				Fix: in.Fix, Flight: in.Flight, Link: *in.Link, CPU: 123,
			}
			if !sampleEqual(s, want) {
				t.Errorf("Fill = %+v, want %+v", s, want)
			}
			if s.Battery == in.Battery {
				t.Error("Fill aliases the battery it received")
			}
			if st := f.Stats(); st != (FlightStats{Received: 1}) {
				t.Errorf("Stats() = %+v", st)
			}
		})
	}
}

func sampleEqual(a, b proto.Sample) bool {
	ab, bb := a.Battery, b.Battery
	a.Battery, b.Battery = nil, nil
	at, bt := a.Temp, b.Temp
	a.Temp, b.Temp = nil, nil
	if (ab == nil) != (bb == nil) || ab != nil && *ab != *bb {
		return false
	}
	if (at == nil) != (bt == nil) || at != nil && *at != *bt {
		return false
	}
	return a.T == b.T && a.Voltage == b.Voltage && a.CPU == b.CPU && a.Mem == b.Mem &&
		a.Lat == b.Lat && a.Lon == b.Lon && a.Alt == b.Alt && a.Fix == b.Fix &&
		a.Flight == b.Flight && a.Link == b.Link && a.Uptime == b.Uptime
}

// TestFlightFreshness checks that each group of fields expires on its own,
// MaxAge after the datagram that last carried it.
func TestFlightFreshness(t *testing.T) {
	f, clock := runFlight(t, "udp:127.0.0.1:0", nil)
	send(t, f, prototest.FlightInput())
	t0 := clock.Now()

	// Four seconds later only the battery is refreshed: a partial update.
	clock.Advance(4 * time.Second)
	send(t, f, proto.FlightInput{Battery: u8(63)})

	var s proto.Sample
	f.Fill(&s, t0.Add(DefaultFlightMaxAge))
	if s.Battery == nil || *s.Battery != 63 || s.Fix != 3 || s.Flight != proto.FlightFlying || s.Link != 80 {
		t.Errorf("at MaxAge: %+v, want battery 63 and the rest of the first datagram", s)
	}

	s = proto.Sample{Mem: 10}
	f.Fill(&s, t0.Add(DefaultFlightMaxAge+time.Millisecond))
	want := proto.Sample{Battery: u8(63), Mem: 10}
	if !sampleEqual(s, want) {
		t.Errorf("after MaxAge: %+v, want only the refreshed battery", s)
	}

	s = proto.Sample{}
	f.Fill(&s, t0.Add(4*time.Second+DefaultFlightMaxAge+time.Millisecond))
	if !sampleEqual(s, proto.Sample{}) {
		t.Errorf("after everything expired: %+v", s)
	}

	// A shorter MaxAge applies at once.
	f.MaxAge = time.Second
	s = proto.Sample{}
	f.Fill(&s, t0.Add(4*time.Second+1500*time.Millisecond))
	if s.Battery != nil {
		t.Errorf("battery %d older than MaxAge 1s applied", *s.Battery)
	}
}

// TestFlightPartial checks the rule for which fields a datagram carries.
func TestFlightPartial(t *testing.T) {
	first := prototest.FlightInput()
	tests := []struct {
		name string
		in   proto.FlightInput
		want func(s *proto.Sample) // changes from the first datagram
	}{
		{"empty map keeps everything", proto.FlightInput{}, func(*proto.Sample) {}},
		{"battery", proto.FlightInput{Battery: u8(0)}, func(s *proto.Sample) { s.Battery = u8(0) }},
		{"link", proto.FlightInput{Link: u8(0)}, func(s *proto.Sample) { s.Link = 0 }},
		{"voltage", proto.FlightInput{Voltage: 14000}, func(s *proto.Sample) { s.Voltage = 14000 }},
		{"flight state", proto.FlightInput{Flight: proto.FlightLanded}, func(s *proto.Sample) { s.Flight = proto.FlightLanded }},
		{"altitude alone is ignored", proto.FlightInput{Alt: 500}, func(*proto.Sample) {}},
		{"position without fix", proto.FlightInput{Lat: 1, Lon: 2}, func(s *proto.Sample) {
			s.Lat, s.Lon, s.Alt, s.Fix = 1, 2, 0, 0
		}},
		{"fix at null island", proto.FlightInput{Fix: 2, Alt: 7}, func(s *proto.Sample) {
			s.Lat, s.Lon, s.Alt, s.Fix = 0, 0, 7, 2
		}},
	}
	f, clock := runFlight(t, "udp:127.0.0.1:0", nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			send(t, f, first)
			send(t, f, tt.in)
			var want proto.Sample
			(&Flight{latest: flightValuesOf(first, clock.Now())}).Fill(&want, clock.Now())
			tt.want(&want)
			var s proto.Sample
			f.Fill(&s, clock.Now())
			if !sampleEqual(s, want) {
				t.Errorf("Fill = %+v, want %+v", s, want)
			}
		})
	}
}

func flightValuesOf(in proto.FlightInput, at time.Time) flightValues {
	var v flightValues
	v.apply(&in, at)
	return v
}

func TestFlightMalformed(t *testing.T) {
	for kind, addr := range flightAddrs(t) {
		t.Run(kind, func(t *testing.T) {
			logs := &recordHandler{}
			f, clock := runFlight(t, addr, slog.New(logs))
			valid := mustMarshal(t, proto.FlightInput{Battery: u8(42)})
			bad := [][]byte{
				[]byte("hello"),
				{},
				append(bytes.Clone(valid), 0x00),   // trailing byte
				mustHex(t, "a1 01 18 c8"),          // battery 200
				mustHex(t, "a1 0a 04"),             // flight state 4
				mustHex(t, "a1 02 1a 00 01 00 00"), // voltage 65536
				mustHex(t, "a1 06 fb 40 47 8c cc cc cc cc cd"),               // float latitude
				mustMarshal(t, proto.FlightInput{Lat: 900_000_001, Fix: 3}),  // latitude beyond 90°
				mustHex(t, "a2 01 01 01 02"),                                 // duplicate key
				padded(t, flightBufSize),                                     // valid CBOR, but fills the buffer
				append(bytes.Clone(valid), make([]byte, 2*flightBufSize)...), // truncated by the read
			}
			for _, b := range bad {
				sendRaw(t, f, b)
			}
			// Still working, unknown keys are ignored, and the largest
			// datagram is accepted.
			sendRaw(t, f, padded(t, flightBufSize-1))
			if st := f.Stats(); st.Received != uint64(len(bad))+1 || st.Malformed != uint64(len(bad)) {
				t.Errorf("Stats() = %+v, want %d malformed of %d", st, len(bad), len(bad)+1)
			}
			var s proto.Sample
			f.Fill(&s, clock.Now())
			if s.Battery == nil || *s.Battery != 42 {
				t.Errorf("battery %v after malformed datagrams, want 42", s.Battery)
			}

			// One warning a minute, however many bad datagrams.
			if n := logs.count("dropped malformed flight input"); n != 1 {
				t.Errorf("%d warnings, want 1", n)
			}
			clock.Advance(malformedLogEvery)
			sendRaw(t, f, []byte("again"))
			// The warning is logged after the datagram is counted.
			waitFor(t, "the warning a minute later", func() bool { return logs.count("dropped malformed flight input") >= 2 })
			if n := logs.count("dropped malformed flight input"); n != 2 {
				t.Errorf("%d warnings a minute later, want 2", n)
			}
		})
	}
}

// padded returns {1: 42, 99: h'00…'}, n bytes long, for n > 264.
func padded(t *testing.T, n int) []byte {
	t.Helper()
	head := mustHex(t, "a2 01 18 2a 18 63 59") // then a 2-byte length
	l := n - len(head) - 2
	b := append(head, byte(l>>8), byte(l))
	b = append(b, make([]byte, l)...)
	if in, err := proto.DecodeFlightInput(b); err != nil || len(b) != n || *in.Battery != 42 {
		t.Fatalf("padded(%d): %d bytes, %v", n, len(b), err)
	}
	return b
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// recordHandler keeps the messages of log records.
type recordHandler struct {
	mu   sync.Mutex
	msgs []string
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recordHandler) WithGroup(string) slog.Handler            { return h }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.msgs = append(h.msgs, r.Message)
	return nil
}

func (h *recordHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range h.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

// TestFlightDocExample decodes the example of the package documentation.
func TestFlightDocExample(t *testing.T) {
	b := mustHex(t, "a2 01 18 40 0a 03")
	in, err := proto.DecodeFlightInput(b)
	if err != nil {
		t.Fatal(err)
	}
	if in.Battery == nil || *in.Battery != 64 || in.Flight != proto.FlightFlying {
		t.Errorf("doc example decodes to %+v", in)
	}
	if got := mustMarshal(t, in); !bytes.Equal(got, b) {
		t.Errorf("doc example encodes to % x", got)
	}
}

func TestListenFlightAddresses(t *testing.T) {
	for _, addr := range []string{"udp:0.0.0.0:0", "udp::0", "udp:192.0.2.1:14560", "udp:[::]:0"} {
		if f, err := ListenFlight(addr, nil); !errors.Is(err, ErrNotLoopback) {
			if f != nil {
				f.Close()
			}
			t.Errorf("ListenFlight(%q) = %v, want ErrNotLoopback", addr, err)
		}
	}
	for _, addr := range []string{"", "unix:", "udp:", "tcp:127.0.0.1:1", "/run/flight.sock", "unix:@hangar"} {
		if f, err := ListenFlight(addr, nil); err == nil {
			f.Close()
			t.Errorf("ListenFlight(%q) succeeded", addr)
		} else {
			t.Logf("%q: %v", addr, err)
		}
	}
	if err := SendFlight("", proto.FlightInput{}); err == nil {
		t.Error("SendFlight to an empty address succeeded")
	}
	if err := SendFlight("udp:127.0.0.1:9", proto.FlightInput{Battery: u8(101)}); err == nil {
		t.Error("SendFlight of an invalid input succeeded")
	}
}

func TestFlightUnixSocketFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f.sock")

	// A stale socket, as a crashed agent leaves it.
	stale, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	stale.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("test setup: closing a unixgram socket removed its file: %v", err)
	}

	f, err := ListenFlight("unix:"+path, nil)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want socket 0660", fi.Mode())
	}

	// A live socket is not taken over.
	if g, err := ListenFlight("unix:"+path, nil); err == nil {
		g.Close()
		t.Error("second ListenFlight on a live socket succeeded")
	}

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	if err := SendFlight(f.Addr(), proto.FlightInput{Voltage: 15000}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "datagram", func() bool { return f.Stats().Received == 1 })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v, want nil after cancel", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not stop after cancel")
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket file left after Run: %v", err)
	}
	if err := f.Run(t.Context()); err == nil {
		t.Error("second Run succeeded")
	}

	// A file that is not a socket is never removed.
	if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if g, err := ListenFlight("unix:"+path, nil); err == nil {
		g.Close()
		t.Error("ListenFlight replaced a regular file")
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "keep me" {
		t.Errorf("regular file changed: %q, %v", b, err)
	}
}

// TestFlightCloseKeepsNewerSocket checks that an agent shutting down does not
// remove the socket of the agent that replaced it.
func TestFlightCloseKeepsNewerSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.sock")
	old, err := ListenFlight("unix:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil { // as if the newer agent found it stale
		t.Fatal(err)
	}
	newer, err := ListenFlight("unix:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close()
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("closing the old agent removed the newer socket: %v", err)
	}
}

func TestFlightRunStopsUDP(t *testing.T) {
	f, err := ListenFlight("udp:127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel() // already done: Run returns at once
	if err := f.Run(ctx); err != nil {
		t.Errorf("Run = %v", err)
	}
	// The port is free again.
	_, address, _ := parseFlightAddr(f.Addr())
	c, err := net.ListenPacket("udp", address)
	if err != nil {
		t.Fatalf("port still bound after Run: %v", err)
	}
	c.Close()
}
