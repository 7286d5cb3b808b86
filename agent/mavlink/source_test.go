package mavlink_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/mavlink"
	"github.com/hangarfleet/hangar/agent/mavlink/mavlinktest"
	"github.com/hangarfleet/hangar/proto"
)

func newVehicle(t *testing.T, addr string, sys uint8, autopilot mavlink.MAV_AUTOPILOT, typ mavlink.MAV_TYPE) *mavlinktest.Vehicle {
	t.Helper()
	v, err := mavlinktest.Start(mavlinktest.Options{Addr: addr, SystemID: sys, Autopilot: autopilot, Type: typ})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	return v
}

type events struct {
	mu  sync.Mutex
	evs []proto.Event
}

func (e *events) add(ev proto.Event) {
	e.mu.Lock()
	e.evs = append(e.evs, ev)
	e.mu.Unlock()
}

func (e *events) has(code, text string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ev := range e.evs {
		if ev.Code == code && strings.Contains(ev.Message, text) {
			return true
		}
	}
	return false
}

func startSource(t *testing.T, mods ...func(*mavlink.Options)) (*mavlink.Source, *events) {
	t.Helper()
	evs := &events{}
	o := mavlink.Options{URL: "udp://127.0.0.1:0", HeartbeatTimeout: 500 * time.Millisecond, Event: evs.add}
	for _, f := range mods {
		f(&o)
	}
	s, err := mavlink.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Run did not end")
		}
	})
	return s, evs
}

func waitState(t *testing.T, s *mavlink.Source, what string, ok func(mavlink.State) bool) mavlink.State {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := s.State(time.Now())
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %+v", what, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func is(f proto.FlightState, why string) func(mavlink.State) bool {
	return func(st mavlink.State) bool { return st.Flight == f && st.Why == why }
}

