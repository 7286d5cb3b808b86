// Package leader elects, among control-plane replicas sharing a database,
// the one that runs the rollout scheduler and the command dispatcher's
// sweep. The election is a lease in the database (store.Lease): the holder
// renews it well before it lapses; another replica takes it only once it
// lapsed by the database's clock, with a greater token. Work done as the
// leader runs under a context that carries the lease (store.WithFence),
// so the store refuses its writes once the lease is lost, and that is
// cancelled as soon as this replica cannot be sure it still leads: its
// own deadline is the lease's term measured from before the renewal was
// sent, so it always stops before another replica can start.
package leader

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// Store keeps the lease.
type Store interface {
	AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (store.Lease, error)
	ReleaseLease(ctx context.Context, l store.Lease) error
}

// Defaults.
const (
	DefaultTTL = 5 * time.Second
	// LeaseName is the scheduler's lease.
	LeaseName = "scheduler"
)

// Options configure an Elector.
type Options struct {
	Store  Store
	Holder string        // this replica's name, unique among replicas
	TTL    time.Duration // a lease's term (default DefaultTTL)
	Logger *slog.Logger
	// OnChange is called (from the elector's goroutine) when this replica
	// starts or stops leading.
	OnChange func(leading bool, l store.Lease)
}

// Elector takes and keeps the lease for one replica.
type Elector struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	lease  store.Lease
	ctx    context.Context // the current term's; nil when not leading
	cancel context.CancelFunc
	until  time.Time // this replica's own end of the term
	timer  *time.Timer
	holder string // who leads, as last seen
}

// New returns an elector; Run takes part in the election.
func New(opts Options) *Elector {
	if opts.TTL <= 0 {
		opts.TTL = DefaultTTL
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Elector{opts: opts, log: opts.Logger.With("component", "leader", "replica", opts.Holder)}
}

// Leading returns the current term's context (carrying the lease for
// fencing, cancelled when the term ends) when this replica leads.
func (e *Elector) Leading() (context.Context, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ctx == nil || time.Now().After(e.until) {
		return nil, false
	}
	return e.ctx, true
}

// Leader is the replica last seen holding the lease ("" before the first
// attempt).
func (e *Elector) Leader() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.holder
}

// Campaign makes one attempt to take or renew the lease (Run makes them
// periodically); a control plane starting alone leads at once.
func (e *Elector) Campaign(ctx context.Context) { e.attempt(ctx) }

// Run takes part in the election until ctx ends, then gives the lease up
// if it holds it, so that another replica takes over at once.
func (e *Elector) Run(ctx context.Context) {
	every := e.opts.TTL / 5
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		e.attempt(ctx)
		select {
		case <-ctx.Done():
			e.resign()
			return
		case <-t.C:
		}
	}
}

func (e *Elector) attempt(ctx context.Context) {
	sent := time.Now()
	// A renewal that cannot finish within the term is no renewal.
	actx, cancel := context.WithTimeout(ctx, e.opts.TTL/2)
	l, err := e.opts.Store.AcquireLease(actx, LeaseName, e.opts.Holder, e.opts.TTL)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			e.log.Warn("scheduler lease not renewed", "err", err)
		}
		return // the term's own deadline ends it
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.holder = l.Holder
	if l.Holder != e.opts.Holder {
		e.stepDownLocked("another replica leads: " + l.Holder)
		return
	}
	if e.ctx != nil && l.Token != e.lease.Token {
		e.stepDownLocked("the lease lapsed meanwhile")
	}
	// This replica's end of the term: the lease's length from before the
	// request left, less a margin for clock rates.
	e.until = sent.Add(e.opts.TTL - e.opts.TTL/10)
	if e.ctx == nil {
		e.lease = l
		e.ctx, e.cancel = context.WithCancel(store.WithFence(context.Background(), l))
		e.log.Info("leading: running the rollout scheduler", "term", l.Token)
		if e.opts.OnChange != nil {
			go e.opts.OnChange(true, l)
		}
	}
	if e.timer != nil {
		e.timer.Stop()
	}
	e.timer = time.AfterFunc(time.Until(e.until), func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.ctx != nil && !time.Now().Before(e.until) {
			e.stepDownLocked("lease not renewed in time")
		}
	})
}

func (e *Elector) stepDownLocked(why string) {
	if e.ctx == nil {
		return
	}
	e.cancel()
	e.ctx, e.cancel = nil, nil
	e.log.Info("not leading any more", "term", e.lease.Token, "why", why)
	if e.opts.OnChange != nil {
		go e.opts.OnChange(false, e.lease)
	}
}

func (e *Elector) resign() {
	e.mu.Lock()
	l, was := e.lease, e.ctx != nil
	e.stepDownLocked("shutting down")
	if e.timer != nil {
		e.timer.Stop()
	}
	e.mu.Unlock()
	if was {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = e.opts.Store.ReleaseLease(ctx, l)
	}
}
