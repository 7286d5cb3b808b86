package clock

import (
	"sort"
	"sync"
	"time"
)

// Fake is a Clock that moves only when told to. Timers fire during Advance,
// in deadline order, each seeing Now equal to its deadline.
type Fake struct {
	mu      sync.Mutex
	now     time.Time
	waiters []*fakeTimer
	seq     uint64
}

var _ Clock = (*Fake)(nil)

// NewFake returns a fake clock reading start.
func NewFake(start time.Time) *Fake { return &Fake{now: start} }

// Now returns the fake time.
func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

// Set jumps the clock to t without firing timers (a clock step, as after a
// power cut with no RTC battery). Timers keep their absolute deadlines.
func (f *Fake) Set(t time.Time) {
	f.mu.Lock()
	f.now = t
	f.mu.Unlock()
}

// Advance moves the clock forward by d, firing every timer and ticker whose
// deadline falls within it.
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	end := f.now.Add(d)
	f.mu.Unlock()
	for {
		f.mu.Lock()
		t := f.next(end)
		if t == nil {
			f.now = end
			f.mu.Unlock()
			return
		}
		f.now = t.when
		t.fireLocked(f)
		f.mu.Unlock()
		if t.fn != nil {
			t.fn()
		}
	}
}

// Waiters reports how many timers and tickers are armed; tests use it to
// know that a goroutine has reached its wait before advancing.
func (f *Fake) Waiters() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.waiters)
}

func (f *Fake) next(end time.Time) *fakeTimer {
	if len(f.waiters) == 0 {
		return nil
	}
	sort.Slice(f.waiters, func(i, j int) bool {
		if f.waiters[i].when.Equal(f.waiters[j].when) {
			return f.waiters[i].id < f.waiters[j].id
		}
		return f.waiters[i].when.Before(f.waiters[j].when)
	})
	if t := f.waiters[0]; !t.when.After(end) {
		return t
	}
	return nil
}

func (f *Fake) add(t *fakeTimer) {
	f.seq++
	t.id = f.seq
	f.waiters = append(f.waiters, t)
}

func (f *Fake) remove(t *fakeTimer) bool {
	for i, w := range f.waiters {
		if w == t {
			f.waiters = append(f.waiters[:i], f.waiters[i+1:]...)
			return true
		}
	}
	return false
}

// NewTimer returns a timer that fires when the clock reaches Now()+d.
func (f *Fake) NewTimer(d time.Duration) Timer {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &fakeTimer{clock: f, c: make(chan time.Time, 1), when: f.now.Add(d)}
	f.add(t)
	return t
}

// AfterFunc calls fn (in the goroutine that calls Advance) once the clock
// reaches Now()+d.
func (f *Fake) AfterFunc(d time.Duration, fn func()) Timer {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &fakeTimer{clock: f, fn: fn, when: f.now.Add(d)}
	f.add(t)
	return t
}

// NewTicker returns a ticker with period d.
func (f *Fake) NewTicker(d time.Duration) Ticker {
	if d <= 0 {
		panic("clock: non-positive ticker period")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &fakeTimer{clock: f, c: make(chan time.Time, 1), when: f.now.Add(d), period: d}
	f.add(t)
	return &fakeTicker{t}
}

type fakeTimer struct {
	clock  *Fake
	id     uint64
	c      chan time.Time
	fn     func()
	when   time.Time
	period time.Duration
}

// fireLocked delivers the tick and re-arms a ticker; called with clock.mu held.
func (t *fakeTimer) fireLocked(f *Fake) {
	if t.c != nil {
		select {
		case t.c <- t.when:
		default: // a slow receiver misses ticks, as with time.Ticker
		}
	}
	if t.period > 0 {
		t.when = t.when.Add(t.period)
		return
	}
	f.remove(t)
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	return t.clock.remove(t)
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	active := t.clock.remove(t)
	t.when = t.clock.now.Add(d)
	t.clock.add(t)
	return active
}

type fakeTicker struct{ t *fakeTimer }

func (k *fakeTicker) C() <-chan time.Time { return k.t.c }
func (k *fakeTicker) Stop()               { k.t.Stop() }
func (k *fakeTicker) Reset(d time.Duration) {
	k.t.clock.mu.Lock()
	defer k.t.clock.mu.Unlock()
	k.t.clock.remove(k.t)
	k.t.period = d
	k.t.when = k.t.clock.now.Add(d)
	k.t.clock.add(k.t)
}
