// Package scenario runs a rehearsal of a release on a simulated fleet: a
// scenario file says which fleet, which builds, what happens when
// (operator actions and faults) and what must hold; the runner plays it
// against a real control plane and writes a report.
package scenario

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// Scenario is a scenario file.
type Scenario struct {
	Name        string `yaml:"name" json:"name"`
	Description string `yaml:"description" json:"description,omitempty"`
	Fleet       Fleet  `yaml:"fleet" json:"fleet"`
	// ControlPlane: how the run starts its control plane.
	ControlPlane struct {
		// Args are more `hangar serve` flags, e.g. [--connect-rate, "500"].
		Args []string `yaml:"args" json:"args,omitempty"`
		// Replicas runs this many control planes behind a load balancer
		// (default 1); more than one needs store postgres and broker nats.
		// kill_control_plane and restart_control_plane then act on the
		// scheduler's leader.
		Replicas int `yaml:"replicas" json:"replicas,omitempty"`
		// Store: sqlite (default) or postgres (a private PostgreSQL
		// server the run starts).
		Store string `yaml:"store" json:"store,omitempty"`
		// Broker: embedded (default) or nats (a three-node NATS cluster
		// the run starts: the drones connect to any node).
		Broker string `yaml:"broker" json:"broker,omitempty"`
	} `yaml:"control_plane" json:"control_plane"`
	Builds   []Build       `yaml:"builds" json:"builds"`
	Timeline []Step        `yaml:"timeline" json:"timeline"`
	Expect   []Expectation `yaml:"expect" json:"expect"`
	// Timeout ends the run whatever happens (expectations then judge
	// what was reached). Default 10m.
	Timeout Duration `yaml:"timeout" json:"timeout"`
	// Settle: once the timeline is done, the run ends when every rollout
	// has been completed, aborted or paused for this long. Default 10s.
	Settle Duration `yaml:"settle" json:"settle"`
	// SampleEvery: how often the fleet's versions are recorded. Default 1s.
	SampleEvery Duration `yaml:"sample_every" json:"sample_every"`
}

// Fleet is the simulated fleet.
type Fleet struct {
	Devices int `yaml:"devices" json:"devices"`
	// MinDevices: a smaller --devices is raised to this (a rare hardware
	// revision needs a fleet large enough to hold some).
	MinDevices int `yaml:"min_devices" json:"min_devices,omitempty"`
	// Hardware revisions and their shares (default rev-a 20%, rev-b 50%,
	// rev-c 30%).
	Hardware map[string]float64 `yaml:"hardware" json:"hardware,omitempty"`
	// Version of the factory build (default 1.0.0).
	Version string `yaml:"version" json:"version,omitempty"`
	// Versions are the factory builds' shares, when the field runs several
	// (Version is then ignored): older builds a delta has no base for.
	Versions map[string]float64 `yaml:"versions" json:"versions,omitempty"`
	// CorruptBase is the share of drones whose flash decays after their
	// agent reported its build's digest: an offered delta no longer
	// applies, and they fall back to the full artifact.
	CorruptBase float64 `yaml:"corrupt_base" json:"corrupt_base,omitempty"`
	// FactorySize is the artifact size of the factory builds (default
	// 64 KiB, as builds): the base a delta from them patches.
	FactorySize int `yaml:"factory_size" json:"factory_size,omitempty"`
	// Grounded drones never fly (no deferral for flight).
	Grounded       bool     `yaml:"grounded" json:"grounded,omitempty"`
	MinBattery     uint8    `yaml:"min_battery" json:"min_battery,omitempty"`
	SampleInterval Duration `yaml:"sample_interval" json:"sample_interval,omitempty"` // default 1s
	BatchSize      int      `yaml:"batch_size" json:"batch_size,omitempty"`           // default 5
	StartRate      int      `yaml:"start_rate" json:"start_rate,omitempty"`           // drones started per second, default 500
	TrialSoak      Duration `yaml:"trial_soak" json:"trial_soak,omitempty"`           // default 2s
	TrialDeadline  Duration `yaml:"trial_deadline" json:"trial_deadline,omitempty"`   // default 1m
	Seed           uint64   `yaml:"seed" json:"seed,omitempty"`
	// MemoryOutbox keeps the drones' outboxes in memory: one descriptor
	// per drone instead of six (needed beyond ~3,000 drones per process
	// with a 20,000 descriptor limit).
	MemoryOutbox bool `yaml:"memory_outbox" json:"memory_outbox,omitempty"`
	// MAVLink gives every drone a simulated flight controller that its
	// agent reads over MAVLink, as on a real drone (hangar-agent --mavlink).
	MAVLink bool `yaml:"mavlink" json:"mavlink,omitempty"`
	// MQTTClient is the drones' MQTT transport: paho (default, the agent
	// binary's) or lite (one goroutine per connection instead of ten: a
	// ninth of the memory per connection, for 10,000 drones in a process).
	MQTTClient string `yaml:"mqtt_client" json:"mqtt_client,omitempty"`
}

