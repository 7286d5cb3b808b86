// Package sim runs fleets of virtual drones: each is a real agent (the same
// agent.New the device binary runs) with simulated sensors, connected to a
// real control plane over real MQTT and HTTP.
package sim

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/agent/mavlink"
	"github.com/hangarfleet/hangar/agent/mavlink/mavlinktest"
	"github.com/hangarfleet/hangar/agent/transport/mqtt"
	"github.com/hangarfleet/hangar/agent/transport/mqttlite"
	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// Mix is a weighted choice of label values.
type Mix []Weighted

// Weighted is one value of a Mix.
type Weighted struct {
	Value  string
	Weight float64
}

// Pick returns the value for position x in [0, 1).
func (m Mix) Pick(x float64) string {
	total := 0.0
	for _, w := range m {
		total += w.Weight
	}
	acc := 0.0
	for _, w := range m {
		acc += w.Weight / total
		if x < acc {
			return w.Value
		}
	}
	return m[len(m)-1].Value
}

// DefaultHardware is the default mix of hardware revisions.
var DefaultHardware = Mix{{"rev-a", 0.2}, {"rev-b", 0.5}, {"rev-c", 0.3}}

// FleetOptions configure a simulated fleet.
type FleetOptions struct {
	ServerURL   string
	EnrollToken string
	// TLS is the drones' trust in the control plane (its CA), as the
	// agent's --ca-file gives it (nil: plain, or the system's roots).
	TLS       *tls.Config
	Devices   int
	Prefix    string // device ids are Prefix + zero-padded index
	StateRoot string // per-device state directories; a temp dir when empty
	Hardware  Mix
	Bases     []Base
	Version   string
	// Versions, when set, are the factory builds' shares (Version is then
	// ignored): a fleet with older builds still in the field.
	Versions Mix
	// FactorySize is the size of factory builds' artifacts (as Size of a
	// Firmware): what a delta from them patches.
	FactorySize int
	// CorruptBase is the share of drones whose flash decays after the agent
	// took the digest of its build: a delta offered for that digest no
	// longer applies, and the drone falls back to the full artifact.
	CorruptBase float64

	SampleInterval    time.Duration
	BatchSize         int
	HeartbeatInterval time.Duration
	BackoffMin        time.Duration
	BackoffMax        time.Duration
	// StartRate is how many drones start per second (0: all at once).
	StartRate int
	Seed      uint64
	Logger    *slog.Logger

	// Roots turn on signed updates: the drones pin these root keys.
	Roots []ed25519.PublicKey
	// Grounded drones never take off (updates are never deferred for
	// flying).
	Grounded bool
	// Update timings and policy of the drones' agents.
	TrialSoak     time.Duration
	TrialDeadline time.Duration
	MinBattery    uint8
	// MemoryOutbox keeps each drone's outbox in memory (across its agent's
	// restarts) instead of files: one descriptor per drone instead of six,
	// for fleets larger than the descriptor limit allows otherwise.
	MemoryOutbox bool
	// MQTTClient is the drones' MQTT transport: "paho" (default; the
	// agent binary's) or "lite" (agent/transport/mqttlite: one goroutine
	// per connection instead of ten, for the largest fleets).
	MQTTClient string
	// SourceAddrs are local IP addresses the drones' connections come
	// from, one per drone in turn (default: the system's choice). Each
	// source address has its own range of ephemeral ports towards the
	// control plane, so more drones fit than one address allows.
	SourceAddrs []string
	// MAVLink gives every drone a simulated flight controller that its
	// agent reads over MAVLink (loopback UDP), as hangar-agent --mavlink.
	MAVLink bool
	// Claims are labels every drone asserts about itself, over its
	// hardware and base: enrolled fakes that pretend to be somewhere.
	Claims map[string]string
	// OnBoot, when set, is called each time a drone boots a build (before
	// it runs, bricked or not): who ever ran what.
	OnBoot func(device string, fw Firmware)
}

