// Command hangar-agent is the device agent: telemetry and signed updates
// for one drone.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/hangarfleet/hangar/agent/daemon"
	"github.com/hangarfleet/hangar/agent/update"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := daemon.Run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, daemon.ErrRestart):
		os.Exit(update.ExitRestart)
	default:
		fmt.Fprintln(os.Stderr, "hangar-agent:", err)
		os.Exit(1)
	}
}
