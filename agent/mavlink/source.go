// Package mavlink reads the flight controller (PX4, ArduPilot) over
// MAVLink: flight state, battery, position and the firmware version, for
// the agent's telemetry and for its rule that nothing is installed while
// the vehicle flies. The agent is an onboard-computer component of the
// vehicle's system: it sends its own heartbeat and, once, a request for
// AUTOPILOT_VERSION, and nothing that commands the vehicle.
package mavlink

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bluenviron/gomavlib/v3/pkg/dialect"
	"github.com/bluenviron/gomavlib/v3/pkg/frame"
	"github.com/bluenviron/gomavlib/v3/pkg/message"
	"go.bug.st/serial"

	"github.com/hangarfleet/hangar/proto"
)

// Defaults of Options.
const (
	DefaultHeartbeatTimeout = 3 * time.Second
	DefaultComponentID      = MAV_COMP_ID_ONBOARD_COMPUTER
)

// Options configure a Source.
type Options struct {
	// URL is the link: udp://ADDR:PORT (listen: what mavlink-router or
	// MAVProxy forwards to), udp-client://HOST:PORT, tcp://HOST:PORT,
	// serial:///dev/ttyS1:921600.
	URL string
	// SystemID is the vehicle's system id to follow (0: the first system
	// whose heartbeat comes from an autopilot). Heartbeats of other
	// systems, and of components that are not an autopilot (a ground
	// station, a camera), are never taken for the vehicle's.
	SystemID uint8
	// OwnSystemID and OwnComponentID are the agent's own ids (defaults:
	// the vehicle's system id once known, else 1; MAV_COMP_ID_ONBOARD_COMPUTER).
	OwnSystemID    uint8
	OwnComponentID uint8
	// HeartbeatTimeout: without a heartbeat of the vehicle for this long
	// the flight state is unknown (and installs wait).
	HeartbeatTimeout time.Duration
	// Event is called with a STATUSTEXT of warning severity or worse, and
	// when the link to the flight controller is lost or back.
	Event func(proto.Event)
	// Firmware is called when the flight controller has said its
	// firmware version (the agent reports it then).
	Firmware func(version string)
	Logger   *slog.Logger
}

// Source follows one vehicle on a MAVLink link.
type Source struct {
	opts Options
	log  *slog.Logger
	link link
	drw  *dialect.ReadWriter
	udp  *UDPConn // a udp:// link's socket

	mu        sync.Mutex
	sysID     uint8 // the vehicle's, once known
	compID    uint8
	hb        time.Time // last heartbeat of the vehicle
	armed     bool
	status    uint64 // MAV_STATE
	extAt     time.Time
	landed    uint64
	battery   *uint8
	voltage   uint16 // mV
	current   int16  // cA
	batAt     time.Time
	mainAt    time.Time // BATTERY_STATUS of battery 0
	batteries map[uint8]Battery
	pos       position
	posAt     time.Time
	fix       uint8
	sats      uint8
	fixAt     time.Time
	version   string // the flight controller's firmware, from AUTOPILOT_VERSION
	board     uint32
	asked     bool
	lost      bool // the link was up, then its heartbeats stopped
	pending   []proto.Event
	textsFrom time.Time
	texts     int

	frames, parseErrors, linkLosses, ignored, textsDropped atomic.Uint64
}

// Battery is one battery the vehicle reports (BATTERY_STATUS).
type Battery struct {
	Remaining *uint8 // percent
	Voltage   uint16 // millivolts, the sum of its cells
	Current   int16  // centiamperes (-1: unknown)
	Faults    uint32 // MAV_BATTERY_FAULT bits
	at        time.Time
}

type position struct {
	lat, lon, alt int32 // degrees * 1e7, centimetres above home
}

// ErrURL is a link URL the source cannot use.
var ErrURL = errors.New("mavlink link")

// link is how the source reaches the flight controller: open gives a
// connection (again after it failed, for the links that dial), datagram
// says whether each read is one whole datagram.
type link struct {
	open     func(ctx context.Context) (io.ReadWriteCloser, error)
	datagram bool
	listen   *UDPConn
}

