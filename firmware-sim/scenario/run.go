package scenario

import (
	"bytes"
	"context"
	"crypto/ed25519"
	crand "crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/controlplane/client"
	"github.com/hangarfleet/hangar/controlplane/delta"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
	"github.com/hangarfleet/hangar/proto"
)

// Options configure a run.
type Options struct {
	// Server is a control plane to use; empty starts one (Hangar, the
	// hangar binary, as a child process on a temporary data directory).
	Server string
	Hangar string
	// With Server: the admin token file, the fleet enrollment token, and
	// release keys the server trusts (a release key, the root-signed key
	// list and the root public key the drones pin).
	TokenFile, EnrollToken       string
	ReleaseKey, KeyList, RootPub string
	// Devices overrides the scenario's fleet size (0: keep it).
	Devices int
	// MQTTClient overrides the scenario's fleet.mqtt_client.
	MQTTClient string
	// SourceAddrs are local addresses the drones connect from (see
	// sim.FleetOptions).
	SourceAddrs []string
	// WorkDir holds keys, artifacts, the control plane's data and the
	// drones' state (default: a temporary directory, removed after).
	WorkDir string
	// NATSServer is the nats-server binary for a scenario on NATS
	// (default: next to hangar, then PATH).
	NATSServer string
	Logger     *slog.Logger
	// Progress gets a line per step and transition.
	Progress io.Writer
}

