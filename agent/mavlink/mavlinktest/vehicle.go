// Package mavlinktest is a flight controller for tests and the simulator:
// a MAVLink node of its own that streams what PX4 streams (heartbeat,
// extended state, battery, position, GPS) and answers the agent's request
// for its firmware version.
package mavlinktest

import (
	"sync"
	"time"

	"github.com/bluenviron/gomavlib/v3"

	"github.com/hangarfleet/hangar/agent/mavlink"
)

// Defaults of a Vehicle.
const (
	AutopilotPX4   mavlink.MAV_AUTOPILOT = 12
	TypeQuadrotor  mavlink.MAV_TYPE      = 2
	FirmwareNumber                       = 1<<24 | 14<<16 | 3<<8 | 255 // PX4 1.14.3, official
	Firmware                             = "1.14.3"
)

// State is what the vehicle says; change it with Vehicle.Set.
type State struct {
	Armed   bool
	Landed  uint64 // MAV_LANDED_STATE
	SendExt bool   // EXTENDED_SYS_STATE (ArduPilot before 4.1 does not send it)
	Battery int8   // percent, -1 unknown
	Beat    bool   // heartbeats (false: the link is silent)
	Text    string // a STATUSTEXT warning to send once
	// Peripheral: a component that is not the flight controller but
	// sends a landed state and a battery of its own all the same.
	Peripheral bool
	// Batteries are sent as BATTERY_STATUS, one each.
	Batteries []mavlink.MessageBatteryStatus
}

// Vehicle is one simulated flight controller.
type Vehicle struct {
	node      *gomavlib.Node
	sys       uint8
	autopilot mavlink.MAV_AUTOPILOT
	typ       mavlink.MAV_TYPE

	addr string // where it listens (Options.Addr empty)

	mu    sync.Mutex
	st    State
	asked int
	stop  chan struct{}
	wg    sync.WaitGroup
}

// Options of a Vehicle.
type Options struct {
	Addr     string // where the agent listens (udp://ADDR:PORT there); empty: the vehicle listens (Vehicle.Addr) and the agent connects (udp-client://)
	SystemID uint8  // default 1
	// ComponentID is its component (default 1, the first autopilot); a
	// peripheral of the vehicle's system (a camera, 100) has its own.
	ComponentID uint8
	Autopilot   mavlink.MAV_AUTOPILOT
	Type        mavlink.MAV_TYPE
	Period      time.Duration // stream period (default 20 ms: 50 Hz)
	V1          bool          // send MAVLink 1 frames
}

// Start connects a vehicle (disarmed, on the ground, battery 95 %).
func Start(o Options) (*Vehicle, error) {
	if o.SystemID == 0 {
		o.SystemID = 1
	}
	if o.ComponentID == 0 {
		o.ComponentID = 1
	}
	if o.Period <= 0 {
		o.Period = 20 * time.Millisecond
	}
	v := &Vehicle{sys: o.SystemID, autopilot: o.Autopilot, typ: o.Type, stop: make(chan struct{}),
		st: State{Landed: mavlink.LandedOnGround, SendExt: true, Battery: 95, Beat: true}}
	ver := gomavlib.V2
	if o.V1 {
		ver = gomavlib.V1
	}
	ep := gomavlib.EndpointConf(gomavlib.EndpointUDPClient{Address: o.Addr})
	if o.Addr == "" {
		c, err := mavlink.ListenUDP("127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		v.addr, ep = c.LocalAddr().String(), gomavlib.EndpointCustom{ReadWriteCloser: c}
	}
	v.node = &gomavlib.Node{
		Endpoints:        []gomavlib.EndpointConf{ep},
		Dialect:          mavlink.Dialect,
		OutVersion:       ver,
		OutSystemID:      o.SystemID,
		OutComponentID:   o.ComponentID,
		HeartbeatDisable: true,
	}
	if err := v.node.Initialize(); err != nil {
		return nil, err
	}
	v.wg.Go(v.answer)
	v.wg.Go(func() { v.stream(o.Period) })
	return v, nil
}

// Addr is where the vehicle listens, for the agent's
// --mavlink udp-client://ADDR ("" when it connects to the agent).
func (v *Vehicle) Addr() string { return v.addr }

// Close stops it.
func (v *Vehicle) Close() {
	close(v.stop)
	v.node.Close()
	v.wg.Wait()
}

// Set changes what the vehicle says.
func (v *Vehicle) Set(f func(*State)) {
	v.mu.Lock()
	f(&v.st)
	v.mu.Unlock()
}

// Asked is how many times the agent asked for the firmware version.
func (v *Vehicle) Asked() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.asked
}

func (v *Vehicle) answer() {
	for evt := range v.node.Events() {
		f, ok := evt.(*gomavlib.EventFrame)
		if !ok {
			continue
		}
		if c, ok := f.Message().(*mavlink.MessageCommandLong); ok && c.Command == mavlink.MAV_CMD_REQUEST_MESSAGE &&
			c.Param1 == mavlink.MsgAutopilotVersion && c.TargetSystem == v.sys {
			v.mu.Lock()
			v.asked++
			v.mu.Unlock()
			v.node.WriteMessageTo(f.Channel, &mavlink.MessageAutopilotVersion{FlightSwVersion: FirmwareNumber, BoardVersion: 0x00320000})
		}
	}
}

func (v *Vehicle) stream(period time.Duration) {
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		select {
		case <-v.stop:
			return
		case <-tick.C:
		}
		v.mu.Lock()
		st := v.st
		st.Batteries = append([]mavlink.MessageBatteryStatus(nil), v.st.Batteries...)
		v.st.Text = ""
		v.mu.Unlock()
		hb := &mavlink.MessageHeartbeat{Type: v.typ, Autopilot: v.autopilot, SystemStatus: mavlink.MAV_STATE_ACTIVE, MavlinkVersion: 3}
		if st.Armed {
			hb.BaseMode |= mavlink.MAV_MODE_FLAG_SAFETY_ARMED
		}
		if st.Beat {
			v.node.WriteMessageAll(hb)
		}
		if v.autopilot == mavlink.MAV_AUTOPILOT_INVALID && !st.Peripheral {
			continue // a ground station sends heartbeats only
		}
		if st.SendExt {
			v.node.WriteMessageAll(&mavlink.MessageExtendedSysState{LandedState: st.Landed})
		}
		v.node.WriteMessageAll(&mavlink.MessageSysStatus{VoltageBattery: 15000 + uint16(max(st.Battery, 0))*10, CurrentBattery: 1200, BatteryRemaining: st.Battery})
		for i := range st.Batteries {
			b := st.Batteries[i]
			v.node.WriteMessageAll(&b)
		}
		v.node.WriteMessageAll(&mavlink.MessageGlobalPositionInt{Lat: 473769000, Lon: 85417000, RelativeAlt: 12000})
		v.node.WriteMessageAll(&mavlink.MessageGpsRawInt{FixType: 3, SatellitesVisible: 14})
		if st.Text != "" {
			v.node.WriteMessageAll(&mavlink.MessageStatustext{Severity: mavlink.SeverityWarning, Text: st.Text})
		}
	}
}