// parseLink reads a link URL.
func parseLink(raw string) (link, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return link{}, fmt.Errorf("%w %q: %v", ErrURL, raw, err)
	}
	hostPort := func() (string, error) {
		if _, _, err := net.SplitHostPort(u.Host); err != nil || u.Path != "" {
			return "", fmt.Errorf("%w %q: want %s://HOST:PORT", ErrURL, raw, u.Scheme)
		}
		return u.Host, nil
	}
	var d net.Dialer
	switch u.Scheme {
	case "udp":
		addr, err := hostPort()
		if err != nil {
			return link{}, err
		}
		c, err := ListenUDP(addr)
		if err != nil {
			return link{}, fmt.Errorf("%w %q: %v", ErrURL, raw, err)
		}
		return link{datagram: true, listen: c, open: func(context.Context) (io.ReadWriteCloser, error) { return c, nil }}, nil
	case "udp-client":
		addr, err := hostPort()
		if err != nil {
			return link{}, err
		}
		return link{datagram: true, open: func(ctx context.Context) (io.ReadWriteCloser, error) { return d.DialContext(ctx, "udp", addr) }}, nil
	case "tcp":
		addr, err := hostPort()
		if err != nil {
			return link{}, err
		}
		return link{open: func(ctx context.Context) (io.ReadWriteCloser, error) {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			return d.DialContext(dctx, "tcp", addr)
		}}, nil
	case "serial":
		dev, baud, ok := strings.Cut(u.Path, ":")
		b, err := strconv.Atoi(baud)
		if !ok || dev == "" || err != nil || b <= 0 {
			return link{}, fmt.Errorf("%w %q: want serial:///dev/DEVICE:BAUD", ErrURL, raw)
		}
		return link{open: func(context.Context) (io.ReadWriteCloser, error) {
			return serial.Open(dev, &serial.Mode{BaudRate: b})
		}}, nil
	}
	return link{}, fmt.Errorf("%w %q: the scheme must be udp (listen), udp-client, tcp or serial", ErrURL, raw)
}

