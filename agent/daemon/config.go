package daemon

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/proto"
)

// Config is the agent's configuration, from flags, environment and an
// optional config file, in that order of precedence.
type Config struct {
	DeviceID          string
	Hardware          string
	Labels            map[string]string
	Server            string
	EnrollToken       string
	CAFile            string
	StateDir          string
	SampleInterval    time.Duration
	BatchSize         int
	HeartbeatInterval time.Duration
	OutboxMaxBytes    int64
	FlightInput       string
	// The flight controller over MAVLink.
	MAVLink                 string
	MAVLinkSystemID         uint
	MAVLinkComponentID      uint
	MAVLinkHeartbeatTimeout time.Duration
	SysRoot                 string
	LogLevel                string
	ShowVersion             bool
	CheckConfig             bool
	// Updates.
	RootKeys           []string // files or base64 of pinned root public keys
	RestartMode        string
	MinBattery         int
	MaintenanceLock    string
	AllowUnknownFlight bool
	TrialDeadline      time.Duration
	TrialSoak          time.Duration
	MaxTrialBoots      int
	Hooks              map[string]string
	HookFiles          map[string]string
	NoDelta            bool
	ExePath            string
}

type listFlag struct{ l *[]string }

func (f listFlag) String() string     { return "" }
func (f listFlag) Set(s string) error { *f.l = append(*f.l, s); return nil }

type mapFlag map[string]string

func (m mapFlag) String() string { return "" }
func (m mapFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" || v == "" {
		return fmt.Errorf("%q is not target=path", s)
	}
	m[k] = v
	return nil
}

type labels map[string]string

func (l labels) String() string { return "" }
func (l labels) Set(s string) error {
	m, err := proto.ParseSelector(s)
	if err != nil {
		return err
	}
	for k, v := range m {
		l[k] = v
	}
	return proto.ValidateLabels(l)
}

// DefaultStateDir is where the agent keeps its state on a device.
const DefaultStateDir = "/var/lib/hangar-agent"