// Build is a simulated build, signed and pushed as a release.
type Build struct {
	Version string `yaml:"version" json:"version"`
	// Counter is the release counter (default: 100 + its place in the list).
	Counter         uint64   `yaml:"counter" json:"counter,omitempty"`
	Behaviour       string   `yaml:"behaviour" json:"behaviour"`
	ErrorsPerMinute float64  `yaml:"errors_per_minute" json:"errors_per_minute,omitempty"`
	RebootEvery     Duration `yaml:"reboot_every" json:"reboot_every,omitempty"`
	DrainFactor     float64  `yaml:"drain_factor" json:"drain_factor,omitempty"`
	BootDelay       Duration `yaml:"boot_delay" json:"boot_delay,omitempty"`
	BrickFraction   float64  `yaml:"brick_fraction" json:"brick_fraction,omitempty"`
	BrickHardware   string   `yaml:"brick_hardware" json:"brick_hardware,omitempty"`
	Size            int      `yaml:"size" json:"size,omitempty"` // artifact bytes, default 64 KiB
	// OnlyHardware: the behaviour shows on this hardware revision only;
	// elsewhere the build is good.
	OnlyHardware string `yaml:"only_hardware" json:"only_hardware,omitempty"`
	// DeltaFrom are factory versions the release also ships a delta from
	// (hangar release sign --delta-from): drones running one of them get
	// the patch, the others the full artifact.
	DeltaFrom []string `yaml:"delta_from" json:"delta_from,omitempty"`
}

// Firmware is the simulated firmware of b.
func (b Build) Firmware() sim.Firmware {
	return sim.Firmware{Version: b.Version, Behaviour: b.Behaviour, ErrorsPerMinute: b.ErrorsPerMinute,
		RebootEvery: sim.Duration(b.RebootEvery), DrainFactor: b.DrainFactor, BootDelay: sim.Duration(b.BootDelay),
		BrickFraction: b.BrickFraction, BrickHardware: b.BrickHardware, Size: b.Size, OnlyHardware: b.OnlyHardware}
}

// Step is one thing that happens at a time after the start. Exactly one
// action is set.
type Step struct {
	At Duration `yaml:"at" json:"at"`
	// Push signs and pushes the build of this version.
	Push string `yaml:"push" json:"push,omitempty"`
	// Rollout creates (and by default starts) a rollout.
	Rollout *RolloutStep `yaml:"rollout" json:"rollout,omitempty"`
	// Pause, Resume, Abort, Promote, Revert act on the named rollout.
	Pause   string `yaml:"pause" json:"pause,omitempty"`
	Resume  string `yaml:"resume" json:"resume,omitempty"`
	Abort   string `yaml:"abort" json:"abort,omitempty"`
	Promote string `yaml:"promote" json:"promote,omitempty"`
	Revert  string `yaml:"revert" json:"revert,omitempty"`
	// Flight makes a share of the drones take off now and land after For.
	Flight *Flight `yaml:"flight" json:"flight,omitempty"`
	// PowerCut cuts the power of a share of the drones.
	PowerCut *PowerCut `yaml:"power_cut" json:"power_cut,omitempty"`
	// Offline switches a share of the drones off cleanly, for a long time
	// (Off), as drones left in a hangar.
	Offline *PowerCut `yaml:"offline" json:"offline,omitempty"`
	// KillControlPlane kills the control plane with SIGKILL and starts it
	// again after Down (only when the runner started it).
	KillControlPlane *Kill `yaml:"kill_control_plane" json:"kill_control_plane,omitempty"`
	// RestartControlPlane stops it (SIGTERM: the embedded broker drops
	// every connection) and starts it again after Down; the run waits
	// until every drone is connected again and records how long it took.
	RestartControlPlane *Kill `yaml:"restart_control_plane" json:"restart_control_plane,omitempty"`
	// KillBrokerNode kills a node of the NATS cluster (control_plane.broker:
	// nats) with SIGKILL, waits until every drone is connected again
	// (through the other nodes; the time is recorded) and starts the node
	// again after Down.
	KillBrokerNode *Kill `yaml:"kill_broker_node" json:"kill_broker_node,omitempty"`
	// LinkLoss cuts Percent of the drones' connections (MQTT and
	// downloads) every Flap, and refuses that share of new ones, For long.
	LinkLoss *LinkLoss `yaml:"link_loss" json:"link_loss,omitempty"`
	// ClockSkew skews the clocks of a share of the drones.
	ClockSkew *ClockSkew `yaml:"clock_skew" json:"clock_skew,omitempty"`
	// ClockSync sets every drone's clock right (NTP or GPS time came back).
	ClockSync bool `yaml:"clock_sync" json:"clock_sync,omitempty"`
	// HostileDevice enrolls a device of its own and misbehaves: malformed
	// CBOR, an oversized message, another drone's topics, wildcards, a
	// wrong password, another drone's identity.
	HostileDevice *Hostile `yaml:"hostile_device" json:"hostile_device,omitempty"`
	// SlowLink caps downloads (per connection) from now on; 0 lifts it.
	SlowLink *SlowLink `yaml:"slow_link" json:"slow_link,omitempty"`
	// Fakes enrolls devices that are not in the operator's inventory and
	// claim labels (a base, a hardware revision): real agents, with the
	// fleet's enrollment token, saying what they like about themselves.
	Fakes *Fakes `yaml:"fakes" json:"fakes,omitempty"`
}