// Fleet is a running simulated fleet.
type Fleet struct {
	opts   FleetOptions
	links  []link    // transports, one per source address
	built  time.Time // the simulated agents' build time: their clocks are not trusted before it
	mu     sync.Mutex
	drones []*SimDrone
}

// SimDrone is one virtual drone. Its agent is restarted whenever the
// simulated firmware "reboots" (an update, a crash, a scheduled reboot).
type SimDrone struct {
	ID      string
	Labels  map[string]string
	Sensors *Drone
	fleet   *Fleet
	dir     string
	hw      string

	mu        sync.Mutex
	agent     *agent.Agent
	boots     int
	bricked   bool
	cancel    context.CancelFunc
	done      chan struct{}
	box       *memOutbox           // with FleetOptions.MemoryOutbox
	factory   Firmware             // the build it left the factory with
	vehicle   *mavlinktest.Vehicle // its flight controller (FleetOptions.MAVLink)
	mav       *mavlink.Source      // the current agent's reader of it
	rot       bool                 // its flash decays (FleetOptions.CorruptBase)
	clk       *skewClock           // the drone's clock (faults skew it)
	runCancel context.CancelFunc   // stops the running agent (power cut)
	cutFor    time.Duration        // set by PowerCut and SwitchOff: how long the power stays off
	cleanOff  bool                 // SwitchOff: the agent's clean stop stands
	link      link
	flash     *installer // the simulated flash as of the last boot (the only writer of its file)
}

// PowerCut stops the drone's agent at once, without its clean stop being
// recorded (the agent counts an unplanned restart), and boots it again
// from its state directory after off. It reports false when the agent is
// not running (booting, bricked, powered off already).
func (d *SimDrone) PowerCut(off time.Duration) bool { return d.powerOff(off, false) }

// Off reports whether the drone is powered off (PowerCut, SwitchOff).
func (d *SimDrone) Off() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cutFor > 0
}

// SwitchOff stops the drone's agent cleanly (as when it is switched off in
// its hangar) and starts it again after off: offline for a while, not a
// crash.
func (d *SimDrone) SwitchOff(off time.Duration) bool { return d.powerOff(off, true) }

func (d *SimDrone) powerOff(off time.Duration, clean bool) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.runCancel == nil || d.cutFor > 0 {
		return false
	}
	d.cutFor, d.cleanOff = max(off, time.Millisecond), clean
	d.runCancel()
	return true
}

// Agent is the drone's current agent.
func (d *SimDrone) Agent() *agent.Agent {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.agent
}

// Firmware is the build in the drone's flash (the one it runs, or boots
// next after an install).
func (d *SimDrone) Firmware() Firmware {
	d.mu.Lock()
	in := d.flash
	d.mu.Unlock()
	if in == nil {
		return Firmware{}
	}
	return in.current()
}

// Boots counts the agent starts of this drone.
func (d *SimDrone) Boots() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.boots
}

// Bricked reports whether the drone's build never came up.
func (d *SimDrone) Bricked() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.bricked
}

// Stop stops the drone's agent and waits for it.
func (d *SimDrone) Stop() {
	d.cancel()
	<-d.done
}

