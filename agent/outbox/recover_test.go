package outbox

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// fill appends n telemetry records of 40 bytes (frames of 52: 4 per segment
// of 256) and one event, then abandons the outbox, returning what was
// pending.
func fill(t *testing.T, dir string, n int) []Record {
	t.Helper()
	o := openT(t, dir, smallOpts())
	mustAppend(t, o, Events, payload(Events, 0, 40))
	for i := range n {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 40))
	}
	recs := peekAll(t, o)
	crash(o)
	return recs
}

func without(recs []Record, drop ...ID) []Record {
	var out []Record
next:
	for _, r := range recs {
		for _, id := range drop {
			if r.ID == id {
				continue next
			}
		}
		out = append(out, r)
	}
	return out
}

func TestTornTailEveryOffset(t *testing.T) {
	src := t.TempDir()
	const n = 5 // the last telemetry segment holds only record 5
	want := fill(t, src, n)
	last := want[len(want)-1]
	seg := lastSeg(t, src, Telemetry)
	fi, err := os.Stat(seg)
	if err != nil {
		t.Fatal(err)
	}
	frame := int64(frameHeaderSize + len(last.Data))
	if fi.Size() != segHeaderSize+frame {
		t.Fatalf("last segment is %d bytes, want one record", fi.Size())
	}
	// Every cut inside the last record, and into the segment header.
	for cut := int64(1); cut <= fi.Size(); cut++ {
		dir := copyDir(t, src)
		if err := os.Truncate(filepath.Join(dir, filepath.Base(seg)), fi.Size()-cut); err != nil {
			t.Fatal(err)
		}
		o := openT(t, dir, smallOpts())
		sameRecords(t, peekAll(t, o), want[:len(want)-1])
		if st := o.Stats(); st.Dropped != 0 {
			t.Fatalf("cut %d: %d dropped, want 0 (a torn append is no loss)", cut, st.Dropped)
		}
		checkBytes(t, o)
		// A torn frame whose header made it keeps its index reserved.
		wantIndex := uint64(n)
		if cut <= int64(len(last.Data)) {
			wantIndex = n + 1
		}
		mustAppend(t, o, Telemetry, []byte("after"))
		recs := peekAll(t, o)
		if got := recs[len(recs)-1].ID; got != (ID{Telemetry, wantIndex}) {
			t.Fatalf("cut %d: next append got %v, want index %d", cut, got, wantIndex)
		}
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
		o = openT(t, dir, smallOpts())
		sameRecords(t, peekAll(t, o), recs)
		if d := o.TakeDropped(); d != 0 {
			t.Fatalf("cut %d: TakeDropped = %d", cut, d)
		}
	}
}

func TestTornTailGarbage(t *testing.T) {
	src := t.TempDir()
	want := fill(t, src, 6)
	last := want[len(want)-1]
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 3000)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	// A frame header that claims a huge record at the next position.
	huge := be.AppendUint32(nil, 1<<31)
	huge = be.AppendUint32(huge, 2)
	huge = be.AppendUint32(huge, 0)
	// The last frame again: valid CRC, but for the wrong index.
	dup := appendFrame(nil, Telemetry, 5, 1, last.Data)
	tails := map[string][]byte{
		"random": random,
		"zeros":  make([]byte, 4096),
		"huge":   huge,
		"dup":    dup,
		"short":  {1, 2, 3},
	}
	for name, tail := range tails {
		t.Run(name, func(t *testing.T) {
			dir := copyDir(t, src)
			seg := lastSeg(t, dir, Telemetry)
			before, err := os.ReadFile(seg)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(seg, append(bytes.Clone(before), tail...), 0o600); err != nil {
				t.Fatal(err)
			}
			o := openT(t, dir, smallOpts())
			sameRecords(t, peekAll(t, o), want)
			if st := o.Stats(); st.Dropped != 0 {
				t.Fatalf("%d dropped", st.Dropped)
			}
			checkBytes(t, o)
			if after, _ := os.ReadFile(seg); !bytes.Equal(after, before) {
				t.Fatalf("segment not cut back: %d bytes, was %d", len(after), len(before))
			}
		})
	}
}

