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
	"hash/fnv"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
)

// Store is what ingest needs from storage.
type Store interface {
	WriteIngest(ctx context.Context, items []store.IngestItem) (store.IngestResult, error)
}

// Defaults of Options.
const (
	DefaultMaxGroup  = 8192
	DefaultQueue     = 8192
	DefaultGroupWait = 10 * time.Millisecond
	// DefaultQueueBytes bounds the payload bytes between the broker and
	// the store: 8,192 messages of up to 256 KiB would be 2 GiB.
	DefaultQueueBytes = 64 << 20
)

// Options tune the ingester.
type Options struct {
	MaxGroup int // messages per transaction at most
	// GroupWait is how long the writer gathers messages before a commit
	// (default DefaultGroupWait).
	GroupWait time.Duration
	Queue     int // messages waiting for the writer at most; publishers block beyond
	// QueueBytes bounds the payload bytes of the messages handled and not
	// yet stored (default DefaultQueueBytes); publishers block beyond.
	QueueBytes int64
	Metrics    *metrics.Metrics
	Logger     *slog.Logger
	// OnEvent, when set, is called after an event is stored (the rollout
	// engine listens for update reports). It must not block.
	OnEvent func(device string, e *proto.Event)
	// OnState, when set, is called after a state message is stored.
	OnState func(device string, s *proto.State)
	// Messages and Bytes are per-device quotas (nil: none): a device's
	// messages beyond them are acknowledged, counted
	// (hangar_ingest_over_quota_total) and not stored, so one credential
	// cannot fill the disk or the writer's queue.
	Messages, Bytes *throttle.Limiter
}

type job struct {
	item store.IngestItem
	skip bool // malformed: nothing to store, but acknowledged in order
	done func(error)
}

// Ingester decodes and stores device messages.
type Ingester struct {
	st   Store
	opts Options
	log  *slog.Logger
	q    chan job
	// decode holds one queue per decoder goroutine.
	decode []chan decodeReq

	lastDecodeLog, lastRefusedLog, lastQuotaLog atomic.Int64
	budget                                      budget
}

// budget counts bytes in flight; acquire waits while they are over max.
type budget struct {
	mu      sync.Mutex
	used    int64
	max     int64
	waiting int
	freed   chan struct{}
}

// acquire takes n bytes (at most max: a message larger than the whole
// budget waits for it to be empty), waiting while the budget is spent.
func (b *budget) acquire(ctx context.Context, n int64) (int64, error) {
	n = min(n, b.max)
	b.mu.Lock()
	for b.used+n > b.max {
		if b.freed == nil {
			b.freed = make(chan struct{})
		}
		ch := b.freed
		b.waiting++
		b.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			b.mu.Lock()
			b.waiting--
			b.mu.Unlock()
			return 0, ctx.Err()
		}
		b.mu.Lock()
		b.waiting--
	}
	b.used += n
	b.mu.Unlock()
	return n, nil
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.used -= n
	if b.freed != nil {
		close(b.freed)
		b.freed = nil
	}
	b.mu.Unlock()
}

// QueuedBytes is the payload bytes handled and not yet stored.
func (in *Ingester) QueuedBytes() int64 {
	in.budget.mu.Lock()
	defer in.budget.mu.Unlock()
	return in.budget.used
}

// New returns an ingester writing to st. Run must be running for Handle to
// return.
func New(st Store, opts Options) *Ingester {
	if opts.MaxGroup <= 0 {
		opts.MaxGroup = DefaultMaxGroup
	}
	if opts.GroupWait <= 0 {
		opts.GroupWait = DefaultGroupWait
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
	if opts.QueueBytes <= 0 {
		opts.QueueBytes = DefaultQueueBytes
	}
	in := &Ingester{st: st, opts: opts, log: opts.Logger.With("component", "ingest"), q: make(chan job, opts.Queue)}
	in.budget.max = opts.QueueBytes
	in.decode = make([]chan decodeReq, max(2, runtime.GOMAXPROCS(0)))
	for i := range in.decode {
		in.decode[i] = make(chan decodeReq, 256)
	}
	return in
}

// ErrStopped is returned by Handle when the ingester is not running.
var ErrStopped = errors.New("ingest stopped")

// Handle queues one device message for decoding and storage; done is
// called from the writer once the message's group is committed (nil) or
// failed. A malformed message is counted, logged and acknowledged (sending
// it again would not help), in its place in the queue so that a device's
// acknowledgements keep their order. Handle blocks only while the queue is
// full.
//
// Decoding runs on a few worker goroutines, one per shard of devices so
// that each device's messages stay in order, and not on the broker's
// goroutine of the connection: thousands of those exist, and a deep
// decode would grow every one of their stacks for good.
func (in *Ingester) Handle(ctx context.Context, m broker.Message, done func(error)) {
	var over string
	if q := in.opts.Messages; q != nil && !q.Allow(m.Device) {
		over = "messages"
	} else if q := in.opts.Bytes; q != nil && !q.AllowN(m.Device, float64(len(m.Payload))) {
		over = "bytes"
	}
	// Bytes waiting for the store are bounded as the message count is:
	// past the budget, publishers wait (and their connections with them).
	n, err := in.budget.acquire(ctx, int64(len(m.Payload)))
	if err != nil {
		done(err)
		return
	}
	inner := done
	done = func(err error) {
		in.budget.release(n)
		inner(err)
	}
	h := fnv.New32a()
	h.Write([]byte(m.Device))
	select {
	case in.decode[h.Sum32()%uint32(len(in.decode))] <- decodeReq{m: m, done: done, over: over}:
	case <-ctx.Done():
		done(ctx.Err())
	}
}

// overQuota drops a message beyond its device's quota: not decoded, not
// stored, counted, and acknowledged in its place (the device must not send
// it again, and its other acknowledgements keep their order).
func (in *Ingester) overQuota(m broker.Message, kind string, done func(error)) job {
	in.opts.Metrics.OverQuota.WithLabelValues(kind).Inc()
	if now := time.Now().Unix(); in.lastQuotaLog.Swap(now) != now {
		in.log.Warn("device over its ingest quota: messages dropped", "device", m.Device, "quota", kind)
	}
	return job{skip: true, done: done}
}

type decodeReq struct {
	m    broker.Message
	done func(error)
	over string // the quota the message is beyond ("": none)
}

func (in *Ingester) decodeLoop(ctx context.Context, reqs <-chan decodeReq) {
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-reqs:
			if ctx.Err() != nil {
				r.done(ctx.Err())
				return
			}
			var j job
			if r.over != "" {
				j = in.overQuota(r.m, r.over, r.done)
			} else {
				j = in.decodeJob(r.m, r.done)
			}
			select {
			case in.q <- j:
			case <-ctx.Done():
				r.done(ctx.Err())
				return
			}
		}
	}
}

