package update

import (
	"testing"

	"github.com/hangarfleet/hangar/proto"
)

// TestBlockedSaysWhy: an install waits while the drone is not landed, and
// the deferral reason carries the flight source's own words.
func TestBlockedSaysWhy(t *testing.T) {
	for _, c := range []struct {
		cond  Conditions
		bench bool
		want  string
	}{
		{Conditions{Flight: proto.FlightFlying, Why: "landing"}, false, "flying: landing"},
		{Conditions{Flight: proto.FlightFlying}, false, "flying"},
		{Conditions{Flight: proto.FlightArmed, Why: "armed"}, false, "armed"},
		{Conditions{Flight: proto.FlightUnknown, Why: "no heartbeat from the flight controller for 4s"}, false, "flight state unknown: no heartbeat from the flight controller for 4s"},
		{Conditions{Flight: proto.FlightUnknown, Why: "no heartbeat"}, true, ""},
		{Conditions{Flight: proto.FlightLanded}, false, ""},
	} {
		u := &Updater{opts: Options{Conditions: func() Conditions { return c.cond }, Policy: Policy{AllowUnknownFlight: c.bench}, Clock: &hostileClock{now: hostileNow}}}
		if got := u.blocked(); got != c.want {
			t.Errorf("%+v (bench %v): %q, want %q", c.cond, c.bench, got, c.want)
		}
	}
}
