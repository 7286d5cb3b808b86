package outbox

import (
	"slices"
	"sort"
)

// span is the range of indexes [lo, hi).
type span struct{ lo, hi uint64 }

// spans is a sorted set of disjoint, non-adjacent ranges. It holds the
// indexes above a lane's ack position that are resolved (acknowledged out of
// order, or lost), so its size follows how far out of order acks come, not
// how many records there are.
type spans []span

// search returns the position of the first span ending after i.
func (s spans) search(i uint64) int {
	return sort.Search(len(s), func(k int) bool { return s[k].hi > i })
}

func (s spans) find(i uint64) (span, bool) {
	if k := s.search(i); k < len(s) && s[k].lo <= i {
		return s[k], true
	}
	return span{}, false
}

func (s spans) contains(i uint64) bool {
	_, ok := s.find(i)
	return ok
}

func (s *spans) add(lo, hi uint64) {
	if lo >= hi {
		return
	}
	v := *s
	k := sort.Search(len(v), func(k int) bool { return v[k].hi >= lo })
	j := k
	for j < len(v) && v[j].lo <= hi {
		lo, hi = min(lo, v[j].lo), max(hi, v[j].hi)
		j++
	}
	*s = slices.Replace(v, k, j, span{lo, hi})
}

// countIn returns how many indexes of [lo, hi) are in the set.
func (s spans) countIn(lo, hi uint64) uint64 {
	var n uint64
	for k := s.search(lo); k < len(s) && s[k].lo < hi; k++ {
		if a, b := max(lo, s[k].lo), min(hi, s[k].hi); a < b {
			n += b - a
		}
	}
	return n
}

// pruneBelow removes every index below floor.
func (s *spans) pruneBelow(floor uint64) {
	v := *s
	v = slices.Delete(v, 0, v.search(floor))
	if len(v) > 0 && v[0].lo < floor {
		v[0].lo = floor
	}
	*s = v
}
