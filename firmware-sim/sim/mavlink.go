package sim

import (
	"context"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/mavlink"
	"github.com/hangarfleet/hangar/agent/mavlink/mavlinktest"
	"github.com/hangarfleet/hangar/proto"
)

// A drone with FleetOptions.MAVLink has a flight controller: a simulated
// PX4 (mavlinktest) that mirrors the drone's flight model, and each start
// of its agent reads it over MAVLink on loopback UDP, as hangar-agent
// --mavlink does: the flight state that decides installs comes the way it
// comes on a real drone.

// mavSensors are the drone's board sensors with the flight controller's
// values over them.
type mavSensors struct {
	drone *Drone
	src   *mavlink.Source
}

func (m mavSensors) Read(now time.Time) proto.Sample {
	s := m.drone.Read(now)
	m.src.Fill(&s, now)
	return s
}

func (m mavSensors) FlightNow(now time.Time) (proto.FlightState, string, *uint8, bool) {
	st := m.src.State(now)
	return st.Flight, st.Why, st.Battery, true
}

var _ agent.FlightSource = mavSensors{}

// startVehicle gives d its flight controller, which follows the drone's
// flight model until the drone stops.
func (d *SimDrone) startVehicle() error {
	v, err := mavlinktest.Start(mavlinktest.Options{Autopilot: mavlinktest.AutopilotPX4, Type: mavlinktest.TypeQuadrotor, Period: 200 * time.Millisecond})
	if err != nil {
		return err
	}
	d.vehicle = v
	go func() {
		defer v.Close()
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-d.done:
				return
			case <-tick.C:
			}
			state, battery := d.Sensors.Flight()
			v.Set(func(s *mavlinktest.State) {
				s.Armed = state == proto.FlightArmed || state == proto.FlightFlying
				s.Landed = mavlink.LandedOnGround
				if state == proto.FlightFlying {
					s.Landed = mavlink.LandedInAir
				}
				s.Battery = int8(min(battery, 100))
			})
		}
	}()
	return nil
}

// mavSource is the MAVLink reader of one start of the drone's agent.
func (d *SimDrone) mavSource() (*mavlink.Source, error) {
	return mavlink.New(mavlink.Options{URL: "udp-client://" + d.vehicle.Addr(), HeartbeatTimeout: 3 * time.Second})
}

// runMAV reads the flight controller while one start of the agent runs.
func runMAV(ctx context.Context, src *mavlink.Source) {
	if src != nil {
		go src.Run(ctx)
	}
}
