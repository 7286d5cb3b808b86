package sim

import (
	"math"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Base is a home base: where drones charge and around which they fly.
type Base struct {
	Name     string
	Lat, Lon float64
}

// DefaultBases are five Swiss bases.
var DefaultBases = []Base{
	{"zurich", 47.3769, 8.5417},
	{"bern", 46.9480, 7.4474},
	{"geneva", 46.2044, 6.1432},
	{"basel", 47.5596, 7.5886},
	{"lugano", 46.0037, 8.9511},
}

// Physics of the simulated airframe, per second of simulated time.
const (
	drainFlying   = 100.0 / (25 * 60) // a full battery lasts 25 minutes in the air
	drainArmed    = 100.0 / (120 * 60)
	chargeLanded  = 100.0 / (40 * 60) // and charges in 40 minutes
	cellsS        = 4                 // 4S pack
	minLaunchBatt = 70.0              // never take off below this
	returnBatt    = 25.0              // come home at this
)

// Drone simulates one airframe's sensors: flight and charge cycles, battery
// physics, a GPS track around its base, board temperature and load, and
// occasional faults. It implements agent.Sensors.
type Drone struct {
	mu   sync.Mutex
	rng  *rand.Rand
	base Base

	last     time.Time
	state    proto.FlightState
	until    time.Time // when the current phase ends
	battery  float64   // percent
	heading  float64   // radians around the base
	radius   float64   // metres
	altitude float64   // metres
	temp     float64   // °C
	cpu      float64   // per mille
	errors   uint32
	// FaultRate is the chance per sample of counting an error.
	FaultRate float64
	// DrainFactor multiplies battery drain (builds that drain faster).
	DrainFactor float64
	// Grounded drones never take off (but for a scenario's Fly).
	Grounded  bool
	flyFor    time.Duration // the length of the flight Fly asked for
	baseFault float64
}

// SetBuild applies a simulated build's behaviour to the airframe's
// readings (errors, battery drain).
func (d *Drone) SetBuild(fw Firmware, sampleInterval time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.baseFault == 0 {
		d.baseFault = d.FaultRate
	}
	d.FaultRate, d.DrainFactor = d.baseFault, 1
	switch fw.Behaviour {
	case Errors:
		if sampleInterval <= 0 {
			sampleInterval = time.Second
		}
		d.FaultRate = fw.ErrorsPerMinute * sampleInterval.Minutes()
	case Drain:
		d.DrainFactor = fw.DrainFactor
	}
	// A new process counts its errors from zero.
	d.errors = 0
}

// NewDrone returns a drone at base, landed, with a random charge.
func NewDrone(base Base, seed uint64) *Drone {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return &Drone{
		rng: rng, base: base, state: proto.FlightLanded,
		battery: 40 + rng.Float64()*60, temp: 30 + rng.Float64()*10, cpu: 100 + rng.Float64()*100,
		FaultRate: 0.001, DrainFactor: 1,
	}
}

// Read advances the simulation to now and returns a sample.
func (d *Drone) Read(now time.Time) proto.Sample {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.last.IsZero() {
		d.last = now
		if d.state == proto.FlightLanded { // not a flight Fly started before the first reading
			d.until = now.Add(time.Duration(d.rng.IntN(600)) * time.Second)
		}
	}
	dt := now.Sub(d.last).Seconds()
	if dt < 0 || dt > 3600 {
		dt = 0 // clock stepped; do not simulate a jump
	}
	d.last = now
	d.step(now, dt)
	bat := uint8(math.Round(math.Max(0, math.Min(100, d.battery))))
	temp := int16(d.temp * 10)
	s := proto.Sample{
		Battery: &bat,
		Voltage: uint16(cellsS * (3300 + 9*d.battery)), // 3.3 V to 4.2 V per cell
		Temp:    &temp,
		CPU:     uint16(math.Min(1000, d.cpu)),
		Mem:     uint16(300 + d.rng.IntN(50)),
		Fix:     3,
		Flight:  d.state,
		Link:    uint8(70 + d.rng.IntN(30)),
		Errors:  d.errors,
		Uptime:  0,
	}
	north := d.radius * math.Cos(d.heading)
	east := d.radius * math.Sin(d.heading)
	lat := d.base.Lat + north/111_320
	lon := d.base.Lon + east/(111_320*math.Cos(d.base.Lat*math.Pi/180))
	s.Lat, s.Lon, s.Alt = int32(lat*1e7), int32(lon*1e7), int32(d.altitude*100)
	return s
}

func (d *Drone) step(now time.Time, dt float64) {
	switch d.state {
	case proto.FlightLanded:
		d.battery = math.Min(100, d.battery+chargeLanded*dt)
		d.altitude, d.radius = 0, 0
		d.cpu += (150 - d.cpu) * 0.1
		if now.After(d.until) && d.battery >= minLaunchBatt && !d.Grounded {
			d.state, d.until = proto.FlightArmed, now.Add(time.Duration(5+d.rng.IntN(20))*time.Second)
		}
	case proto.FlightArmed:
		d.battery -= drainArmed * dt * d.DrainFactor
		if now.After(d.until) {
			d.state = proto.FlightFlying
			d.until = now.Add(time.Duration(5+d.rng.IntN(15)) * time.Minute)
			if d.flyFor > 0 {
				d.until, d.flyFor = now.Add(d.flyFor), 0
			}
		}
	case proto.FlightFlying:
		d.battery -= drainFlying * dt * d.DrainFactor
		d.heading += dt * 0.01
		d.radius = math.Min(2000, d.radius+dt*8)
		d.altitude += (60 - d.altitude) * math.Min(1, dt*0.1)
		d.cpu += (450 - d.cpu) * 0.1
		if now.After(d.until) || d.battery <= returnBatt {
			d.state = proto.FlightLanded
			d.until = now.Add(time.Duration(1+d.rng.IntN(10)) * time.Minute)
		}
	}
	d.battery = math.Max(0, d.battery)
	target := 35.0
	if d.state == proto.FlightFlying {
		target = 48
	}
	d.temp += (target-d.temp)*math.Min(1, dt*0.02) + (d.rng.Float64()-0.5)*0.2
	d.cpu += (d.rng.Float64() - 0.5) * 20
	d.cpu = math.Max(0, d.cpu)
	for p := d.FaultRate; p > 0; p-- {
		if p >= 1 || d.rng.Float64() < p {
			d.errors++
		}
	}
}

// Fly makes the drone take off now (armed on the ground for a second)
// and land after for, whatever its schedule: a scenario's flight.
func (d *Drone) Fly(dur time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now()
	d.state, d.until, d.flyFor = proto.FlightArmed, now.Add(time.Second), dur
}

// Flight reports the drone's flight state and battery.
func (d *Drone) Flight() (proto.FlightState, float64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state, d.battery
}
