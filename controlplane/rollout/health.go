package rollout

import (
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
	return h
}
