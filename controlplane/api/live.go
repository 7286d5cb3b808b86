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

// MaxLiveStreamsPerToken bounds one token's open streams, so that one
// token cannot take every slot.
const MaxLiveStreamsPerToken = 8

type liveSub struct {
	who    string
	mu     sync.Mutex
	topics map[string]bool
	events []store.Event
	trunc  bool
	wake   chan struct{}
}

func (s *liveSub) add(topics []string, evs []store.Event, truncated bool) {
	s.mu.Lock()
	s.trunc = s.trunc || truncated
	for _, t := range topics {
		s.topics[t] = true
	}
	// A slow client gets the newest events; the rest it re-reads.
	s.events = append(s.events, evs...)
	if len(s.events) > 200 {
		s.events = s.events[len(s.events)-200:]
		s.trunc = true
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
	ch := LiveChange{Events: s.events, Truncated: s.trunc}
	for _, t := range []string{TopicFleet, TopicTelemetry, TopicEvents, TopicAudit, TopicRollouts, TopicReleases} {
		if s.topics[t] {
			ch.Topics = append(ch.Topics, t)
		}
	}
	s.topics, s.events, s.trunc = map[string]bool{}, nil, false
	return ch, true
}

type liveHub struct {
	mu      sync.Mutex
	subs    map[*liveSub]struct{}
	running bool
	closed  chan struct{} // closed when the server shuts down
	once    sync.Once
}

func (h *liveHub) done() chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed == nil {
		h.closed = make(chan struct{})
	}
	return h.closed
}

// CloseLive ends the open live streams and their loop (the server calls
// it at shutdown: http.Server.Shutdown does not end streaming requests).
func (a *API) CloseLive() {
	ch := a.live.done()
	a.live.once.Do(func() { close(ch) })
}

func (a *API) subscribe(who string) (*liveSub, error) {
	h := &a.live
	closed := h.done()
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-closed:
		return nil, echo.NewHTTPError(http.StatusServiceUnavailable, "shutting down")
	default:
	}
	if len(h.subs) >= MaxLiveStreams {
		return nil, echo.NewHTTPError(http.StatusServiceUnavailable, fmt.Sprintf("%d live streams open already", MaxLiveStreams))
	}
	mine := 0
	for s := range h.subs {
		if s.who == who {
			mine++
		}
	}
	if mine >= MaxLiveStreamsPerToken {
		return nil, echo.NewHTTPError(http.StatusTooManyRequests, fmt.Sprintf("token %s has %d live streams open already", who, mine))
	}
	if h.subs == nil {
		h.subs = map[*liveSub]struct{}{}
	}
	s := &liveSub{who: who, topics: map[string]bool{}, wake: make(chan struct{}, 1)}
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

// nudge tells this process's open streams that a topic changed in a way
// the watermarks do not show (a relabelling). Other API processes on the
// same database see it at the next change they do see.
func (a *API) nudge(topic string) {
	a.live.mu.Lock()
	defer a.live.mu.Unlock()
	for s := range a.live.subs {
		s.add([]string{topic}, nil, false)
	}
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
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	closed := a.live.done()
	go func() {
		select {
		case <-closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	var prev store.LiveMarks
	havePrev := false
	var lastTelemetry time.Time
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if havePrev {
			select {
			case <-t.C:
			case <-ctx.Done():
				a.live.mu.Lock()
				a.live.running = false
				a.live.mu.Unlock()
				return
			}
		}
		a.live.mu.Lock()
		if len(a.live.subs) == 0 {
			a.live.running = false
			a.live.mu.Unlock()
			return
		}
		a.live.mu.Unlock()
		cur, err := a.opts.Store.LiveMarks(ctx)
		if err != nil {
			if ctx.Err() != nil {
				a.live.mu.Lock()
				a.live.running = false
				a.live.mu.Unlock()
				return
			}
			a.log.Warn("live stream: watermarks", "err", err)
			if !havePrev {
				select { // no base to compare with yet: try again
				case <-t.C:
				case <-ctx.Done():
				}
			}
			continue
		}
		if !havePrev {
			prev, havePrev = cur, true
			continue
		}
		var topics []string
		var evs []store.Event
		if cur.Event != prev.Event {
			topics = append(topics, TopicEvents)
			// Exactly the events between the two marks; beyond 200, the
			// consoles re-read (Truncated).
			evs, _ = a.opts.Store.QueryEvents(ctx, store.EventFilter{After: prev.Event, Before: cur.Event + 1, Limit: 200})
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
			s.add(topics, evs, len(evs) == 200)
		}
		a.live.mu.Unlock()
	}
}

// liveStream serves the stream: a "hello" message with the principal,
// then "change" messages, and a comment every 15 s to keep proxies from
// closing an idle connection.
func (a *API) liveStream(c echo.Context) error {
	sub, err := a.subscribe(principal(c).Name)
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
	every := a.opts.LiveKeepAlive
	if every <= 0 {
		every = 15 * time.Second
	}
	keep := time.NewTicker(every)
	defer keep.Stop()
	ctx := c.Request().Context()
	closed := a.live.done()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-closed:
			return nil
		case <-keep.C:
			// The token may have been revoked or have expired since.
			if _, err := a.authenticate(c); err != nil {
				_ = send("end", map[string]string{"reason": fmt.Sprint(err)})
				return nil
			}
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
