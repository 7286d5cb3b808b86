package outbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		name    string
		opts    Options
		wantErr bool
	}{
		{"zero", Options{}, false},
		{"tiny", Options{MaxBytes: MinMaxBytes}, false},
		{"explicit", Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10}, false},
		{"segment is half", Options{MaxBytes: 8 << 10, SegmentBytes: 4 << 10}, false},
		{"negative max", Options{MaxBytes: -1}, true},
		{"negative segment", Options{SegmentBytes: -1}, true},
		{"max too small", Options{MaxBytes: MinMaxBytes - 1}, true},
		{"segment too small", Options{SegmentBytes: MinSegmentBytes - 1}, true},
		{"segment over half", Options{MaxBytes: 8 << 10, SegmentBytes: 4<<10 + 1}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.opts.Validate(); (err != nil) != tt.wantErr {
				t.Fatalf("Validate() = %v, want error %v", err, tt.wantErr)
			}
		})
	}
}

func TestDefaultSegmentBytes(t *testing.T) {
	tests := []struct{ max, want int64 }{
		{0, 256 << 10},
		{1 << 30, 1 << 20},
		{64 << 10, 4 << 10},
		{4 << 10, 2 << 10},
	}
	for _, tt := range tests {
		if got := (Options{MaxBytes: tt.max}).withDefaults().SegmentBytes; got != tt.want {
			t.Errorf("MaxBytes %d: SegmentBytes %d, want %d", tt.max, got, tt.want)
		}
	}
}

func TestPeekOrder(t *testing.T) {
	o := openT(t, t.TempDir(), smallOpts())
	want := map[ID][]byte{}
	add := func(l Lane, i int) {
		d := payload(l, i, 40)
		mustAppend(t, o, l, d)
	}
	// Interleaved, with enough records to span several segments per lane.
	for i := range 30 {
		add(Telemetry, i)
		if i%3 == 0 {
			add(Events, i)
		}
	}
	recs := peekAll(t, o)
	if len(recs) != 40 {
		t.Fatalf("got %d records, want 40", len(recs))
	}
	for i, r := range recs {
		wantLane, wantIndex := Events, uint64(i+1)
		if i >= 10 {
			wantLane, wantIndex = Telemetry, uint64(i-10+1)
		}
		if r.ID != (ID{wantLane, wantIndex}) {
			t.Fatalf("record %d is %v, want %v", i, r.ID, ID{wantLane, wantIndex})
		}
		want[r.ID] = r.Data
	}

	// Peek again without acks: the same records, and max is honoured.
	first := recs[:5]
	again, err := o.Peek(5)
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, again, first)

	// An event appended now comes before the pending telemetry.
	mustAppend(t, o, Events, []byte("late event"))
	recs = peekAll(t, o)
	if got := recs[10].ID; got != (ID{Events, 11}) {
		t.Fatalf("record 10 is %v, want the late event", got)
	}
	if got := recs[11].ID; got != (ID{Telemetry, 1}) {
		t.Fatalf("record 11 is %v, want the first telemetry", got)
	}
	st := o.Stats()
	if st.PendingEvents != 11 || st.PendingTelemetry != 30 {
		t.Fatalf("Stats pending %d/%d, want 11/30", st.PendingEvents, st.PendingTelemetry)
	}
}

func TestPeekEmptyAndMax(t *testing.T) {
	o := openT(t, t.TempDir(), Options{})
	if recs, err := o.Peek(10); err != nil || len(recs) != 0 {
		t.Fatalf("Peek on empty = %v, %v", recs, err)
	}
	mustAppend(t, o, Telemetry, []byte("x"))
	if recs, err := o.Peek(0); err != nil || len(recs) != 0 {
		t.Fatalf("Peek(0) = %v, %v", recs, err)
	}
}

func TestReopenKeepsPending(t *testing.T) {
	for _, how := range []string{"close", "crash"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			o := openT(t, dir, smallOpts())
			for i := range 20 {
				mustAppend(t, o, Lane(i%2), payload(Lane(i%2), i, 50))
			}
			want := peekAll(t, o)
			if how == "close" {
				if err := o.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				crash(o)
			}
			o = openT(t, dir, smallOpts())
			sameRecords(t, peekAll(t, o), want)
			if d := o.TakeDropped(); d != 0 {
				t.Fatalf("TakeDropped = %d after a clean reopen", d)
			}
			// Indexes continue where they stopped.
			mustAppend(t, o, Events, []byte("next"))
			if recs := peekAll(t, o); recs[10].ID != (ID{Events, 11}) {
				t.Fatalf("appended after reopen as %v, want %v", recs[10].ID, ID{Events, 11})
			}
		})
	}
}

