package leader_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/leader"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// cutStore is a replica's view of the store, which the test can cut off
// (a network partition between the replica and the database).
type cutStore struct {
	leader.Store
	cut atomic.Bool
}

func (c *cutStore) AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (store.Lease, error) {
	if c.cut.Load() {
		<-ctx.Done() // the request hangs, as over a dead link
		return store.Lease{}, ctx.Err()
	}
	return c.Store.AcquireLease(ctx, name, holder, ttl)
}

// terms records when each replica led, by the test's clock.
type terms struct {
	mu     sync.Mutex
	starts map[string][]time.Time
	stops  map[string][]time.Time
}

func (tr *terms) on(holder string) func(bool, store.Lease) {
	return func(leading bool, _ store.Lease) {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		if leading {
			tr.starts[holder] = append(tr.starts[holder], time.Now())
		} else {
			tr.stops[holder] = append(tr.stops[holder], time.Now())
		}
	}
}

func (tr *terms) get(m map[string][]time.Time, h string) []time.Time {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]time.Time(nil), m[h]...)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// One replica leads at a time. Cut off from the database, the leader stops
// leading before another can start, and the writes of its term are refused
// once it lost the lease; a replica that shuts down hands over at once.
func TestElection(t *testing.T) {
	db := sqlstoretest.Open(t, sqlstore.Options{})
	ttl := time.Second
	tr := &terms{starts: map[string][]time.Time{}, stops: map[string][]time.Time{}}
	stores := map[string]*cutStore{}
	electors := map[string]*leader.Elector{}
	cancels := map[string]context.CancelFunc{}
	var wg sync.WaitGroup
	for _, h := range []string{"a", "b", "c"} {
		stores[h] = &cutStore{Store: db}
		electors[h] = leader.New(leader.Options{Store: stores[h], Holder: h, TTL: ttl, OnChange: tr.on(h)})
		ctx, cancel := context.WithCancel(t.Context())
		cancels[h] = cancel
		e := electors[h]
		if h == "a" {
			e.Campaign(ctx) // a starts first
		}
		wg.Add(1)
		go func() { defer wg.Done(); e.Run(ctx) }()
	}
	defer func() {
		for _, c := range cancels {
			c()
		}
		wg.Wait()
	}()
	leaders := func() (out []string) {
		for h, e := range electors {
			if _, ok := e.Leading(); ok {
				out = append(out, h)
			}
		}
		return out
	}
	if l := leaders(); len(l) != 1 || l[0] != "a" {
		t.Fatalf("leading: %v, want a", l)
	}
	term, _ := electors["a"].Leading()
	fence, _ := store.FenceFrom(term)
	if fence.Holder != "a" || fence.Token != 1 {
		t.Fatalf("a's term carries %+v", fence)
	}
	// A few renewals: still a alone.
	time.Sleep(2 * ttl)
	if l := leaders(); len(l) != 1 || l[0] != "a" {
		t.Fatalf("after renewals leading: %v", l)
	}

	// Cut a off from the database.
	stores["a"].cut.Store(true)
	waitFor(t, "another replica to lead", func() bool {
		l := leaders()
		return len(l) == 1 && l[0] != "a"
	})
	next := leaders()[0]
	stopA := tr.get(tr.stops, "a")
	startNext := tr.get(tr.starts, next)
	if len(stopA) != 1 || len(startNext) != 1 || !stopA[0].Before(startNext[0]) {
		t.Fatalf("a stopped %v, %s started %v: the old leader must stop before the next starts", stopA, next, startNext)
	}
	if term.Err() == nil {
		t.Fatal("a's term context still live after it stopped leading")
	}
	// Whatever a still tries to write under its old term is refused.
	err := db.ApplyRollout(store.WithFence(context.Background(), fence), store.RolloutChange{ID: "none"})
	if !errors.Is(err, store.ErrFenced) {
		t.Fatalf("write under a's lost term: %v", err)
	}
	nt, _ := electors[next].Leading()
	if f, _ := store.FenceFrom(nt); f.Token != 2 {
		t.Fatalf("new term %+v, want token 2", f)
	}

	// a comes back: it does not lead again while the other renews.
	stores["a"].cut.Store(false)
	time.Sleep(2 * ttl)
	if l := leaders(); len(l) != 1 || l[0] != next {
		t.Fatalf("after a returned leading: %v, want %s", l, next)
	}

	// The leader shuts down: it releases the lease, and a successor
	// takes over without waiting for the term to lapse.
	down := time.Now()
	cancels[next]()
	waitFor(t, "a successor", func() bool {
		l := leaders()
		return len(l) == 1 && l[0] != next
	})
	if took := time.Since(down); took > ttl {
		t.Fatalf("handover after a clean shutdown took %v (term %v)", took, ttl)
	}
}
