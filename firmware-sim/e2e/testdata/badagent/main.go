// Command badagent is the real agent made to fail on purpose, built by the
// end-to-end tests as a bad release to roll back from. The build picks the
// failure (-ldflags "-X main.mode=crash"):
//
//	nolink        the build cannot reach the broker (it fails its trial's health check)
//	crash         the build crashes a second after it starts (a crash loop, in its trial)
//	exit1         the build exits 1 at start, before any agent code runs
//	segv          the build dies of SIGSEGV at start
//	hang          the build hangs at start, before its trial code
//	strictconfig  the build no longer knows the "heartbeat" setting: it refuses a
//	              config file that has one, also when asked to --check-config
//	oldconfig     as strictconfig, but the build predates --check-config: it
//	              can only be checked with --version, and then fails at start
//
// Every one of them answers --version like a good build.
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/daemon"
	"github.com/hangarfleet/hangar/agent/guard/guardtest"
	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// mode is set at build time.
var mode = "nolink"

type noLink struct{}

func (noLink) Connect(ctx context.Context, p agent.ConnectParams) (agent.Conn, error) {
	return nil, errors.New("this build's network stack is broken")
}

type crashing struct{ start time.Time }

func (c *crashing) Read(now time.Time) proto.Sample {
	if time.Since(c.start) > time.Second {
		panic("this build crashes")
	}
	return proto.Sample{}
}

func has(args []string, flag string) bool {
	return slices.Contains(args, flag) || slices.Contains(args, "-"+strings.TrimPrefix(flag, "--"))
}

// refusesHeartbeat is the config check of a build without the heartbeat
// setting.
func refusesHeartbeat(args []string) error {
	for i, a := range args {
		if (a == "--config" || a == "-config") && i+1 < len(args) {
			f, err := os.Open(args[i+1])
			if err != nil {
				return err
			}
			defer f.Close()
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if k, _, _ := strings.Cut(sc.Text(), "="); strings.TrimSpace(k) == "heartbeat" {
					return fmt.Errorf("config file %s: unknown setting %q", args[i+1], "heartbeat")
				}
			}
		}
	}
	return nil
}

func main() {
	args := os.Args[1:]
	if !has(args, "--version") {
		switch mode {
		case "exit1":
			if !has(args, "--check-config") {
				fmt.Fprintln(os.Stderr, "badagent: this build exits at start")
				os.Exit(1)
			}
		case "segv":
			if !has(args, "--check-config") {
				guardtest.DieBySignal(syscall.SIGSEGV)
			}
		case "hang":
			if !has(args, "--check-config") {
				guardtest.Hang()
			}
		case "strictconfig":
			if err := refusesHeartbeat(args); err != nil {
				fmt.Fprintln(os.Stderr, "badagent:", err)
				os.Exit(1)
			}
		case "oldconfig":
			if has(args, "--check-config") {
				fmt.Fprintln(os.Stderr, "flag provided but not defined: -check-config")
				os.Exit(2)
			}
			if err := refusesHeartbeat(args); err != nil {
				fmt.Fprintln(os.Stderr, "badagent:", err)
				os.Exit(1)
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := daemon.RunWith(ctx, args, os.Getenv, os.Stdout, os.Stderr, func(o *agent.Options) {
		switch mode {
		case "nolink":
			o.Transport = noLink{}
		case "crash":
			o.Sensors = &crashing{start: time.Now()}
			o.SampleInterval = 100 * time.Millisecond
		}
	})
	switch {
	case err == nil:
	case errors.Is(err, daemon.ErrRestart):
		os.Exit(update.ExitRestart)
	default:
		fmt.Fprintln(os.Stderr, "badagent:", err)
		os.Exit(1)
	}
}
