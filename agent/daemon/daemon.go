// Package daemon runs the agent as a device service: it reads the
// configuration, wires the real sensors (Linux /proc and /sys, and the
// flight stack's local socket) and runs the agent until it is stopped.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/sensors"
	"github.com/hangarfleet/hangar/proto"
)

// Run is the hangar-agent command.
func Run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
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
	a, err := agent.New(agent.Options{
		DeviceID: cfg.DeviceID, Hardware: cfg.Hardware, Labels: cfg.Labels, Version: agent.BuildVersion,
		ServerURL: cfg.Server, EnrollToken: cfg.EnrollToken, StateDir: cfg.StateDir, OutboxMaxBytes: cfg.OutboxMaxBytes,
		SampleInterval: cfg.SampleInterval, BatchSize: cfg.BatchSize, HeartbeatInterval: cfg.HeartbeatInterval,
		Sensors: ds, Logger: log,
	})
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// deviceSensors reads the board, then overlays what the flight stack said.
type deviceSensors struct {
	linux  *sensors.Linux
	flight *sensors.Flight
}

func (d *deviceSensors) Read(now time.Time) proto.Sample {
	var s proto.Sample
	d.linux.Fill(&s)
	if d.flight != nil {
		d.flight.Fill(&s, now)
	}
	return s
}
