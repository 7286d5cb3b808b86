// Package cli is the hangar command: the control-plane server ("hangar
// serve") and the operator commands that talk to its REST API.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// Version is set at build time with -ldflags "-X".
var Version = "dev"

// Env is the process environment the command runs in; tests replace it.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
}

// ErrUsage marks errors in how the command was called (exit status 2).
var ErrUsage = errors.New("usage")

type command struct {
	name, args, help string
	run              func(ctx context.Context, g *globals, args []string) error
	verbs            []verb // a command group's subcommands (args and run come from them)
}

// grouped fills a command group's usage and dispatch from its verbs.
func grouped(name, help, about string, verbs []verb) command {
	return command{name: name, args: verbList(verbs), help: help, run: group(name, about, verbs), verbs: verbs}
}

func commands() []command {
	return []command{
		{"serve", "[flags]", "run the control plane (embedded MQTT broker and SQLite by default)", runServe, nil},
		grouped("device", "list, inspect, pre-provision, approve, label, revoke and update devices", "", deviceVerbs()),
		{"backup", "--out FILE", "write a consistent copy of the SQLite store while the control plane runs", runBackup, nil},
		{"ca", "init", "make the built-in device certificate authority in the data directory", runCA, nil},
		{"broker-config", "mosquitto|nats --out DIR ...", "write a broker's configuration: Mosquitto for devices with certificates (mutual TLS, ACLs by certificate), or a NATS cluster's (JetStream, MQTT, hangar's auth callout)", runBrokerConfig, nil},
		grouped("token", "named API tokens with a role (viewer, operator, admin)", tokenAbout, tokenVerbs()),
		grouped("enroll-profile", "enrollment tokens that give their devices labels", profileAbout, profileVerbs()),
		grouped("release", "sign releases offline, push and list them", "", releaseVerbs()),
		grouped("rollout", "staged canary rollouts gated on health", "", rolloutVerbs()),
		{"events", "[--device ID] [--since 1h] [--follow]", "show device events, newest first", runEvents, nil},
		grouped("report", "delivery metrics: deployment frequency, lead time, change failure rate, time to restore", "", reportVerbs()),
		{"health", "", "show the fleet health summary", runHealth, nil},
		{"audit", "[--target ID] | verify [--head ID:HASH]", "show who did what, when and why; verify the log's hash chain", runAudit, nil},
		grouped("completion", "print a shell completion script", "", completionVerbs()),
		{"version", "", "print the version", func(_ context.Context, g *globals, _ []string) error {
			fmt.Fprintln(g.env.Stdout, Version)
			return nil
		}, nil},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "hangar %s: control plane and operator CLI for drone fleets\n\nUsage: hangar COMMAND [flags]\n\nCommands:\n", Version)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-14s %-34s %s\n", c.name, c.args, c.help)
	}
	fmt.Fprintf(w, "\nOperator commands take --server URL (or HANGAR_SERVER, default %s), --token (or HANGAR_TOKEN,\n"+
		"or the file given by --token-file, default %s) and -o table|json.\nRun 'hangar COMMAND -h' for a command's flags.\n", defaultServer, defaultTokenFile)
}

// Run executes the command line args (without the program name).
func Run(ctx context.Context, args []string, env Env) error {
	if env.Stdout == nil {
		env.Stdout = os.Stdout
	}
	if env.Stderr == nil {
		env.Stderr = os.Stderr
	}
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	// Devices supply much of what the CLI prints (versions, hardware,
	// event text): no control character of theirs reaches the terminal.
	env.Stdout = &Escaper{W: env.Stdout}
	env.Stderr = &Escaper{W: env.Stderr}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(env.Stdout)
		if len(args) == 0 {
			return fmt.Errorf("%w: no command", ErrUsage)
		}
		return nil
	}
	if args[0] == "--version" {
		fmt.Fprintln(env.Stdout, Version)
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, &globals{env: env}, args[1:])
		}
	}
	usage(env.Stderr)
	return fmt.Errorf("%w: unknown command %q", ErrUsage, args[0])
}

const (
	defaultServer    = "http://127.0.0.1:8080"
	defaultTokenFile = "data/admin.token"
)

// globals are the flags every operator command takes.
type globals struct {
	env       Env
	server    string
	token     string
	tokenFile string
	caFile    string
	output    string
}

func (g *globals) register(fs *flag.FlagSet) {
	def := g.env.Getenv("HANGAR_SERVER")
	if def == "" {
		def = defaultServer
	}
	fs.StringVar(&g.server, "server", def, "control plane URL, or host:port for https://host:port (env HANGAR_SERVER)")
	// The default stays empty: --help prints defaults, and a token is a
	// secret. HANGAR_TOKEN is read when the client is made.
	fs.StringVar(&g.token, "token", "", "API token (default: from HANGAR_TOKEN)")
	fs.StringVar(&g.tokenFile, "token-file", defaultTokenFile, "file holding the API token, used when --token is not given")
	fs.StringVar(&g.caFile, "ca-file", g.env.Getenv("HANGAR_CA_FILE"), "CA certificate (PEM) the control plane's TLS certificate must chain to (env HANGAR_CA_FILE; default: the system's)")
	fs.StringVar(&g.output, "o", "table", "output format: table or json")
}

// newFlags returns a flag set that reports errors instead of exiting.
func (g *globals) newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("hangar "+name, flag.ContinueOnError)
	fs.SetOutput(g.env.Stderr)
	return fs
}

// parse parses flags that may come before or after positional arguments.
//
// A bad flag is one line with a hint, not the whole usage before it; the
// usage is printed when asked for (-h, --help).
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	defer fs.SetOutput(out)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(out)
				fs.Usage()
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v (%s --help lists the flags)", ErrUsage, err, fs.Name())
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func (g *globals) client() (*Client, error) {
	if g.output != "table" && g.output != "json" {
		return nil, fmt.Errorf("%w: -o must be table or json, not %q", ErrUsage, g.output)
	}
	tok := g.token
	if tok == "" {
		tok = g.env.Getenv("HANGAR_TOKEN")
	}
	if tok == "" {
		b, err := os.ReadFile(g.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("no admin token: give --token, set HANGAR_TOKEN, or point --token-file at the server's %s (%v)",
				filepath.Base(defaultTokenFile), err)
		}
		tok = strings.TrimSpace(string(b))
	}
	server := g.server
	if !strings.Contains(server, "://") {
		// host:port, as an operator types it: the control plane speaks
		// TLS unless it was started --insecure.
		server = "https://" + server
	}
	c := NewClient(server, tok)
	if g.caFile != "" {
		pem, err := os.ReadFile(g.caFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-file: %w", err)
		}
		if err := c.TrustCA(pem); err != nil {
			return nil, fmt.Errorf("--ca-file %s: %v", g.caFile, err)
		}
	}
	return c, nil
}

// reasonQuery is the ?reason= of an operator's action (none when empty).
func reasonQuery(reason string) url.Values {
	q := url.Values{}
	if reason != "" {
		q.Set("reason", reason)
	}
	return q
}
