package mavlink

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bluenviron/gomavlib/v3"

	"github.com/hangarfleet/hangar/proto"
)

// vehicle is a flight controller in the test: a gomavlib node of its own
// that streams what PX4 streams (heartbeat, extended state, battery,
// position, GPS) every 20 ms, and answers the request for its version.
type vehicle struct {
	t    *testing.T
	node *gomavlib.Node
	sys  uint8

	mu        sync.Mutex
	autopilot MAV_AUTOPILOT
	typ       MAV_TYPE
	armed     bool
	landed    uint64
	sendExt   bool
	battery   int8
	beat      bool
	asked     int
	text      string
}

const (
	autopilotPX4  MAV_AUTOPILOT = 12
	typeQuadrotor MAV_TYPE      = 2
	fcVersion                   = 1<<24 | 14<<16 | 3<<8 | 255 // 1.14.3, official
)

func newVehicle(t *testing.T, addr string, sys uint8, autopilot MAV_AUTOPILOT, typ MAV_TYPE) *vehicle {
	t.Helper()
	v := &vehicle{t: t, sys: sys, autopilot: autopilot, typ: typ, sendExt: true, battery: 95, beat: true, landed: landedOnGround}
	v.node = &gomavlib.Node{
		Endpoints:        []gomavlib.EndpointConf{gomavlib.EndpointUDPClient{Address: addr}},
		Dialect:          Dialect,
		OutVersion:       gomavlib.V2,
		OutSystemID:      sys,
		OutComponentID:   1,
		HeartbeatDisable: true,
	}
	if err := v.node.Initialize(); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); v.node.Close(); wg.Wait() })
	wg.Go(func() {
		for evt := range v.node.Events() {
			if f, ok := evt.(*gomavlib.EventFrame); ok {
				if c, ok := f.Message().(*MessageCommandLong); ok && c.Command == MAV_CMD_REQUEST_MESSAGE && c.Param1 == msgAutopilotVersion && c.TargetSystem == sys {
					v.mu.Lock()
					v.asked++
					v.mu.Unlock()
					v.node.WriteMessageTo(f.Channel, &MessageAutopilotVersion{FlightSwVersion: fcVersion, BoardVersion: 0x00320000})
				}
			}
		}
	})
	wg.Go(func() {
		tick := time.NewTicker(20 * time.Millisecond) // the vehicle's stream rate
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			v.mu.Lock()
			hb := &MessageHeartbeat{Type: v.typ, Autopilot: v.autopilot, SystemStatus: MAV_STATE_ACTIVE, MavlinkVersion: 3}
			if v.armed {
				hb.BaseMode |= MAV_MODE_FLAG_SAFETY_ARMED
			}
			beat, ext, landed, battery, text := v.beat, v.sendExt, v.landed, v.battery, v.text
			v.text = ""
			v.mu.Unlock()
			if beat {
				v.node.WriteMessageAll(hb)
			}
			if v.autopilot == MAV_AUTOPILOT_INVALID {
				continue // a ground station sends heartbeats only
			}
			if ext {
				v.node.WriteMessageAll(&MessageExtendedSysState{LandedState: landed})
			}
			v.node.WriteMessageAll(&MessageSysStatus{VoltageBattery: 15000 + uint16(battery)*10, CurrentBattery: 1200, BatteryRemaining: battery})
			v.node.WriteMessageAll(&MessageGlobalPositionInt{Lat: 473769000, Lon: 85417000, RelativeAlt: 12000})
			v.node.WriteMessageAll(&MessageGpsRawInt{FixType: 3, SatellitesVisible: 14})
			if text != "" {
				v.node.WriteMessageAll(&MessageStatustext{Severity: severityWarning, Text: text})
			}
		}
	})
	return v
}