// Fakes are enrolled devices that lie about where they belong.
type Fakes struct {
	Count  int               `yaml:"count" json:"count"`
	Claims map[string]string `yaml:"claims" json:"claims"`
}

// Hostile is a misbehaving device.
type Hostile struct {
	Victim string `yaml:"victim" json:"victim,omitempty"` // the drone whose topics it tries (default the first)
}

// LinkLoss is a period of lossy links.
type LinkLoss struct {
	Percent float64  `yaml:"percent" json:"percent"`
	For     Duration `yaml:"for" json:"for"`
	Flap    Duration `yaml:"flap" json:"flap"` // default 5s
}

// SlowLink is a bandwidth cap.
type SlowLink struct {
	BytesPerSecond int `yaml:"bytes_per_second" json:"bytes_per_second"`
}

// RolloutStep creates a rollout.
type RolloutStep struct {
	// Name refers to it in later steps and expectations.
	Name          string `yaml:"name" json:"name"`
	Release       string `yaml:"release" json:"release"`
	RevertRelease string `yaml:"revert_release" json:"revert_release,omitempty"`
	// Args are more `hangar rollout create` flags: --stages, --soak,
	// --selector, --on-failure, --auto-revert, ...
	Args []string `yaml:"args" json:"args,omitempty"`
	// NoStart creates it without starting it.
	NoStart bool `yaml:"no_start" json:"no_start,omitempty"`
}

// Flight is a flight of a share of the drones.
type Flight struct {
	Percent float64  `yaml:"percent" json:"percent"`
	For     Duration `yaml:"for" json:"for"`
}

// PowerCut is a power loss on a share of the drones.
type PowerCut struct {
	Percent float64  `yaml:"percent" json:"percent"`
	Off     Duration `yaml:"off" json:"off"` // default 2s
	// ClockReset: their clocks read 1970 when they come back (an RTC
	// without backup power).
	ClockReset bool `yaml:"clock_reset" json:"clock_reset,omitempty"`
}

// ClockSkew sets the clocks of a share of the drones Offset from real time.
type ClockSkew struct {
	Percent float64  `yaml:"percent" json:"percent"`
	Offset  Duration `yaml:"offset" json:"offset"`
}

// Kill is a kill -9 of the control plane.
type Kill struct {
	Down Duration `yaml:"down" json:"down"` // default 1s
}