// NewFleet prepares a fleet; Run starts it.
func NewFleet(opts FleetOptions) (*Fleet, error) {
	if opts.Devices <= 0 {
		return nil, errors.New("fleet: no devices")
	}
	if opts.Prefix == "" {
		opts.Prefix = "drone-"
	}
	if len(opts.Hardware) == 0 {
		opts.Hardware = DefaultHardware
	}
	if len(opts.Bases) == 0 {
		opts.Bases = DefaultBases
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Version == "" {
		opts.Version = "1.0.0"
	}
	if opts.StateRoot == "" {
		dir, err := os.MkdirTemp("", "hangar-sim-")
		if err != nil {
			return nil, err
		}
		opts.StateRoot = dir
	}
	links, err := newLinks(opts.MQTTClient, opts.SourceAddrs, opts.TLS)
	if err != nil {
		return nil, err
	}
	return &Fleet{opts: opts, links: links, built: time.Now().Add(-time.Hour).Truncate(time.Second)}, nil
}

// link is how a drone reaches the control plane: its MQTT transport and
// HTTP client (nil: the agent's defaults).
type link struct {
	transport agent.Transport
	http      *http.Client
}

func newLinks(client string, addrs []string, tlsCfg *tls.Config) ([]link, error) {
	newTransport := func(d *net.Dialer) agent.Transport {
		if client == "lite" {
			return &mqttlite.Transport{Dialer: d}
		}
		if d == nil {
			return nil
		}
		return &mqtt.Transport{Dialer: d}
	}
	switch client {
	case "", "paho", "lite":
	default:
		return nil, fmt.Errorf("fleet: MQTT client %q: paho or lite", client)
	}
	if len(addrs) == 0 {
		return []link{{transport: newTransport(nil)}}, nil
	}
	var links []link
	for _, a := range addrs {
		ip := net.ParseIP(a)
		if ip == nil {
			return nil, fmt.Errorf("fleet: source address %q is not an IP address", a)
		}
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 30 * time.Second}
		ht := http.DefaultTransport.(*http.Transport).Clone()
		ht.DialContext = d.DialContext
		ht.TLSClientConfig = tlsCfg
		links = append(links, link{transport: newTransport(d), http: &http.Client{Timeout: 30 * time.Second, Transport: ht}})
	}
	return links, nil
}

// ID returns the id of drone i.
func (f *Fleet) ID(i int) string { return fmt.Sprintf("%s%05d", f.opts.Prefix, i) }

func hash01(s string, salt string) float64 {
	h := fnv.New64a()
	h.Write([]byte(salt))
	h.Write([]byte(s))
	// FNV mixes its high bits poorly for ids that differ in the last
	// character; finish with the splitmix64 mixer.
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return float64(x>>11) / float64(1<<53)
}

// Run starts every drone and blocks until ctx is done and all have stopped.
func (f *Fleet) Run(ctx context.Context) error {
	var interval time.Duration
	if f.opts.StartRate > 0 {
		interval = time.Second / time.Duration(f.opts.StartRate)
	}
	var wg sync.WaitGroup
	var err error
	next := time.Now()
	for i := range f.opts.Devices {
		if ctx.Err() != nil {
			break
		}
		var d *SimDrone
		if d, err = f.newDrone(i); err != nil {
			break
		}
		dctx, cancel := context.WithCancel(ctx)
		d.cancel = cancel
		wg.Add(1)
		go d.run(dctx, &wg)
		// Pace by a schedule rather than a sleep per drone (preparing a
		// drone takes time too), one that slips after a stall instead of
		// catching up in a burst.
		if interval > 0 {
			next = maxTime(next, time.Now()).Add(interval)
			if wait := time.Until(next); wait > 0 && !sleep(ctx, wait) {
				break
			}
		}
	}
	if err != nil {
		// Stop the drones already started rather than leave them running.
		for _, d := range f.Drones() {
			d.cancel()
		}
	}
	wg.Wait()
	return err
}

// InventoryItem is one drone as the factory knows it.
type InventoryItem struct {
	ID     string
	Labels map[string]string
}

// Inventory is what the factory knows of the fleet: each drone's id, its
// hardware revision and home base. The drones report the same about
// themselves, but the control plane groups devices only by operators'
// labels: importing this (hangar device import) is the operator's part.
// Claims (fakes) are not in it.
func (f *Fleet) Inventory() []InventoryItem {
	out := make([]InventoryItem, f.opts.Devices)
	for i := range out {
		hw, base := f.place(f.ID(i))
		out[i] = InventoryItem{ID: f.ID(i), Labels: map[string]string{"hw": hw, "base": base.Name}}
	}
	return out
}