// corrupt flips one byte of the record at position pos of a segment of
// 40-byte records, in its data or, with header set, in its length field.
func corrupt(t *testing.T, path string, pos int, header bool) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off := segHeaderSize + pos*(frameHeaderSize+40)
	if header {
		off += 1 // the length becomes > 16 MiB
	} else {
		off += frameHeaderSize + 20
	}
	b[off] ^= 0x5a
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestMidSegmentCorruption(t *testing.T) {
	src := t.TempDir()
	// Telemetry 1-4, 5-8, 9-12, 13-14: the segment of 5-8 is not the newest.
	want := fill(t, src, 14)
	tid := func(i uint64) ID { return ID{Telemetry, i} }

	tests := []struct {
		name    string
		seg     uint64 // first index of the damaged segment
		pos     int
		header  bool
		acked   []ID // acknowledged before the damage: not counted
		lost    []ID
		dropped uint64
	}{
		{"data, old segment", 5, 1, false, nil, []ID{tid(6), tid(7), tid(8)}, 3},
		{"length, old segment", 5, 1, true, nil, []ID{tid(6), tid(7), tid(8)}, 3},
		{"first record, old segment", 5, 0, false, nil, []ID{tid(5), tid(6), tid(7), tid(8)}, 4},
		{"acked records not counted", 5, 1, false, []ID{tid(7)}, []ID{tid(6), tid(7), tid(8)}, 2},
		{"data, newest segment", 13, 0, false, nil, []ID{tid(13), tid(14)}, 2},
		{"length, newest segment", 13, 0, true, nil, []ID{tid(13), tid(14)}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := copyDir(t, src)
			if tt.acked != nil {
				o := openT(t, dir, smallOpts())
				if err := o.Ack(tt.acked...); err != nil {
					t.Fatal(err)
				}
				if err := o.Close(); err != nil {
					t.Fatal(err)
				}
			}
			corrupt(t, filepath.Join(dir, segName(Telemetry, tt.seg)), tt.pos, tt.header)

			o := openT(t, dir, smallOpts())
			wantNow := without(want, append(tt.acked, tt.lost...)...)
			sameRecords(t, peekAll(t, o), wantNow)
			if st := o.Stats(); st.DroppedTelemetry != tt.dropped || st.PendingTelemetry != uint64(len(wantNow)-1) {
				t.Fatalf("Stats = %+v, want %d dropped", st, tt.dropped)
			}
			checkBytes(t, o)
			// Indexes of lost records are never given again.
			mustAppend(t, o, Telemetry, []byte("after"))
			recs := peekAll(t, o)
			if got := recs[len(recs)-1].ID; got != tid(15) {
				t.Fatalf("next append got %v, want %v", got, tid(15))
			}

			// The loss is counted once, across restarts.
			if err := o.Close(); err != nil {
				t.Fatal(err)
			}
			o = openT(t, dir, smallOpts())
			sameRecords(t, peekAll(t, o), recs)
			if st := o.Stats(); st.Dropped != 0 {
				t.Fatalf("second open: %d dropped again", st.Dropped)
			}
			if d := o.TakeDropped(); d != tt.dropped {
				t.Fatalf("TakeDropped = %d, want %d", d, tt.dropped)
			}
		})
	}
}

// TestCorruptionAfterOpen damages a segment while the outbox is open: Peek
// drops the rest of it, as Open would, rather than failing for ever.
func TestCorruptionAfterOpen(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, smallOpts())
	for i := range 14 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 40))
	}
	want := peekAll(t, o)
	corrupt(t, filepath.Join(dir, segName(Telemetry, 5)), 2, false)
	got := peekAll(t, o)
	sameRecords(t, got, without(want, ID{Telemetry, 7}, ID{Telemetry, 8}))
	if d := o.TakeDropped(); d != 2 {
		t.Fatalf("TakeDropped = %d, want 2", d)
	}
	checkBytes(t, o)
	ackAll(t, o, got)
	mustAppend(t, o, Telemetry, []byte("after"))
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	o = openT(t, dir, smallOpts())
	if recs := peekAll(t, o); len(recs) != 1 || recs[0].ID != (ID{Telemetry, 15}) {
		t.Fatalf("after reopen: %v", ids(recs))
	}
	if st := o.Stats(); st.Dropped != 0 {
		t.Fatalf("reopen counted %d drops again", st.Dropped)
	}
}