// Expectation is one thing that must hold. Exactly one field is set.
type Expectation struct {
	// Rollout ends (or is, at the end of the run) in Status.
	RolloutStatus *RolloutStatus `yaml:"rollout_status" json:"rollout_status,omitempty"`
	// NeverOutsideCanary: no device outside the rollout's first stage ever
	// ran the version.
	NeverOutsideCanary *RolloutVersion `yaml:"never_outside_canary" json:"never_outside_canary,omitempty"`
	// AtMostRan: at most Percent of the fleet ever ran the version.
	AtMostRan *VersionShare `yaml:"at_most_ran" json:"at_most_ran,omitempty"`
	// AllOn: every drone runs the version from some moment within Within
	// of the start until the end of the run.
	AllOn *VersionWithin `yaml:"all_on" json:"all_on,omitempty"`
	// CanaryOn: every canary device that ran Version runs Now at the end.
	CanaryBackOn *CanaryBack `yaml:"canary_back_on" json:"canary_back_on,omitempty"`
	// NoneBricked: no drone is left without a build that starts.
	NoneBricked bool `yaml:"none_bricked" json:"none_bricked,omitempty"`
	// ReconnectWithin: after each restart of the control plane, every
	// drone is connected again within this time of its start.
	ReconnectWithin Duration `yaml:"reconnect_within" json:"reconnect_within,omitempty"`
	// NoneLost: every message the drones sent is stored: no hole in any
	// device boot's sequence numbers (with acknowledgement after storage,
	// nothing a drone deleted from its outbox is missing). Needs the
	// control plane the run starts.
	NoneLost bool `yaml:"none_lost" json:"none_lost,omitempty"`
	// HostileContained: after the hostile device's attempts the control
	// plane is healthy, every drone online, and it recorded the attempts
	// (decode errors, ACL denials, authentication failures).
	HostileContained bool `yaml:"hostile_contained" json:"hostile_contained,omitempty"`
	// ConnectRateAtMost: the broker never accepts more connections than
	// this in one second (measured while drones reconnect).
	ConnectRateAtMost int `yaml:"connect_rate_at_most" json:"connect_rate_at_most,omitempty"`
	// FakesExcluded: no fake (a fakes step) is a member of any rollout or
	// ever runs a build it was offered.
	FakesExcluded bool `yaml:"fakes_excluded" json:"fakes_excluded,omitempty"`
	// InstalledOnGround: no drone booted a new build while it flew, and
	// every drone a flight step sent up installed, after it landed.
	InstalledOnGround bool `yaml:"installed_on_ground" json:"installed_on_ground,omitempty"`
	// NoneFailed: no member of the rollout failed or timed out (a drone
	// switched off is waiting, not failing).
	NoneFailed string `yaml:"none_failed" json:"none_failed,omitempty"`
	// Deltas: at least so many members of the rollout fetched a delta,
	// the full artifact, and a delta given up for the full one, and the
	// deltas saved bytes over the air.
	Deltas *DeltaCounts `yaml:"deltas" json:"deltas,omitempty"`
}

type DeltaCounts struct {
	Rollout     string `yaml:"rollout" json:"rollout"`
	MinDelta    int    `yaml:"min_delta" json:"min_delta"`
	MinFull     int    `yaml:"min_full" json:"min_full"`
	MinFallback int    `yaml:"min_fallback" json:"min_fallback"`
}

type RolloutStatus struct {
	Rollout string `yaml:"rollout" json:"rollout"`
	Status  string `yaml:"status" json:"status"`
}

type RolloutVersion struct {
	Rollout string `yaml:"rollout" json:"rollout"`
	Version string `yaml:"version" json:"version"`
	// Hardware narrows it to the drones of this revision: none outside
	// the canary's devices of that revision ever ran the version.
	Hardware string `yaml:"hardware" json:"hardware,omitempty"`
}

type VersionShare struct {
	Version string  `yaml:"version" json:"version"`
	Percent float64 `yaml:"percent" json:"percent"`
}

type VersionWithin struct {
	Version string   `yaml:"version" json:"version"`
	Within  Duration `yaml:"within" json:"within"`
}

type CanaryBack struct {
	Rollout string `yaml:"rollout" json:"rollout"`
	Version string `yaml:"version" json:"version"` // the bad build
	Now     string `yaml:"now" json:"now"`         // the build they must run at the end
}

// Duration is a time.Duration written as "90s" in YAML and JSON.
type Duration time.Duration

func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// Load reads and checks a scenario file.
func Load(path string) (Scenario, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Scenario{}, err
	}
	return Parse(b)
}

// Parse reads a scenario (YAML, or JSON, which is YAML); unknown fields
// are errors, so a typo does not silently drop an expectation.
func Parse(b []byte) (Scenario, error) {
	var s Scenario
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&s); err != nil {
		return s, fmt.Errorf("scenario: %w", err)
	}
	s.defaults()
	return s, s.Validate()
}