func (v *vehicle) set(f func(v *vehicle)) {
	v.mu.Lock()
	f(v)
	v.mu.Unlock()
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

func startSource(t *testing.T, mods ...func(*Options)) (*Source, *events) {
	t.Helper()
	evs := &events{}
	o := Options{URL: "udp://127.0.0.1:0", HeartbeatTimeout: 500 * time.Millisecond, Event: evs.add}
	for _, f := range mods {
		f(&o)
	}
	s, err := New(o)
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

func waitState(t *testing.T, s *Source, what string, ok func(State) bool) State {
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

func is(f proto.FlightState, why string) func(State) bool {
	return func(st State) bool { return st.Flight == f && st.Why == why }
}

// TestVehicleFlight: a vehicle arms, takes off, flies, lands and
// disarms, its battery draining; the source follows each step (only
// disarmed and on the ground is landed), reads its firmware version once,
// turns its warnings into events, and fills the sample from it.
func TestVehicleFlight(t *testing.T) {
	s, evs := startSource(t)
	v := newVehicle(t, s.Addr().String(), 1, autopilotPX4, typeQuadrotor)
	waitState(t, s, "landed", is(proto.FlightLanded, ""))
	for _, step := range []struct {
		armed  bool
		landed uint64
		flight proto.FlightState
		why    string
	}{
		{true, landedOnGround, proto.FlightArmed, "armed"},
		{true, landedTakeoff, proto.FlightFlying, "taking off"},
		{true, landedInAir, proto.FlightFlying, "in the air"},
		{true, landedLanding, proto.FlightFlying, "landing"},
		{true, landedOnGround, proto.FlightArmed, "armed"},
		{false, landedUndefined, proto.FlightUnknown, "landed state undefined"},
		{false, landedOnGround, proto.FlightLanded, ""},
	} {
		v.set(func(v *vehicle) { v.armed, v.landed, v.battery = step.armed, step.landed, v.battery-10 })
		waitState(t, s, fmt.Sprintf("armed %v, landed state %d", step.armed, step.landed), is(step.flight, step.why))
	}
	st := waitState(t, s, "the drained battery", func(st State) bool { return st.Battery != nil && *st.Battery == 25 })
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
	for ver, _ := s.Firmware(); ver != "1.14.3"; ver, _ = s.Firmware() {
		if time.Now().After(deadline) {
			t.Fatalf("firmware version %q", ver)
		}
		time.Sleep(10 * time.Millisecond)
	}
	v.mu.Lock()
	asked := v.asked
	v.mu.Unlock()
	if asked != 1 {
		t.Errorf("asked for the version %d times", asked)
	}
	v.set(func(v *vehicle) { v.text = "Preflight Fail: baro" })
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
	v := newVehicle(t, s.Addr().String(), 1, autopilotPX4, typeQuadrotor)
	waitState(t, s, "landed", is(proto.FlightLanded, ""))
	v.set(func(v *vehicle) { v.beat = false })
	st := waitState(t, s, "unknown", func(st State) bool { return st.Flight == proto.FlightUnknown })
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
	v.set(func(v *vehicle) { v.beat = true })
	waitState(t, s, "landed again", is(proto.FlightLanded, ""))
	waitFor(t, "the link back", func() bool { return evs.has("fc_link_back", "") })
}

// TestVehicleNotTheGroundStation: a ground station's heartbeat on the
// same link is not the vehicle's; nor is another vehicle's when the
// source follows a system id; a vehicle that sends no EXTENDED_SYS_STATE
// is landed when disarmed.
func TestVehicleNotTheGroundStation(t *testing.T) {
	s, _ := startSource(t, func(o *Options) { o.SystemID = 2 })
	addr := s.Addr().String()
	newVehicle(t, addr, 255, MAV_AUTOPILOT_INVALID, MAV_TYPE_GCS) // QGroundControl
	other := newVehicle(t, addr, 1, autopilotPX4, typeQuadrotor)  // another vehicle, flying
	other.set(func(v *vehicle) { v.armed, v.landed = true, landedInAir })
	waitFor(t, "frames of the others", func() bool { _, _, ignored, _ := s.Counters(); return ignored > 20 })
	if st := s.State(time.Now()); st.Flight != proto.FlightUnknown || !strings.Contains(st.Why, "no heartbeat") {
		t.Fatalf("took another system for the vehicle: %+v", st)
	}
	mine := newVehicle(t, addr, 2, autopilotPX4, typeQuadrotor)
	mine.set(func(v *vehicle) { v.sendExt = false })
	waitState(t, s, "its own vehicle, landed", is(proto.FlightLanded, ""))
	mine.set(func(v *vehicle) { v.armed = true })
	waitState(t, s, "armed", is(proto.FlightArmed, "armed"))
}

func TestEndpointURLs(t *testing.T) {
	for _, good := range []string{"udp-client://127.0.0.1:14550", "tcp://127.0.0.1:5760", "serial:///dev/ttyS1:921600"} {
		if _, _, err := endpoint(good); err != nil {
			t.Errorf("%s: %v", good, err)
		}
	}
	for _, bad := range []string{"", "udp://", "http://x:1", "tcp://host", "serial:///dev/ttyS1", "serial:///dev/ttyS1:fast", "udp-client://h:1/path"} {
		if _, _, err := endpoint(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