func envName(flagName string) string {
	return "HANGAR_AGENT_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func newFlagSet(c *Config, w io.Writer) (*flag.FlagSet, *string, *string) {
	fs := flag.NewFlagSet("hangar-agent", flag.ContinueOnError)
	fs.SetOutput(w)
	host, _ := os.Hostname()
	c.Labels = labels{}
	fs.StringVar(&c.DeviceID, "device-id", sanitizeID(host), "device id: 1-64 characters from A-Z a-z 0-9 . _ - (defaults to the host name)")
	fs.StringVar(&c.Hardware, "hardware", "", "hardware revision, matched against release manifests (e.g. rev-b)")
	fs.Var(labels(c.Labels), "label", "label k=v reported to the control plane (repeat, or k=v,k2=v2)")
	fs.StringVar(&c.Server, "server", "", "control plane URL, used to enroll (e.g. https://hangar.example.com)")
	fs.StringVar(&c.EnrollToken, "enroll-token", "", "fleet enrollment token (prefer --enroll-token-file)")
	fs.StringVar(&c.CAFile, "ca-file", "", "the control plane's CA certificate (PEM): the only one trusted for enrollment, downloads and the broker, which must then speak TLS")
	tokenFile := fs.String("enroll-token-file", "", "file holding the fleet enrollment token")
	fs.StringVar(&c.StateDir, "state-dir", DefaultStateDir, "state directory: credential, outbox, update state")
	fs.DurationVar(&c.SampleInterval, "sample-interval", agent.DefaultSampleInterval, "time between telemetry samples")
	fs.IntVar(&c.BatchSize, "batch-size", agent.DefaultBatchSize, "samples per telemetry message")
	fs.DurationVar(&c.HeartbeatInterval, "heartbeat", agent.DefaultHeartbeatInterval, "state heartbeat interval")
	fs.Int64Var(&c.OutboxMaxBytes, "outbox-max-bytes", 8<<20, "disk space for messages waiting for the link; oldest telemetry is dropped first")
	fs.StringVar(&c.FlightInput, "flight-input", "unix:/run/hangar-agent/flight.sock",
		"socket on which the flight stack sends battery, position and flight state (unix:PATH or udp:127.0.0.1:PORT; empty: none)")
	fs.StringVar(&c.MAVLink, "mavlink", "", "the flight controller over MAVLink: udp://127.0.0.1:14540 (listen: what mavlink-router forwards; keep it local), udp-client://HOST:PORT, tcp://HOST:PORT or serial:///dev/ttyS1:921600; it then gives the flight state, battery and position (empty: none)")
	fs.UintVar(&c.MAVLinkSystemID, "mavlink-system-id", 0, "the vehicle's MAVLink system id (0: the first autopilot heard)")
	fs.UintVar(&c.MAVLinkComponentID, "mavlink-component-id", 191, "the agent's own MAVLink component id (191: onboard computer)")
	fs.DurationVar(&c.MAVLinkHeartbeatTimeout, "mavlink-heartbeat-timeout", 3*time.Second, "without a heartbeat of the flight controller for this long the flight state is unknown, and installs wait")
	fs.StringVar(&c.SysRoot, "sysroot", "/", "root of /proc and /sys for system sensors")
	fs.StringVar(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.BoolVar(&c.ShowVersion, "version", false, "print the version and exit")
	fs.BoolVar(&c.CheckConfig, "check-config", false, "check the configuration (flags, environment, config file, root keys), print the version and exit; a new build is run so before it is installed")
	fs.Var(listFlag{&c.RootKeys}, "root-key", "pinned root public key for signed updates: a PEM file or base64 (repeat for several); without one, updates are refused")
	fs.StringVar(&c.RestartMode, "restart-mode", "exec", "how to start a new build of the agent: exec (replace the process) or exit (status 75, the supervisor restarts it)")
	fs.IntVar(&c.MinBattery, "min-battery", 30, "install only with the battery at or above this percentage")
	fs.StringVar(&c.MaintenanceLock, "maintenance-lock", "/run/hangar-agent/maintenance.lock", "install nothing while this file exists")
	fs.BoolVar(&c.AllowUnknownFlight, "install-when-flight-unknown", false, "install even when no flight stack reports the flight state (bench units only)")
	fs.DurationVar(&c.TrialDeadline, "trial-deadline", 2*time.Minute, "a new build must pass its health checks within this time, or it is rolled back")
	fs.DurationVar(&c.TrialSoak, "trial-soak", 30*time.Second, "a new build must stay up this long, healthy, before it is committed")
	fs.IntVar(&c.MaxTrialBoots, "max-trial-boots", 3, "starts of a new build without passing its trial before it is rolled back (crash loop)")
	c.Hooks = mapFlag{}
	fs.Var(mapFlag(c.Hooks), "hook", "install hook for a payload target: target=/path/to/executable (repeat)")
	c.HookFiles = mapFlag{}
	fs.Var(mapFlag(c.HookFiles), "hook-file", "the installed file of a hook's payload, which delta updates patch: target=/path/to/file (repeat)")
	fs.BoolVar(&c.NoDelta, "no-delta", false, "take full artifacts only: the control plane offers no delta updates to this device")
	fs.StringVar(&c.ExePath, "exe-path", "", "the agent binary that updates replace (default: this executable)")
	config := fs.String("config", "", "config file: one 'flag = value' per line, # comments (env HANGAR_AGENT_CONFIG)")
	return fs, tokenFile, config
}

// Usage is the text of --help.
func Usage(w io.Writer) {
	var c Config
	fs, _, _ := newFlagSet(&c, w)
	fmt.Fprintf(w, "hangar-agent %s: telemetry and signed updates for one drone\n\nUsage: hangar-agent [flags]\n\n", agent.BuildVersion)
	fmt.Fprintln(w, "Every flag can also be set in the environment as HANGAR_AGENT_<FLAG> (e.g. HANGAR_AGENT_SERVER),")
	fmt.Fprintln(w, "or in the config file. Flags win over the environment, which wins over the file.")
	fmt.Fprintln(w)
	fs.PrintDefaults()
}

// ParseConfig reads the configuration.
func ParseConfig(args []string, getenv func(string) string, stderr io.Writer) (Config, error) {
	var c Config
	fs, tokenFile, config := newFlagSet(&c, io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			Usage(stderr)
		}
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	file := map[string][]string{}
	path := *config
	if path == "" {
		path = getenv("HANGAR_AGENT_CONFIG")
	}
	if path != "" {
		var err error
		if file, err = readConfigFile(path); err != nil {
			return c, err
		}
	}
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] || f.Name == "config" {
			return
		}
		var vals []string
		if v := getenv(envName(f.Name)); v != "" {
			vals = []string{v}
		} else if vs, ok := file[f.Name]; ok {
			vals = vs
		}
		for _, v := range vals {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s: %w", f.Name, e)
			}
		}
	})
	if err != nil {
		return c, err
	}
	for name := range file {
		if fs.Lookup(name) == nil {
			return c, fmt.Errorf("config file %s: unknown setting %q", path, name)
		}
	}
	if *tokenFile != "" && c.EnrollToken == "" {
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return c, fmt.Errorf("enroll token: %w", err)
		}
		c.EnrollToken = strings.TrimSpace(string(b))
	}
	return c, nil
}

func readConfigFile(path string) (map[string][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("config file %s:%d: expected 'name = value'", path, n)
		}
		k = strings.TrimPrefix(strings.TrimSpace(k), "--")
		out[k] = append(out[k], strings.Trim(strings.TrimSpace(v), `"`))
	}
	return out, sc.Err()
}

// sanitizeID turns a host name into a valid device id.
func sanitizeID(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '-'
		}
	}
	s = strings.TrimLeft(string(b), ".-")
	if len(s) > proto.MaxDeviceIDLen {
		s = s[:proto.MaxDeviceIDLen]
	}
	return s
}
