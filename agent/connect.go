package agent

import (
	"context"
	"errors"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/agent/outbox"
	"github.com/hangarfleet/hangar/proto"
)

// backoff returns the wait before reconnect attempt n (0-based): full
// jitter over an exponentially growing window, so that a fleet that lost a
// broker at the same instant does not come back at the same instant.
func (a *Agent) backoff(n int) time.Duration {
	window := a.opts.BackoffMin << min(n, 30)
	if window > a.opts.BackoffMax || window <= 0 {
		window = a.opts.BackoffMax
	}
	return time.Duration(a.opts.Rand.Int64N(int64(window) + 1))
}

func (a *Agent) connectLoop(ctx context.Context) {
	attempt := 0
	for ctx.Err() == nil {
		err := a.session(ctx)
		if ctx.Err() != nil {
			return
		}
		a.mu.Lock()
		a.lastErr = err
		a.mu.Unlock()
		wait := a.backoff(attempt)
		if errors.Is(err, ErrRevoked) {
			wait = a.opts.BackoffMax
		}
		if errSessionWorked(err) {
			attempt = 0
		} else {
			attempt++
		}
		a.log.Info("broker link down", "err", err, "retry_in", wait.Round(time.Millisecond))
		if !clock.Sleep(a.clk, wait, ctx.Done()) {
			return
		}
	}
}

// sessionEnded wraps the error that ended a session that had connected, so
// that backoff restarts from its minimum.
type sessionEnded struct{ err error }

func (s sessionEnded) Error() string { return s.err.Error() }
func (s sessionEnded) Unwrap() error { return s.err }

func errSessionWorked(err error) bool {
	var s sessionEnded
	return errors.As(err, &s)
}

var errConnLost = errors.New("connection lost")

// session enrolls if needed, connects, and sends until the link drops.
func (a *Agent) session(ctx context.Context) error {
	a.mu.Lock()
	cred := a.cred
	a.mu.Unlock()
	if cred == nil {
		c, err := a.enroll(ctx)
		if err != nil {
			return err
		}
		a.mu.Lock()
		a.cred, cred = c, c
		a.mu.Unlock()
	}
	connID := a.conns.Add(1)
	will, _ := proto.Marshal(ptr(a.state(false, connID)))
	stateTopic := proto.DeviceTopic(a.opts.DeviceID, proto.KindState)
	cmdTopic := proto.DeviceTopic(a.opts.DeviceID, proto.KindCmd)
	conn, err := a.opts.Transport.Connect(ctx, ConnectParams{
		URL: cred.MQTTURL, ClientID: a.opts.DeviceID, Username: cred.Username, Password: cred.Password,
		WillTopic: stateTopic, WillPayload: will, KeepAlive: a.opts.KeepAlive,
		OnMessage: func(topic string, payload []byte) { a.onMessage(topic, payload) },
	})
	if errors.Is(err, ErrNotAuthorized) {
		// The credential is stale (revoked, or the control plane lost its
		// data): enroll again on the next attempt.
		a.log.Warn("broker refused the credential; enrolling again", "err", err)
		a.mu.Lock()
		a.cred = nil
		a.mu.Unlock()
		_ = a.store.Remove(credentialFile)
		return err
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.Subscribe(ctx, cmdTopic); err != nil {
		return err
	}
	hello, _ := proto.Marshal(ptr(a.state(true, connID)))
	if err := conn.Publish(stateTopic, hello).Wait(ctx); err != nil {
		return err
	}
	a.setConnected(true)
	defer a.setConnected(false)
	a.log.Info("connected", "broker", cred.MQTTURL, "conn", connID)
	err = a.send(ctx, conn, connID, stateTopic, hello)
	if ctx.Err() != nil {
		// Clean shutdown: say goodbye so the device shows offline at once.
		bye, _ := proto.Marshal(ptr(a.state(false, connID)))
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = conn.Publish(stateTopic, bye).Wait(sctx)
		cancel()
		return ctx.Err()
	}
	return sessionEnded{err}
}

func ptr[T any](v T) *T { return &v }

func (a *Agent) setConnected(on bool) {
	a.mu.Lock()
	a.connected = on
	a.mu.Unlock()
}

func topicFor(id string, l outbox.Lane) string {
	if l == outbox.Events {
		return proto.DeviceTopic(id, proto.KindEvent)
	}
	return proto.DeviceTopic(id, proto.KindTelemetry)
}

// send drains the outbox in order over conn, a window of QoS1 publishes at
// a time, acknowledging each record once the broker has, and re-sends the
// hello as a heartbeat.
func (a *Agent) send(ctx context.Context, conn Conn, connID uint64, stateTopic string, hello []byte) error {
	hb := a.clk.NewTicker(a.opts.HeartbeatInterval)
	defer hb.Stop()
	for {
		recs, err := a.box.Peek(a.opts.SendWindow)
		if err != nil {
			return err
		}
		if len(recs) > 0 {
			toks := make([]Token, len(recs))
			for i, r := range recs {
				toks[i] = conn.Publish(topicFor(a.opts.DeviceID, r.ID.Lane), r.Data)
			}
			for i, t := range toks {
				if err := t.Wait(ctx); err != nil {
					return err
				}
				if err := a.box.Ack(recs[i].ID); err != nil {
					return err
				}
				a.acked.Add(1)
			}
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-conn.Done():
			return errConnLost
		case <-a.box.Notify():
		case <-hb.C():
			if err := conn.Publish(stateTopic, hello).Wait(ctx); err != nil {
				return err
			}
		case <-a.helloNow:
			// The installed versions changed: say so now.
			hello, _ = proto.Marshal(ptr(a.state(true, connID)))
			if err := conn.Publish(stateTopic, hello).Wait(ctx); err != nil {
				return err
			}
		}
	}
}
