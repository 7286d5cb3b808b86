// Package agent is the hangar device agent as a library: it samples
// telemetry, queues it in an on-disk outbox, sends it over MQTT when the
// link allows, and answers commands from the control plane.
//
// The agent is built from small seams passed in Options (Clock, Sensors,
// Transport, Store, Logger): nil means the real default, and the fleet
// simulator runs the same code with simulated ones.
package agent

import (
	"context"
	"crypto"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/agent/outbox"
	"github.com/hangarfleet/hangar/agent/statedir"
	"github.com/hangarfleet/hangar/agent/transport/mqtt"
	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// Defaults of Options.
const (
	DefaultSampleInterval    = time.Second
	DefaultBatchSize         = 10
	DefaultHeartbeatInterval = 30 * time.Second
	DefaultBackoffMin        = time.Second
	DefaultBackoffMax        = 2 * time.Minute
	DefaultKeepAlive         = 30 * time.Second
	DefaultSendWindow        = 16
)

// Sensors produce telemetry readings.
type Sensors interface {
	// Read fills a sample taken at now. The agent sets T, Errors, Reboots
	// and Link (when left zero) itself.
	Read(now time.Time) proto.Sample
}

// FlightSource is a Sensors that knows the flight state now, in more
// words than a sample holds (the flight controller over MAVLink): the
// update policy asks it rather than the latest sample. ok is false when
// it has no flight source configured.
type FlightSource interface {
	FlightNow(now time.Time) (state proto.FlightState, why string, battery *uint8, ok bool)
}

// PayloadReporter is a Sensors that knows versions of payloads the agent
// does not install itself (the flight controller's firmware): they are
// reported in the hello with the installed payloads.
type PayloadReporter interface {
	Payloads() map[string]string
}

// Store is the agent's state directory: small durable files and the
// outbox. statedir.Dir with an outbox.Outbox is the default.
type Store interface {
	Load(name string) ([]byte, error) // an error wrapping fs.ErrNotExist when absent
	Save(name string, data []byte) error
	Remove(name string) error
}

// Outbox queues encoded messages until the broker acknowledges them.
type Outbox interface {
	Append(l outbox.Lane, rec []byte) error
	Peek(max int) ([]outbox.Record, error)
	Ack(ids ...outbox.ID) error
	TakeDropped() uint64
	Notify() <-chan struct{}
	Stats() outbox.Stats
	Close() error
}

// Options configure an agent. DeviceID, ServerURL (or a stored credential)
// and StateDir (or Store and Outbox) are required.
type Options struct {
	DeviceID    string
	Hardware    string
	Labels      map[string]string
	Version     string // agent version reported to the control plane
	ServerURL   string // control plane base URL, used to enroll
	EnrollToken string

	StateDir       string
	OutboxMaxBytes int64
	// NoSync skips fsync in the state directory and outbox (simulators).
	NoSync bool

	SampleInterval    time.Duration
	BatchSize         int // samples per telemetry batch
	HeartbeatInterval time.Duration
	KeepAlive         time.Duration
	BackoffMin        time.Duration
	BackoffMax        time.Duration
	SendWindow        int // QoS1 messages in flight at once

	// Update turns on signed updates.
	Update *UpdateOptions

	Clock      clock.Clock
	Sensors    Sensors
	Transport  Transport
	Store      Store
	Outbox     Outbox
	HTTPClient *http.Client
	// TLS, when set, is the only trust the agent has for the control
	// plane: enrollment, downloads and the broker are reached over TLS
	// with it, and a plaintext broker URL is refused.
	TLS *tls.Config
	// Keys makes and keeps the device's private keys (default FileKeys:
	// software keys in the state directory).
	Keys   Keys
	Logger *slog.Logger
	// Rand drives backoff jitter; seeded randomly when nil.
	Rand *rand.Rand
}

// Validate reports missing or inconsistent options.
func (o *Options) Validate() error {
	if err := proto.ValidateDeviceID(o.DeviceID); err != nil {
		return err
	}
	if err := proto.ValidateLabels(o.Labels); err != nil {
		return err
	}
	if o.StateDir == "" && (o.Store == nil || o.Outbox == nil) {
		return errors.New("agent: a state directory is required")
	}
	if o.BatchSize > proto.MaxSamples {
		return fmt.Errorf("agent: batch size %d above %d", o.BatchSize, proto.MaxSamples)
	}
	if o.SampleInterval < 0 || o.HeartbeatInterval < 0 || o.BackoffMin < 0 || o.BackoffMax < o.BackoffMin {
		return errors.New("agent: negative interval, or backoff max below min")
	}
	return nil
}

func (o *Options) setDefaults() {
	if o.SampleInterval == 0 {
		o.SampleInterval = DefaultSampleInterval
	}
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.HeartbeatInterval == 0 {
		o.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = DefaultKeepAlive
	}
	if o.BackoffMin == 0 {
		o.BackoffMin = DefaultBackoffMin
	}
	if o.BackoffMax == 0 {
		o.BackoffMax = DefaultBackoffMax
	}
	if o.SendWindow == 0 {
		o.SendWindow = DefaultSendWindow
	}
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Keys == nil {
		o.Keys = FileKeys{}
	}
	if o.Transport == nil {
		o.Transport = &mqtt.Transport{}
	}
	if o.Rand == nil {
		o.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	if o.Version == "" {
		o.Version = "dev"
	}
}

// Agent is one device agent.
type Agent struct {
	opts  Options
	log   *slog.Logger
	clk   clock.Clock
	store Store
	box   Outbox

	boot    uint64
	reboots uint32
	seq     atomic.Uint64
	conns   atomic.Uint64 // connection nonce
	errors  atomic.Uint32

	mu        sync.Mutex
	cred      *Credential
	ident     *identity // the device certificate and its key, once issued
	connected bool
	lastErr   error
	// A certificate request in flight over the connection.
	renewKey    crypto.Signer
	renewStored []byte
	renewID     string
	renewAsked  time.Time
	// renewInvited: the control plane offered a password device a
	// certificate; renewRefused: when it last refused one.
	renewInvited bool
	renewRefused time.Time
	renewNow     chan struct{}
	// tls is Options.TLS presenting the device certificate when asked.
	tls *tls.Config
	// reconnect ends the session so that the next one uses a new
	// credential.
	reconnect chan struct{}

	cmds         chan inbound
	started      time.Time
	updater      *update.Updater
	latest       atomic.Pointer[proto.Sample]
	lastSampleAt atomic.Int64
	// helloNow asks the sender to publish the state at once (the installed
	// versions changed).
	helloNow chan struct{}
	// acked counts messages the broker acknowledged (tests, simulator).
	acked atomic.Uint64
}

// New prepares an agent: opens the state directory and outbox, and starts
// a new boot epoch. Run does the work.
func New(opts Options) (*Agent, error) {
	opts.setDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	a := &Agent{opts: opts, clk: opts.Clock, cmds: make(chan inbound, 8), helloNow: make(chan struct{}, 1), reconnect: make(chan struct{}, 1), renewNow: make(chan struct{}, 1)}
	if opts.TLS != nil {
		a.tls = opts.TLS.Clone()
		a.tls.GetClientCertificate = a.clientCertificate
	}
	if t, ok := transportOf(a.opts.HTTPClient); ok && a.tls != nil && t.TLSClientConfig != nil && t.TLSClientConfig.GetClientCertificate == nil {
		// A client of the caller's (a simulator's, with its own dialer):
		// it presents the device certificate too.
		t = t.Clone()
		t.TLSClientConfig.GetClientCertificate = a.clientCertificate
		c := *a.opts.HTTPClient
		c.Transport = t
		a.opts.HTTPClient = &c
	}
	if a.opts.HTTPClient == nil {
		a.opts.HTTPClient = &http.Client{Timeout: 30 * time.Second}
		if a.tls != nil {
			a.opts.HTTPClient.Transport = &http.Transport{TLSClientConfig: a.tls, Proxy: http.ProxyFromEnvironment,
				TLSHandshakeTimeout: 10 * time.Second, IdleConnTimeout: 90 * time.Second}
		}
	}
	a.log = opts.Logger.With("component", "agent", "device", opts.DeviceID)
	a.store = opts.Store
	if a.store == nil {
		d, err := statedir.Open(opts.StateDir, opts.NoSync)
		if err != nil {
			return nil, err
		}
		a.store = d
	}
	a.box = opts.Outbox
	if a.box == nil {
		ob, err := outbox.Open(opts.StateDir+"/outbox", outbox.Options{MaxBytes: opts.OutboxMaxBytes, NoSync: opts.NoSync, Logger: opts.Logger})
		if err != nil {
			return nil, err
		}
		a.box = ob
	}
	if err := a.startEpoch(); err != nil {
		a.box.Close()
		return nil, err
	}
	if c, err := loadCredential(a.store); err == nil {
		a.cred = c
		if id, err := a.loadIdentity(); err == nil {
			a.ident = id
		} else if !errors.Is(err, fs.ErrNotExist) || c.Password == "" {
			a.log.Warn("device certificate unreadable; enrolling again", "err", err)
			a.cred = nil
		}
	}
	if err := a.setupUpdater(); err != nil {
		a.box.Close()
		return nil, err
	}
	return a, nil
}

func transportOf(c *http.Client) (*http.Transport, bool) {
	if c == nil {
		return nil, false
	}
	t, ok := c.Transport.(*http.Transport)
	return t, ok
}

// startEpoch picks this run's boot epoch: the wall clock in seconds, but
// always above the previous epoch, so that (boot, seq) never repeats even
// when the clock reads 1970 after a power cut.
func (a *Agent) startEpoch() error {
	prev := uint64(0)
	if b, err := a.store.Load("boot"); err == nil {
		prev, _ = strconv.ParseUint(string(b), 10, 64)
	}
	now := uint64(max(a.clk.Now().Unix(), 0))
	a.boot = max(prev+1, now)
	if err := a.store.Save("boot", []byte(strconv.FormatUint(a.boot, 10))); err != nil {
		return fmt.Errorf("boot epoch: %w", err)
	}
	if b, err := a.store.Load("reboots"); err == nil {
		n, _ := strconv.ParseUint(string(b), 10, 32)
		a.reboots = uint32(n)
	}
	// A start after a clean stop or a planned restart into a new build
	// is not a reboot: the counter is the health signal of unplanned
	// restarts (crashes, watchdog resets, power cuts).
	_, cleanErr := a.store.Load(CleanStopFile)
	if prev > 0 && cleanErr != nil {
		a.reboots++
	}
	_ = a.store.Remove(CleanStopFile)
	_ = a.store.Save("reboots", []byte(strconv.FormatUint(uint64(a.reboots), 10)))
	return nil
}

// CleanStopFile marks in the state directory that the last run ended as
// planned.
const CleanStopFile = "clean-stop"

// Boot is this run's boot epoch.
func (a *Agent) Boot() uint64 { return a.boot }

// Acked is how many messages the broker has acknowledged in this run.
func (a *Agent) Acked() uint64 { return a.acked.Load() }

// Connected reports whether the agent has a live broker connection.
func (a *Agent) Connected() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.connected
}

// OutboxStats reports the outbox's state.
func (a *Agent) OutboxStats() outbox.Stats { return a.box.Stats() }

// CountError adds to the error counter reported in telemetry.
func (a *Agent) CountError() { a.errors.Add(1) }

// Run samples, sends and handles commands until ctx is done, then flushes
// the samples in hand to the outbox and disconnects cleanly.
//
// An agent that must leave for a new build of itself (update.RestartExit)
// returns update.ErrRestart.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.settle(ctx); err != nil {
		a.box.Close()
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	a.announce()
	var wg sync.WaitGroup
	restart := a.spawn(ctx, cancel, &wg)
	a.connectLoop(ctx)
	wg.Wait()
	cancel()
	_ = a.store.Save(CleanStopFile, nil)
	a.box.Close()
	a.log.Info("agent stopped")
	return *restart
}

