// Package daemon runs the agent as a device service: it reads the
// configuration, wires the real sensors (Linux /proc and /sys, and the
// flight stack's local socket) and runs the agent until it is stopped.
package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/guard"
	"github.com/hangarfleet/hangar/agent/mavlink"
	"github.com/hangarfleet/hangar/agent/sensors"
	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// Run is the hangar-agent command.
func Run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	return RunWith(ctx, args, getenv, stdout, stderr, nil)
}

// RunWith is Run with a last say on the agent's options: for programs that
// embed the agent with other seams (for example a build made to misbehave
// on purpose, to rehearse rollbacks).
func RunWith(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, edit func(*agent.Options)) error {
	cfg, err := ParseConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if cfg.ShowVersion {
		fmt.Fprintln(stdout, agent.BuildVersion)
		return nil
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	uo, err := updateOptions(cfg)
	if err != nil {
		return err
	}
	opts := agent.Options{
		Update:   uo,
		DeviceID: cfg.DeviceID, Hardware: cfg.Hardware, Labels: cfg.Labels, Version: agent.BuildVersion,
		ServerURL: cfg.Server, EnrollToken: cfg.EnrollToken, StateDir: cfg.StateDir, OutboxMaxBytes: cfg.OutboxMaxBytes,
		SampleInterval: cfg.SampleInterval, BatchSize: cfg.BatchSize, HeartbeatInterval: cfg.HeartbeatInterval,
	}
	if cfg.CAFile != "" {
		if opts.TLS, err = PinnedTLS(cfg.CAFile); err != nil {
			return err
		}
		if strings.HasPrefix(cfg.Server, "http://") {
			return fmt.Errorf("--server %s: with --ca-file the control plane is reached over https://", cfg.Server)
		}
	}
	if err := opts.Validate(); err != nil {
		return err
	}
	if cfg.CheckConfig {
		// What a start would refuse, without starting anything: the agent
		// that installs this build runs it so, with its own arguments and
		// environment, before the swap.
		fmt.Fprintln(stdout, agent.BuildVersion)
		return nil
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	ds := &deviceSensors{linux: sensors.NewLinux(sensors.LinuxOptions{Root: cfg.SysRoot, Logger: log})}
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	if cfg.FlightInput != "" {
		if path, ok := strings.CutPrefix(cfg.FlightInput, "unix:"); ok {
			_ = os.MkdirAll(filepath.Dir(path), 0o750)
		}
		fl, err := sensors.ListenFlight(cfg.FlightInput, log)
		if err != nil {
			// Telemetry and updates matter more than the flight stack's
			// input; without it the flight state is unknown, and an
			// unknown flight state never allows an install.
			log.Error("flight input unavailable; flight state unknown", "addr", cfg.FlightInput, "err", err)
		} else {
			ds.flight = fl
		}
	}
	if ds.flight != nil {
		fl := ds.flight
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fl.Run(ctx); err != nil {
				log.Error("flight input stopped", "err", err)
			}
		}()
		log.Info("listening for the flight stack", "addr", fl.Addr())
	}
	var running atomic.Pointer[agent.Agent] // for the flight controller's events
	if cfg.MAVLink != "" {
		if cfg.MAVLinkSystemID > 255 || cfg.MAVLinkComponentID == 0 || cfg.MAVLinkComponentID > 255 {
			return fmt.Errorf("--mavlink-system-id and --mavlink-component-id are 0-255 and 1-255")
		}
		if cfg.MAVLinkHeartbeatTimeout < 100*time.Millisecond || cfg.MAVLinkHeartbeatTimeout > time.Minute {
			return fmt.Errorf("--mavlink-heartbeat-timeout must be between 100ms and 1m, not %v", cfg.MAVLinkHeartbeatTimeout)
		}
		mav, err := mavlink.New(mavlink.Options{URL: cfg.MAVLink, SystemID: uint8(cfg.MAVLinkSystemID), OwnComponentID: uint8(cfg.MAVLinkComponentID),
			HeartbeatTimeout: cfg.MAVLinkHeartbeatTimeout, Logger: log, Event: func(e proto.Event) {
				if a := running.Load(); a != nil {
					a.Emit(e)
				}
			}, Firmware: func(string) {
				if a := running.Load(); a != nil {
					a.Hello() // the fc-firmware payload
				}
			}})
		if err != nil {
			return err
		}
		ds.mav = mav
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := mav.Run(ctx); err != nil {
				log.Error("mavlink stopped", "err", err)
			}
		}()
		log.Info("reading the flight controller over MAVLink", "link", cfg.MAVLink)
	}
	if uo == nil {
		log.Warn("no --root-key: signed updates are refused")
	} else {
		uo.Guard = guardFromEnv(getenv, log)
	}
	opts.Update = uo
	opts.Sensors, opts.Logger = ds, log
	if edit != nil {
		edit(&opts)
	}
	a, err := agent.New(opts)
	if err != nil {
		return err
	}
	running.Store(a)
	sdNotify("READY=1")
	wdCtx, stopWD := context.WithCancel(ctx)
	defer stopWD()
	go watchdog(wdCtx, func() bool { return time.Since(a.LastSample()) < 3*cfg.SampleInterval+30*time.Second })
	err = a.Run(ctx)
	sdNotify("STOPPING=1")
	if errors.Is(err, update.ErrRestart) {
		log.Info("leaving for the new build", "exit", update.ExitRestart)
		return ErrRestart
	}
	return err
}