func TestAckPersists(t *testing.T) {
	for _, how := range []string{"close", "crash"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			o := openT(t, dir, smallOpts())
			for i := range 30 {
				mustAppend(t, o, Telemetry, payload(Telemetry, i, 60))
			}
			recs := peekAll(t, o)
			ackAll(t, o, recs[:17])
			if how == "close" {
				if err := o.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				// Every Ack has written the state, so a process crash
				// repeats nothing.
				crash(o)
			}
			o = openT(t, dir, smallOpts())
			sameRecords(t, peekAll(t, o), recs[17:])
		})
	}
}

func TestAckDeletesSegments(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, smallOpts())
	// 3 records of 60 bytes fill a segment of 256, so each lane ends on a
	// full segment.
	for i := range 42 {
		mustAppend(t, o, Lane(i%2), payload(Lane(i%2), i, 60))
	}
	before, _ := segFiles(t, dir)
	ackAll(t, o, peekAll(t, o))
	after, _ := segFiles(t, dir)
	// The newest segment of each lane stays: its name carries the next index.
	if len(before) <= 2 || len(after) != 2 {
		t.Fatalf("segments before/after ack: %v / %v", before, after)
	}
	checkBytes(t, o)
	// Once a new segment supersedes it, the acknowledged one goes too.
	mustAppend(t, o, Telemetry, payload(Telemetry, 100, 60))
	names, _ := segFiles(t, dir)
	for _, n := range names {
		if n == after[1] {
			t.Fatalf("acknowledged segment %s still there: %v", n, names)
		}
	}
}

func TestIndexesNeverReused(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, smallOpts())
	for i := range 5 {
		mustAppend(t, o, Events, payload(Events, i, 10))
	}
	ackAll(t, o, peekAll(t, o))
	// Lose the state entirely: the newest segment's name still pins the
	// index.
	crash(o)
	for _, n := range stateNames {
		if err := os.Remove(filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	o = openT(t, dir, smallOpts())
	mustAppend(t, o, Events, []byte("new"))
	recs := peekAll(t, o)
	if last := recs[len(recs)-1].ID; last != (ID{Events, 6}) {
		t.Fatalf("new record got %v, want %v", last, ID{Events, 6})
	}
}

func TestOutOfOrderAcks(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, smallOpts())
	for i := range 12 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 30))
	}
	recs := peekAll(t, o)
	// Ack every odd one, backwards.
	var acked []ID
	for i := len(recs) - 1; i >= 0; i -= 2 {
		acked = append(acked, recs[i].ID)
	}
	if err := o.Ack(acked...); err != nil {
		t.Fatal(err)
	}
	var want []Record
	for i := 0; i < len(recs); i += 2 {
		want = append(want, recs[i])
	}
	sameRecords(t, peekAll(t, o), want)
	if st := o.Stats(); st.PendingTelemetry != 6 {
		t.Fatalf("PendingTelemetry = %d, want 6", st.PendingTelemetry)
	}

	// Acks above the ack position survive a restart too.
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o = openT(t, dir, smallOpts())
	sameRecords(t, peekAll(t, o), want)

	if err := o.Ack(want[2].ID, want[0].ID); err != nil {
		t.Fatal(err)
	}
	sameRecords(t, peekAll(t, o), []Record{want[1], want[3], want[4], want[5]})
}

func TestAckIgnoresUnknown(t *testing.T) {
	o := openT(t, t.TempDir(), smallOpts())
	for i := range 3 {
		mustAppend(t, o, Events, payload(Events, i, 10))
	}
	recs := peekAll(t, o)
	ackAll(t, o, recs[:1])
	bogus := []ID{
		{},                  // zero ID
		recs[0].ID,          // already acknowledged
		{Events, 4},         // not appended yet
		{Telemetry, 1},      // empty lane
		{Lane(7), 2},        // unknown lane
		{Events, 1<<64 - 1}, // far future
		{Telemetry, 1<<64 - 1} /* far future */}
	if err := o.Ack(bogus...); err != nil {
		t.Fatalf("Ack of unknown IDs: %v", err)
	}
	sameRecords(t, peekAll(t, o), recs[1:])
	// The index not yet appended when acknowledged must still be sent.
	mustAppend(t, o, Events, []byte("fourth"))
	if got := peekAll(t, o); len(got) != 3 || got[2].ID != (ID{Events, 4}) {
		t.Fatalf("after append: %v", ids(got))
	}
}

