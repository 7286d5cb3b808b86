// Package ingest turns device messages into stored records. Messages are
// decoded by the broker's goroutine, queued, and written to the store in
// groups: one transaction per group amortises SQLite's commit cost over
// every message that arrived while the previous group was being written.
// Each caller waits until its group is committed, so the broker
// acknowledges a message only once it is stored.
package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// Store is what ingest needs from storage.
type Store interface {
	WriteIngest(ctx context.Context, items []store.IngestItem) (store.IngestResult, error)
}

// Defaults of Options.
const (
	DefaultMaxGroup = 1024
	DefaultQueue    = 8192
)

// Options tune the ingester.
type Options struct {
	MaxGroup int // messages per transaction at most
	Queue    int // messages waiting for the writer at most; publishers block beyond
	Metrics  *metrics.Metrics
	Logger   *slog.Logger
	// OnEvent, when set, is called after an event is stored (the rollout
	// engine listens for update reports). It must not block.
	OnEvent func(device string, e *proto.Event)
	// OnState, when set, is called after a state message is stored.
	OnState func(device string, s *proto.State)
}

type job struct {
	item store.IngestItem
	done chan error
}

// Ingester decodes and stores device messages.
type Ingester struct {
	st   Store
	opts Options
	log  *slog.Logger
	q    chan job

	lastDecodeLog atomic.Int64
}

// New returns an ingester writing to st. Run must be running for Handle to
// return.
func New(st Store, opts Options) *Ingester {
	if opts.MaxGroup <= 0 {
		opts.MaxGroup = DefaultMaxGroup
	}
	if opts.Queue <= 0 {
		opts.Queue = DefaultQueue
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.New(nil)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Ingester{st: st, opts: opts, log: opts.Logger.With("component", "ingest"), q: make(chan job, opts.Queue)}
}

// ErrStopped is returned by Handle when the ingester is not running.
var ErrStopped = errors.New("ingest stopped")

// Handle decodes one device message and waits until it is stored. A
// malformed message is counted, logged and dropped (returning nil: sending
// it again would not help); a storage failure returns an error so that the
// message is not acknowledged.
func (in *Ingester) Handle(ctx context.Context, m broker.Message) error {
	item := store.IngestItem{Device: m.Device, Received: m.Received}
	var err error
	switch m.Kind {
	case proto.KindState:
		var s proto.State
		s, err = proto.DecodeState(m.Payload)
		item.Kind, item.State = store.IngestState, &s
	case proto.KindTelemetry:
		var b proto.Batch
		b, err = proto.DecodeBatch(m.Payload)
		item.Kind, item.Batch = store.IngestBatch, &b
	case proto.KindEvent:
		var e proto.Event
		e, err = proto.DecodeEvent(m.Payload)
		item.Kind, item.Event = store.IngestEvent, &e
	default:
		err = fmt.Errorf("%w: kind %q is not a device message", proto.ErrMalformed, m.Kind)
	}
	in.opts.Metrics.Messages.WithLabelValues(string(m.Kind)).Inc()
	if err != nil {
		in.opts.Metrics.DecodeErrors.WithLabelValues(string(m.Kind)).Inc()
		in.logDecodeError(m, err)
		return nil
	}
	j := job{item: item, done: make(chan error, 1)}
	select {
	case in.q <- j:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-j.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// logDecodeError logs at most one malformed message per second: a hostile
// or broken device must not flood the log.
func (in *Ingester) logDecodeError(m broker.Message, err error) {
	now := time.Now().UnixNano()
	last := in.lastDecodeLog.Load()
	if now-last < int64(time.Second) || !in.lastDecodeLog.CompareAndSwap(last, now) {
		return
	}
	in.log.Warn("malformed device message dropped", "device", m.Device, "kind", string(m.Kind), "bytes", len(m.Payload), "err", err)
}

// flusher is implemented by stores that write device rows behind.
type flusher interface {
	FlushSeen(ctx context.Context) error
}

// Run writes queued messages until ctx is done.
func (in *Ingester) Run(ctx context.Context) {
	group := make([]job, 0, in.opts.MaxGroup)
	items := make([]store.IngestItem, 0, in.opts.MaxGroup)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		group, items = group[:0], items[:0]
		select {
		case <-ctx.Done():
			in.drain(ctx.Err())
			return
		case <-tick.C:
			if f, ok := in.st.(flusher); ok {
				if err := f.FlushSeen(ctx); err != nil && ctx.Err() == nil {
					in.log.Error("device rows not written", "err", err)
				}
			}
			continue
		case j := <-in.q:
			group = append(group, j)
		}
		// Take whatever else is already waiting: the group grows with load.
	fill:
		for len(group) < in.opts.MaxGroup {
			select {
			case j := <-in.q:
				group = append(group, j)
			default:
				break fill
			}
		}
		for _, j := range group {
			items = append(items, j.item)
		}
		in.write(ctx, group, items)
	}
}

func (in *Ingester) write(ctx context.Context, group []job, items []store.IngestItem) {
	start := time.Now()
	res, err := in.st.WriteIngest(ctx, items)
	in.opts.Metrics.StoreLatency.Observe(time.Since(start).Seconds())
	in.opts.Metrics.GroupSize.Observe(float64(len(items)))
	if err != nil {
		in.opts.Metrics.StoreErrors.Inc()
		in.log.Error("store write failed; messages stay unacknowledged", "messages", len(items), "err", err)
	} else {
		m := in.opts.Metrics
		now := time.Now().UnixMilli()
		m.Samples.Add(float64(res.Samples))
		m.Duplicates.Add(float64(res.Duplicates))
		m.UnknownDevice.Add(float64(res.Unknown))
		for i := range items {
			it := &items[i]
			if it.Kind == store.IngestBatch {
				if d := now - it.Batch.Base; d >= 0 {
					m.IngestDelay.Observe(float64(d) / 1000)
				}
			}
			switch {
			case it.Kind == store.IngestBatch && it.Batch.Dropped > 0:
				m.AgentDropped.Add(float64(it.Batch.Dropped))
			case it.Kind == store.IngestEvent && in.opts.OnEvent != nil:
				in.opts.OnEvent(it.Device, it.Event)
			case it.Kind == store.IngestState && in.opts.OnState != nil:
				in.opts.OnState(it.Device, it.State)
			}
		}
	}
	for _, j := range group {
		j.done <- err
	}
}

func (in *Ingester) drain(err error) {
	for {
		select {
		case j := <-in.q:
			j.done <- err
		default:
			return
		}
	}
}
