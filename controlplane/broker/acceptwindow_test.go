package broker

import (
	"testing"
	"time"
)

func TestAcceptWindow(t *testing.T) {
	var w acceptWindow
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	// 5 accepts in 400 ms, then a gap, then 7 spread so that at most 6
	// fall within one second.
	for _, ms := range []int{0, 100, 200, 300, 400} {
		w.add(at(ms))
	}
	if w.peak != 5 {
		t.Fatalf("peak %d after a burst of 5", w.peak)
	}
	for _, ms := range []int{3000, 3200, 3400, 3600, 3800, 3999, 4000, 4300} {
		w.add(at(ms))
	}
	// [3000, 4000) holds 6; at 4000 the one at 3000 has left the window.
	if w.peak != 6 {
		t.Fatalf("peak %d, want 6", w.peak)
	}
	if n := len(w.times) - w.head; n > 7 {
		t.Fatalf("window holds %d times, want only the last second's", n)
	}
}