func TestTooLarge(t *testing.T) {
	opts := Options{MaxBytes: 4 << 10}
	o := openT(t, t.TempDir(), opts)
	max := o.MaxRecord()
	if max != opts.MaxRecordBytes() || max != 2<<10-segHeaderSize-frameHeaderSize {
		t.Fatalf("MaxRecord = %d", max)
	}
	if err := o.Append(Events, make([]byte, max+1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Append of %d bytes: %v, want ErrTooLarge", max+1, err)
	}
	// The largest record fits, whatever is already there.
	for i := range 5 {
		mustAppend(t, o, Telemetry, make([]byte, 700))
		mustAppend(t, o, Lane(i%2), make([]byte, max))
		checkBytes(t, o)
	}
	if err := o.Append(Lane(2), nil); !errors.Is(err, ErrLane) {
		t.Fatalf("Append to lane 2: %v, want ErrLane", err)
	}
	// The default limit takes the biggest message the broker accepts.
	if got := (Options{}).MaxRecordBytes(); got < 256<<10 {
		t.Fatalf("default MaxRecordBytes = %d", got)
	}
}

func TestClosed(t *testing.T) {
	o := openT(t, t.TempDir(), Options{})
	mustAppend(t, o, Events, []byte("x"))
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if err := o.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("Close twice: %v", err)
	}
	if err := o.Append(Events, []byte("y")); !errors.Is(err, ErrClosed) {
		t.Errorf("Append: %v", err)
	}
	if _, err := o.Peek(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Peek: %v", err)
	}
	if err := o.Ack(ID{Events, 1}); !errors.Is(err, ErrClosed) {
		t.Errorf("Ack: %v", err)
	}
	if n := o.TakeDropped(); n != 0 {
		t.Errorf("TakeDropped: %d", n)
	}
	<-o.Notify() // the Append's
	if _, ok := <-o.Notify(); ok {
		t.Errorf("Notify channel not closed")
	}
}

func TestNotify(t *testing.T) {
	o := openT(t, t.TempDir(), Options{})
	select {
	case <-o.Notify():
		t.Fatal("notified before any Append")
	default:
	}
	// Appends never block on an unread notification, and are merged.
	for range 3 {
		mustAppend(t, o, Telemetry, []byte("x"))
	}
	select {
	case <-o.Notify():
	default:
		t.Fatal("no notification after Append")
	}
	select {
	case <-o.Notify():
		t.Fatal("second notification for merged Appends")
	default:
	}
}

// TestConcurrentSendLoop runs an appender and a sender as the agent does and
// checks that every record arrives once, in order within its lane.
func TestConcurrentSendLoop(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	o := openT(t, t.TempDir(), Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10, NoSync: true})
	const n = 2000
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range n {
			l := Telemetry
			if i%10 == 0 {
				l = Events
			}
			if err := o.Append(l, payload(l, i, 100)); err != nil {
				t.Errorf("Append: %v", err)
				return
			}
		}
	})
	wg.Go(func() {
		var got int
		var last [numLanes]uint64
		for got < n {
			recs, err := o.Peek(17)
			if err != nil {
				t.Errorf("Peek: %v", err)
				return
			}
			if len(recs) == 0 {
				select {
				case <-o.Notify():
				case <-ctx.Done():
					t.Errorf("got %d of %d records: %v", got, n, ctx.Err())
					return
				}
				continue
			}
			for _, r := range recs {
				if r.ID.Index <= last[r.ID.Lane] {
					t.Errorf("%v after %d: repeated or out of order", r.ID, last[r.ID.Lane])
					return
				}
				last[r.ID.Lane] = r.ID.Index
			}
			got += len(recs)
			// Ack the second half first, as a sender with several packets in
			// flight may.
			h := len(recs) / 2
			if err := o.Ack(ids(recs[h:])...); err != nil {
				t.Errorf("Ack: %v", err)
				return
			}
			_ = o.Stats()
			if err := o.Ack(ids(recs[:h])...); err != nil {
				t.Errorf("Ack: %v", err)
				return
			}
		}
	})
	wg.Wait()
	if st := o.Stats(); st.PendingEvents+st.PendingTelemetry != 0 || st.Dropped != 0 {
		t.Fatalf("after the loop: %+v", st)
	}
}