// WriteInventory writes the inventory as "hangar device import" reads it.
func (f *Fleet) WriteInventory(w io.Writer) error {
	bw := bufio.NewWriter(w)
	for _, it := range f.Inventory() {
		fmt.Fprintf(bw, "%s hw=%s base=%s\n", it.ID, it.Labels["hw"], it.Labels["base"])
	}
	return bw.Flush()
}

func (f *Fleet) place(id string) (hw string, base Base) {
	return f.opts.Hardware.Pick(hash01(id, "hw")), f.opts.Bases[int(hash01(id, "base")*float64(len(f.opts.Bases)))]
}

func (f *Fleet) newDrone(i int) (*SimDrone, error) {
	id := f.ID(i)
	hw, base := f.place(id)
	labels := map[string]string{"hw": hw, "base": base.Name}
	maps.Copy(labels, f.opts.Claims)
	seed := f.opts.Seed ^ uint64(i)*0x9e3779b97f4a7c15
	sensors := NewDrone(base, seed)
	sensors.Grounded = f.opts.Grounded
	version := f.opts.Version
	if len(f.opts.Versions) > 0 {
		version = f.opts.Versions.Pick(hash01(id, "version"))
	}
	d := &SimDrone{ID: id, Labels: labels, Sensors: sensors, fleet: f, dir: filepath.Join(f.opts.StateRoot, id), hw: hw, done: make(chan struct{}),
		factory: FactoryFirmware(version, f.opts.FactorySize), rot: hash01(id, "rot") < f.opts.CorruptBase,
		clk: &skewClock{}, link: f.links[i%len(f.links)]}
	if f.opts.MAVLink {
		if err := d.startVehicle(); err != nil {
			return nil, fmt.Errorf("drone %s: flight controller: %w", id, err)
		}
	}
	// Boot the first agent now, so that it exists once Run returns from
	// starting drones.
	if _, err := d.boot(); err != nil {
		return nil, fmt.Errorf("drone %s: %w", id, err)
	}
	f.mu.Lock()
	f.drones = append(f.drones, d)
	f.mu.Unlock()
	return d, nil
}

// boot creates the agent for the build in the drone's flash.
func (d *SimDrone) boot() (Firmware, error) {
	o := d.fleet.opts
	in, err := loadFirmware(d.dir, d.factory)
	if err != nil {
		return Firmware{}, err
	}
	in.hw, in.rot = d.hw, d.rot
	fw := in.current()
	d.Sensors.SetBuild(fw.On(d.hw), o.SampleInterval)
	opts := agent.Options{
		DeviceID: d.ID, Hardware: d.hw, Labels: d.Labels, Version: fw.Version,
		ServerURL: o.ServerURL, EnrollToken: o.EnrollToken,
		StateDir: d.dir, NoSync: true, OutboxMaxBytes: 256 << 10,
		SampleInterval: o.SampleInterval, BatchSize: o.BatchSize, HeartbeatInterval: o.HeartbeatInterval,
		BackoffMin: o.BackoffMin, BackoffMax: o.BackoffMax,
		Sensors: agent.Sensors(d.Sensors), Logger: o.Logger, Clock: d.clk,
		Transport: d.link.transport, HTTPClient: d.link.http, TLS: o.TLS,
	}
	if o.MemoryOutbox {
		if d.box == nil {
			d.box = newMemOutbox(opts.OutboxMaxBytes)
		}
		opts.Outbox = d.box
	}
	if len(o.Roots) > 0 {
		opts.Update = &agent.UpdateOptions{Roots: o.Roots, TrialSoak: o.TrialSoak, TrialDeadline: o.TrialDeadline, BuildTime: d.fleet.built,
			Policy:     update.Policy{MinBattery: o.MinBattery},
			Installers: map[string]update.Installer{proto.TargetAgent: in}}
	}
	var mav *mavlink.Source
	if d.vehicle != nil {
		if mav, err = d.mavSource(); err != nil {
			return fw, err
		}
		opts.Sensors = mavSensors{drone: d.Sensors, src: mav}
	}
	a, err := agent.New(opts)
	if err != nil {
		return fw, err
	}
	d.mu.Lock()
	d.agent = a
	d.mav = mav
	d.flash = in
	d.boots++
	d.mu.Unlock()
	if o.OnBoot != nil {
		o.OnBoot(d.ID, fw)
	}
	return fw, nil
}