func (in *Ingester) decodeJob(m broker.Message, done func(error)) job {
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
		item.Kind, item.Batch, item.Raw = store.IngestBatch, &b, m.Payload
	case proto.KindEvent:
		var e proto.Event
		e, err = proto.DecodeEvent(m.Payload)
		item.Kind, item.Event = store.IngestEvent, &e
	default:
		err = fmt.Errorf("%w: kind %q is not a device message", proto.ErrMalformed, m.Kind)
	}
	in.opts.Metrics.Messages.WithLabelValues(string(m.Kind)).Inc()
	j := job{item: item, done: done}
	if err != nil {
		in.opts.Metrics.DecodeErrors.WithLabelValues(string(m.Kind)).Inc()
		in.logDecodeError(m, err)
		j.skip = true
	}
	return j
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

// logRefused logs refused reports at most once a second.
func (in *Ingester) logRefused(n int) {
	now := time.Now().UnixNano()
	last := in.lastRefusedLog.Load()
	if now-last < int64(time.Second) || !in.lastRefusedLog.CompareAndSwap(last, now) {
		return
	}
	in.log.Warn("update reports not believed: their boot epoch is ahead of the device's connection and of this clock "+
		"(a device clock far ahead, or a device rigging its history); see hangar_ingest_refused_reports_total", "reports", n)
}

// flusher is implemented by stores that write device rows behind.
type flusher interface {
	FlushSeen(ctx context.Context) error
}

// compactor is implemented by stores that stage telemetry and move it in
// bulk; the writer runs the move between group writes.
type compactor interface {
	CompactDue(ctx context.Context) (duplicates int64, err error)
}

// Run writes queued messages until ctx is done.
func (in *Ingester) Run(ctx context.Context) {
	var decoders sync.WaitGroup
	for _, reqs := range in.decode {
		decoders.Add(1)
		go func() { defer decoders.Done(); in.decodeLoop(ctx, reqs) }()
	}
	defer func() {
		decoders.Wait()
		for _, reqs := range in.decode {
			for len(reqs) > 0 {
				(<-reqs).done(ctx.Err())
			}
		}
	}()
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
			if ctx.Err() != nil {
				j.done(ctx.Err())
				in.drain(ctx.Err())
				return
			}
			group = append(group, j)
		}
		// Gather for a few milliseconds: a commit costs about the same
		// for one message as for thousands, and a device's acknowledgement
		// waits for it anyway.
		gather := time.NewTimer(in.opts.GroupWait)
	fill:
		for len(group) < in.opts.MaxGroup {
			select {
			case j := <-in.q:
				group = append(group, j)
			case <-gather.C:
				break fill
			}
		}
		gather.Stop()
		for _, j := range group {
			if !j.skip {
				items = append(items, j.item)
			}
		}
		in.write(ctx, group, items)
		if c, ok := in.st.(compactor); ok {
			dups, err := c.CompactDue(ctx)
			if err != nil && ctx.Err() == nil {
				in.log.Error("telemetry compaction failed", "err", err)
			}
			in.opts.Metrics.Duplicates.Add(float64(dups))
		}
	}
}

func (in *Ingester) write(ctx context.Context, group []job, items []store.IngestItem) {
	if len(items) == 0 {
		for _, j := range group {
			j.done(nil)
		}
		return
	}
	start := time.Now()
	res, err := in.st.WriteIngest(ctx, items)
	in.opts.Metrics.StoreLatency.Observe(time.Since(start).Seconds())
	in.opts.Metrics.GroupSize.Observe(float64(len(items)))
	switch {
	case err != nil && ctx.Err() != nil:
		// Stopping: not a failure; the devices send them again.
		in.log.Info("stopping: messages left unacknowledged, the devices send them again", "messages", len(items))
	case err != nil:
		in.opts.Metrics.StoreErrors.Inc()
		in.log.Error("store write failed; messages stay unacknowledged", "messages", len(items), "err", err)
	default:
		m := in.opts.Metrics
		now := time.Now().UnixMilli()
		m.Samples.Add(float64(res.Samples))
		m.Duplicates.Add(float64(res.Duplicates))
		m.UnknownDevice.Add(float64(res.Unknown))
		if res.Refused > 0 {
			m.Refused.Add(float64(res.Refused))
			in.logRefused(res.Refused)
		}
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
		if j.skip {
			j.done(nil)
		} else {
			j.done(err)
		}
	}
}

func (in *Ingester) drain(err error) {
	for {
		select {
		case j := <-in.q:
			j.done(err)
		default:
			return
		}
	}
}
