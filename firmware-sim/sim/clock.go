package sim

import (
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
)

// skewClock is a drone's clock: real time plus an offset that faults set
// (a skewed RTC, 1970 after a power cut). Timers and tickers run in real
// time: a wrong clock does not make time pass faster.
type skewClock struct {
	clock.Real
	offset atomic.Int64 // nanoseconds
}

func (c *skewClock) Now() time.Time { return time.Now().Add(time.Duration(c.offset.Load())) }

// SetClock makes the drone's clock read now+offset from now on.
func (d *SimDrone) SetClock(offset time.Duration) { d.clk.offset.Store(int64(offset)) }

// ResetClockTo1970 makes the drone's clock read the start of 1970, as an
// RTC without backup power after a power cut, and run on from there.
func (d *SimDrone) ResetClockTo1970() { d.SetClock(-time.Since(time.Unix(0, 0))) }

// ClockOffset is how far the drone's clock is from real time.
func (d *SimDrone) ClockOffset() time.Duration { return time.Duration(d.clk.offset.Load()) }
