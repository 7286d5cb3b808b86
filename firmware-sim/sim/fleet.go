// Package sim runs fleets of virtual drones: each is a real agent (the same
// agent.New the device binary runs) with simulated sensors, connected to a
// real control plane over real MQTT and HTTP.
package sim

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/agent"
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
	Devices     int
	Prefix      string // device ids are Prefix + zero-padded index
	StateRoot   string // per-device state directories; a temp dir when empty
	Hardware    Mix
	Bases       []Base
	Version     string

	SampleInterval    time.Duration
	BatchSize         int
	HeartbeatInterval time.Duration
	BackoffMin        time.Duration
	BackoffMax        time.Duration
	// StartRate is how many drones start per second (0: all at once).
	StartRate int
	Seed      uint64
	Logger    *slog.Logger
}

// Fleet is a running simulated fleet.
type Fleet struct {
	opts   FleetOptions
	mu     sync.Mutex
	drones []*SimDrone
}

// SimDrone is one virtual drone.
type SimDrone struct {
	ID      string
	Labels  map[string]string
	Sensors *Drone
	Agent   *agent.Agent
	cancel  context.CancelFunc
	done    chan struct{}
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
	return &Fleet{opts: opts}, nil
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
	for i := range f.opts.Devices {
		if ctx.Err() != nil {
			break
		}
		d, err := f.newDrone(i)
		if err != nil {
			return err
		}
		dctx, cancel := context.WithCancel(ctx)
		d.cancel = cancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(d.done)
			if err := d.Agent.Run(dctx); err != nil {
				f.opts.Logger.Error("drone stopped", "device", d.ID, "err", err)
			}
		}()
		if interval > 0 {
			select {
			case <-time.After(interval):
			case <-ctx.Done():
			}
		}
	}
	wg.Wait()
	return nil
}

func (f *Fleet) newDrone(i int) (*SimDrone, error) {
	id := f.ID(i)
	hw := f.opts.Hardware.Pick(hash01(id, "hw"))
	base := f.opts.Bases[int(hash01(id, "base")*float64(len(f.opts.Bases)))]
	labels := map[string]string{"hw": hw, "base": base.Name}
	seed := f.opts.Seed ^ uint64(i)*0x9e3779b97f4a7c15
	sensors := NewDrone(base, seed)
	a, err := agent.New(agent.Options{
		DeviceID: id, Hardware: hw, Labels: labels, Version: f.opts.Version,
		ServerURL: f.opts.ServerURL, EnrollToken: f.opts.EnrollToken,
		StateDir: filepath.Join(f.opts.StateRoot, id), NoSync: true, OutboxMaxBytes: 256 << 10,
		SampleInterval: f.opts.SampleInterval, BatchSize: f.opts.BatchSize, HeartbeatInterval: f.opts.HeartbeatInterval,
		BackoffMin: f.opts.BackoffMin, BackoffMax: f.opts.BackoffMax,
		Sensors: sensors, Logger: f.opts.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("drone %s: %w", id, err)
	}
	d := &SimDrone{ID: id, Labels: labels, Sensors: sensors, Agent: a, done: make(chan struct{})}
	f.mu.Lock()
	f.drones = append(f.drones, d)
	f.mu.Unlock()
	return d, nil
}

// Drones returns the drones started so far.
func (f *Fleet) Drones() []*SimDrone {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*SimDrone(nil), f.drones...)
}
