package throttle

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := New(1, 3, 2)
	l.Now = func() time.Time { return now }
	for i := range 3 {
		if !l.Allow("a") {
			t.Fatalf("event %d of the burst throttled", i)
		}
	}
	if l.Allow("a") || !l.Spent("a") {
		t.Fatal("past the burst: not throttled")
	}
	now = now.Add(time.Second)
	if !l.Allow("a") || l.Allow("a") {
		t.Fatal("one token a second")
	}
	if !l.Allow("b") {
		t.Fatal("another key is throttled")
	}
	// Full: a third key waits until a bucket is full again.
	if l.Allow("c") {
		t.Fatal("a third key was let in while every tracked bucket is in use")
	}
	now = now.Add(10 * time.Second)
	if !l.Allow("c") {
		t.Fatal("a third key refused once the others refilled")
	}
}