func (s *Scenario) defaults() {
	f := &s.Fleet
	if f.Version == "" {
		f.Version = "1.0.0"
	}
	if f.SampleInterval == 0 {
		f.SampleInterval = Duration(time.Second)
	}
	if f.BatchSize == 0 {
		f.BatchSize = 5
	}
	if f.StartRate == 0 {
		f.StartRate = 500
	}
	if f.TrialSoak == 0 {
		f.TrialSoak = Duration(2 * time.Second)
	}
	if f.TrialDeadline == 0 {
		f.TrialDeadline = Duration(time.Minute)
	}
	if f.Seed == 0 {
		f.Seed = 1
	}
	for i := range s.Builds {
		if s.Builds[i].Counter == 0 {
			s.Builds[i].Counter = uint64(100 + i)
		}
		if s.Builds[i].Size == 0 {
			s.Builds[i].Size = 64 << 10
		}
	}
	for i := range s.Timeline {
		for _, a := range s.Timeline[i].actions() {
			a.setDefaults()
		}
	}
	if s.Timeout == 0 {
		s.Timeout = Duration(10 * time.Minute)
	}
	if s.Settle == 0 {
		s.Settle = Duration(10 * time.Second)
	}
	if s.SampleEvery == 0 {
		s.SampleEvery = Duration(time.Second)
	}
}

// linkFaults says whether the timeline breaks links (the runner then puts
// proxies between the drones and the control plane).
func (s Scenario) linkFaults() bool {
	for _, st := range s.Timeline {
		for _, a := range st.actions() {
			if a.breaksLinks() {
				return true
			}
		}
	}
	return false
}

// Validate checks references and that each step and expectation says one
// thing.
func (s Scenario) Validate() error {
	var errs []error
	if s.Name == "" {
		errs = append(errs, errors.New("no name"))
	}
	if s.Fleet.Devices <= 0 {
		errs = append(errs, errors.New("fleet.devices must be positive"))
	}
	if c := s.Fleet.MQTTClient; c != "" && c != "paho" && c != "lite" {
		errs = append(errs, fmt.Errorf("fleet.mqtt_client %q: paho or lite", c))
	}
	if err := s.checkControlPlane(); err != nil {
		errs = append(errs, err)
	}
	builds := map[string]bool{}
	for _, b := range s.Builds {
		switch b.Behaviour {
		case sim.Good, sim.CrashLoop, sim.FailHealth, sim.Errors, sim.Reboots, sim.Drain, sim.SlowBoot, sim.Brick:
		default:
			errs = append(errs, fmt.Errorf("build %s: unknown behaviour %q", b.Version, b.Behaviour))
		}
		if builds[b.Version] {
			errs = append(errs, fmt.Errorf("build %s defined twice", b.Version))
		}
		builds[b.Version] = true
	}
	if s.SampleEvery <= 0 || s.Timeout <= 0 || s.Settle <= 0 {
		errs = append(errs, errors.New("sample_every, timeout and settle must be positive"))
	}
	rollouts := map[string]bool{}
	c := &checkCtx{builds: builds, rollouts: rollouts}
	for i, st := range s.Timeline {
		if i > 0 && st.At < s.Timeline[i-1].At {
			errs = append(errs, fmt.Errorf("timeline[%d]: steps must be in time order", i))
		}
		if st.At < 0 {
			errs = append(errs, fmt.Errorf("timeline[%d]: negative time", i))
		}
		acts := st.actions()
		if len(acts) != 1 {
			errs = append(errs, fmt.Errorf("timeline[%d] at %v: %d actions, want exactly one", i, time.Duration(st.At), len(acts)))
			if st.Rollout != nil {
				rollouts[st.Rollout.Name] = true // not a second error in the steps that name it
			}
			continue
		}
		if err := acts[0].check(c); err != nil {
			errs = append(errs, fmt.Errorf("timeline[%d]: %w", i, err))
		}
	}
	for i, e := range s.Expect {
		ks := e.kinds()
		if len(ks) != 1 {
			errs = append(errs, fmt.Errorf("expect[%d]: %d expectations, want exactly one", i, len(ks)))
			continue
		}
		if err := ks[0].check(); err != nil {
			errs = append(errs, fmt.Errorf("expect[%d]: %w", i, err))
		}
		for _, ref := range ks[0].refs() {
			if !rollouts[ref] {
				errs = append(errs, fmt.Errorf("expect[%d]: no rollout %q in the timeline", i, ref))
			}
		}
	}
	return errors.Join(errs...)
}
