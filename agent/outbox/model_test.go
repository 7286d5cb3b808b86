package outbox

import (
	"bytes"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// model is the expected content of an outbox: the pending records of each
// lane, oldest first.
type model struct {
	pending    [numLanes][]Record
	next       [numLanes]uint64
	unreported uint64 // drops not yet taken
	dropped    uint64 // drops since the last Open
}

func (m *model) sendOrder() []Record {
	return slices.Concat(m.pending[Events], m.pending[Telemetry])
}

func (m *model) ack(ids []ID) {
	for _, id := range ids {
		if id.Lane >= numLanes {
			continue
		}
		m.pending[id.Lane] = slices.DeleteFunc(m.pending[id.Lane], func(r Record) bool { return r.ID == id })
	}
}

// reconcile learns from a full Peek which records the Append of just dropped
// and checks that the drops followed the rules.
func (m *model) reconcile(t *rapid.T, o *Outbox, just ID) {
	got, err := o.Peek(1 << 30)
	if err != nil {
		t.Fatalf("Peek: %v", err)
	}
	present := map[ID]bool{}
	for _, r := range got {
		present[r.ID] = true
	}
	var lost [numLanes]int
	for l := range numLanes {
		p := m.pending[l]
		// Drops take whole segments, oldest first: what is gone is a prefix.
		k := 0
		for k < len(p) && !present[p[k].ID] {
			k++
		}
		for _, r := range p[k:] {
			if !present[r.ID] {
				t.Fatalf("%v dropped while older %s records were kept", r.ID, Lane(l))
			}
		}
		lost[l] = k
		m.pending[l] = p[k:]
	}
	if !present[just] {
		t.Fatalf("the record just appended, %v, is missing", just)
	}
	if lost[Events] > 0 {
		for _, r := range m.pending[Telemetry] {
			if r.ID != just {
				t.Fatalf("events dropped while telemetry %v was kept", r.ID)
			}
		}
	}
	n := uint64(lost[Events] + lost[Telemetry])
	m.unreported += n
	m.dropped += n
}

func (m *model) check(t *rapid.T, o *Outbox) {
	st := o.Stats()
	if st.PendingEvents != uint64(len(m.pending[Events])) || st.PendingTelemetry != uint64(len(m.pending[Telemetry])) {
		t.Fatalf("Stats pending %d/%d, model %d/%d", st.PendingEvents, st.PendingTelemetry, len(m.pending[Events]), len(m.pending[Telemetry]))
	}
	if st.Dropped != m.dropped {
		t.Fatalf("Stats.Dropped = %d, model %d", st.Dropped, m.dropped)
	}
	checkBytes(t, o)
}

// TestModel runs random sequences of Append, Peek, Ack, TakeDropped, Close
// and crash with reopen against the model, with budgets that make drops
// frequent or impossible.
func TestModel(t *testing.T) {
	base := t.TempDir()
	run := 0
	rapid.Check(t, func(t *rapid.T) {
		run++
		dir := filepath.Join(base, fmt.Sprint(run))
		maxBytes := rapid.SampledFrom([]int64{MinMaxBytes, 3 << 10, 1 << 20}).Draw(t, "maxBytes")
		opts := Options{
			MaxBytes:     maxBytes,
			SegmentBytes: rapid.Int64Range(MinSegmentBytes, min(maxBytes/2, 2<<10)).Draw(t, "segmentBytes"),
			NoSync:       true,
		}
		o, err := Open(dir, opts)
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		defer func() { _ = o.Close() }()
		bigRecord := min(o.MaxRecord(), 4<<10)

		m := &model{next: [numLanes]uint64{1, 1}}
		var peeked []Record
		steps := rapid.IntRange(1, 150).Draw(t, "steps")
		for range steps {
			switch op := rapid.IntRange(0, 9).Draw(t, "op"); {
			case op <= 3:
				l := Lane(rapid.IntRange(0, 1).Draw(t, "lane"))
				size := rapid.OneOf(rapid.IntRange(0, 100), rapid.IntRange(0, bigRecord)).Draw(t, "size")
				id := ID{l, m.next[l]}
				data := bytes.Repeat([]byte{byte(id.Index), byte(l)}, size)[:size]
				if err := o.Append(l, data); err != nil {
					t.Fatalf("Append(%v, %d bytes): %v", id, size, err)
				}
				m.next[l]++
				m.pending[l] = append(m.pending[l], Record{id, data})
				m.reconcile(t, o, id)
			case op <= 5:
				max := rapid.IntRange(0, 20).Draw(t, "max")
				got, err := o.Peek(max)
				if err != nil {
					t.Fatalf("Peek: %v", err)
				}
				want := m.sendOrder()
				want = want[:min(max, len(want))]
				sameRecords(t, got, want)
				peeked = got
			case op <= 7:
				// Acks in any order, with repeats and IDs that do not (or
				// no longer) name a pending record.
				acks := rapid.Permutation(peeked).Draw(t, "perm")
				acks = acks[:rapid.IntRange(0, len(acks)).Draw(t, "nacks")]
				ackIDs := ids(acks)
				if rapid.Bool().Draw(t, "bogus") {
					ackIDs = append(ackIDs, ID{Telemetry, m.next[Telemetry]}, ID{Events, 0}, ID{Lane(3), 1})
					ackIDs = append(ackIDs, ackIDs[:len(ackIDs)/2]...)
				}
				if err := o.Ack(ackIDs...); err != nil {
					t.Fatalf("Ack: %v", err)
				}
				m.ack(ackIDs)
			case op == 8:
				if rapid.Bool().Draw(t, "clean") {
					if err := o.Close(); err != nil {
						t.Fatalf("Close: %v", err)
					}
				} else {
					crash(o)
				}
				if o, err = Open(dir, opts); err != nil {
					t.Fatalf("reopen: %v", err)
				}
				m.dropped = 0
			default:
				if got := o.TakeDropped(); got != m.unreported {
					t.Fatalf("TakeDropped = %d, model %d", got, m.unreported)
				}
				m.unreported = 0
			}
			m.check(t, o)
		}
	})
}