// Run plays the scenario and returns its report; the error is for runs
// that could not be carried out (not for expectations that fail).
func Run(ctx context.Context, s Scenario, o Options) (*Report, error) {
	if o.Devices > 0 {
		// A scenario may need more drones than asked: a rare revision
		// must exist in the fleet at all.
		s.Fleet.Devices = max(o.Devices, s.Fleet.MinDevices)
	}
	if o.MQTTClient != "" {
		s.Fleet.MQTTClient = o.MQTTClient
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.WorkDir == "" {
		dir, err := os.MkdirTemp("", "hangar-scenario-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		o.WorkDir = dir
	}
	r := &runner{s: s, o: o, ids: map[string]string{}, everRan: map[string]map[string]time.Duration{},
		rep: &Report{Scenario: s, Devices: s.Fleet.Devices}}
	return r.rep, r.run(ctx)
}

type runner struct {
	// flights are the drones a flight step sent up, with when they land;
	// firstNewBoot when each first booted a build of the scenario's, and
	// flyingBoots the boots of such a build while the drone was not landed.
	flights      map[string]time.Time
	firstNewBoot map[string]time.Time
	flyingBoots  []string

	s       Scenario
	o       Options
	cp      *ControlPlane // nil with Options.Server; the first replica
	cps     []*ControlPlane
	cluster *cluster // the PostgreSQL server, the NATS cluster, the balancer
	url     string   // the control plane, for operator actions
	tok     string   // admin token file
	rssLast int64    // the simulator's RSS at the last sample

	droneURL             string     // where the drones reach it
	enroll               string     // the fleet enrollment token
	mqttProxy, httpProxy *linkProxy // nil with Options.Server

	relKey, keyList, rootPub string

	fleet *sim.Fleet
	// fakes are fleets of devices that lie about where they belong (not
	// in the inventory); they run until the end.
	fakes    []*sim.Fleet
	fakesRun sync.WaitGroup
	fakeCtx  context.Context
	root     ed25519.PublicKey
	start    time.Time

	mu      sync.Mutex
	ids     map[string]string                   // rollout name -> id
	everRan map[string]map[string]time.Duration // version -> device -> first boot offset
	ran     map[string]map[string]time.Duration // everRan when the run ended
	rep     *Report
}

func (r *runner) progress(format string, args ...any) {
	at := time.Duration(0)
	if !r.start.IsZero() {
		at = time.Since(r.start).Round(100 * time.Millisecond)
	}
	fmt.Fprintf(r.o.Progress, "%7s  %s\n", at, fmt.Sprintf(format, args...))
}

func (r *runner) run(ctx context.Context) error {
	// Whatever setUp got to start is stopped, also when it fails halfway.
	defer func() {
		for _, cp := range r.cps {
			cp.Stop()
		}
		r.cluster.stop()
		for _, p := range []*linkProxy{r.mqttProxy, r.httpProxy} {
			if p != nil {
				p.Close()
			}
		}
	}()
	if err := r.setUp(ctx); err != nil {
		return err
	}
	fleetCtx, stopFleet := context.WithCancel(ctx)
	fleetDone := make(chan error, 1)
	go func() { fleetDone <- r.fleet.Run(fleetCtx) }()
	defer func() { stopFleet(); <-fleetDone }()
	var stopFakes context.CancelFunc
	r.fakeCtx, stopFakes = context.WithCancel(ctx)
	defer func() { stopFakes(); r.fakesRun.Wait() }()

	setupStart := time.Now()
	if err := r.waitOnline(ctx, 3*time.Minute); err != nil {
		return err
	}
	r.rep.Figures.FleetOnline = time.Since(setupStart).Seconds()
	r.progress("%d drones online in %.1f s", r.s.Fleet.Devices, r.rep.Figures.FleetOnline)

	r.mu.Lock() // drones already boot (and read start) concurrently
	r.start = time.Now()
	r.rep.Started = r.start
	r.mu.Unlock()
	sampleCtx, stopSampling := context.WithCancel(ctx)
	sampled := make(chan struct{})
	go func() { defer close(sampled); r.sampleLoop(sampleCtx) }()

	err := r.playTimeline(ctx)
	if err == nil {
		err = r.waitEnd(ctx)
	}
	stopSampling()
	<-sampled
	if err != nil {
		return err
	}
	r.rep.Duration = time.Since(r.start).Seconds()
	r.mu.Lock()
	ran := make(map[string]map[string]time.Duration, len(r.everRan))
	for v, m := range r.everRan {
		ran[v] = maps.Clone(m)
	}
	r.ran = ran
	r.mu.Unlock()
	if err := r.collect(ctx); err != nil {
		return err
	}
	r.judge()
	return nil
}

func (r *runner) setUp(ctx context.Context) error {
	// (the fleet is made by setUpFleet)
	if r.o.Server != "" {
		server := r.o.Server
		if !strings.Contains(server, "://") {
			server = "https://" + server // host:port, as for the hangar CLI
		}
		r.url, r.tok, r.droneURL = server, r.o.TokenFile, server
		r.relKey, r.keyList, r.rootPub = r.o.ReleaseKey, r.o.KeyList, r.o.RootPub
		if r.relKey == "" || r.keyList == "" || r.rootPub == "" || r.tok == "" || r.o.EnrollToken == "" {
			return errors.New("with --server: --token-file, --enroll-token, --release-key, --keys and --root-key are needed")
		}
	} else if err := r.keys(ctx); err != nil {
		return err
	}
	enroll := r.o.EnrollToken
	if r.o.Server == "" {
		bin := r.o.Hangar
		if bin == "" {
			var err error
			if bin, err = FindHangar(); err != nil {
				return err
			}
		}
		args := append([]string{"--root-key", r.rootPub}, r.s.ControlPlane.Args...)
		var err error
		if r.s.clustered() {
			if r.s.linkFaults() {
				return errors.New("link faults are not rehearsed with a clustered control plane")
			}
			if enroll, err = r.setUpCluster(ctx, bin, args); err != nil {
				return err
			}
		} else if enroll, err = r.setUpOne(ctx, bin, args); err != nil {
			return err
		}
	} else if b, err := os.ReadFile(enroll); err == nil {
		enroll = strings.TrimSpace(string(b))
	}
	r.enroll = enroll
	return r.setUpFleet(ctx)
}

// setUpOne starts the control plane as one child process and returns the
// fleet's enrollment token.
func (r *runner) setUpOne(ctx context.Context, bin string, args []string) (string, error) {
	fl := r.s.Fleet
	cp, err := NewControlPlane(bin, filepath.Join(r.o.WorkDir, "controlplane"), args...)
	if err != nil {
		return "", err
	}
	r.cps = []*ControlPlane{cp}
	// With link faults in the timeline, the drones reach it through
	// link proxies (the faults are injected there; the broker address
	// handed out at enrollment is the proxy's). Without, directly: a
	// proxied connection costs the simulator two more descriptors.
	r.droneURL = cp.URL()
	if r.s.linkFaults() {
		if r.mqttProxy, err = newLinkProxy(cp.mqtt, fl.Seed); err != nil {
			return "", err
		}
		if r.httpProxy, err = newLinkProxy(cp.http, fl.Seed+1); err != nil {
			return "", err
		}
		cp.args = append(cp.args, "--mqtt-advertise", "tcp://"+r.mqttProxy.Addr())
		r.droneURL = "http://" + r.httpProxy.Addr()
	}
	r.cp = cp
	if err := cp.Start(ctx); err != nil {
		return "", err
	}
	r.url, r.tok = cp.URL(), filepath.Join(cp.dir, "admin.token")
	b, err := os.ReadFile(filepath.Join(cp.dir, "enroll.token"))
	if err != nil {
		return "", err
	}
	r.progress("control plane %s (data %s)", r.url, cp.dir)
	return strings.TrimSpace(string(b)), nil
}

// setUpFleet makes the simulated fleet and imports its inventory.
func (r *runner) setUpFleet(ctx context.Context) error {
	fl := r.s.Fleet
	pemRoot, err := os.ReadFile(r.rootPub)
	if err != nil {
		return err
	}
	root, err := proto.ParsePublicKey(pemRoot)
	if err != nil {
		return fmt.Errorf("root key: %w", err)
	}
	r.root = root
	var hw sim.Mix
	for _, k := range sortedKeys(fl.Hardware) {
		hw = append(hw, sim.Weighted{Value: k, Weight: fl.Hardware[k]})
	}
	r.fleet, err = sim.NewFleet(sim.FleetOptions{
		ServerURL: r.droneURL, EnrollToken: r.enroll, Devices: fl.Devices, Prefix: "drone-",
		StateRoot: filepath.Join(r.o.WorkDir, "drones"), Hardware: hw, Version: fl.Version, Versions: versionMix(fl.Versions),
		FactorySize: r.factorySize(), CorruptBase: fl.CorruptBase,
		SampleInterval: time.Duration(fl.SampleInterval), BatchSize: fl.BatchSize, HeartbeatInterval: 5 * time.Second,
		BackoffMin: 100 * time.Millisecond, BackoffMax: 2 * time.Second, StartRate: fl.StartRate, Seed: fl.Seed,
		Logger: r.o.Logger, Roots: []ed25519.PublicKey{root}, Grounded: fl.Grounded,
		TrialSoak: time.Duration(fl.TrialSoak), TrialDeadline: time.Duration(fl.TrialDeadline), MinBattery: fl.MinBattery,
		OnBoot: r.booted, MemoryOutbox: fl.MemoryOutbox, MAVLink: fl.MAVLink, MQTTClient: fl.MQTTClient, SourceAddrs: r.o.SourceAddrs,
	})
	if err != nil {
		return err
	}
	return r.importInventory(ctx)
}

// importInventory does the operator's part before the drones enroll: the
// drones' hardware and bases, as the factory knows them, become their
// labels (what a drone says about itself never does).
func (r *runner) importInventory(ctx context.Context) error {
	c, err := r.api()
	if err != nil {
		return err
	}
	var changes []store.LabelChange
	for _, it := range r.fleet.Inventory() {
		changes = append(changes, store.LabelChange{Device: it.ID, Set: map[string]string{"hw": it.Labels["hw"], "base": it.Labels["base"]}})
	}
	res, err := c.Import(ctx, changes)
	if err != nil {
		return fmt.Errorf("import the inventory: %w", err)
	}
	r.progress("inventory imported: %d devices pre-provisioned, %d relabelled", res.Created, res.Labelled)
	return nil
}

// keys makes a root key, a release key and the signed key list.
func (r *runner) keys(ctx context.Context) error {
	dir := filepath.Join(r.o.WorkDir, "keys")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, name := range []string{"root", "release"} {
		pub, priv, _ := ed25519.GenerateKey(crand.Reader)
		privPEM, _ := proto.EncodePrivateKey(priv)
		pubPEM, _ := proto.EncodePublicKey(pub)
		if err := os.WriteFile(filepath.Join(dir, name+".key"), privPEM, 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name+".pub"), pubPEM, 0o644); err != nil {
			return err
		}
	}
	r.relKey, r.rootPub, r.keyList = filepath.Join(dir, "release.key"), filepath.Join(dir, "root.pub"), filepath.Join(dir, "keys.cose")
	return signKeyList(filepath.Join(dir, "root.key"), filepath.Join(dir, "release.pub"), r.keyList)
}

// api is a client of the control plane's API with the admin token.
func (r *runner) api() (*client.Client, error) {
	b, err := os.ReadFile(r.tok)
	if err != nil {
		return nil, fmt.Errorf("admin token: %w", err)
	}
	return client.New(r.url, strings.TrimSpace(string(b))), nil
}

func (r *runner) booted(device string, fw sim.Firmware) {
	var flying bool
	if r.fleet != nil && slices.ContainsFunc(r.s.Builds, func(b Build) bool { return b.Version == fw.Version }) {
		for _, d := range r.fleet.Drones() {
			if d.ID == device {
				st, _ := d.Sensors.Flight()
				flying = st != proto.FlightLanded
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if slices.ContainsFunc(r.s.Builds, func(b Build) bool { return b.Version == fw.Version }) {
		if r.firstNewBoot == nil {
			r.firstNewBoot = map[string]time.Time{}
		}
		if _, ok := r.firstNewBoot[device]; !ok {
			r.firstNewBoot[device] = time.Now()
		}
		if flying {
			r.flyingBoots = append(r.flyingBoots, device+"@"+fw.Version)
		}
	}
	m := r.everRan[fw.Version]
	if m == nil {
		m = map[string]time.Duration{}
		r.everRan[fw.Version] = m
	}
	if _, ok := m[device]; !ok {
		at := time.Duration(0)
		if !r.start.IsZero() {
			at = time.Since(r.start)
		}
		m[device] = at
	}
}

func (r *runner) waitOnline(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		// Drones switched off or powered down on purpose are not expected;
		// other enrolled devices (the hostile one) do not count.
		want := r.s.Fleet.Devices
		for _, d := range r.fleet.Drones() {
			if d.Off() {
				want--
			}
		}
		// The fleet summary is cheap; the device list (to leave out other
		// devices) only once the summary says enough are online: listing
		// 10,000 devices twice a second loads the control plane being
		// measured.
		c, err := r.api()
		var h store.FleetHealth
		var ds []store.Device
		if err == nil {
			h, err = c.Health(ctx)
		}
		if err == nil && h.Online >= want {
			on := true
			ds, _, err = c.Devices(ctx, client.DeviceQuery{Online: &on})
		} else {
			err = errors.New("not yet")
		}
		online := h.Online
		if err == nil {
			online = 0
			for _, d := range ds {
				if strings.HasPrefix(d.ID, "drone-") {
					online++
				}
			}
			if online >= want {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d drones online after %v", online, want, timeout)
		}
		if !sleepCtx(ctx, 500*time.Millisecond) {
			return ctx.Err()
		}
	}
}

// sleepCtx waits d, or less when ctx ends first (then false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	return clock.Sleep(clock.Real{}, d, ctx.Done())
}

func (r *runner) playTimeline(ctx context.Context) error {
	rng := rand.New(rand.NewPCG(r.s.Fleet.Seed, 7))
	for _, st := range r.s.Timeline {
		if wait := time.Until(r.start.Add(time.Duration(st.At))); wait > 0 && !sleepCtx(ctx, wait) {
			return ctx.Err()
		}
		what, err := r.do(ctx, st, rng)
		r.mu.Lock()
		ev := Event{At: time.Since(r.start).Seconds(), What: what}
		if err != nil {
			ev.Error = err.Error()
		}
		r.rep.Events = append(r.rep.Events, ev)
		r.mu.Unlock()
		if err != nil {
			r.progress("%s: FAILED: %v", what, err)
			return fmt.Errorf("%s: %w", what, err)
		}
		r.progress("%s", what)
	}
	return nil
}

func (r *runner) do(ctx context.Context, st Step, rng *rand.Rand) (string, error) {
	acts := st.actions()
	if len(acts) != 1 {
		return "", fmt.Errorf("a step with %d actions", len(acts))
	}
	return acts[0].run(ctx, r, rng)
}

// startFakes starts devices that enroll with the fleet's token and claim
// labels; they are not in the inventory, so no operator vouched for them.
func (r *runner) startFakes(ctx context.Context, fk *Fakes) (*sim.Fleet, error) {
	fl := r.s.Fleet
	r.mu.Lock()
	n := len(r.fakes)
	r.mu.Unlock()
	f, err := sim.NewFleet(sim.FleetOptions{
		ServerURL: r.droneURL, EnrollToken: r.enroll, Devices: fk.Count, Prefix: fmt.Sprintf("fake%d-", n),
		StateRoot: filepath.Join(r.o.WorkDir, fmt.Sprintf("fakes-%d", n)), Version: fl.Version, Claims: fk.Claims,
		SampleInterval: time.Duration(fl.SampleInterval), BatchSize: fl.BatchSize, HeartbeatInterval: 5 * time.Second,
		BackoffMin: 100 * time.Millisecond, BackoffMax: 2 * time.Second, Seed: fl.Seed + 7, Logger: r.o.Logger,
		Roots: []ed25519.PublicKey{r.root}, Grounded: true, OnBoot: r.booted, MemoryOutbox: true,
	})
	if err != nil {
		return nil, err
	}
	r.fakesRun.Add(1)
	go func() {
		defer r.fakesRun.Done()
		if err := f.Run(ctx); err != nil && ctx.Err() == nil {
			r.progress("fakes: %v", err)
		}
	}()
	// The fakes are enrolled and connected (the broker acknowledged their
	// messages) before the step is done: what follows meets them.
	deadline := time.Now().Add(time.Minute)
	for {
		up := 0
		for _, d := range f.Drones() {
			if a := d.Agent(); a != nil && a.Acked() > 0 {
				up++
			}
		}
		if up == fk.Count {
			return f, nil
		}
		if time.Now().After(deadline) {
			return f, fmt.Errorf("fakes: %d of %d connected after a minute", up, fk.Count)
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return f, ctx.Err()
		}
	}
}

func (r *runner) isFake(id string) bool { return strings.HasPrefix(id, "fake") }

func (r *runner) id(name string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ids[name]
}

func (r *runner) push(ctx context.Context, version string) error {
	var b *Build
	for i := range r.s.Builds {
		if r.s.Builds[i].Version == version {
			b = &r.s.Builds[i]
		}
	}
	dir := filepath.Join(r.o.WorkDir, "releases")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	art := filepath.Join(dir, version+".bin")
	if err := os.WriteFile(art, b.Firmware().Artifact(), 0o644); err != nil {
		return err
	}
	hw := sortedKeys(r.s.Fleet.Hardware)
	if len(hw) == 0 {
		hw = []string{"rev-a", "rev-b", "rev-c"}
	}
	manifest, err := signManifest(r.relKey, art, proto.Manifest{Version: version, Target: proto.TargetAgent, Hardware: hw,
		Arch: []string{"amd64", "arm64", "arm"}, Counter: b.Counter})
	if err != nil {
		return err
	}
	keys, err := os.ReadFile(r.keyList)
	if err != nil {
		return err
	}
	f, err := os.Open(art)
	if err != nil {
		return err
	}
	defer f.Close()
	c, err := r.api()
	if err != nil {
		return err
	}
	if _, err = c.PushRelease(ctx, manifest, keys, f); err != nil {
		return err
	}
	newBuild := b.Firmware().Artifact()
	full, err := proto.DecodeManifestUnverified(manifest)
	if err != nil {
		return err
	}
	for _, from := range b.DeltaFrom {
		// As hangar release sign --delta-from: a patch from the factory
		// build of that version, under a manifest naming base and patch.
		base := sim.FactoryFirmware(from, r.factorySize()).Artifact()
		patch, err := delta.Make(base, newBuild)
		if err != nil {
			return fmt.Errorf("delta from %s: %w", from, err)
		}
		ps, bs := sha256.Sum256(patch), sha256.Sum256(base)
		m := proto.Manifest{Version: version, Target: proto.TargetAgent, Hardware: hw, Arch: []string{"amd64", "arm64", "arm"}, Counter: b.Counter,
			Created: full.Created, Expires: full.Expires, // the full release's
			Delta: &proto.Delta{BaseSHA256: bs[:], BaseSize: uint64(len(base)), PatchSHA256: ps[:], PatchSize: uint64(len(patch)), BaseVersion: from}}
		dm, err := signManifest(r.relKey, art, m)
		if err != nil {
			return err
		}
		if _, err := c.PushDelta(ctx, proto.TargetAgent, version, dm, bytes.NewReader(patch)); err != nil {
			return fmt.Errorf("push the delta from %s: %w", from, err)
		}
	}
	return nil
}

// factorySize is the size of the factory builds' artifacts (by default
// that of builds, so that a delta from one is a patch release's).
func (r *runner) factorySize() int {
	if r.s.Fleet.FactorySize > 0 {
		return r.s.Fleet.FactorySize
	}
	return 64 << 10
}

func versionMix(shares map[string]float64) sim.Mix {
	var m sim.Mix
	for _, k := range sortedKeys(shares) {
		m = append(m, sim.Weighted{Value: k, Weight: shares[k]})
	}
	return m
}

// status reads a rollout's status over the API.
func (r *runner) status(ctx context.Context, id string) (rollout.StatusReport, error) {
	c, err := r.api()
	if err != nil {
		return rollout.StatusReport{}, err
	}
	return c.Rollout(ctx, id)
}

func (r *runner) sampleLoop(ctx context.Context) {
	t := time.NewTicker(time.Duration(r.s.SampleEvery))
	defer t.Stop()
	for {
		r.sample(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (r *runner) sample(ctx context.Context) {
	s := Sample{At: time.Since(r.start).Seconds(), Versions: map[string]int{}, Rollouts: map[string]RolloutSample{}}
	for _, d := range r.fleet.Drones() {
		if d.Bricked() {
			s.Bricked++
			continue
		}
		s.Versions[d.Firmware().Version]++
	}
	r.mu.Lock()
	ids := maps.Clone(r.ids)
	r.mu.Unlock()
	for name, id := range ids {
		if rep, err := r.status(ctx, id); err == nil {
			s.Rollouts[name] = RolloutSample{Status: string(rep.State.Status), Stage: rep.State.Stage + 1}
		}
	}
	rss := selfRSS()
	r.mu.Lock()
	r.rep.Samples = append(r.rep.Samples, s)
	r.rssLast, r.rep.Figures.SimRSSPeakBytes = rss, max(r.rep.Figures.SimRSSPeakBytes, rss)
	r.mu.Unlock()
}

// waitEnd waits until every rollout has settled (completed, aborted, or
// paused and not changing) for the settle time, and every "all on"
// expectation has been met or is past its time; or until the timeout.
func (r *runner) waitEnd(ctx context.Context) error {
	deadline := r.start.Add(time.Duration(r.s.Timeout))
	var stableSince time.Time
	last := ""
	for time.Now().Before(deadline) {
		r.mu.Lock()
		ids := maps.Clone(r.ids)
		var lastSample Sample
		if n := len(r.rep.Samples); n > 0 {
			lastSample = r.rep.Samples[n-1]
		}
		r.mu.Unlock()
		key, settled := "", true
		for _, name := range sortedKeys(ids) {
			rep, err := r.status(ctx, ids[name])
			if err != nil {
				settled = false
				break
			}
			st := rep.State.Status
			key += fmt.Sprintf("%s=%s/%d/%v;", name, st, rep.State.Stage, rep.Counts)
			if st == rollout.StatusRunning || st == rollout.StatusCreated {
				settled = false
			}
		}
		for _, e := range r.s.Expect {
			if a := e.AllOn; a != nil && time.Since(r.start) < time.Duration(a.Within) && lastSample.Versions[a.Version] < r.s.Fleet.Devices {
				settled = false
			}
		}
		key += fmt.Sprint(lastSample.Versions)
		if !settled || key != last {
			stableSince, last = time.Now(), key
		} else if time.Since(stableSince) >= time.Duration(r.s.Settle) {
			return nil
		}
		if !sleepCtx(ctx, 500*time.Millisecond) {
			return ctx.Err()
		}
	}
	r.progress("timeout (%v) reached", time.Duration(r.s.Timeout))
	r.rep.TimedOut = true
	return nil
}

// collect reads what the control plane recorded: each rollout's final
// status, transitions and members.
func (r *runner) collect(ctx context.Context) error {
	r.rep.Rollouts = map[string]RolloutReport{}
	for name, id := range r.ids {
		rep, err := r.status(ctx, id)
		if err != nil {
			return err
		}
		rr := RolloutReport{ID: id, Release: rep.Spec.Release.String(), Status: string(rep.State.Status), Stage: rep.State.Stage + 1,
			Reason: rep.State.Reason, Counts: rep.Counts, Gates: rep.Gates, Transfer: rep.Transfer}
		c, err := r.api()
		if err != nil {
			return err
		}
		evs, err := c.RolloutEvents(ctx, id)
		if err != nil {
			return err
		}
		for i := len(evs) - 1; i >= 0; i-- {
			e := evs[i]
			rr.Events = append(rr.Events, RolloutEvent{At: e.Time.Sub(r.start).Seconds(), Actor: e.Actor, Action: e.Action,
				From: e.Attrs["from"], To: e.Attrs["to"], Reason: e.Reason})
		}
		ms, err := c.RolloutDevices(ctx, id, "")
		if err != nil {
			return err
		}
		rr.Members = map[rollout.MemberState]int{}
		for _, m := range ms {
			if m.Stage == 1 {
				rr.Canary = append(rr.Canary, m.Device)
			}
			rr.Members[m.State]++
			if r.isFake(m.Device) {
				rr.Fakes = append(rr.Fakes, m.Device)
			}
		}
		for _, e := range rr.Events {
			if e.Action == "rollout.transition" && e.To == string(rollout.StatusCompleted) {
				rr.CompletedAt = e.At
			}
		}
		r.rep.Rollouts[name] = rr
	}
	r.rep.EverRan = map[string]int{}
	for v, devs := range r.ran {
		r.rep.EverRan[v] = len(devs)
	}
	hw := r.hardware()
	for _, b := range r.s.Builds {
		if b.Behaviour != sim.Good {
			br := BlastRadius{Version: b.Version, Behaviour: b.Behaviour, Hardware: b.OnlyHardware,
				Devices: len(r.ran[b.Version]), Percent: 100 * float64(len(r.ran[b.Version])) / float64(r.s.Fleet.Devices)}
			if b.OnlyHardware != "" {
				for dev := range r.ran[b.Version] {
					if hw[dev] == b.OnlyHardware {
						br.OnHardware++
					}
				}
			}
			r.rep.BlastRadius = append(r.rep.BlastRadius, br)
		}
	}
	for _, d := range r.fleet.Drones() {
		if d.Bricked() {
			r.rep.Bricked = append(r.rep.Bricked, d.ID)
		}
	}
	slices.Sort(r.rep.Bricked)
	// The last sample's RSS: the fleet running, before this analysis
	// (which reads the control plane's database) adds its own.
	if rss := r.rssLast; rss > 0 {
		r.rep.Figures.SimRSSBytes = rss
		r.rep.Figures.RSSPerDroneBytes = rss / int64(r.s.Fleet.Devices)
	}
	for _, e := range r.s.Expect {
		if e.NoneLost {
			// Let the drones' outboxes drain and ingest commit first.
			sleepCtx(ctx, 3*time.Second)
			g, err := r.gaps(ctx)
			if err != nil {
				return err
			}
			r.rep.Gaps = g
			break
		}
	}
	if r.cp != nil {
		r.rep.Figures.ControlPlaneStarts = r.cp.Starts()
		if r.mqttProxy != nil {
			r.rep.Figures.LinkCuts = r.mqttProxy.cutCount() + r.httpProxy.cutCount()
		}
	}
	return nil
}

// hardware maps each drone of the fleet to its revision.
func (r *runner) hardware() map[string]string {
	out := map[string]string{}
	for _, it := range r.fleet.Inventory() {
		out[it.ID] = it.Labels["hw"]
	}
	return out
}

// judge evaluates every expectation.
func (r *runner) judge() {
	rep := r.rep
	n := r.s.Fleet.Devices
	rep.Passed = true
	for _, e := range r.s.Expect {
		res := Result{Expectation: e.String(), OK: true}
		if ks := e.kinds(); len(ks) == 1 {
			ks[0].judge(r, rep, n, &res)
		}
		if !res.OK {
			rep.Passed = false
		}
		rep.Results = append(rep.Results, res)
	}
}

func maxOn(ss []Sample, v string) int {
	m := 0
	for _, s := range ss {
		m = max(m, s.Versions[v])
	}
	return m
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// selfRSS is this process's resident set size.
func selfRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}
