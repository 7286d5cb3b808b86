package outbox

import (
	"math/rand/v2"
	"testing"
)

// TestSpans checks the set against a map on random operations.
func TestSpans(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 200 {
		var s spans
		ref := map[uint64]bool{}
		var floor uint64
		for range 100 {
			switch rng.IntN(3) {
			case 0, 1:
				lo := floor + rng.Uint64N(60)
				hi := lo + rng.Uint64N(5)
				s.add(lo, hi)
				for i := lo; i < hi; i++ {
					ref[i] = true
				}
			case 2:
				floor += rng.Uint64N(10)
				s.pruneBelow(floor)
				for i := range ref {
					if i < floor {
						delete(ref, i)
					}
				}
			}
			for k, sp := range s {
				if sp.lo >= sp.hi || (k > 0 && s[k-1].hi >= sp.lo) || sp.lo < floor {
					t.Fatalf("malformed set %v (floor %d)", s, floor)
				}
			}
			for i := floor; i < floor+80; i++ {
				if s.contains(i) != ref[i] {
					t.Fatalf("contains(%d) = %v, want %v; set %v", i, s.contains(i), ref[i], s)
				}
			}
			lo := floor + rng.Uint64N(70)
			hi := lo + rng.Uint64N(20)
			var want uint64
			for i := lo; i < hi; i++ {
				if ref[i] {
					want++
				}
			}
			if got := s.countIn(lo, hi); got != want {
				t.Fatalf("countIn(%d, %d) = %d, want %d; set %v", lo, hi, got, want, s)
			}
		}
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	in := snapshot{seq: 7, unreported: 3}
	in.lanes[Events] = laneSnap{next: 10, floor: 4}
	in.lanes[Telemetry] = laneSnap{next: 99, floor: 50, done: spans{{52, 53}, {60, 70}}}
	b := in.encode(nil)
	out, ok := decodeSnapshot(b)
	if !ok {
		t.Fatal("decode failed")
	}
	if out.seq != in.seq || out.unreported != in.unreported || out.lanes[Events].next != 10 ||
		out.lanes[Telemetry].floor != 50 || len(out.lanes[Telemetry].done) != 2 || out.lanes[Telemetry].done[1] != (span{60, 70}) {
		t.Fatalf("round trip: %+v", out)
	}
	// Trailing bytes of an older, longer state are ignored; any flipped bit
	// is caught.
	if _, ok := decodeSnapshot(append(b, 1, 2, 3)); !ok {
		t.Fatal("trailing bytes rejected")
	}
	for i := range b {
		c := append([]byte(nil), b...)
		c[i] ^= 1
		if _, ok := decodeSnapshot(c); ok {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
}