// PinnedTLS is the client TLS configuration that trusts only the CA
// certificates in the PEM file caFile (the agent's --ca-file).
func PinnedTLS(caFile string) (*tls.Config, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--ca-file %s: no PEM certificate", caFile)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// guardFromEnv is the trial guard the agent runs under, from what the
// guard put in its environment.
func guardFromEnv(getenv func(string) string, log *slog.Logger) update.Guard {
	g := update.Guard{Path: getenv(guard.EnvGuard), Version: getenv(guard.EnvVersion)}
	if g.Path == "" {
		log.Warn("not started through hangar-guard: a new build that dies before its own code runs cannot be rolled back (see docs/operations.md)")
		return update.Guard{}
	}
	if fd, err := strconv.Atoi(getenv(guard.EnvNotify)); err == nil && fd > 2 {
		// This process is a new build on trial, run by the guard as its
		// child. Its pipe is this process's only: children (hooks, smoke
		// tests) must not hold it.
		syscall.CloseOnExec(fd)
		if f := os.NewFile(uintptr(fd), "hangar-guard"); f != nil {
			if _, err := f.Stat(); err == nil {
				g.Notify = f
			}
		}
	}
	log.Info("started through the trial guard", "guard", g.Path, "guard_version", g.Version, "on_trial", g.Notify != nil)
	return g
}

// ErrRestart: the agent exits with update.ExitRestart for its supervisor
// to start the new build.
var ErrRestart = errors.New("restart for a new build")

func updateOptions(cfg Config) (*agent.UpdateOptions, error) {
	if len(cfg.RootKeys) == 0 {
		return nil, nil
	}
	uo := &agent.UpdateOptions{
		ExePath: cfg.ExePath, Hooks: cfg.Hooks, HookFiles: cfg.HookFiles, NoDelta: cfg.NoDelta, TrialDeadline: cfg.TrialDeadline, TrialSoak: cfg.TrialSoak, MaxTrialBoots: cfg.MaxTrialBoots,
		Policy: update.Policy{MinBattery: uint8(max(0, min(100, cfg.MinBattery))), LockFile: cfg.MaintenanceLock, AllowUnknownFlight: cfg.AllowUnknownFlight},
	}
	if uo.TrialSoak == 0 {
		uo.TrialSoak = -1 // asked for no soak; zero would mean the default
	}
	switch update.RestartMode(cfg.RestartMode) {
	case update.RestartExec, update.RestartExit:
		uo.RestartMode = update.RestartMode(cfg.RestartMode)
	default:
		return nil, fmt.Errorf("--restart-mode must be exec or exit, not %q", cfg.RestartMode)
	}
	if bt, err := strconv.ParseInt(agent.BuildTime, 10, 64); err == nil && bt > 0 {
		uo.BuildTime = time.Unix(bt, 0)
	}
	for _, rk := range cfg.RootKeys {
		data := []byte(rk)
		if b, err := os.ReadFile(rk); err == nil {
			data = b
		}
		k, err := proto.ParsePublicKey(data)
		if err != nil {
			return nil, fmt.Errorf("--root-key %s: %w", rk, err)
		}
		uo.Roots = append(uo.Roots, k)
	}
	return uo, nil
}

// deviceSensors reads the board, then overlays what the flight stack said
// on the local socket, then what the flight controller says over MAVLink.
type deviceSensors struct {
	linux  *sensors.Linux
	flight *sensors.Flight
	mav    *mavlink.Source
}

func (d *deviceSensors) Read(now time.Time) proto.Sample {
	var s proto.Sample
	d.linux.Fill(&s)
	if d.flight != nil {
		d.flight.Fill(&s, now)
	}
	if d.mav != nil {
		d.mav.Fill(&s, now)
	}
	return s
}

// FlightNow is the flight controller's state now, with MAVLink.
func (d *deviceSensors) FlightNow(now time.Time) (proto.FlightState, string, *uint8, bool) {
	if d.mav == nil {
		return 0, "", nil, false
	}
	st := d.mav.State(now)
	return st.Flight, st.Why, st.Battery, true
}

// PayloadFC is the payload name the flight controller's firmware version
// is reported under.
const PayloadFC = "fc-firmware"

// Payloads are the flight controller's firmware version, once it answered.
func (d *deviceSensors) Payloads() map[string]string {
	if d.mav == nil {
		return nil
	}
	if v, _ := d.mav.Firmware(); v != "" {
		return map[string]string{PayloadFC: v}
	}
	return nil
}

var (
	_ agent.FlightSource    = (*deviceSensors)(nil)
	_ agent.PayloadReporter = (*deviceSensors)(nil)
)