// New opens the link. Nothing is read until Run.
func New(opts Options) (*Source, error) {
	if opts.HeartbeatTimeout <= 0 {
		opts.HeartbeatTimeout = DefaultHeartbeatTimeout
	}
	if opts.OwnComponentID == 0 {
		opts.OwnComponentID = DefaultComponentID
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Event == nil {
		opts.Event = func(proto.Event) {}
	}
	if opts.Firmware == nil {
		opts.Firmware = func(string) {}
	}
	l, err := parseLink(opts.URL)
	if err != nil {
		return nil, err
	}
	drw := &dialect.ReadWriter{Dialect: Dialect}
	if err := drw.Initialize(); err != nil {
		if l.listen != nil {
			l.listen.Close()
		}
		return nil, fmt.Errorf("mavlink dialect: %w", err)
	}
	return &Source{opts: opts, log: opts.Logger.With("component", "mavlink"), batteries: map[uint8]Battery{}, link: l, drw: drw, udp: l.listen}, nil
}

// Run reads the link until ctx ends, then closes it. A link that fails
// (a serial device unplugged, a TCP peer gone) is opened again every 2 s.
func (s *Source) Run(ctx context.Context) error {
	if s.udp != nil {
		defer s.udp.Close()
	}
	watch := time.NewTicker(time.Second)
	defer watch.Stop()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-watch.C:
				s.watch(now)
				s.flush()
			}
		}
	}()
	failing := false
	for ctx.Err() == nil {
		conn, err := s.link.open(ctx)
		if err == nil {
			failing = false
			err = s.serve(ctx, conn)
		}
		if ctx.Err() != nil {
			return nil
		}
		if !failing {
			s.log.Warn("mavlink link down, trying again", "link", s.opts.URL, "err", err)
			failing = true
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
	return nil
}

// serve reads frames from conn and sends the agent's heartbeat on it
// until it fails or ctx ends.
func (s *Source) serve(ctx context.Context, conn io.ReadWriteCloser) error {
	if s.udp == nil { // the listening socket outlives one serve
		defer conn.Close()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wmu sync.Mutex
	w := &frame.Writer{ByteWriter: conn, DialectRW: s.drw, OutVersion: frame.V2, OutSystemID: s.ownSystem(), OutComponentID: s.opts.OwnComponentID}
	if err := w.Initialize(); err != nil {
		return err
	}
	send := func(m message.Message) {
		wmu.Lock()
		defer wmu.Unlock()
		w.OutSystemID = s.ownSystem()
		if err := w.WriteMessage(m); err != nil {
			s.log.Debug("mavlink write", "err", err)
		}
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		// The agent's own heartbeat: an onboard computer, no autopilot.
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			send(&MessageHeartbeat{Type: MAV_TYPE_ONBOARD_CONTROLLER, Autopilot: MAV_AUTOPILOT_INVALID, SystemStatus: MAV_STATE_ACTIVE, MavlinkVersion: 3})
			select {
			case <-ctx.Done():
				if s.udp == nil { // the listening socket outlives one serve
					conn.Close()
				}
				return
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	if s.udp != nil {
		go func() {
			select {
			case <-ctx.Done():
				s.udp.Close()
			case <-done:
			}
		}()
	}
	br := bufio.NewReaderSize(conn, 512)
	r := &frame.Reader{BufByteReader: br, DialectRW: s.drw}
	if err := r.Initialize(); err != nil {
		return err
	}
	buf := make([]byte, 2048)
	var dg bytes.Reader
	for {
		if s.link.datagram {
			// One datagram at a time: a runt or a cut frame ends with its
			// datagram and never splices into the next one.
			n, err := conn.Read(buf)
			if err != nil {
				return err
			}
			dg.Reset(buf[:n])
			br.Reset(&dg)
		}
		for {
			f, err := r.Read()
			var re frame.ReadError
			switch {
			case err == nil:
				s.frames.Add(1)
				reply := s.frame(f.GetSystemID(), f.GetComponentID(), f.GetMessage(), time.Now())
				s.flush()
				if reply != nil {
					send(reply)
				}
				continue
			case errors.As(err, &re):
				// A malformed frame, a bad CRC, a byte of line noise:
				// dropped, counted (not logged one by one: noise is many).
				s.parseErrors.Add(1)
				continue
			case s.link.datagram && errors.Is(err, io.EOF):
			default:
				return err
			}
			break
		}
	}
}

func (s *Source) ownSystem() uint8 {
	if s.opts.OwnSystemID != 0 {
		return s.opts.OwnSystemID
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return max(s.sysID, s.opts.SystemID, 1)
}

// frame takes what the vehicle's autopilot sends; it returns what to send
// back (the request for the firmware version), if anything.
func (s *Source) frame(sys, comp uint8, msg message.Message, now time.Time) (reply message.Message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if hb, ok := msg.(*MessageHeartbeat); ok && isVehicle(hb) && (s.opts.SystemID == 0 || sys == s.opts.SystemID) &&
		(s.sysID == 0 || (sys == s.sysID && comp == compAutopilot1 && s.compID != compAutopilot1)) {
		// The vehicle is the configured system, or the first whose
		// heartbeat is a vehicle's autopilot (not a ground station, a
		// camera, a gimbal, another onboard computer). Of its components,
		// the first autopilot (component 1) wins once it is heard.
		s.sysID, s.compID = sys, comp
		s.log.Info("following the vehicle", "system", sys, "component", comp, "autopilot", uint64(hb.Autopilot), "type", uint64(hb.Type))
	}
	if s.sysID == 0 || sys != s.sysID {
		s.ignored.Add(1)
		return nil
	}
	// Only the flight controller's word counts (a battery monitor's too,
	// for BATTERY_STATUS): a camera or a gimbal of the same system may
	// send a landed state or a battery of its own.
	if _, battery := msg.(*MessageBatteryStatus); comp != s.compID && !(battery && comp == compBattery) {
		s.ignored.Add(1)
		return nil
	}
	switch m := msg.(type) {
	case *MessageHeartbeat:
		s.hb = now
		s.armed = m.BaseMode&MAV_MODE_FLAG_SAFETY_ARMED != 0
		s.status = uint64(m.SystemStatus)
		if s.lost {
			s.lost = false
			s.pending = append(s.pending, proto.Event{Kind: proto.EventMessage, Severity: proto.SevInfo, Code: "fc_link_back", Message: "heartbeats of the flight controller again"})
		}
		if !s.asked && s.version == "" {
			// The one command the agent sends: the autopilot's version.
			s.asked = true
			return &MessageCommandLong{TargetSystem: s.sysID, TargetComponent: s.compID, Command: MAV_CMD_REQUEST_MESSAGE, Param1: MsgAutopilotVersion}
		}
	case *MessageExtendedSysState:
		s.extAt, s.landed = now, m.LandedState
	case *MessageSysStatus:
		if !s.mainAt.IsZero() && now.Sub(s.mainAt) <= s.opts.HeartbeatTimeout {
			break // BATTERY_STATUS of the main battery says more
		}
		if m.BatteryRemaining >= 0 && m.BatteryRemaining <= 100 {
			b := uint8(m.BatteryRemaining)
			s.battery = &b
		} else {
			s.battery = nil
		}
		s.voltage = 0 // unknown, unless said
		if m.VoltageBattery != 0xffff {
			s.voltage = m.VoltageBattery
		}
		s.current, s.batAt = m.CurrentBattery, now
	case *MessageBatteryStatus:
		var mv uint32
		for _, c := range m.Voltages {
			if c != 0xffff {
				mv += uint32(c)
			}
		}
		for _, c := range m.VoltagesExt { // cells 11 to 14; 0: none
			if c != 0 && c != 0xffff {
				mv += uint32(c)
			}
		}
		b := Battery{Voltage: uint16(min(mv, 0xfffe)), Current: m.CurrentBattery, Faults: uint32(m.FaultBitmask)}
		if m.BatteryRemaining >= 0 && m.BatteryRemaining <= 100 {
			r := uint8(m.BatteryRemaining)
			b.Remaining = &r
		}
		b.at = now
		if _, known := s.batteries[m.Id]; known || len(s.batteries) < 16 {
			s.batteries[m.Id] = b
		}
		if m.Id == 0 {
			// The main battery: what battery thresholds use.
			s.battery, s.batAt, s.mainAt, s.voltage, s.current = b.Remaining, now, now, b.Voltage, b.Current
		}
	case *MessageGlobalPositionInt:
		s.pos, s.posAt = position{lat: m.Lat, lon: m.Lon, alt: m.RelativeAlt / 10}, now
	case *MessageGpsRawInt:
		s.fix, s.sats, s.fixAt = uint8(min(m.FixType, 255)), m.SatellitesVisible, now
	case *MessageAutopilotVersion:
		if v := firmwareVersion(m.FlightSwVersion); v != s.version {
			s.version, s.board = v, m.BoardVersion
			s.log.Info("flight controller firmware", "version", s.version, "board", m.BoardVersion)
			go s.opts.Firmware(v)
		}
	case *MessageStatustext:
		if m.Severity <= SeverityWarning && s.textBudget(now) {
			sev := proto.SevWarning
			if m.Severity <= 2 { // emergency, alert, critical
				sev = proto.SevCritical
			}
			s.pending = append(s.pending, proto.Event{Kind: proto.EventAlert, Severity: sev, Code: "fc_statustext", Message: m.Text})
		}
	}
	return nil
}

// maxTexts bounds the STATUSTEXT events a minute: a flight controller
// repeating a warning must not fill the outbox, where telemetry goes first.
const maxTexts = 20

// textBudget says whether another STATUSTEXT event fits this minute.
func (s *Source) textBudget(now time.Time) bool {
	if now.Sub(s.textsFrom) >= time.Minute {
		s.textsFrom, s.texts = now, 0
	}
	s.texts++
	if s.texts > maxTexts {
		s.textsDropped.Add(1)
		return false
	}
	return true
}

// flush hands the events noted under the lock to Options.Event, outside it.
func (s *Source) flush() {
	s.mu.Lock()
	evs := s.pending
	s.pending = nil
	s.mu.Unlock()
	for _, e := range evs {
		s.opts.Event(e)
	}
}

// MAV_COMPONENT ids the source treats apart.
const (
	compAutopilot1 = 1
	compBattery    = 180
)

// vehicleTypes are the MAV_TYPEs of vehicles: what a flight controller's
// heartbeat says. Not a ground station (6), an onboard computer (18), a
// gimbal (26), an ADS-B receiver (27), a camera (30), a charging station,
// a servo, a battery or any other peripheral.
var vehicleTypes = map[MAV_TYPE]bool{1: true, 2: true, 3: true, 4: true, 7: true, 8: true, 9: true, 10: true, 11: true, 12: true,
	13: true, 14: true, 15: true, 16: true, 17: true, 19: true, 20: true, 21: true, 22: true, 23: true, 24: true, 25: true, 28: true, 29: true, 35: true}

// isVehicle says whether a heartbeat is a vehicle's flight controller.
func isVehicle(hb *MessageHeartbeat) bool {
	return hb.Autopilot != MAV_AUTOPILOT_INVALID && vehicleTypes[hb.Type]
}

// watch notices a vehicle that went quiet.
func (s *Source) watch(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.hb.IsZero() && !s.lost && now.Sub(s.hb) > s.opts.HeartbeatTimeout {
		s.lost = true
		s.linkLosses.Add(1)
		s.pending = append(s.pending, proto.Event{Kind: proto.EventAlert, Severity: proto.SevWarning, Code: "fc_link_lost",
			Message: fmt.Sprintf("no heartbeat from the flight controller for %v: flight state unknown", s.opts.HeartbeatTimeout)})
	}
}

// firmwareVersion reads AUTOPILOT_VERSION's flight_sw_version: major,
// minor, patch in its top three bytes, the release type in the last.
func firmwareVersion(v uint32) string {
	s := fmt.Sprintf("%d.%d.%d", v>>24, v>>16&0xff, v>>8&0xff)
	switch v & 0xff {
	case 0:
		s += "-dev"
	case 64:
		s += "-alpha"
	case 128:
		s += "-beta"
	case 192:
		s += "-rc"
	}
	return s
}

// State is what the source knows of the vehicle at time now.
type State struct {
	Flight proto.FlightState
	// Why says in words why the flight state is what it is, when installs
	// must wait: "armed", "in the air", "taking off", "landing", "no
	// heartbeat from the flight controller for 3s".
	Why     string
	Battery *uint8
	Voltage uint16
}

// State is the vehicle's state now. It fails safe: only a fresh heartbeat
// saying disarmed, with a landed state of on-ground where the vehicle
// sends EXTENDED_SYS_STATE, is landed. Freshness is measured on the
// source's own clock (the one it stamped frames with), whatever the
// caller's clock says: a device clock set back must not make an old
// heartbeat fresh.
func (s *Source) State(_ time.Time) State {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	var st State
	fresh := func(at time.Time) bool { return !at.IsZero() && now.Sub(at) <= s.opts.HeartbeatTimeout }
	if fresh(s.batAt) {
		st.Battery, st.Voltage = copyPtr(s.battery), s.voltage
	}
	switch {
	case s.hb.IsZero():
		st.Flight, st.Why = proto.FlightUnknown, "no heartbeat from the flight controller yet"
		return st
	case !fresh(s.hb):
		st.Flight, st.Why = proto.FlightUnknown, fmt.Sprintf("no heartbeat from the flight controller for %v", now.Sub(s.hb).Round(time.Second))
		return st
	}
	landed := ""
	switch {
	case s.extAt.IsZero():
		// The vehicle does not send EXTENDED_SYS_STATE: disarmed is all
		// there is to go by.
	case !fresh(s.extAt):
		landed = "no landed state from the flight controller for " + now.Sub(s.extAt).Round(time.Second).String()
	default:
		landed = map[uint64]string{LandedUndefined: "landed state undefined", LandedInAir: "in the air", LandedTakeoff: "taking off", LandedLanding: "landing"}[s.landed]
		if landed == "" && s.landed != LandedOnGround {
			landed = fmt.Sprintf("landed state %d", s.landed)
		}
	}
	switch {
	case landed == "in the air" || landed == "taking off" || landed == "landing":
		st.Flight, st.Why = proto.FlightFlying, landed
	case s.armed:
		st.Flight, st.Why = proto.FlightArmed, "armed"
	case landed != "":
		st.Flight, st.Why = proto.FlightUnknown, landed
	default:
		st.Flight = proto.FlightLanded
	}
	return st
}

func copyPtr(p *uint8) *uint8 {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}

// Fill sets the sample's fields the vehicle reports: battery, voltage,
// position and fix (fresh values only), and the flight state.
func (s *Source) Fill(smp *proto.Sample, _ time.Time) {
	now := time.Now() // see State
	st := s.State(now)
	smp.Flight = st.Flight
	if st.Battery != nil {
		smp.Battery = st.Battery
	}
	if st.Voltage != 0 {
		smp.Voltage = st.Voltage
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	fresh := func(at time.Time) bool { return !at.IsZero() && now.Sub(at) <= s.opts.HeartbeatTimeout }
	if fresh(s.fixAt) {
		smp.Fix = min(s.fix, 3) // 4 and up are 3D fixes with corrections
		if s.fix == 1 {
			smp.Fix = 0 // GPS_FIX_TYPE_NO_FIX
		}
	}
	if fresh(s.posAt) && smp.Fix >= 2 {
		smp.Lat, smp.Lon, smp.Alt = s.pos.lat, s.pos.lon, s.pos.alt
	}
	if smp.Ext == nil {
		smp.Ext = map[string]float64{}
	}
	smp.Ext["fc_link_losses"] = float64(s.linkLosses.Load())
	if fresh(s.fixAt) {
		smp.Ext["gps_satellites"] = float64(s.sats)
	}
	if fresh(s.batAt) && s.current >= 0 {
		smp.Ext["battery_current_a"] = float64(s.current) / 100
	}
	// Every battery the vehicle reports (BATTERY_STATUS), where there are
	// several, and any fault bits.
	var faults uint32
	for id, b := range s.batteries {
		if !fresh(b.at) {
			continue // a battery no longer reported (removed, swapped)
		}
		faults |= b.Faults
		if len(s.batteries) > 1 && b.Remaining != nil {
			smp.Ext[fmt.Sprintf("battery%d_pct", id)] = float64(*b.Remaining)
		}
	}
	if faults != 0 {
		smp.Ext["battery_faults"] = float64(faults)
	}
}

// Firmware is the flight controller's firmware version ("" until it
// answered) and board.
func (s *Source) Firmware() (string, uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.version, s.board
}

// Batteries are the batteries the vehicle reported, by id.
func (s *Source) Batteries() map[uint8]Battery {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[uint8]Battery, len(s.batteries))
	for k, v := range s.batteries {
		out[k] = v
	}
	return out
}

// Counters are the frames read, the frames dropped as malformed, the
// frames of other systems and components, and the losses of the
// vehicle's heartbeat.
func (s *Source) Counters() (frames, parseErrors, ignored, linkLosses uint64) {
	return s.frames.Load(), s.parseErrors.Load(), s.ignored.Load(), s.linkLosses.Load()
}

var _ io.Closer = (*UDPConn)(nil)

// Addr is where a udp:// link listens (nil for other links).
func (s *Source) Addr() net.Addr {
	if s.udp == nil {
		return nil
	}
	return s.udp.LocalAddr()
}
