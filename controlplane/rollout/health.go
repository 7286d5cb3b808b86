package rollout

import (
	"math"

	"github.com/hangarfleet/hangar/proto"
)

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
