package outbox

import (
	"testing"
)

// boundOpts holds 4 records of 100 bytes per segment, 8 segments in all.
func boundOpts() Options {
	return Options{MaxBytes: 4 << 10, SegmentBytes: 512}
}

// checkSuffix fails unless recs of lane l are the indexes up to last,
// consecutive, oldest first: drops took the oldest.
func checkSuffix(t *testing.T, recs []Record, l Lane, last uint64) {
	t.Helper()
	var got []uint64
	for _, r := range recs {
		if r.ID.Lane == l {
			got = append(got, r.ID.Index)
		}
	}
	for i, idx := range got {
		if want := last - uint64(len(got)-1-i); idx != want {
			t.Fatalf("%s pending %v: not the newest, consecutive", l, got)
		}
	}
}

func TestBoundDropsTelemetryFirst(t *testing.T) {
	o := openT(t, t.TempDir(), boundOpts())
	for i := range 3 {
		mustAppend(t, o, Events, payload(Events, i, 100))
	}
	const nt = 200
	for i := range nt {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 100))
		checkBytes(t, o)
		st := o.Stats()
		if st.PendingEvents != 3 || st.DroppedEvents != 0 {
			t.Fatalf("after telemetry %d: events dropped while telemetry could go: %+v", i, st)
		}
		if got := uint64(i+1) - st.PendingTelemetry; got != st.DroppedTelemetry {
			t.Fatalf("after telemetry %d: %d missing, %d counted dropped", i, got, st.DroppedTelemetry)
		}
	}
	recs := peekAll(t, o)
	checkSuffix(t, recs, Events, 3)
	checkSuffix(t, recs, Telemetry, nt)
	if o.Stats().DroppedTelemetry == 0 {
		t.Fatal("nothing dropped")
	}

	// Events now push out all telemetry, the segment being written included,
	// before the oldest events go.
	const ne = 100
	for i := range ne {
		mustAppend(t, o, Events, payload(Events, 3+i, 100))
		checkBytes(t, o)
		st := o.Stats()
		if st.PendingTelemetry > 0 && st.DroppedEvents > 0 {
			t.Fatalf("after event %d: events dropped with telemetry pending: %+v", i, st)
		}
		if got := uint64(3+i+1) - st.PendingEvents; got != st.DroppedEvents {
			t.Fatalf("after event %d: %d missing, %d counted dropped", i, got, st.DroppedEvents)
		}
	}
	recs = peekAll(t, o)
	checkSuffix(t, recs, Events, 3+ne)
	st := o.Stats()
	if st.PendingTelemetry != 0 || st.DroppedEvents == 0 {
		t.Fatalf("after the events: %+v", st)
	}
	if d := o.TakeDropped(); d != st.Dropped {
		t.Fatalf("TakeDropped = %d, Stats.Dropped = %d", d, st.Dropped)
	}
	if d := o.TakeDropped(); d != 0 {
		t.Fatalf("second TakeDropped = %d", d)
	}
}

func TestDropsDoNotCountAcked(t *testing.T) {
	o := openT(t, t.TempDir(), boundOpts())
	for i := range 8 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 100))
	}
	// Acknowledged out of order: the ack position stays at 1.
	if err := o.Ack(ID{Telemetry, 2}, ID{Telemetry, 3}, ID{Telemetry, 6}); err != nil {
		t.Fatal(err)
	}
	appended := uint64(8)
	for o.Stats().DroppedTelemetry == 0 {
		mustAppend(t, o, Telemetry, payload(Telemetry, int(appended), 100))
		appended++
	}
	recs := peekAll(t, o)
	if recs[0].ID.Index < 5 {
		t.Fatalf("oldest segment not dropped: %v", ids(recs))
	}
	// The first segment held 1-4, of which 2 and 3 were acknowledged.
	if st := o.Stats(); st.DroppedTelemetry != 2 {
		t.Fatalf("DroppedTelemetry = %d, want 2", st.DroppedTelemetry)
	}
}

func TestTakeDroppedSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, boundOpts())
	for i := range 100 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 100))
	}
	dropped := o.Stats().Dropped
	if dropped == 0 {
		t.Fatal("nothing dropped")
	}
	crash(o)
	o = openT(t, dir, boundOpts())
	if d := o.TakeDropped(); d != dropped {
		t.Fatalf("TakeDropped after crash = %d, want %d", d, dropped)
	}
	crash(o)
	o = openT(t, dir, boundOpts())
	if d := o.TakeDropped(); d != 0 {
		t.Fatalf("TakeDropped after taking and crash = %d, want 0", d)
	}
	// Drops not taken before a clean close are kept too.
	for i := range 20 {
		mustAppend(t, o, Telemetry, payload(Telemetry, 100+i, 100))
	}
	dropped = o.Stats().Dropped
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o = openT(t, dir, boundOpts())
	if d := o.TakeDropped(); d != dropped || dropped == 0 {
		t.Fatalf("TakeDropped after close = %d, want %d", d, dropped)
	}
}

func TestOpenShrinksToMaxBytes(t *testing.T) {
	dir := t.TempDir()
	big := Options{MaxBytes: 64 << 10, SegmentBytes: 512}
	o := openT(t, dir, big)
	for i := range 10 {
		mustAppend(t, o, Events, payload(Events, i, 100))
	}
	for i := range 200 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 100))
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o = openT(t, dir, boundOpts())
	checkBytes(t, o)
	st := o.Stats()
	if st.PendingEvents != 10 || st.DroppedEvents != 0 || st.DroppedTelemetry != 200-st.PendingTelemetry {
		t.Fatalf("after shrinking: %+v", st)
	}
	checkSuffix(t, peekAll(t, o), Telemetry, 200)
}
