package rollout

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// placement is where place put each device (stage index, in the order
// given) and, for a first placement whose canary had to grow, why.
type placement struct {
	stage []int
	note  string
}

// place gives devices that are not members yet their stage. The first
// placement (an empty rollout) orders the whole target so that:
//   - the canary holds at least one device of every value of the first
//     stratum label (the hardware revision by default), whatever its
//     percentage says — it grows to fit, and says so;
//   - within that, it spreads over the values of the next label (the
//     base): each pick prefers a value not in the canary yet;
//   - past the first picks, every value of the first label takes its
//     share in turn (the largest shortfall against its share of the
//     target goes next), so later stages keep the fleet's proportions;
//   - within a value, devices go online first, then by rank, a hash of
//     the device id and the rollout's seed.
//
// The order depends only on the devices, their labels and online state,
// and the seed: the same fleet gives the same stages, in a dry run and in
// earnest. Devices that join later (existing members) go to the stage
// their rank falls in.
func (s Spec) place(fresh []*Device, existing int, first bool) placement {
	out := placement{stage: make([]int, len(fresh))}
	seed := s.seed()
	if !first {
		n := existing + len(fresh)
		sizes := s.stageSizes(n, 0)
		for i, d := range fresh {
			r := rank(d.ID, seed)
			stage := len(sizes) - 1
			for j, c := range sizes {
				if r < float64(c)/float64(n) {
					stage = j
					break
				}
			}
			out.stage[i] = stage
		}
		return out
	}
	type cand struct {
		i       int // index in fresh
		offline bool
		rank    float64
		next    string // value of the second stratum label
	}
	label := s.firstLabel()
	byValue := map[string][]cand{}
	for i, d := range fresh {
		c := cand{i: i, offline: !d.Online, rank: rank(d.ID, seed)}
		if len(s.Strata) > 1 {
			c.next = d.Labels[s.Strata[1]]
		}
		v := ""
		if label != "" {
			v = d.Labels[label]
		}
		byValue[v] = append(byValue[v], c)
	}
	better := func(a, b cand) int {
		return cmp.Or(cmp.Compare(boolInt(a.offline), boolInt(b.offline)), cmp.Compare(a.rank, b.rank))
	}
	type group struct {
		value string
		cands []cand // in preference order; cands[taken:] are left
		size  int
		taken int
		nexts map[string]int // second-label values among cands[taken:]
	}
	groups := make([]*group, 0, len(byValue))
	for v, cs := range byValue {
		slices.SortFunc(cs, better)
		g := &group{value: v, cands: cs, size: len(cs), nexts: map[string]int{}}
		for _, c := range cs {
			g.nexts[c.next]++
		}
		groups = append(groups, g)
	}
	// Values take turns in the order of their best device.
	slices.SortFunc(groups, func(a, b *group) int { return better(a.cands[0], b.cands[0]) })

	n := len(fresh)
	sizes := s.stageSizes(n, len(groups))
	asked := s.stageSizes(n, 0)[0]
	if len(groups) > asked && label != "" {
		values := make([]string, len(groups))
		for i, g := range groups {
			values[i] = orDash(g.value)
		}
		slices.Sort(values)
		out.note = fmt.Sprintf("the first stage holds %d devices, not %d: one of each of the %d values of %s (%s)",
			sizes[0], asked, len(groups), label, strings.Join(values, ", "))
	}
	covered := map[string]bool{} // second-label values in the canary
	canary := sizes[0]
	// take removes g's next device: in the canary, the best one whose
	// second-label value is not covered yet, if any.
	take := func(g *group, inCanary bool) cand {
		k := g.taken
		uncovered := false // does g still hold a value not in the canary? (few values: cheap)
		for v, n := range g.nexts {
			if n > 0 && !covered[v] {
				uncovered = true
				break
			}
		}
		if inCanary && len(s.Strata) > 1 && uncovered {
			// An uncovered base, but not at the price of an offline
			// device when an online one is left.
			for j := g.taken; j < len(g.cands) && g.cands[j].offline == g.cands[g.taken].offline; j++ {
				if !covered[g.cands[j].next] {
					k = j
					break
				}
			}
		}
		c := g.cands[k]
		copy(g.cands[g.taken+1:k+1], g.cands[g.taken:k]) // the others keep their order
		g.taken++
		g.nexts[c.next]--
		if inCanary {
			covered[c.next] = true
		}
		return c
	}
	order := make([]int, 0, n)
	// Coverage: one of each value first.
	for _, g := range groups {
		order = append(order, take(g, len(order) < canary).i)
	}
	// Then by share: the value furthest below its share of the target.
	for len(order) < n {
		var best *group
		bestGap := 0.0
		pos := float64(len(order) + 1)
		for _, g := range groups {
			if g.taken == g.size {
				continue
			}
			gap := float64(g.size)*pos/float64(n) - float64(g.taken)
			if best == nil || gap > bestGap {
				best, bestGap = g, gap
			}
		}
		order = append(order, take(best, len(order) < canary).i)
	}
	stage := 0
	for pos, i := range order {
		for stage < len(sizes)-1 && pos >= sizes[stage] {
			stage++
		}
		out.stage[i] = stage
	}
	return out
}
