// Command badagent is the real agent made to fail on purpose, built by the
// end-to-end tests as a bad release to roll back from. The build picks the
// failure (-ldflags "-X main.mode=crash"):
//
//	nolink  the build cannot reach the broker (it fails its trial's health check)
//	crash   the build crashes a second after it starts (a crash loop)
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/daemon"
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

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := daemon.RunWith(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr, func(o *agent.Options) {
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
