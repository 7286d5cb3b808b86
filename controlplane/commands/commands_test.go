package commands

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

type bus struct {
	mu   sync.Mutex
	sent []proto.Command
}

func (b *bus) Publish(_ context.Context, device string, kind proto.Kind, payload []byte) error {
	var c proto.Command
	if err := proto.Unmarshal(payload, &c); err != nil {
		return err
	}
	b.mu.Lock()
	b.sent = append(b.sent, c)
	b.mu.Unlock()
	return nil
}

func (b *bus) confirms() []proto.Command {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []proto.Command
	for _, c := range b.sent {
		if c.Kind == proto.CmdConfirm {
			out = append(out, c)
		}
	}
	return out
}

// A trial report stored just before a crash (its reaction lost with the
// process) is confirmed when the dispatcher starts again, once.
func TestTrialConfirmedAfterRestart(t *testing.T) {
	ctx := t.Context()
	db := sqlstoretest.Open(t, sqlstore.Options{})
	now := time.Now()
	for _, id := range []string{"d1", "d2"} {
		if _, err := db.Enroll(ctx, store.Enrollment{ID: id, Hardware: "rev-b", CredHash: []byte(id), Now: now}); err != nil {
			t.Fatal(err)
		}
	}
	report := func(dev string, seq uint64, state proto.UpdateState) {
		ev := prototest.UpdateEvent()
		ev.Seq, ev.Time, ev.Update.State = seq, now.UnixMilli(), state
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: dev, Kind: store.IngestEvent, Event: &ev, Received: now}}); err != nil {
			t.Fatal(err)
		}
	}
	report("d1", 1, proto.UpdateTrial)
	report("d2", 1, proto.UpdateTrial)
	report("d2", 2, proto.UpdateCommitted) // d2's trial is over

	b := &bus{}
	d := New(Options{Store: db, Bus: b, Metrics: metrics.New(func() float64 { return 0 })})
	run := func() {
		ctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { d.Run(ctx, nil); close(done) }()
		time.Sleep(100 * time.Millisecond)
		cancel()
		<-done
	}
	run()
	got := b.confirms()
	id := fmt.Sprintf("confirm:d1:13:%d", prototest.UpdateEvent().Boot)
	if len(got) != 1 || got[0].ID != id || got[0].Counter != 13 || got[0].Rollout != "r-1" {
		t.Fatalf("confirmations after start: %+v, want one for d1's trial of counter 13", got)
	}
	// Seen again (a restart, the report redelivered): not created twice.
	run()
	trial := func(boot uint64) {
		d.handle(ctx, deviceEvent{device: "d1", event: &proto.Event{Boot: boot, Kind: proto.EventUpdate,
			Update: &proto.UpdateReport{State: proto.UpdateTrial, Counter: 13, Rollout: "r-1"}}})
	}
	trial(prototest.UpdateEvent().Boot)
	if n := len(b.confirms()); n != 1 {
		t.Fatalf("%d confirmations, want 1", n)
	}
	pending, _ := db.PendingCommands(ctx, "d1", time.Now().Add(time.Hour))
	if len(pending) != 1 || pending[0].ID != id {
		t.Fatalf("pending for d1: %+v", pending)
	}
	// The agent restarted during its trial (a new boot): the confirmation
	// it had is gone with the old process, so it gets a new one.
	trial(prototest.UpdateEvent().Boot + 7)
	if got := b.confirms(); len(got) != 2 || got[1].ID == id {
		t.Fatalf("after a restart in trial: %+v", got)
	}
}