// TestVehicleFlight: a vehicle arms, takes off, flies, lands and
// disarms, its battery draining; the source follows each step (only
// disarmed and on the ground is landed), reads its firmware version once,
// turns its warnings into events, and fills the sample from it.
func TestVehicleFlight(t *testing.T) {
	s, evs := startSource(t)
	v := newVehicle(t, s.Addr().String(), 1, mavlinktest.AutopilotPX4, mavlinktest.TypeQuadrotor)
	waitState(t, s, "landed", is(proto.FlightLanded, ""))
	for _, step := range []struct {
		armed  bool
		landed uint64
		flight proto.FlightState
		why    string
	}{
		{true, mavlink.LandedOnGround, proto.FlightArmed, "armed"},
		{true, mavlink.LandedTakeoff, proto.FlightFlying, "taking off"},
		{true, mavlink.LandedInAir, proto.FlightFlying, "in the air"},
		{true, mavlink.LandedLanding, proto.FlightFlying, "landing"},
		{true, mavlink.LandedOnGround, proto.FlightArmed, "armed"},
		{false, mavlink.LandedUndefined, proto.FlightUnknown, "landed state undefined"},
		{false, mavlink.LandedOnGround, proto.FlightLanded, ""},
	} {
		v.Set(func(v *mavlinktest.State) { v.Armed, v.Landed, v.Battery = step.armed, step.landed, v.Battery-10 })
		waitState(t, s, fmt.Sprintf("armed %v, landed state %d", step.armed, step.landed), is(step.flight, step.why))
	}
	st := waitState(t, s, "the drained battery", func(st mavlink.State) bool { return st.Battery != nil && *st.Battery == 25 })
	if st.Voltage != 15250 {
		t.Errorf("voltage %d mV", st.Voltage)
	}
	var smp proto.Sample
	s.Fill(&smp, time.Now())
	if smp.Flight != proto.FlightLanded || smp.Battery == nil || *smp.Battery != 25 || smp.Fix != 3 || smp.Lat != 473769000 || smp.Lon != 85417000 || smp.Alt != 1200 ||
		smp.Ext["gps_satellites"] != 14 {
		t.Errorf("sample %+v (ext %v)", smp, smp.Ext)
	}
	deadline := time.Now().Add(10 * time.Second)
	for ver, _ := s.Firmware(); ver != mavlinktest.Firmware; ver, _ = s.Firmware() {
		if time.Now().After(deadline) {
			t.Fatalf("firmware version %q", ver)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if asked := v.Asked(); asked != 1 {
		t.Errorf("asked for the version %d times", asked)
	}
	v.Set(func(v *mavlinktest.State) { v.Text = "Preflight Fail: baro" })
	waitFor(t, "the warning as an event", func() bool { return evs.has("fc_statustext", "Preflight Fail: baro") })
	if frames, bad, _, _ := s.Counters(); frames == 0 || bad != 0 {
		t.Errorf("frames %d, malformed %d", frames, bad)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestVehicleHeartbeatLoss: when the vehicle's heartbeats stop, the
// flight state is unknown (installs wait), the loss is counted and
// reported, and it comes back with them.
func TestVehicleHeartbeatLoss(t *testing.T) {
	s, evs := startSource(t)
	v := newVehicle(t, s.Addr().String(), 1, mavlinktest.AutopilotPX4, mavlinktest.TypeQuadrotor)
	waitState(t, s, "landed", is(proto.FlightLanded, ""))
	v.Set(func(v *mavlinktest.State) { v.Beat = false })
	st := waitState(t, s, "unknown", func(st mavlink.State) bool { return st.Flight == proto.FlightUnknown })
	if !strings.Contains(st.Why, "no heartbeat from the flight controller") {
		t.Errorf("why %q", st.Why)
	}
	waitFor(t, "the loss reported", func() bool { return evs.has("fc_link_lost", "no heartbeat") })
	if _, _, _, losses := s.Counters(); losses != 1 {
		t.Errorf("%d losses", losses)
	}
	var smp proto.Sample
	s.Fill(&smp, time.Now())
	if smp.Ext["fc_link_losses"] != 1 || smp.Flight != proto.FlightUnknown {
		t.Errorf("sample %+v", smp)
	}
	v.Set(func(v *mavlinktest.State) { v.Beat = true })
	waitState(t, s, "landed again", is(proto.FlightLanded, ""))
	waitFor(t, "the link back", func() bool { return evs.has("fc_link_back", "") })
}

// TestVehicleNotTheGroundStation: with no system id configured, a ground
// station's heartbeat arriving first is not the vehicle's, nor is a
// camera's of the vehicle's system (an autopilot field of GENERIC, type
// CAMERA), nor do that camera's landed state and battery count; with a
// system id, another vehicle is not followed; a vehicle that sends no
// EXTENDED_SYS_STATE is landed when disarmed.
func TestVehicleNotTheGroundStation(t *testing.T) {
	s, _ := startSource(t)
	addr := s.Addr().String()
	newVehicle(t, addr, 255, mavlink.MAV_AUTOPILOT_INVALID, mavlink.MAV_TYPE_GCS) // QGroundControl
	waitFor(t, "the ground station's heartbeats", func() bool { _, _, ignored, _ := s.Counters(); return ignored > 5 })
	if st := s.State(time.Now()); st.Flight != proto.FlightUnknown {
		t.Fatalf("took the ground station for the vehicle: %+v", st)
	}
	camera, err := mavlinktest.Start(mavlinktest.Options{Addr: addr, SystemID: 1, ComponentID: 100, Autopilot: 0, Type: 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(camera.Close)
	camera.Set(func(v *mavlinktest.State) { v.Peripheral, v.Landed, v.Battery = true, mavlink.LandedOnGround, 99 })
	waitFor(t, "the camera's heartbeats", func() bool { _, _, ignored, _ := s.Counters(); return ignored > 20 })
	if st := s.State(time.Now()); st.Flight != proto.FlightUnknown {
		t.Fatalf("took the camera for the vehicle: %+v", st)
	}
	fc := newVehicle(t, addr, 1, mavlinktest.AutopilotPX4, mavlinktest.TypeQuadrotor)
	fc.Set(func(v *mavlinktest.State) { v.Armed, v.Landed, v.Battery = true, mavlink.LandedInAir, 40 })
	st := waitState(t, s, "the flight controller in the air, whatever the camera says", is(proto.FlightFlying, "in the air"))
	if st.Battery == nil || *st.Battery != 40 {
		t.Errorf("battery %v: the camera's?", st.Battery)
	}
	// It stops sending its landed state: unknown, not landed.
	fc.Set(func(v *mavlinktest.State) { v.Armed, v.SendExt = false, false })
	st = waitState(t, s, "the landed state gone stale", func(st mavlink.State) bool { return st.Flight == proto.FlightUnknown })
	if !strings.Contains(st.Why, "no landed state") {
		t.Errorf("why %q", st.Why)
	}

	// With a system id, only that vehicle; one that never sent a landed
	// state goes by its armed flag.
	s2, _ := startSource(t, func(o *mavlink.Options) { o.SystemID = 2 })
	other := newVehicle(t, s2.Addr().String(), 1, mavlinktest.AutopilotPX4, mavlinktest.TypeQuadrotor)
	other.Set(func(v *mavlinktest.State) { v.Armed, v.Landed = true, mavlink.LandedInAir })
	waitFor(t, "the other vehicle's frames", func() bool { _, _, ignored, _ := s2.Counters(); return ignored > 20 })
	if st := s2.State(time.Now()); st.Flight != proto.FlightUnknown {
		t.Fatalf("followed system 1 with system 2 configured: %+v", st)
	}
	mine := newVehicle(t, s2.Addr().String(), 2, mavlinktest.AutopilotPX4, mavlinktest.TypeQuadrotor)
	mine.Set(func(v *mavlinktest.State) { v.SendExt = false })
	waitState(t, s2, "its own vehicle, landed", is(proto.FlightLanded, ""))
	mine.Set(func(v *mavlinktest.State) { v.Armed = true })
	waitState(t, s2, "armed", is(proto.FlightArmed, "armed"))
}

// TestVehicleBatteries: BATTERY_STATUS of each battery is kept, the main
// one (id 0) is the battery the install policy uses, and fault bits reach
// the sample.
func TestVehicleBatteries(t *testing.T) {
	s, _ := startSource(t)
	v := newVehicle(t, s.Addr().String(), 1, mavlinktest.AutopilotPX4, mavlinktest.TypeQuadrotor)
	waitState(t, s, "landed", is(proto.FlightLanded, ""))
	v.Set(func(st *mavlinktest.State) {
		st.Batteries = []mavlink.MessageBatteryStatus{
			{Id: 0, BatteryRemaining: 41, Voltages: [10]uint16{4000, 4000, 4000, 4000, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff}, CurrentBattery: 900},
			{Id: 1, BatteryRemaining: 77, FaultBitmask: 4},
		}
		st.Battery = -1 // SYS_STATUS does not know
	})
	waitFor(t, "two batteries", func() bool { return len(s.Batteries()) == 2 })
	waitState(t, s, "the main battery", func(st mavlink.State) bool { return st.Battery != nil && *st.Battery == 41 && st.Voltage == 16000 })
	var smp proto.Sample
	s.Fill(&smp, time.Now())
	if smp.Ext["battery0_pct"] != 41 || smp.Ext["battery1_pct"] != 77 || smp.Ext["battery_faults"] != 4 {
		t.Errorf("ext %v", smp.Ext)
	}
}

// TestSourceDropsBadFrames: a heartbeat with a wrong checksum (of an
// armed vehicle) is dropped and counted, not believed; a frame cut short
// and line noise are counted; the good heartbeat after them is read.
func TestSourceDropsBadFrames(t *testing.T) {
	s, _ := startSource(t)
	c, err := net.Dial("udp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v2hb, _ := hex.DecodeString("fd09000001010100000000000404020c810403db7b") // node-mavlink: an armed PX4's heartbeat
	badCRC := bytes.Clone(v2hb)
	badCRC[len(badCRC)-1] ^= 0xff
	send := func(dg []byte) {
		t.Helper()
		if _, err := c.Write(dg); err != nil {
			t.Fatal(err)
		}
	}
	send(badCRC)
	waitFor(t, "the bad checksum counted", func() bool { _, bad, _, _ := s.Counters(); return bad == 1 })
	send(v2hb[:7])
	waitFor(t, "the cut frame counted", func() bool { _, bad, _, _ := s.Counters(); return bad >= 2 })
	if frames, _, _, _ := s.Counters(); frames != 0 {
		t.Fatalf("%d frames read of bad ones", frames)
	}
	if st := s.State(time.Now()); st.Flight != proto.FlightUnknown {
		t.Fatalf("a bad frame was believed: %+v", st)
	}
	bad0 := func() uint64 { _, b, _, _ := s.Counters(); return b }()
	send([]byte("\x00\x01 line noise"))
	waitFor(t, "the noise counted", func() bool { _, bad, _, _ := s.Counters(); return bad > bad0 })
	send(v2hb)
	waitState(t, s, "the good heartbeat read", is(proto.FlightArmed, "armed"))
}

// TestSourceTCP: over tcp:// the source reads a stream of frames (here
// node-mavlink's heartbeat of an armed PX4) and follows the vehicle, and
// dials again when the connection drops.
func TestSourceTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hb, _ := hex.DecodeString("fd09000001010100000000000404020c810403db7b")
	accepted := make(chan int, 8)
	go func() {
		for n := 1; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- n
			go func(c net.Conn, first bool) {
				defer c.Close()
				for i := 0; i < 40 || !first; i++ {
					if _, err := c.Write(hb); err != nil {
						return
					}
					time.Sleep(20 * time.Millisecond) // the vehicle's stream rate
				}
			}(c, n == 1)
		}
	}()
	s, _ := startSource(t, func(o *mavlink.Options) { o.URL = "tcp://" + ln.Addr().String() })
	waitState(t, s, "armed (the vectors' heartbeat is of an armed vehicle)", is(proto.FlightArmed, "armed"))
	// The first connection ends after 40 frames: the source dials again.
	waitFor(t, "a second connection", func() bool {
		select {
		case n := <-accepted:
			return n >= 2
		default:
			return false
		}
	})
	waitState(t, s, "armed again", is(proto.FlightArmed, "armed"))
}
