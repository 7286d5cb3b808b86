package rollout

import (
	"fmt"
	"math"

	"github.com/hangarfleet/hangar/proto"
)

// Health floors: a difference smaller than these is noise, whatever the
// ratio.
const (
	floorReboots = 0.5  // per hour
	floorErrors  = 5.0  // per hour
	floorLink    = 0.05 // share of samples
	floorDrain   = 5.0  // percent per flight hour
)

// significance is how unlikely an excess over the limit must be under
// the limit's own rate before the health gate fails: a handful of events
// on a few device-minutes of telemetry is not evidence.
const significance = 0.01

type cohort struct {
	n, samples, noLink                  int
	hours, reboots, errors, flightHours float64
	drain                               float64
}

func (c *cohort) add(h *Health) {
	if h == nil || h.Hours <= 0 {
		return
	}
	c.n++
	c.hours += h.Hours
	c.reboots += h.Reboots
	c.errors += h.Errors
	c.flightHours += h.FlightHours
	c.drain += h.Drain
	c.samples += h.Samples
	c.noLink += int(math.Round(h.LinkLoss * float64(h.Samples)))
}

func (c cohort) rates() (reboots, errors, link, drain float64, hasDrain bool) {
	if c.hours == 0 {
		return 0, 0, 0, 0, false
	}
	reboots, errors = c.reboots/c.hours, c.errors/c.hours
	if c.samples > 0 {
		link = float64(c.noLink) / float64(c.samples)
	}
	if c.flightHours > 0.05 {
		return reboots, errors, link, c.drain / c.flightHours, true
	}
	return reboots, errors, link, 0, false
}

// healthGates compares the updated devices with the not yet updated
// (within one stratum when stratum, label=value, is set).
func (s Spec) healthGates(updated, baseline cohort, stratum string) []GateResult {
	if updated.n == 0 || baseline.n == 0 {
		why := "no updated devices reporting yet"
		if baseline.n == 0 {
			why = "no devices left to compare with"
		}
		return []GateResult{{Name: "health", Stratum: stratum, OK: true, Judged: false, Verdict: VerdictUnknown, Why: why}}
	}
	ur, ue, ul, ud, uok := updated.rates()
	br, be, bl, bd, bok := baseline.rates()
	m := 1 + s.Gates.HealthMargin
	// A metric fails when the updated cohort's rate is over the limit
	// and an excess that large would be unlikely (p < significance) if
	// the cohort's true rate were the limit itself.
	check := func(name string, u, b, floor float64, unit string, tail func(limit float64) float64) GateResult {
		limit := max(b*m, b+floor)
		g := GateResult{Name: "health:" + name, Stratum: stratum, Value: u, Threshold: limit, OK: true, Judged: true, Verdict: VerdictHolds,
			Why: fmt.Sprintf("updated %.2f %s, not yet updated %.2f: limit %.2f", u, unit, b, limit)}
		if u > limit {
			p := 0.0
			if tail != nil {
				p = tail(limit)
			}
			g.OK = p >= significance
			g.verdict()
			if g.OK {
				g.Why += fmt.Sprintf(", over it but not significant (p=%.2g)", p)
			} else if tail != nil {
				g.Why += fmt.Sprintf(" (p=%.2g)", p)
			}
		}
		return g
	}
	// Two tests, both must reject: the updated cohort's count against the
	// limit (one sample: is it above the limit at all?), and against the
	// other cohort over the same window (two samples: given all the events
	// seen, are there too many on the updated side for its share of the
	// exposure, margin included?). A short window with one background
	// error on an updated device fails the first but not the second.
	twoSample := func(ku, kb, eu, eb float64) float64 {
		k := int(math.Round(ku + kb))
		if k == 0 || eu <= 0 {
			return 1
		}
		share := eu * m / (eu*m + eb)
		return binomialTail(k, share, int(math.Round(ku)))
	}
	poisson := func(events, hours, baseEvents, baseHours float64) func(float64) float64 {
		return func(limit float64) float64 {
			return max(poissonTail(limit*hours, int(math.Round(events))), twoSample(events, baseEvents, hours, baseHours))
		}
	}
	out := []GateResult{
		check("reboots", ur, br, floorReboots, "reboots/h", poisson(updated.reboots, updated.hours, baseline.reboots, baseline.hours)),
		check("errors", ue, be, floorErrors, "errors/h", poisson(updated.errors, updated.hours, baseline.errors, baseline.hours)),
		check("link_loss", ul, bl, floorLink, "of samples", func(limit float64) float64 {
			return max(binomialTail(updated.samples, limit, updated.noLink),
				twoSample(float64(updated.noLink), float64(baseline.noLink), float64(updated.samples), float64(baseline.samples)))
		}),
	}
	if uok && bok {
		out = append(out, check("battery_drain", ud, bd, floorDrain, "%/flight h", nil))
	}
	return out
}