// spawn starts the sampler, the command handler and the updater; the
// updater sets *restart and cancels when a new build must start.
func (a *Agent) spawn(ctx context.Context, cancel context.CancelFunc, wg *sync.WaitGroup) *error {
	restart := new(error)
	wg.Add(2)
	go func() { defer wg.Done(); a.sampleLoop(ctx) }()
	go func() { defer wg.Done(); a.commandLoop(ctx) }()
	if a.updater != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.updater.Run(ctx); errors.Is(err, update.ErrRestart) {
				*restart = err
				cancel()
			}
		}()
	}
	return restart
}

// settle finishes an interrupted update before the agent starts: this
// may start another build (update.ErrRestart).
func (a *Agent) settle(ctx context.Context) error {
	if a.updater == nil {
		return nil
	}
	if err := a.updater.Boot(ctx); err != nil {
		if errors.Is(err, update.ErrRestart) {
			_ = a.store.Save(CleanStopFile, nil)
			return err
		}
		a.log.Error("update recovery failed", "err", err)
	}
	return nil
}

func (a *Agent) announce() {
	a.started = a.clk.Now()
	a.log.Info("agent starting", "version", a.opts.Version, "boot", a.boot, "arch", runtime.GOARCH)
	a.Emit(proto.Event{Kind: proto.EventMessage, Code: "agent_started", Message: "agent " + a.opts.Version + " started",
		Attrs: map[string]string{"version": a.opts.Version}})
}

