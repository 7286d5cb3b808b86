package sqlstore_test

import (
	"errors"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// A lease has one holder at a time; a new holder (or the same one after a
// lapse) gets a greater token, and writes made under an earlier term, or
// under a lapsed one, are refused with nothing stored.
func TestLeaseFencing(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	postgres := db.Engine() == "postgres" // leases run on the server's clock there
	ttl := time.Hour
	if postgres {
		ttl = 2 * time.Second
	}
	a, err := db.AcquireLease(ctx, "scheduler", "a", ttl)
	if err != nil || a.Holder != "a" || a.Token != 1 {
		t.Fatalf("first acquire: %+v, %v", a, err)
	}
	b, err := db.AcquireLease(ctx, "scheduler", "b", ttl)
	if err != nil || b.Holder != "a" || b.Token != 1 {
		t.Fatalf("b while a holds it: %+v, %v (want a's lease reported)", b, err)
	}
	if r, err := db.AcquireLease(ctx, "scheduler", "a", ttl); err != nil || r.Holder != "a" || r.Token != 1 {
		t.Fatalf("renewal: %+v, %v (same term)", r, err)
	}
	now := clk.Now()
	if err := db.CreateRollout(ctx, store.RolloutRow{ID: "r", Spec: []byte(`{}`), State: []byte(`{"n":0}`), Status: "running", Created: now, Updated: now},
		nil, store.Audit{Time: now, Actor: "t", Action: "rollout.create", Target: "r"}); err != nil {
		t.Fatal(err)
	}
	apply := func(lease store.Lease, rev int64, state string) error {
		return db.ApplyRollout(store.WithFence(ctx, lease), store.RolloutChange{ID: "r", Rev: rev, State: []byte(state), Status: "running", Now: now,
			Commands: []store.Command{{ID: "cmd-" + state, Device: "d1", Kind: "offer", Body: []byte{1}, Created: now}}})
	}
	enroll(t, db, "d1", nil)
	if err := apply(a, 0, `{"n":1}`); err != nil {
		t.Fatalf("holder's write: %v", err)
	}
	// The holder lapses; b takes over with a new term.
	if postgres {
		deadline := time.Now().Add(10 * time.Second)
		for b.Holder != "b" && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			b, err = db.AcquireLease(ctx, "scheduler", "b", ttl)
		}
	} else {
		clk.Add(ttl + time.Millisecond)
		b, err = db.AcquireLease(ctx, "scheduler", "b", ttl)
	}
	if err != nil || b.Holder != "b" || b.Token != 2 {
		t.Fatalf("takeover after the lapse: %+v, %v", b, err)
	}
	if err := apply(a, 1, `{"n":2}`); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("old holder's write after the takeover: %v (want ErrFenced)", err)
	}
	row, _ := db.Rollout(ctx, "r")
	if string(row.State) != `{"n":1}` || row.Rev != 1 {
		t.Fatalf("state after a fenced write: %s rev %d", row.State, row.Rev)
	}
	if cmds, _ := db.PendingCommands(ctx, "d1", now.Add(time.Hour)); len(cmds) != 1 {
		t.Fatalf("%d commands stored: the fenced write's must not be", len(cmds))
	}
	// A write planned from an old revision is refused too.
	if err := apply(b, 0, `{"n":3}`); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("write from a stale revision: %v (want ErrConflict)", err)
	}
	if err := apply(b, 1, `{"n":3}`); err != nil {
		t.Fatalf("new holder's write: %v", err)
	}
	// Released, the lease goes to the next asker at once, in a new term.
	if err := db.ReleaseLease(ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := apply(b, 2, `{"n":4}`); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("write after release: %v (want ErrFenced)", err)
	}
	if a2, err := db.AcquireLease(ctx, "scheduler", "a", ttl); err != nil || a2.Holder != "a" || a2.Token != 3 {
		t.Fatalf("acquire after release: %+v, %v", a2, err)
	}
	// A lapsed lease refuses its holder's writes even with nobody else.
	if !postgres {
		a3, _ := db.Lease(ctx, "scheduler")
		clk.Add(ttl + time.Millisecond)
		if err := apply(a3, 2, `{"n":5}`); !errors.Is(err, store.ErrFenced) {
			t.Fatalf("write under a lapsed lease: %v", err)
		}
	}
}