// HealthOf measures one device's telemetry: samples in time order, each
// with its absolute time in unix ms.
func HealthOf(samples []proto.Sample, times []int64) *Health {
	if len(samples) < 2 {
		return nil
	}
	h := &Health{Hours: float64(times[len(times)-1]-times[0]) / 3.6e6}
	var noLink int
	for i, s := range samples {
		if s.Link == 0 {
			noLink++
		}
		if i == 0 {
			continue
		}
		p := samples[i-1]
		// Counters: a drop is a restart of the count (errors count since
		// the agent started), so the new value is all new.
		if s.Reboots >= p.Reboots {
			h.Reboots += float64(s.Reboots - p.Reboots)
		}
		if s.Errors >= p.Errors {
			h.Errors += float64(s.Errors - p.Errors)
		} else {
			h.Errors += float64(s.Errors)
		}
		if p.Flight == proto.FlightFlying && s.Flight == proto.FlightFlying {
			h.FlightHours += float64(times[i]-times[i-1]) / 3.6e6
			if p.Battery != nil && s.Battery != nil && *s.Battery < *p.Battery {
				h.Drain += float64(*p.Battery - *s.Battery)
			}
		}
	}
	h.LinkLoss = float64(noLink) / float64(len(samples))
	h.Samples = len(samples)
	return h
}

// poissonTail is P(X >= k) for X ~ Poisson(mean).
func poissonTail(mean float64, k int) float64 {
	if k <= 0 {
		return 1
	}
	if mean <= 0 {
		return 0
	}
	if float64(k) <= mean {
		return 1 // at or under the mean: no evidence of excess
	}
	// Sum the pmf upward from k; the terms fall geometrically once past
	// the mean.
	lg, _ := math.Lgamma(float64(k) + 1)
	term := math.Exp(float64(k)*math.Log(mean) - mean - lg)
	sum := 0.0
	for i := k; term > sum*1e-12 && i < k+1_000_000; i++ {
		sum += term
		term *= mean / float64(i+1)
	}
	return min(sum, 1)
}

// binomialTail is P(X >= k) for X ~ Binomial(n, p).
func binomialTail(n int, p float64, k int) float64 {
	if k <= 0 {
		return 1
	}
	if k > n || p <= 0 {
		return 0
	}
	if p >= 1 || float64(k) <= float64(n)*p {
		return 1
	}
	ln, _ := math.Lgamma(float64(n) + 1)
	lk, _ := math.Lgamma(float64(k) + 1)
	lnk, _ := math.Lgamma(float64(n-k) + 1)
	term := math.Exp(ln - lk - lnk + float64(k)*math.Log(p) + float64(n-k)*math.Log1p(-p))
	sum := 0.0
	for i := k; i <= n && term > sum*1e-12; i++ {
		sum += term
		term *= float64(n-i) / float64(i+1) * p / (1 - p)
	}
	return min(sum, 1)
}
