package agent

import (
	"context"

	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
)

// inbound is a command as it arrived: decoded, or malformed (err) with
// what could be read of it.
type inbound struct {
	cmd proto.Command
	err error
}

// rawCommand is proto.Command without its validation: it reads what a
// malformed command carries (its id, so that it can be answered).
type rawCommand proto.Command

// commandHead is the least of a command that can be answered.
type commandHead struct {
	ID      string            `cbor:"0,keyasint"`
	Kind    proto.CommandKind `cbor:"1,keyasint"`
	Rollout string            `cbor:"4,keyasint,omitempty"`
}

// onMessage runs on the transport's goroutine: decode and hand off, never
// block.
func (a *Agent) onMessage(topic string, payload []byte) {
	if topic != proto.DeviceTopic(a.opts.DeviceID, proto.KindCmd) {
		return
	}
	in := inbound{}
	in.cmd, in.err = proto.DecodeCommand(payload)
	if in.err != nil {
		a.errors.Add(1)
		a.log.Warn("malformed command", "err", in.err)
		in.cmd = salvage(payload)
		if in.cmd.ID == "" {
			// Nothing to answer: dropped.
			return
		}
	}
	select {
	case a.cmds <- in:
	default:
		// The control plane re-sends commands that are not acknowledged.
		a.log.Warn("command queue full, command dropped", "cmd", in.cmd.ID)
	}
}

// salvage reads what it can of a command that does not decode as a whole
// (it breaks a rule of the protocol, or a field has the wrong type).
func salvage(payload []byte) proto.Command {
	var raw rawCommand
	if proto.Unmarshal(payload, &raw) == nil {
		return proto.Command(raw)
	}
	var head commandHead
	if proto.Unmarshal(payload, &head) == nil {
		return proto.Command{ID: head.ID, Kind: head.Kind, Rollout: head.Rollout}
	}
	return proto.Command{}
}

// commandLoop handles commands on a goroutine of its own: an offer may run
// an installer's checks (a hook command, a digest of a binary), which must
// not hold up sampling.
func (a *Agent) commandLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case in := <-a.cmds:
			a.dispatch(ctx, in)
		}
	}
}

func (a *Agent) dispatch(ctx context.Context, in inbound) {
	if in.err != nil {
		a.malformed(in.cmd, in.err)
		return
	}
	a.handle(ctx, in.cmd)
}

// malformed answers a command that cannot be acted on, so that the control
// plane stops re-sending it (the same bytes would fail the same way) and
// an offer is filed as rejected at once, not after a rollout's timeout.
func (a *Agent) malformed(cmd proto.Command, err error) {
	a.Emit(proto.Event{Kind: proto.EventAck, Cmd: cmd.ID, Severity: proto.SevWarning, Code: "malformed",
		Message: "malformed command: " + err.Error()})
	if cmd.Kind == proto.CmdUpdate {
		a.reportUpdate(update.RefusalReport(cmd, proto.CheckFormat, "malformed update command: "+err.Error()), cmd.ID)
	}
}

// noRootKey is why an agent without update options refuses every offer.
const noRootKey = "no root key configured: this agent cannot verify releases (start it with --root-key)"

func (a *Agent) handle(ctx context.Context, cmd proto.Command) {
	switch cmd.Kind {
	case proto.CmdPing:
		a.Emit(proto.Event{Kind: proto.EventAck, Cmd: cmd.ID, Code: "pong"})
	case proto.CmdCertificate:
		a.onCertificate(cmd)
	case proto.CmdRenew:
		a.invited()
	case proto.CmdUpdate, proto.CmdCancel, proto.CmdConfirm:
		a.Emit(proto.Event{Kind: proto.EventAck, Cmd: cmd.ID, Code: "received"})
		if a.updater == nil {
			if cmd.Kind == proto.CmdUpdate {
				// A refusal like any other: rejected at once, filed under
				// the release offered, with the reason.
				a.log.Warn("release refused", "check", proto.CheckRoot, "err", noRootKey)
				a.reportUpdate(update.RefusalReport(cmd, proto.CheckRoot, noRootKey), cmd.ID)
				return
			}
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
