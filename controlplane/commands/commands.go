// Package commands sends commands to devices and makes sure they arrive:
// a command is stored before it is published, re-sent when its device says
// hello and periodically until the device acknowledges it, and answered
// where the protocol needs an answer (a build in trial is confirmed).
package commands

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"time"

	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Store is what the dispatcher keeps commands in.
type Store interface {
	AddCommand(ctx context.Context, c store.Command, supersede bool) error
	AddCommandOnce(ctx context.Context, c store.Command, supersede bool) (bool, error)
	Trials(ctx context.Context, since time.Time) ([]store.DeviceUpdate, error)
	MarkSent(ctx context.Context, id string, at time.Time) error
	MarkSentAll(ctx context.Context, ids []string, at time.Time) error
	AckCommand(ctx context.Context, device, id string, at time.Time) error
	PendingCommands(ctx context.Context, device string, sentBefore time.Time) ([]store.Command, error)
}

// Publisher sends a message to a device.
type Publisher interface {
	Publish(ctx context.Context, device string, kind proto.Kind, payload []byte) error
}

// Defaults.
const (
	DefaultResendAfter = time.Minute
	resendEvery        = 15 * time.Second
	// trialsWithin: trials reported longer ago than this are over
	// (committed, rolled back or the device is gone) whatever they said.
	trialsWithin = 24 * time.Hour
)

// Options configure a Dispatcher.
type Options struct {
	Store       Store
	Bus         Publisher
	Metrics     *metrics.Metrics
	Logger      *slog.Logger
	Now         func() time.Time
	ResendAfter time.Duration // an unacknowledged command is sent again after this
}

// Dispatcher sends commands.
type Dispatcher struct {
	opts   Options
	log    *slog.Logger
	events chan deviceEvent
}

type deviceEvent struct {
	device string
	event  *proto.Event
	state  *proto.State
}

// New returns a dispatcher; Run must run for it to react to devices.
func New(opts Options) *Dispatcher {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.New(nil)
	}
	if opts.ResendAfter == 0 {
		opts.ResendAfter = DefaultResendAfter
	}
	return &Dispatcher{opts: opts, log: opts.Logger.With("component", "commands"), events: make(chan deviceEvent, 4096)}
}

// NewID returns a random command id.
func NewID() string {
	var b [12]byte
	rand.Read(b[:])
	return "c-" + hex.EncodeToString(b[:])
}

// Send stores cmd for device, then publishes it. When supersede is set,
// pending commands of the same kind for the device are dropped (a newer
// offer replaces an older one). A failed publish is not an error: the
// command is re-sent until acknowledged.
func (d *Dispatcher) Send(ctx context.Context, device string, cmd proto.Command, supersede bool) (string, error) {
	if cmd.ID == "" {
		cmd.ID = NewID()
	}
	now := d.opts.Now()
	cmd.Issued = now.UnixMilli()
	body, err := proto.Marshal(&cmd)
	if err != nil {
		return "", err
	}
	c := store.Command{ID: cmd.ID, Device: device, Kind: string(cmd.Kind), Body: body, Rollout: cmd.Rollout, Created: now}
	if err := d.opts.Store.AddCommand(ctx, c, supersede); err != nil {
		return "", err
	}
	d.Publish(ctx, c)
	return cmd.ID, nil
}

// Publish sends a stored command (marking it sent); a failure is left to
// the resend.
func (d *Dispatcher) Publish(ctx context.Context, c store.Command) {
	if err := d.opts.Bus.Publish(ctx, c.Device, proto.KindCmd, c.Body); err != nil {
		d.log.Debug("command not published, will retry", "device", c.Device, "cmd", c.ID, "err", err)
		return
	}
	d.opts.Metrics.CommandsSent.Inc()
	if err := d.opts.Store.MarkSent(ctx, c.ID, d.opts.Now()); err != nil {
		d.log.Error("command sent but not recorded", "cmd", c.ID, "err", err)
	}
}

// PublishAll sends stored commands and marks those sent in one write;
// failures are left to the resend.
func (d *Dispatcher) PublishAll(ctx context.Context, cs []store.Command) {
	ids := make([]string, 0, len(cs))
	for _, c := range cs {
		if err := d.opts.Bus.Publish(ctx, c.Device, proto.KindCmd, c.Body); err != nil {
			d.log.Debug("command not published, will retry", "device", c.Device, "cmd", c.ID, "err", err)
			continue
		}
		ids = append(ids, c.ID)
	}
	d.opts.Metrics.CommandsSent.Add(float64(len(ids)))
	if err := d.opts.Store.MarkSentAll(ctx, ids, d.opts.Now()); err != nil {
		d.log.Error("commands sent but not recorded", "commands", len(ids), "err", err)
	}
}

