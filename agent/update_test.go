package agent

import (
	"context"
	"crypto/ed25519"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// queuedEvents returns the events in the agent's outbox, oldest first.
func queuedEvents(t *testing.T, a *Agent) []proto.Event {
	t.Helper()
	recs, err := a.box.Peek(100)
	if err != nil {
		t.Fatal(err)
	}
	var out []proto.Event
	for _, r := range recs {
		if ev, err := proto.DecodeEvent(r.Data); err == nil {
			out = append(out, ev)
		}
	}
	return out
}

// updateReports returns the update reports queued for cmd.
func updateReports(t *testing.T, a *Agent, cmd string) []proto.Event {
	t.Helper()
	var out []proto.Event
	for _, ev := range queuedEvents(t, a) {
		if ev.Kind == proto.EventUpdate && ev.Cmd == cmd {
			out = append(out, ev)
		}
	}
	return out
}

func acked(t *testing.T, a *Agent, cmd string) (proto.Event, bool) {
	t.Helper()
	for _, ev := range queuedEvents(t, a) {
		if ev.Kind == proto.EventAck && ev.Cmd == cmd {
			return ev, true
		}
	}
	return proto.Event{}, false
}

// testOffer is the prototest release (agent 1.5.0, counter 13, rev-b) as
// a rollout's update command.
func testOffer(t *testing.T, id string) proto.Command {
	t.Helper()
	m := prototest.Manifest([]byte("hangar-agent 1.5.0"))
	signed, err := proto.SignManifest(prototest.ReleaseKey, m)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := proto.SignKeyList(prototest.RootKey, prototest.KeyList())
	if err != nil {
		t.Fatal(err)
	}
	return proto.Command{ID: id, Kind: proto.CmdUpdate, Rollout: "r-1", Issued: prototest.Base,
		Update: &proto.UpdateOffer{Manifest: signed, Keys: keys, URL: "/api/v1/releases/agent/1.5.0/artifact"}}
}

// deliver passes a command through the agent as the transport would, and
// handles it.
func deliver(t *testing.T, a *Agent, payload []byte) {
	t.Helper()
	a.onMessage(proto.DeviceTopic(a.opts.DeviceID, proto.KindCmd), payload)
	select {
	case in := <-a.cmds:
		a.dispatch(context.Background(), in)
	default:
		t.Fatal("the command was not queued")
	}
}

// wantRejected checks that cmd was acknowledged and reported rejected, at
// once, by check, with a reason saying reason, and (when counter is not
// zero) filed under the release offered.
func wantRejected(t *testing.T, a *Agent, cmd string, check proto.Check, reason string, counter uint64) {
	t.Helper()
	if _, ok := acked(t, a, cmd); !ok {
		t.Errorf("%s not acknowledged", cmd)
	}
	reps := updateReports(t, a, cmd)
	if len(reps) != 1 {
		t.Fatalf("%d update reports for %s, want one rejection; events: %+v", len(reps), cmd, queuedEvents(t, a))
	}
	ev := reps[0]
	r := ev.Update
	if r.State != proto.UpdateRejected || r.Check != string(check) || !strings.Contains(r.Reason, reason) {
		t.Errorf("%s reported %+v, want rejected by %q saying %q", cmd, r, check, reason)
	}
	if ev.Severity != proto.SevWarning || ev.Code != "update_rejected" || ev.Message != r.Reason {
		t.Errorf("%s: event %q severity %d message %q", cmd, ev.Code, ev.Severity, ev.Message)
	}
	if counter != 0 && (r.Target != proto.TargetAgent || r.Counter != counter || r.Version != "1.5.0" || r.Rollout != "r-1") {
		t.Errorf("%s: rejection filed under %s %s #%d rollout %q, want agent 1.5.0 #%d rollout r-1", cmd, r.Target, r.Version, r.Counter, r.Rollout, counter)
	}
}

// An agent started without --root-key cannot verify releases: an offer is
// rejected at once, with that reason, under the release offered, so that a
// rollout counts the device as failed now rather than after its timeout.
func TestOfferWithoutRootKeyRejected(t *testing.T) {
	a := newTestAgent(t, Options{Transport: &fakeTransport{}})
	defer a.box.Close()
	if a.updater != nil {
		t.Fatal("an updater without root keys")
	}
	deliver(t, a, marshalCmd(t, testOffer(t, "r-1:d1:offer")))
	wantRejected(t, a, "r-1:d1:offer", proto.CheckRoot, "no root key configured: this agent cannot verify releases", 13)

	// Cancel and confirm have no release to report on: acknowledged, and
	// an alert says why nothing happens.
	for _, kind := range []proto.CommandKind{proto.CmdCancel, proto.CmdConfirm} {
		b, _ := proto.Marshal(&proto.Command{ID: "c-" + string(kind), Kind: kind, Counter: 13})
		deliver(t, a, b)
		if _, ok := acked(t, a, "c-"+string(kind)); !ok {
			t.Errorf("%s not acknowledged", kind)
		}
		alerted := false
		for _, ev := range queuedEvents(t, a) {
			alerted = alerted || (ev.Kind == proto.EventAlert && ev.Cmd == "c-"+string(kind) && ev.Code == "updates_disabled")
		}
		if !alerted {
			t.Errorf("%s: no updates_disabled alert", kind)
		}
	}
}

// A command the agent cannot decode but can read the id of is answered:
// acknowledged as malformed (re-sending the same bytes would not help),
// and an update command is reported rejected (format) at once.
func TestMalformedUpdateCommandAnswered(t *testing.T) {
	for _, withUpdater := range []bool{false, true} {
		name := "without root key"
		if withUpdater {
			name = "with root key"
		}
		t.Run(name, func(t *testing.T) {
			opts := Options{Transport: &fakeTransport{}}
			if withUpdater {
				opts = updaterOptions("rev-b")
			}
			a := newTestAgent(t, opts)
			defer a.box.Close()
			// An update command without its offer breaks the protocol.
			noOffer, _ := proto.Marshal(&proto.Command{ID: "c-1", Kind: proto.CmdUpdate, Rollout: "r-1"})
			deliver(t, a, noOffer)
			// One whose offer has the wrong type: only its head reads.
			badOffer, _ := proto.Marshal(map[int]any{0: "c-2", 1: "update", 3: "not an offer", 4: "r-1"})
			deliver(t, a, badOffer)
			for _, cmd := range []string{"c-1", "c-2"} {
				if ack, ok := acked(t, a, cmd); !ok || ack.Code != "malformed" || ack.Message == "" {
					t.Errorf("%s: ack %+v (%v), want a malformed ack with the error", cmd, ack, ok)
				}
				wantRejected(t, a, cmd, proto.CheckFormat, "malformed update command", 0)
				if r := updateReports(t, a, cmd); len(r) == 1 && r[0].Update.Rollout != "r-1" {
					t.Errorf("%s: rejection for rollout %q, want r-1", cmd, r[0].Update.Rollout)
				}
			}
			if n := a.errors.Load(); n != 2 {
				t.Errorf("errors = %d, want the 2 malformed commands", n)
			}
		})
	}
}

// stubInstaller installs nothing; the running build is never the offered one.
type stubInstaller struct{}

func (stubInstaller) Install(context.Context, proto.Manifest, string) error { return nil }
func (stubInstaller) Activate(context.Context, proto.Manifest) error        { return nil }
func (stubInstaller) Check(context.Context, proto.Manifest) error           { return nil }
func (stubInstaller) Commit(context.Context, proto.Manifest) error          { return nil }
func (stubInstaller) Rollback(context.Context, proto.Manifest) error        { return nil }
func (stubInstaller) Running(proto.Manifest) bool                           { return false }
func (stubInstaller) Installed(proto.Manifest) bool                         { return false }

// updaterOptions are agent options with updates on, trusting the
// prototest root, on hardware hw, with the clock an hour after the
// fixtures were signed.
func updaterOptions(hw string) Options {
	return Options{Transport: &fakeTransport{}, Hardware: hw, ServerURL: "http://127.0.0.1:1",
		Clock: clock.NewFake(time.UnixMilli(prototest.Base).Add(time.Hour)),
		Update: &UpdateOptions{
			Roots:      []ed25519.PublicKey{prototest.RootKey.Public().(ed25519.PublicKey)},
			BuildTime:  time.UnixMilli(prototest.Base).Add(-24 * time.Hour),
			Installers: map[string]update.Installer{proto.TargetAgent: stubInstaller{}},
		}}
}

// With updates on, a refusal goes out as the command is handled: the
// wrong hardware, a counter at the installed one, an untrusted clock
// (deferred, not rejected).
func TestOfferRefusedAtOnce(t *testing.T) {
	t.Run("wrong hardware", func(t *testing.T) {
		a := newTestAgent(t, updaterOptions("rev-c"))
		defer a.box.Close()
		b := marshalCmd(t, testOffer(t, "c-hw"))
		deliver(t, a, b)
		wantRejected(t, a, "c-hw", proto.CheckHardware, `this device is hardware "rev-c", the release is for rev-b`, 13)
	})
	t.Run("untrusted clock, then wrong hardware", func(t *testing.T) {
		opts := updaterOptions("rev-c")
		opts.Clock = clock.NewFake(time.Unix(0, 0))
		a := newTestAgent(t, opts)
		defer a.box.Close()
		b := marshalCmd(t, testOffer(t, "c-hw-1970"))
		deliver(t, a, b)
		wantRejected(t, a, "c-hw-1970", proto.CheckHardware, `this device is hardware "rev-c"`, 13)
	})
	t.Run("untrusted clock, otherwise fine: deferred", func(t *testing.T) {
		opts := updaterOptions("rev-b")
		opts.Clock = clock.NewFake(time.Unix(0, 0))
		a := newTestAgent(t, opts)
		defer a.box.Close()
		b := marshalCmd(t, testOffer(t, "c-1970"))
		deliver(t, a, b)
		reps := updateReports(t, a, "c-1970")
		if len(reps) != 1 || reps[0].Update.State != proto.UpdateDeferred || reps[0].Update.Check != string(proto.CheckClock) ||
			reps[0].Update.Reason == "" || reps[0].Update.Counter != 13 {
			t.Errorf("reports %+v, want one deferred (clock) with a reason, for counter 13", reps)
		}
	})
	t.Run("accepted", func(t *testing.T) {
		a := newTestAgent(t, updaterOptions("rev-b"))
		defer a.box.Close()
		b := marshalCmd(t, testOffer(t, "c-ok"))
		deliver(t, a, b)
		reps := updateReports(t, a, "c-ok")
		if len(reps) != 1 || reps[0].Update.State != proto.UpdateOffered || reps[0].Update.Counter != 13 {
			t.Errorf("reports %+v, want one offered", reps)
		}
	})
}

func marshalCmd(t *testing.T, c proto.Command) []byte {
	t.Helper()
	b, err := proto.Marshal(&c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
