package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
)

// The live stream (GET /api/v1/events/stream, server-sent events) tells
// consoles what changed, so that they refresh only the views concerned
// and never poll. One loop per API reads the store's watermarks once a
// LiveInterval, whatever the number of clients, and fans the differences
// out; new device events travel in the message itself.

// Live topics: which views to refresh.
const (
	TopicFleet     = "fleet"     // devices enrolled, revoked, online, versions
	TopicTelemetry = "telemetry" // new samples arrived (at most every 5 s)
	TopicEvents    = "events"    // new device events (in the message)
	TopicAudit     = "audit"
	TopicRollouts  = "rollouts"
	TopicReleases  = "releases"
)

// LiveChange is wire.LiveChange.
type LiveChange = wire.LiveChange

// MaxLiveStreams bounds the open live streams; beyond it a new one is
// refused with 503 (each holds a connection and a goroutine).
const MaxLiveStreams = 256

const telemetryEvery = 5 * time.Second

type liveSub struct {
	mu     sync.Mutex
	topics map[string]bool
	events []store.Event
	wake   chan struct{}
}

func (s *liveSub) add(topics []string, evs []store.Event) {
	s.mu.Lock()
	for _, t := range topics {
		s.topics[t] = true
	}
	// A slow client gets the newest events; the rest it re-reads.
	s.events = append(s.events, evs...)
	if len(s.events) > 200 {
		s.events = s.events[len(s.events)-200:]
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *liveSub) take() (LiveChange, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.topics) == 0 {
		return LiveChange{}, false
	}
	ch := LiveChange{Events: s.events}
	for _, t := range []string{TopicFleet, TopicTelemetry, TopicEvents, TopicAudit, TopicRollouts, TopicReleases} {
		if s.topics[t] {
			ch.Topics = append(ch.Topics, t)
		}
	}
	s.topics, s.events = map[string]bool{}, nil
	return ch, true
}

type liveHub struct {
	mu      sync.Mutex
	subs    map[*liveSub]struct{}
	running bool
}

func (a *API) subscribe() (*liveSub, error) {
	h := &a.live
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.subs) >= MaxLiveStreams {
		return nil, echo.NewHTTPError(http.StatusServiceUnavailable, fmt.Sprintf("%d live streams open already", MaxLiveStreams))
	}
	if h.subs == nil {
		h.subs = map[*liveSub]struct{}{}
	}
	s := &liveSub{topics: map[string]bool{}, wake: make(chan struct{}, 1)}
	h.subs[s] = struct{}{}
	if !h.running {
		h.running = true
		go a.liveLoop()
	}
	return s, nil
}

func (a *API) unsubscribe(s *liveSub) {
	a.live.mu.Lock()
	delete(a.live.subs, s)
	a.live.mu.Unlock()
}

// LiveStreams is the number of open live streams.
func (a *API) LiveStreams() int {
	a.live.mu.Lock()
	defer a.live.mu.Unlock()
	return len(a.live.subs)
}

// liveLoop runs while streams are open.
func (a *API) liveLoop() {
	interval := a.opts.LiveInterval
	if interval <= 0 {
		interval = time.Second
	}
	ctx := context.Background()
	prev, err := a.opts.Store.LiveMarks(ctx)
	if err != nil {
		a.log.Warn("live stream: watermarks", "err", err)
	}
	var lastTelemetry time.Time
	t := time.NewTicker(interval)
	defer t.Stop()
	for range t.C {
		a.live.mu.Lock()
		if len(a.live.subs) == 0 {
			a.live.running = false
			a.live.mu.Unlock()
			return
		}
		a.live.mu.Unlock()
		cur, err := a.opts.Store.LiveMarks(ctx)
		if err != nil {
			a.log.Warn("live stream: watermarks", "err", err)
			continue
		}
		var topics []string
		var evs []store.Event
		if cur.Event != prev.Event {
			topics = append(topics, TopicEvents)
			evs, _ = a.opts.Store.QueryEvents(ctx, store.EventFilter{After: prev.Event, Limit: 200})
		}
		if cur.Fleet != prev.Fleet {
			topics = append(topics, TopicFleet)
		}
		if cur.LastSeen != prev.LastSeen && time.Since(lastTelemetry) >= telemetryEvery {
			topics = append(topics, TopicTelemetry)
			lastTelemetry = time.Now()
		} else if cur.LastSeen != prev.LastSeen {
			cur.LastSeen = prev.LastSeen // not yet told: tell at the next chance
		}
		if cur.Audit != prev.Audit {
			topics = append(topics, TopicAudit)
		}
		if cur.Rollouts != prev.Rollouts {
			topics = append(topics, TopicRollouts)
		}
		if cur.Releases != prev.Releases {
			topics = append(topics, TopicReleases)
		}
		prev = cur
		if len(topics) == 0 {
			continue
		}
		a.live.mu.Lock()
		for s := range a.live.subs {
			s.add(topics, evs)
		}
		a.live.mu.Unlock()
	}
}

// liveStream serves the stream: a "hello" message with the principal,
// then "change" messages, and a comment every 15 s to keep proxies from
// closing an idle connection.
func (a *API) liveStream(c echo.Context) error {
	sub, err := a.subscribe()
	if err != nil {
		return err
	}
	defer a.unsubscribe(sub)
	w := c.Response()
	rc := http.NewResponseController(w.Writer)
	_ = rc.SetWriteDeadline(time.Time{})
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	send := func(event string, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		_ = rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b); err != nil {
			return err
		}
		return rc.Flush()
	}
	if err := send("hello", principal(c)); err != nil {
		return nil
	}
	keep := time.NewTicker(15 * time.Second)
	defer keep.Stop()
	ctx := c.Request().Context()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-keep.C:
			_ = rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil {
				return nil
			}
			if rc.Flush() != nil {
				return nil
			}
		case <-sub.wake:
			if ch, ok := sub.take(); ok {
				ch.Time = a.opts.Now().UTC()
				if send("change", ch) != nil {
					return nil
				}
			}
		}
	}
}
