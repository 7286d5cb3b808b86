package clock

import (
	"testing"
	"time"
)

func TestFakeTimersFireInOrder(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f := NewFake(start)
	var order []int
	f.AfterFunc(3*time.Second, func() { order = append(order, 3) })
	f.AfterFunc(1*time.Second, func() { order = append(order, 1) })
	stopped := f.AfterFunc(2*time.Second, func() { order = append(order, 2) })
	if !stopped.Stop() {
		t.Fatal("Stop of an armed timer returned false")
	}
	tm := f.NewTimer(2 * time.Second)
	f.Advance(2500 * time.Millisecond)
	if len(order) != 1 || order[0] != 1 {
		t.Fatalf("after 2.5s fired %v", order)
	}
	select {
	case at := <-tm.C():
		if !at.Equal(start.Add(2 * time.Second)) {
			t.Errorf("timer fired at %v", at)
		}
	default:
		t.Fatal("timer did not fire")
	}
	f.Advance(time.Second)
	if len(order) != 2 || order[1] != 3 {
		t.Fatalf("after 3.5s fired %v", order)
	}
	if got := f.Now(); !got.Equal(start.Add(3500 * time.Millisecond)) {
		t.Errorf("Now = %v", got)
	}
}

func TestFakeTicker(t *testing.T) {
	f := NewFake(time.Unix(0, 0))
	tk := f.NewTicker(time.Second)
	n := 0
	for range 5 {
		f.Advance(time.Second)
		select {
		case <-tk.C():
			n++
		default:
		}
	}
	if n != 5 {
		t.Fatalf("ticked %d times, want 5", n)
	}
	tk.Stop()
	f.Advance(10 * time.Second)
	select {
	case <-tk.C():
		t.Fatal("stopped ticker ticked")
	default:
	}
	if f.Waiters() != 0 {
		t.Fatalf("waiters = %d", f.Waiters())
	}
}

func TestSleepInterrupted(t *testing.T) {
	done := make(chan struct{})
	close(done)
	if Sleep(Real{}, time.Hour, done) {
		t.Fatal("Sleep ignored done")
	}
	if !Sleep(Real{}, 0, nil) {
		t.Fatal("zero sleep not complete")
	}
}
