package agent

import (
	"context"

	"github.com/hangarfleet/hangar/proto"
)

// onMessage runs on the transport's goroutine: decode and hand off, never
// block.
func (a *Agent) onMessage(topic string, payload []byte) {
	if topic != proto.DeviceTopic(a.opts.DeviceID, proto.KindCmd) {
		return
	}
	cmd, err := proto.DecodeCommand(payload)
	if err != nil {
		a.errors.Add(1)
		a.log.Warn("malformed command dropped", "err", err)
		return
	}
	select {
	case a.cmds <- cmd:
	default:
		// The control plane re-sends commands that are not acknowledged.
		a.log.Warn("command queue full, command dropped", "cmd", cmd.ID)
	}
}

// commandLoop handles commands on a goroutine of its own: an offer may run
// an installer's checks (a hook command, a digest of a binary), which must
// not hold up sampling.
func (a *Agent) commandLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case cmd := <-a.cmds:
			a.handle(ctx, cmd)
		}
	}
}

func (a *Agent) handle(ctx context.Context, cmd proto.Command) {
	switch cmd.Kind {
	case proto.CmdPing:
		a.Emit(proto.Event{Kind: proto.EventAck, Cmd: cmd.ID, Code: "pong"})
	case proto.CmdUpdate, proto.CmdCancel, proto.CmdConfirm:
		a.Emit(proto.Event{Kind: proto.EventAck, Cmd: cmd.ID, Code: "received"})
		if a.updater == nil {
			a.Emit(proto.Event{Kind: proto.EventAlert, Severity: proto.SevWarning, Cmd: cmd.ID, Code: "updates_disabled",
				Message: "this agent has no root key configured and refuses updates"})
			return
		}
		switch cmd.Kind {
		case proto.CmdUpdate:
			_ = a.updater.Offer(cmd)
		case proto.CmdCancel:
			a.updater.Cancel()
		case proto.CmdConfirm:
			a.updater.Confirm(cmd.Counter)
		}
	default:
		a.Emit(proto.Event{Kind: proto.EventAck, Cmd: cmd.ID, Severity: proto.SevWarning, Code: "unsupported",
			Message: "command kind " + string(cmd.Kind) + " not supported by agent " + a.opts.Version})
	}
}