// OnEvent and OnState are called by ingest after storing a device message;
// they must not block, so the work is queued.
func (d *Dispatcher) OnEvent(device string, e *proto.Event) {
	if e.Kind != proto.EventAck && e.Kind != proto.EventUpdate {
		return
	}
	d.enqueue(deviceEvent{device: device, event: e})
}

// OnState: a device that says hello gets its pending commands again.
func (d *Dispatcher) OnState(device string, s *proto.State) {
	if s.Online {
		d.enqueue(deviceEvent{device: device, state: s})
	}
}

func (d *Dispatcher) enqueue(ev deviceEvent) {
	select {
	case d.events <- ev:
	default:
		// The periodic resend catches up with what is dropped here.
		d.log.Warn("command dispatcher busy, device event dropped", "device", ev.device)
	}
}

// Run reacts to devices and re-sends unacknowledged commands.
//
// With several replicas every one runs it for the device messages it
// ingested (acknowledgements, hellos, trials); the periodic sweep over the
// whole fleet runs only where leading says so (the scheduler's lease
// holder; nil: always), under the context leading returns.
func (d *Dispatcher) Run(ctx context.Context, leading func() (context.Context, bool)) {
	t := time.NewTicker(resendEvery)
	defer t.Stop()
	sweep := func() {
		sctx, ok := ctx, true
		if leading != nil {
			sctx, ok = leading()
		}
		if ok {
			d.confirmTrials(sctx)
			d.resend(sctx, "", d.opts.Now().Add(-d.opts.ResendAfter))
		}
	}
	sweep()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-d.events:
			d.handle(ctx, ev)
		case <-t.C:
			sweep()
		}
	}
}

func (d *Dispatcher) handle(ctx context.Context, ev deviceEvent) {
	now := d.opts.Now()
	switch {
	case ev.state != nil:
		d.resend(ctx, ev.device, now.Add(time.Second))
	case ev.event.Kind == proto.EventAck && ev.event.Cmd != "":
		if err := d.opts.Store.AckCommand(ctx, ev.device, ev.event.Cmd, now); err != nil {
			d.log.Error("command acknowledgement not recorded", "device", ev.device, "cmd", ev.event.Cmd, "err", err)
		}
	case ev.event.Kind == proto.EventUpdate && ev.event.Update.State == proto.UpdateTrial:
		// The new build reached the control plane through the broker:
		// confirm, so that its trial can pass.
		d.confirm(ctx, ev.device, ev.event.Update.Counter, ev.event.Boot, ev.event.Update.Rollout)
	}
}

// confirm acknowledges a device's trial of a release in one boot of its
// agent. The command's id is derived from device, counter and boot, so it
// is created once however many times that trial is seen, and a trial that
// starts again after a restart (the confirmation was in the lost process's
// memory) gets a confirmation of its own.
func (d *Dispatcher) confirm(ctx context.Context, device string, counter, boot uint64, rollout string) {
	now := d.opts.Now()
	cmd := proto.Command{ID: fmt.Sprintf("confirm:%s:%d:%d", device, counter, boot), Kind: proto.CmdConfirm, Counter: counter, Rollout: rollout, Issued: now.UnixMilli()}
	body, err := proto.Marshal(&cmd)
	if err != nil {
		d.log.Error("trial confirmation", "device", device, "err", err)
		return
	}
	c := store.Command{ID: cmd.ID, Device: device, Kind: string(cmd.Kind), Body: body, Rollout: rollout, Created: now}
	added, err := d.opts.Store.AddCommandOnce(ctx, c, true)
	if err != nil {
		if ctx.Err() == nil {
			d.log.Error("trial confirmation not stored", "device", device, "err", err)
		}
		return
	}
	if added {
		d.Publish(ctx, c)
	}
}

// confirmTrials confirms every trial stored but not confirmed: the
// reaction to a trial report is not in the report's transaction, so a
// crash between the two (or a full event queue) would leave the device's
// trial to fail for want of a confirmation.
func (d *Dispatcher) confirmTrials(ctx context.Context) {
	trials, err := d.opts.Store.Trials(ctx, d.opts.Now().Add(-trialsWithin))
	if err != nil {
		if ctx.Err() == nil {
			d.log.Error("trials", "err", err)
		}
		return
	}
	for _, u := range trials {
		d.confirm(ctx, u.Device, u.Counter, u.Boot, u.Rollout)
	}
}

func (d *Dispatcher) resend(ctx context.Context, device string, sentBefore time.Time) {
	cmds, err := d.opts.Store.PendingCommands(ctx, device, sentBefore)
	if err != nil {
		if ctx.Err() == nil {
			d.log.Error("pending commands", "err", err)
		}
		return
	}
	for _, c := range cmds {
		if ctx.Err() != nil {
			return // no longer leading (or stopping): the next leader resends
		}
		d.Publish(ctx, c)
	}
}