func TestGarbageFiles(t *testing.T) {
	dir := t.TempDir()
	want := fill(t, dir, 6)
	rng := rand.New(rand.NewPCG(3, 4))
	garbage := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	files := map[string][]byte{
		"README":                     []byte("not ours"),
		"e-1.seg":                    garbage(100), // name too short: ignored
		"x-00000000000000000001.seg": garbage(100),
		"t-00000000000000000100.tmp": garbage(100),
		// Named like segments of this outbox, after the real ones.
		"t-00000000000000000050.seg": garbage(5000),
		"t-00000000000000000070.seg": nil,
		"e-00000000000000000009.seg": garbage(segHeaderSize),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "t-00000000000000000090.seg"), 0o700); err != nil {
		t.Fatal(err)
	}
	o := openT(t, dir, smallOpts())
	// Files named like segments are taken for damaged segments: the real
	// records before them are kept.
	sameRecords(t, peekAll(t, o), want)
	checkBytes(t, o)
	mustAppend(t, o, Telemetry, []byte("after"))
	recs := peekAll(t, o)
	// Their names still pin the indexes they carry.
	if got := recs[len(recs)-1].ID; got != (ID{Telemetry, 70}) {
		t.Fatalf("next append got %v, want index 70", got)
	}
	for _, name := range []string{"README", "e-1.seg", "x-00000000000000000001.seg", "t-00000000000000000100.tmp"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("unknown file %s touched: %v", name, err)
		}
	}
}

func TestGarbageState(t *testing.T) {
	dir := t.TempDir()
	want := fill(t, dir, 6)
	for i, name := range stateNames {
		b := bytes.Repeat([]byte{byte(i + 1)}, 100)
		copy(b, stateMagic[:])
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	o := openT(t, dir, smallOpts())
	// Without state nothing is known acknowledged: everything is sent.
	sameRecords(t, peekAll(t, o), want)
}

// TestTornStateSlot tears the newest state slot: the other one still holds
// an older, valid ack position, so records are repeated but never skipped.
func TestTornStateSlot(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, smallOpts())
	for i := range 10 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 40))
	}
	recs := peekAll(t, o)
	if err := o.Close(); err != nil { // fsynced state: nothing acknowledged
		t.Fatal(err)
	}
	o = openT(t, dir, smallOpts())
	ackAll(t, o, recs[:3])
	slot := 1 - o.st.durable // where the unsynced ack went
	crash(o)
	path := filepath.Join(dir, stateNames[slot])
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	o = openT(t, dir, smallOpts())
	sameRecords(t, peekAll(t, o), recs)
}

// TestAckLagAfterPowerCut rolls the state slots back to an earlier point, as
// a power cut may after acks written without fsync: records acknowledged
// since come back, none is skipped.
func TestAckLagAfterPowerCut(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, smallOpts())
	for i := range 20 {
		mustAppend(t, o, Telemetry, payload(Telemetry, i, 40))
	}
	recs := peekAll(t, o)
	ackAll(t, o, recs[:2])
	saved := map[string][]byte{}
	for _, name := range stateNames {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		saved[name] = b
	}
	// Records 3-6 acknowledged after the snapshot: their segment (1-4) and
	// 5-8 stay for 7 and 8; 9 and 11 out of order.
	if err := o.Ack(recs[2].ID, recs[3].ID, recs[4].ID, recs[5].ID, recs[8].ID, recs[10].ID); err != nil {
		t.Fatal(err)
	}
	crash(o)
	for name, b := range saved {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	o = openT(t, dir, smallOpts())
	got := peekAll(t, o)
	// Segment 1-4 was deleted, so 3 and 4 are gone; 5, 6, 9 and 11 repeat.
	sameRecords(t, got, recs[4:])
}

func FuzzOpen(f *testing.F) {
	seed := appendFrame(make([]byte, segHeaderSize), Telemetry, 1, 0, []byte("hello"))
	putSegHeader(seed, Telemetry, 1)
	f.Add(seed, []byte{})
	f.Add(append(bytes.Clone(seed), 0, 0, 0), []byte("HGOS"))
	f.Add(seed[:segHeaderSize+3], []byte{})
	f.Add([]byte("garbage"), []byte("garbage"))
	f.Fuzz(func(t *testing.T, seg, state []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segName(Telemetry, 1)), seg, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, stateNames[0]), state, 0o600); err != nil {
			t.Fatal(err)
		}
		o, err := Open(dir, Options{MaxBytes: 4 << 10, NoSync: true})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		defer o.Close()
		recs, err := o.Peek(100)
		if err != nil {
			t.Fatalf("Peek: %v", err)
		}
		if err := o.Append(Telemetry, []byte("x")); err != nil {
			t.Fatalf("Append: %v", err)
		}
		if err := o.Ack(ids(recs)...); err != nil {
			t.Fatalf("Ack: %v", err)
		}
		if got, err := o.Peek(100); err != nil || len(got) != 1 {
			t.Fatalf("Peek after Ack = %v, %v; want the new record", ids(got), err)
		}
	})
}
