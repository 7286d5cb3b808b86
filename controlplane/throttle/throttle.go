// Package throttle is a token bucket per key (a source address, a device
// id) with a bounded number of keys: what limits enrollment attempts and
// failed authentications before they cost the control plane anything.
package throttle

import (
	"sync"
	"time"
)

// Limiter allows Burst events at once per key and Rate a second after
// that. It tracks at most MaxKeys keys; when full, it forgets the keys
// whose buckets are full again (they have nothing to remember), and if
// none are, it refuses new keys until some are (an attacker spraying
// source addresses is throttled as a whole, not let through).
type Limiter struct {
	Rate    float64
	Burst   float64
	MaxKeys int
	Now     func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

// New is a limiter of rate per second, burst, over at most maxKeys keys.
func New(rate, burst float64, maxKeys int) *Limiter {
	return &Limiter{Rate: rate, Burst: burst, MaxKeys: maxKeys, Now: time.Now, buckets: map[string]*bucket{}}
}

func (l *Limiter) refill(b *bucket, now time.Time) {
	if d := now.Sub(b.at).Seconds(); d > 0 {
		b.tokens = min(l.Burst, b.tokens+d*l.Rate)
	}
	b.at = now
}

// Allow takes a token of key; false means the event is throttled.
func (l *Limiter) Allow(key string) bool { return l.AllowN(key, 1) }

// AllowN takes n tokens of key (bytes, say); false means throttled (and
// nothing is taken).
func (l *Limiter) AllowN(key string, n float64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.Now()
	b := l.buckets[key]
	if b == nil {
		if len(l.buckets) >= l.MaxKeys && !l.sweepLocked(now) {
			return false
		}
		b = &bucket{tokens: l.Burst, at: now}
		l.buckets[key] = b
	}
	l.refill(b, now)
	if b.tokens < n {
		return false
	}
	b.tokens -= n
	return true
}

// Spent reports whether key has no token left, without taking one: for
// checks made before the work ("has this source failed too often?").
func (l *Limiter) Spent(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	if b == nil {
		return false
	}
	l.refill(b, l.Now())
	return b.tokens < 1
}

// sweepLocked forgets full buckets; it reports whether it freed any.
func (l *Limiter) sweepLocked(now time.Time) bool {
	freed := false
	for k, b := range l.buckets {
		l.refill(b, now)
		if b.tokens >= l.Burst {
			delete(l.buckets, k)
			freed = true
		}
	}
	return freed
}