// Emit queues an event for the control plane. Events go out before any
// pending telemetry.
func (a *Agent) Emit(e proto.Event) {
	e.Boot, e.Seq = a.boot, a.seq.Add(1)
	if e.Time == 0 {
		e.Time = a.clk.Now().UnixMilli()
	}
	b, err := proto.Marshal(&e)
	if err == nil {
		err = a.box.Append(outbox.Events, b)
	}
	if err != nil {
		a.errors.Add(1)
		a.log.Error("event lost", "code", e.Code, "err", err)
	}
}

func (a *Agent) sampleLoop(ctx context.Context) {
	t := a.clk.NewTicker(a.opts.SampleInterval)
	defer t.Stop()
	var batch proto.Batch
	flush := func() {
		if len(batch.Samples) == 0 {
			return
		}
		batch.Boot, batch.Seq = a.boot, a.seq.Add(1)
		batch.Dropped = a.box.TakeDropped()
		b, err := proto.Marshal(&batch)
		if err == nil {
			err = a.box.Append(outbox.Telemetry, b)
		}
		if err != nil {
			a.errors.Add(1)
			a.log.Error("telemetry batch lost", "samples", len(batch.Samples), "err", err)
		}
		batch = proto.Batch{}
	}
	for {
		select {
		case <-ctx.Done():
			flush()
			return
		case now := <-t.C():
			s := a.read(now)
			if len(batch.Samples) == 0 {
				batch.Base = now.UnixMilli()
			}
			off := now.UnixMilli() - batch.Base
			if off < 0 || off > proto.MaxBatchSpan.Milliseconds() {
				// The clock stepped, or sampling is slow: start a new
				// batch at the new time.
				flush()
				batch.Base, off = now.UnixMilli(), 0
			}
			s.T = uint32(off)
			batch.Samples = append(batch.Samples, s)
			if len(batch.Samples) >= a.opts.BatchSize {
				flush()
			}
		}
	}
}

