package ingest_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/ingest"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// fakeStore records group writes; fail makes the next write fail.
type fakeStore struct {
	mu     sync.Mutex
	groups [][]store.IngestItem
	fail   error
}

func (f *fakeStore) WriteIngest(_ context.Context, items []store.IngestItem) (store.IngestResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		err := f.fail
		f.fail = nil
		return store.IngestResult{}, err
	}
	f.groups = append(f.groups, append([]store.IngestItem(nil), items...))
	return store.IngestResult{}, nil
}

func (f *fakeStore) stored() []store.IngestItem {
	f.mu.Lock()
	defer f.mu.Unlock()
	var all []store.IngestItem
	for _, g := range f.groups {
		all = append(all, g...)
	}
	return all
}

func start(t *testing.T, st ingest.Store, m *metrics.Metrics) *ingest.Ingester {
	in := ingest.New(st, ingest.Options{Metrics: m, GroupWait: time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { in.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return in
}

// collect gathers done results in the order they are called.
type collect struct {
	mu  sync.Mutex
	got []string
	wg  sync.WaitGroup
}

func (c *collect) done(name string) func(error) {
	c.wg.Add(1)
	return func(err error) {
		c.mu.Lock()
		s := name
		if err != nil {
			s += ":" + err.Error()
		}
		c.got = append(c.got, s)
		c.mu.Unlock()
		c.wg.Done()
	}
}

// TestMalformedCountedAndAcknowledgedInOrder: malformed messages are
// counted, stored nowhere, acknowledged, and keep the device's order.
func TestMalformedCountedAndAcknowledgedInOrder(t *testing.T) {
	st := &fakeStore{}
	m := metrics.New(nil)
	in := start(t, st, m)
	good := prototest.Batch(1, 1)
	goodBytes, _ := proto.Marshal(&good)
	good2 := prototest.Batch(2, 1)
	good2Bytes, _ := proto.Marshal(&good2)
	var c collect
	msgs := []struct {
		name    string
		kind    proto.Kind
		payload []byte
	}{
		{"good1", proto.KindTelemetry, goodBytes},
		{"garbage", proto.KindTelemetry, []byte{0xff, 0xfe, 0x00}},
		{"state-as-telemetry", proto.KindState, goodBytes},
		{"empty", proto.KindEvent, nil},
		{"cmd", proto.KindCmd, goodBytes},
		{"good2", proto.KindTelemetry, good2Bytes},
	}
	for _, msg := range msgs {
		in.Handle(context.Background(), broker.Message{Device: "d1", Kind: msg.kind, Payload: msg.payload, Received: time.Now()}, c.done(msg.name))
	}
	c.wg.Wait()
	want := []string{"good1", "garbage", "state-as-telemetry", "empty", "cmd", "good2"}
	if len(c.got) != len(want) {
		t.Fatalf("done calls %v", c.got)
	}
	for i := range want {
		if c.got[i] != want[i] {
			t.Fatalf("acknowledgements out of order or failed: %v, want %v", c.got, want)
		}
	}
	if s := st.stored(); len(s) != 2 || s[0].Batch.Seq != 1 || s[1].Batch.Seq != 2 {
		t.Fatalf("stored %+v", s)
	}
	bad := testutil.ToFloat64(m.DecodeErrors.WithLabelValues("telemetry")) + testutil.ToFloat64(m.DecodeErrors.WithLabelValues("state")) +
		testutil.ToFloat64(m.DecodeErrors.WithLabelValues("event")) + testutil.ToFloat64(m.DecodeErrors.WithLabelValues("cmd"))
	if bad != 4 {
		t.Fatalf("decode errors counted: %v", bad)
	}
}

// TestStoreFailureNotAcknowledged: when the store fails, done gets the
// error (the broker then does not acknowledge) and later messages go on.
func TestStoreFailureNotAcknowledged(t *testing.T) {
	st := &fakeStore{fail: errors.New("disk I/O error")}
	m := metrics.New(nil)
	in := start(t, st, m)
	b := prototest.Batch(1, 1)
	p, _ := proto.Marshal(&b)
	var c collect
	in.Handle(context.Background(), broker.Message{Device: "d1", Kind: proto.KindTelemetry, Payload: p, Received: time.Now()}, c.done("first"))
	c.wg.Wait()
	in.Handle(context.Background(), broker.Message{Device: "d1", Kind: proto.KindTelemetry, Payload: p, Received: time.Now()}, c.done("again"))
	c.wg.Wait()
	if len(c.got) != 2 || c.got[0] != "first:disk I/O error" || c.got[1] != "again" {
		t.Fatalf("done calls %v", c.got)
	}
	if testutil.ToFloat64(m.StoreErrors) != 1 {
		t.Fatal("store error not counted")
	}
}

// TestHandleAfterStop: a message arriving after shutdown is refused, not
// acknowledged.
func TestHandleAfterStop(t *testing.T) {
	in := ingest.New(&fakeStore{}, ingest.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var c collect
	b := prototest.Batch(1, 1)
	p, _ := proto.Marshal(&b)
	for range 300 { // more than a decoder queue holds
		in.Handle(ctx, broker.Message{Device: "d1", Kind: proto.KindTelemetry, Payload: p}, c.done("x"))
	}
	in.Run(ctx) // returns at once and fails what was queued
	c.wg.Wait()
	for _, g := range c.got {
		if g == "x" {
			t.Fatal("a message was acknowledged after shutdown")
		}
	}
}

// TestQuotaDropsAndCounts: a device beyond its quota has the excess
// acknowledged in order, counted and not stored; another device's
// messages are stored meanwhile.
func TestQuotaDropsAndCounts(t *testing.T) {
	st := &fakeStore{}
	m := metrics.New(nil)
	in := ingest.New(st, ingest.Options{Metrics: m, GroupWait: time.Millisecond,
		Messages: throttle.New(0.001, 5, 100), Bytes: throttle.New(0.001, 1<<20, 100)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { in.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	var c collect
	for i := range 20 {
		b := prototest.Batch(uint64(i+1), 1)
		raw, _ := proto.Marshal(&b)
		in.Handle(context.Background(), broker.Message{Device: "flood", Kind: proto.KindTelemetry, Payload: raw, Received: time.Now()}, c.done(fmt.Sprint("f", i)))
		if i%5 == 0 {
			in.Handle(context.Background(), broker.Message{Device: "calm", Kind: proto.KindTelemetry, Payload: raw, Received: time.Now()}, c.done(fmt.Sprint("c", i)))
		}
	}
	big := make([]byte, 2<<20)
	in.Handle(context.Background(), broker.Message{Device: "calm", Kind: proto.KindTelemetry, Payload: big, Received: time.Now()}, c.done("big"))
	c.wg.Wait()
	for _, g := range c.got {
		if strings.Contains(g, ":") {
			t.Fatalf("a dropped message was not acknowledged: %v", c.got)
		}
	}
	var flood, calm int
	for _, it := range st.stored() {
		switch it.Device {
		case "flood":
			flood++
		case "calm":
			calm++
		}
	}
	if flood != 5 || calm != 4 {
		t.Errorf("stored %d of the flooding device's messages (want its quota, 5) and %d of the other's (want 4)", flood, calm)
	}
	if got := testutil.ToFloat64(m.OverQuota.WithLabelValues("messages")); got != 15 {
		t.Errorf("over the message quota: %v, want 15", got)
	}
	if got := testutil.ToFloat64(m.OverQuota.WithLabelValues("bytes")); got != 1 {
		t.Errorf("over the byte quota: %v, want 1", got)
	}
}

// blockingStore holds every write until released.
type blockingStore struct {
	fakeStore
	release chan struct{}
}

func (b *blockingStore) WriteIngest(ctx context.Context, items []store.IngestItem) (store.IngestResult, error) {
	<-b.release
	return b.fakeStore.WriteIngest(ctx, items)
}

// TestQueueBoundedInBytes: while the store is slow, the bytes waiting for
// it stay under the budget; publishers wait, then everything is stored.
func TestQueueBoundedInBytes(t *testing.T) {
	st := &blockingStore{release: make(chan struct{})}
	const budget = 64 << 10
	in := ingest.New(st, ingest.Options{GroupWait: time.Millisecond, QueueBytes: budget})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { in.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	b := prototest.Batch(1, 300)
	raw, _ := proto.Marshal(&b)
	var c collect
	sent := make(chan int, 1)
	published := make(chan struct{})
	go func() {
		defer close(published)
		for i := range 100 {
			b := prototest.Batch(uint64(i+1), 300)
			raw, _ := proto.Marshal(&b)
			in.Handle(context.Background(), broker.Message{Device: "d", Kind: proto.KindTelemetry, Payload: raw, Received: time.Now()}, c.done(fmt.Sprint(i)))
			select {
			case sent <- i:
			default:
				<-sent
				sent <- i
			}
		}
	}()
	// The publisher gets as far as the budget allows, and no further.
	want := budget / len(raw)
	deadline := time.Now().Add(10 * time.Second)
	for in.QueuedBytes()+int64(len(raw)) <= budget {
		if time.Now().After(deadline) {
			t.Fatalf("queued %d bytes of %d", in.QueuedBytes(), budget)
		}
		time.Sleep(time.Millisecond)
	}
	if q := in.QueuedBytes(); q > budget {
		t.Fatalf("%d bytes queued, budget %d", q, budget)
	}
	if n := len(st.stored()); n != 0 {
		t.Fatalf("stored %d while the store is held", n)
	}
	if i := <-sent; i+1 > want {
		t.Fatalf("handled %d messages of %d bytes with a budget of %d", i+1, len(raw), budget)
	}
	close(st.release)
	<-published
	c.wg.Wait()
	if n := len(st.stored()); n != 100 {
		t.Fatalf("stored %d of 100", n)
	}
	if q := in.QueuedBytes(); q != 0 {
		t.Fatalf("%d bytes still counted", q)
	}
}
