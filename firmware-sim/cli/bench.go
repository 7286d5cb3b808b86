package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/firmware-sim/bench"
)

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "agent" {
		return runBenchAgent(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "update" {
		return runBenchUpdate(ctx, args[1:], stdout, stderr)
	}
	if len(args) == 0 || args[0] != "ingest" {
		return errors.New("usage: hangar-sim bench ingest|agent|update [flags]")
	}
	fs := flag.NewFlagSet("hangar-sim bench ingest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	hangar := fs.String("hangar", "bin/hangar", "hangar binary to run as the control plane")
	devices := fs.Int("devices", 2000, "drones, one MQTT connection each")
	rate := fs.Float64("rate", 15, "messages per second per drone")
	samples := fs.Int("samples", 1, "telemetry samples per message")
	warmup := fs.Duration("warmup", 5*time.Second, "load before measuring")
	duration := fs.Duration("duration", 20*time.Second, "measured load")
	brokers := fs.String("brokers", "embedded,mosquitto", "broker setups to measure, in order; the first is the baseline: embedded (plain TCP), embedded-mtls (TLS, device certificates), mosquitto (SQLite), mosquitto-pg (PostgreSQL, one replica), mosquitto-pg3 (PostgreSQL, three replicas on a shared subscription)")
	jsonOut := fs.String("json", "", "also write the results as JSON to this file")
	verbose := fs.Bool("v", false, "show the control plane's log")
	serveArgs := fs.String("serve-args", "", "extra flags for hangar serve, space separated (e.g. --pprof 127.0.0.1:6060)")
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var logw io.Writer
	if *verbose {
		logw = stderr
	}
	var results []bench.IngestResult
	for _, b := range strings.Split(*brokers, ",") {
		fmt.Fprintf(stderr, "ingest: %s broker, %d drones at %.1f msg/s each for %v...\n", b, *devices, *rate, *duration)
		r, err := bench.RunIngest(ctx, bench.IngestOptions{
			Hangar: *hangar, Devices: *devices, Rate: *rate, Samples: *samples, Warmup: *warmup, Duration: *duration,
			Broker: b, LogWriter: logw, ServeArgs: strings.Fields(*serveArgs),
		})
		if err != nil {
			return fmt.Errorf("%s: %w", b, err)
		}
		results = append(results, r)
	}
	bench.PrintIngest(stdout, results)
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		return os.WriteFile(*jsonOut, b, 0o644)
	}
	return nil
}

func runBenchAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangar-sim bench agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	hangar := fs.String("hangar", "bin/hangar", "hangar binary to run as the control plane")
	agentBin := fs.String("agent", "bin/hangar-agent", "hangar-agent binary to measure")
	cross := fs.String("cross", "bin/hangar-agent-linux-arm64,bin/hangar-agent-linux-armv7", "cross-built agents whose size to report")
	duration := fs.Duration("duration", 30*time.Second, "how long to measure")
	mavHz := fs.Int("mavlink-hz", 0, "give the agent a simulated flight controller streaming 5 MAVLink messages at this rate each (0: none)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	r, err := bench.RunAgent(ctx, bench.AgentOptions{Hangar: *hangar, Agent: *agentBin, Duration: *duration, Cross: strings.Split(*cross, ","), MAVLinkHz: *mavHz})
	if err != nil {
		return err
	}
	bench.PrintAgent(stdout, r)
	return nil
}

func runBenchUpdate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangar-sim bench update", flag.ContinueOnError)
	fs.SetOutput(stderr)
	hangar := fs.String("hangar", "bin/hangar", "hangar binary to run as the control plane")
	agentBin := fs.String("agent", "bin/hangar-agent", "hangar-agent binary")
	size := fs.Int64("size", 6<<20, "artifact bytes")
	cuts := fs.Int("cuts", 3, "connection cuts during the second download")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	r, err := bench.RunUpdate(ctx, bench.UpdateOptions{Hangar: *hangar, Agent: *agentBin, Size: *size, Cuts: *cuts})
	if err != nil {
		return err
	}
	bench.PrintUpdate(stdout, r)
	return nil
}
