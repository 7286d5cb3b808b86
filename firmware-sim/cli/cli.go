// Package cli is the hangar-sim command.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// Run runs hangar-sim with args (without the program name).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "bench" {
		return runBench(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "run" {
		return runScenario(ctx, args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("hangar-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	server := fs.String("server", envOr("HANGAR_SERVER", "http://127.0.0.1:8080"), "control plane URL (env HANGAR_SERVER)")
	token := fs.String("enroll-token", envOr("HANGAR_ENROLL_TOKEN", "data/enroll.token"), "fleet enrollment token, or a file holding it")
	n := fs.Int("devices", 100, "number of simulated drones")
	prefix := fs.String("prefix", "sim-", "device id prefix")
	stateDir := fs.String("state-dir", "", "where the drones keep their state (default: a temporary directory)")
	sample := fs.Duration("sample-interval", time.Second, "time between samples")
	batch := fs.Int("batch-size", 10, "samples per telemetry message")
	rate := fs.Int("start-rate", 200, "drones started per second")
	version := fs.String("agent-version", "1.0.0", "agent version the drones report")
	seed := fs.Uint64("seed", 1, "random seed")
	memOutbox := fs.Bool("memory-outbox", false, "keep the drones' outboxes in memory (one file descriptor per drone instead of six)")
	logLevel := fs.String("log-level", "warn", "debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "hangar-sim: run a fleet of simulated drones (the real agent code) against a control plane\n\n"+
			"Usage: hangar-sim [flags]\n       hangar-sim run SCENARIO [flags]   (rehearse a release; see firmware-sim/scenarios)\n       hangar-sim bench ingest [flags]   (measure ingest; see docs/benchmarks.md)\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	tok := *token
	if b, err := os.ReadFile(tok); err == nil {
		tok = strings.TrimSpace(string(b))
	} else if strings.Contains(tok, "/") || strings.HasSuffix(tok, ".token") {
		return fmt.Errorf("enroll token: %w", err)
	}
	fleet, err := sim.NewFleet(sim.FleetOptions{
		ServerURL: *server, EnrollToken: tok, Devices: *n, Prefix: *prefix, StateRoot: *stateDir,
		SampleInterval: *sample, BatchSize: *batch, StartRate: *rate, Version: *version, Seed: *seed, Logger: log, MemoryOutbox: *memOutbox,
	})
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- fleet.Run(ctx) }()
	fmt.Fprintf(stdout, "hangar-sim: %d drones against %s (Ctrl-C to stop)\n", *n, *server)
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case err := <-done:
			fmt.Fprintln(stdout, "hangar-sim: stopped")
			return err
		case <-t.C:
			connected, acked := 0, uint64(0)
			drones := fleet.Drones()
			for _, d := range drones {
				if d.Agent().Connected() {
					connected++
				}
				acked += d.Agent().Acked()
			}
			fmt.Fprintf(stdout, "hangar-sim: %d/%d drones connected, %d messages acknowledged\n", connected, len(drones), acked)
		}
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