// run runs the drone's agent, and starts it again whenever the simulated
// build reboots, until ctx ends. Its frame stays small (the work is in
// start and stopped): it is on the stack of every drone's longest-lived
// goroutine.
func (d *SimDrone) run(ctx context.Context, wg *sync.WaitGroup) {
	for first := true; ctx.Err() == nil; first = false {
		a, runCtx, cancel, crash, ok := d.start(ctx, first)
		if !ok {
			break
		}
		err := a.Run(runCtx)
		cancel()
		if !d.stopped(ctx, err, crash) {
			break
		}
	}
	close(d.done)
	wg.Done()
}

// start boots the build in the drone's flash (not on the first round: the
// fleet booted it) and arranges its simulated behaviour; ok is false when
// the drone stops for good (bricked, ctx done).
func (d *SimDrone) start(ctx context.Context, first bool) (a *agent.Agent, runCtx context.Context, cancel context.CancelFunc, crash, ok bool) {
	fw := d.Firmware()
	if !first {
		var err error
		if fw, err = d.boot(); err != nil {
			d.fleet.opts.Logger.Error("simulated drone does not boot", "device", d.ID, "err", err)
			return nil, nil, nil, false, false
		}
	}
	fw = fw.On(d.hw)
	if fw.Bricks(d.ID, d.hw) {
		d.mu.Lock()
		d.bricked = true
		d.mu.Unlock()
		<-ctx.Done()
		return nil, nil, nil, false, false
	}
	if fw.BootDelay > 0 && !sleep(ctx, time.Duration(fw.BootDelay)) {
		return nil, nil, nil, false, false
	}
	runCtx, cancel = context.WithCancel(ctx)
	switch {
	case fw.Behaviour == CrashLoop:
		crash = true
		time.AfterFunc(time.Second, cancel)
	case fw.Behaviour == Reboots && fw.RebootEvery > 0:
		crash = true
		time.AfterFunc(time.Duration(fw.RebootEvery), cancel)
	}
	d.mu.Lock()
	d.runCancel = cancel
	a = d.agent
	mav := d.mav
	d.mu.Unlock()
	runMAV(runCtx, mav)
	return a, runCtx, cancel, crash, true
}

// stopped handles the end of an agent run: a power cut keeps the drone off
// for a while, a simulated crash leaves no clean-stop marker. It reports
// whether the drone boots again.
func (d *SimDrone) stopped(ctx context.Context, err error, crash bool) bool {
	d.mu.Lock()
	cut, clean := d.cutFor, d.cleanOff
	d.runCancel = nil
	d.mu.Unlock()
	if ctx.Err() != nil {
		return false
	}
	if cut > 0 {
		crash = !clean
		ok := sleep(ctx, cut)
		d.mu.Lock()
		d.cutFor = 0
		d.mu.Unlock()
		if !ok {
			return false
		}
	}
	if crash && err == nil {
		// The simulated build died: a real process would not have
		// recorded its clean stop.
		_ = os.Remove(filepath.Join(d.dir, agent.CleanStopFile))
	}
	if err != nil && !errors.Is(err, update.ErrRestart) {
		d.fleet.opts.Logger.Error("simulated agent stopped", "device", d.ID, "err", err)
	}
	return sleep(ctx, 100*time.Millisecond)
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// sleep waits d, or less when ctx ends first (then false).
func sleep(ctx context.Context, d time.Duration) bool {
	return clock.Sleep(clock.Real{}, d, ctx.Done())
}

// Drones returns the drones started so far.
func (f *Fleet) Drones() []*SimDrone {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*SimDrone(nil), f.drones...)
}
