// Package cli is the hangar-sim command.
package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof" // for --pprof
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/agent/daemon"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
	"github.com/hangarfleet/hangar/internal/units"
	"github.com/hangarfleet/hangar/proto"
)

// Run runs hangar-sim with args (without the program name).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "bench" {
		return runBench(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "run" {
		return runScenario(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "inventory" {
		return runInventory(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "firmware" {
		return runFirmware(args[1:], stdout, stderr)
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
	factorySize := fs.Int("factory-size", sim.DefaultFactorySize, "bytes of the build the drones left the factory with (hangar-sim firmware --factory makes the same file, a delta's base)")
	seed := fs.Uint64("seed", 1, "random seed")
	memOutbox := fs.Bool("memory-outbox", false, "keep the drones' outboxes in memory (one file descriptor per drone instead of six)")
	logLevel := fs.String("log-level", "warn", "debug, info, warn or error")
	mqttClient := fs.String("mqtt-client", "paho", "the drones' MQTT transport: paho (the agent binary's) or lite (one goroutine per connection; for 10,000 drones in a process)")
	sources := fs.String("source-addrs", "", "local IP addresses the drones connect from, comma separated (e.g. 127.0.0.2,127.0.0.3): more drones than one address's ephemeral ports")
	memLimit := fs.String("memory-limit", "", "soft limit for the simulator's Go heap and stacks, e.g. 400MiB (GOMEMLIMIT); empty: none")
	caFile := fs.String("ca-file", "", "the control plane's CA certificate (PEM), as agents pin it: the drones then speak only TLS to it")
	pprofAddr := fs.String("pprof", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6061; off when empty")
	var roots []ed25519.PublicKey
	fs.Func("root-key", "release root public key (PEM) the drones pin: they take signed updates (repeat for several)", func(v string) error {
		b, err := os.ReadFile(v)
		if err != nil {
			return err
		}
		k, err := proto.ParsePublicKey(b)
		if err != nil {
			return fmt.Errorf("%s: %w", v, err)
		}
		roots = append(roots, k)
		return nil
	})
	fs.Usage = func() {
		fmt.Fprintf(stderr, "hangar-sim: run a fleet of simulated drones (the real agent code) against a control plane\n\n"+
			"Usage: hangar-sim [flags]\n       hangar-sim run SCENARIO [flags]   (rehearse a release; see firmware-sim/scenarios)\n"+
			"       hangar-sim inventory [--devices N] [--prefix P]   (the fleet's hardware and bases, for hangar device import)\n"+
			"       hangar-sim firmware --version V --out FILE [--behaviour B]   (a build the simulated drones run, to sign and push)\n"+
			"       hangar-sim bench ingest [flags]   (measure ingest; see docs/benchmarks.md)\n\n")
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
	// Refuse a fleet the process cannot hold before any drone starts (it
	// would fail with "too many open files" and no drone online).
	if err := checkLimits(sim.Load{Devices: *n, MemoryOutbox: *memOutbox, SourceAddrs: len(splitList(*sources))}); err != nil {
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
	tok := *token
	if b, err := os.ReadFile(tok); err == nil {
		tok = strings.TrimSpace(string(b))
	} else if strings.Contains(tok, "/") || strings.HasSuffix(tok, ".token") {
		return fmt.Errorf("enroll token: %w", err)
	}
	var tlsCfg *tls.Config
	if *caFile != "" {
		if tlsCfg, err = daemon.PinnedTLS(*caFile); err != nil {
			return err
		}
	}
	fleet, err := sim.NewFleet(sim.FleetOptions{
		ServerURL: *server, EnrollToken: tok, Devices: *n, Prefix: *prefix, StateRoot: *stateDir,
		SampleInterval: *sample, BatchSize: *batch, StartRate: *rate, Version: *version, FactorySize: *factorySize, Seed: *seed, Logger: log, MemoryOutbox: *memOutbox,
		MQTTClient: *mqttClient, SourceAddrs: splitList(*sources), TLS: tlsCfg, Roots: roots,
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

// runFirmware writes a simulated build: an artifact the simulated drones
// install and then behave as (a good build, or one of the bad ones), to
// sign with hangar release sign and push like any release.
func runFirmware(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangar-sim firmware", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var fw sim.Firmware
	fs.StringVar(&fw.Version, "version", "", "the build's version (semver), as the drones will report it")
	fs.StringVar(&fw.Behaviour, "behaviour", sim.Good, "what the build does: good, crashloop, failhealth, errors, reboots, drain, slowboot, brick")
	fs.Float64Var(&fw.ErrorsPerMinute, "errors-per-minute", 600, "with --behaviour errors: the error rate it raises")
	fs.StringVar(&fw.OnlyHardware, "only-hardware", "", "the behaviour shows on this hardware revision only (good elsewhere)")
	fs.IntVar(&fw.Size, "size", 256<<10, "pad the artifact to this many bytes (a realistic download)")
	factory := fs.Bool("factory", false, "the build a hangar-sim drone left the factory with (version --version, size --factory-size): the base of a delta (hangar release sign --delta-from)")
	factorySize := fs.Int("factory-size", sim.DefaultFactorySize, "with --factory: the fleet's --factory-size")
	out := fs.String("out", "", "file to write")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *factory {
		fw = sim.FactoryFirmware(fw.Version, *factorySize)
	}
	if fw.Version == "" || *out == "" {
		return errors.New("hangar-sim firmware: --version and --out are required")
	}
	if !proto.ValidVersion(fw.Version) {
		return fmt.Errorf("hangar-sim firmware: version %q is not semver", fw.Version)
	}
	switch fw.Behaviour {
	case sim.Good, sim.CrashLoop, sim.FailHealth, sim.Errors, sim.Reboots, sim.Drain, sim.SlowBoot, sim.Brick:
	default:
		return fmt.Errorf("hangar-sim firmware: unknown behaviour %q", fw.Behaviour)
	}
	if fw.Behaviour != sim.Errors {
		fw.ErrorsPerMinute = 0
	}
	if err := os.WriteFile(*out, fw.Artifact(), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s: simulated build %s (%s), %d bytes\n", *out, fw.Version, fw.Behaviour, len(fw.Artifact()))
	return nil
}

// runInventory prints the inventory of the fleet `hangar-sim --devices N
// --prefix P` runs: each drone's hardware and base, as a factory would hand
// them to the operator ("hangar device import" reads it). The control plane
// groups drones only by such operator labels, never by what they report.
func runInventory(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangar-sim inventory", flag.ContinueOnError)
	fs.SetOutput(stderr)
	n := fs.Int("devices", 100, "number of simulated drones")
	prefix := fs.String("prefix", "sim-", "device id prefix")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("hangar-sim inventory takes flags only, not %q", fs.Arg(0))
	}
	fleet, err := sim.NewFleet(sim.FleetOptions{Devices: *n, Prefix: *prefix, StateRoot: os.TempDir()}) // nothing runs: no state
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "# hangar-sim fleet of %d drones (prefix %s): id, operator labels\n", *n, *prefix)
	return fleet.WriteInventory(stdout)
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// setMemoryLimit sets the Go runtime's soft memory limit from a size such
// as 400MiB (empty: leave it).
func setMemoryLimit(s string) error {
	if s == "" {
		return nil
	}
	n, err := units.ParseBytes(s)
	if err != nil {
		return fmt.Errorf("--memory-limit: %w", err)
	}
	if n < 16<<20 {
		return fmt.Errorf("--memory-limit %q: below 16MiB (a unit is needed: 400MiB)", s)
	}
	debug.SetMemoryLimit(n)
	return nil
}

// servePprof serves net/http/pprof on addr when it is not empty.
func servePprof(addr string) (stop func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("pprof: %w", err)
	}
	go http.Serve(ln, http.DefaultServeMux) // net/http/pprof registers there
	return func() { ln.Close() }, nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
