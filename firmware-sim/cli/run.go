package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/hangarfleet/hangar/firmware-sim/scenario"
)

// ErrExpectations is returned when a scenario ran but an expectation did
// not hold (exit status 1).
var ErrExpectations = errors.New("expectations not met")

func runScenario(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangar-sim run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o scenario.Options
	fs.StringVar(&o.Server, "server", "", "use this control plane instead of starting one")
	fs.StringVar(&o.Hangar, "hangar", "", "hangar binary to start the control plane with (default: next to hangar-sim, or in PATH)")
	fs.StringVar(&o.NATSServer, "nats-server", "", "nats-server binary for scenarios on a NATS cluster (default: next to hangar, or in PATH)")
	fs.StringVar(&o.TokenFile, "token-file", "", "with --server: admin token file")
	fs.StringVar(&o.EnrollToken, "enroll-token", "", "with --server: fleet enrollment token, or a file holding it")
	fs.StringVar(&o.ReleaseKey, "release-key", "", "with --server: release private key (PEM) the server's root trusts")
	fs.StringVar(&o.KeyList, "keys", "", "with --server: the root-signed release key list")
	fs.StringVar(&o.RootPub, "root-key", "", "with --server: root public key (PEM) the drones pin")
	fs.IntVar(&o.Devices, "devices", 0, "fleet size (default: the scenario's)")
	fs.StringVar(&o.WorkDir, "work-dir", "", "keep keys, artifacts, control plane data and drone state here (default: a temporary directory, removed)")
	out := fs.String("out", "", "report directory (default: scenario-reports/NAME)")
	logLevel := fs.String("log-level", "error", "simulated agents' log level")
	fs.StringVar(&o.MQTTClient, "mqtt-client", "", "the drones' MQTT transport, paho or lite (default: the scenario's fleet.mqtt_client, else paho)")
	sources := fs.String("source-addrs", "", "local IP addresses the drones connect from, comma separated (e.g. 127.0.0.2,127.0.0.3): more drones than one address's ephemeral ports")
	memLimit := fs.String("memory-limit", "", "soft limit for the simulator's Go heap and stacks, e.g. 400MiB (GOMEMLIMIT); empty: none")
	pprofAddr := fs.String("pprof", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6061; off when empty")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: hangar-sim run SCENARIO.yaml [flags]\n\nPlays the scenario on a simulated fleet against a real control plane, writes\nreport.json and report.html, and exits 0 when every expectation holds, 1 otherwise.\n\n")
		fs.PrintDefaults()
	}
	var files []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil
			}
			return err
		}
		args = fs.Args()
		if len(args) > 0 {
			files, args = append(files, args[0]), args[1:]
		}
	}
	if len(files) != 1 {
		fs.Usage()
		return errors.New("run: one scenario file")
	}
	s, err := scenario.Load(files[0])
	if err != nil {
		return err
	}
	o.SourceAddrs = splitList(*sources)
	// Before the control plane and the drones start.
	if err := checkLimits(scenarioLoad(s, o)); err != nil {
		return err
	}
	if err := setMemoryLimit(*memLimit); err != nil {
		return err
	}
	stop, err := servePprof(*pprofAddr)
	if err != nil {
		return err
	}
	defer stop()
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	o.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	o.Progress = stdout
	if *out == "" {
		*out = filepath.Join("scenario-reports", strings.ReplaceAll(s.Name, " ", "-"))
	}
	rep, err := scenario.Run(ctx, s, o)
	if rep != nil && len(rep.Samples) > 0 {
		if werr := rep.Write(*out); werr != nil {
			return werr
		}
	}
	if err != nil {
		return err
	}
	rep.Summary(stdout)
	fmt.Fprintf(stdout, "report: %s\n", filepath.Join(*out, "report.html"))
	if !rep.Passed {
		return ErrExpectations
	}
	return nil
}