func (a *Agent) read(now time.Time) proto.Sample {
	var s proto.Sample
	if a.opts.Sensors != nil {
		s = a.opts.Sensors.Read(now)
	}
	s.Errors += a.errors.Load()
	s.Reboots = a.reboots
	if s.Link == 0 && a.Connected() {
		s.Link = 100
	}
	defer func() { a.latest.Store(&s); a.lastSampleAt.Store(time.Now().UnixNano()) }()
	if err := s.Validate(); err != nil {
		// A sensor gave nonsense: drop the offending fields rather than
		// the sample (the control plane would refuse the whole batch).
		a.errors.Add(1)
		a.log.Warn("invalid sensor reading", "err", err)
		s.Battery, s.Fix, s.Lat, s.Lon = nil, 0, 0, 0
		s.Link, s.CPU, s.Mem = min(s.Link, 100), min(s.CPU, 1000), min(s.Mem, 1000)
	}
	return s
}

// state is the hello (online) or goodbye/will (offline) for connection conn.
func (a *Agent) state(online bool, conn uint64) proto.State {
	s := proto.State{Proto: proto.ProtocolVersion, Online: online, Boot: a.boot, Conn: conn}
	if online {
		s.Time = a.clk.Now().UnixMilli()
		s.Hardware, s.Arch, s.Version, s.Labels = a.opts.Hardware, runtime.GOARCH, a.opts.Version, a.opts.Labels
		s.Release, s.Payloads = a.installed()
		s.Builds, s.Deltas = a.builds()
	}
	return s
}

// LastSeq is the sequence number of the last message this run queued.
func (a *Agent) LastSeq() uint64 { return a.seq.Load() }

// Connections counts the broker connections this run has attempted.
func (a *Agent) Connections() uint64 { return a.conns.Load() }

// LastSample is when the sampler last ran (zero before the first sample):
// a stale value means the agent is stuck.
func (a *Agent) LastSample() time.Time {
	if s := a.lastSampleAt.Load(); s != 0 {
		return time.Unix(0, s)
	}
	return time.Now()
}
