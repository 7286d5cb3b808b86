package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
		if !clock.Sleep(a.clk, a.linkDown(err, &attempt), ctx.Done()) {
			return
		}
	}
}

// linkDown records why a session ended and returns the wait before the
// next attempt.
func (a *Agent) linkDown(err error, attempt *int) time.Duration {
	a.mu.Lock()
	a.lastErr = err
	a.mu.Unlock()
	wait := a.backoff(*attempt)
	if errors.Is(err, ErrRevoked) || errors.Is(err, ErrAlreadyEnrolled) {
		// Only an operator changes this: ask rarely.
		wait = a.opts.BackoffMax
	}
	if errSessionWorked(err) {
		*attempt = 0
	} else {
		*attempt++
	}
	a.log.Info("broker link down", "err", err, "retry_in", wait.Round(time.Millisecond))
	return wait
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
//
// Its frame and send's stay small: they are on the stack for as long as
// the link is up, and a simulator runs thousands of agents.
func (a *Agent) session(ctx context.Context) error {
	conn, connID, hello, err := a.dial(ctx)
	if err != nil {
		return err
	}
	a.setConnected(true)
	err = a.send(ctx, conn, connID, hello)
	a.setConnected(false)
	if ctx.Err() != nil {
		a.goodbye(conn, connID)
		conn.Close()
		return ctx.Err()
	}
	conn.Close()
	return sessionEnded{err}
}

// dial enrolls if needed, connects, subscribes to commands and publishes
// the hello.
func (a *Agent) dial(ctx context.Context) (Conn, uint64, []byte, error) {
	a.mu.Lock()
	cred := a.cred
	a.mu.Unlock()
	if cred == nil {
		c, err := a.enroll(ctx)
		if err != nil {
			return nil, 0, nil, err
		}
		a.mu.Lock()
		a.cred, cred = c, c
		a.mu.Unlock()
	} else if id := a.identity(); id != nil && id.expired(a.clk.Now()) {
		// Past its certificate's expiry (by this device's clock, which
		// may be wrong): enroll again, as the control plane allows it
		// (an operator's rekey, or approval); until then try the
		// certificate in hand.
		if c, err := a.enroll(ctx); err == nil {
			a.mu.Lock()
			a.cred, cred = c, c
			a.mu.Unlock()
		} else {
			a.log.Warn("device certificate expired and enrolling again failed", "expired", id.leaf.NotAfter.UTC().Format(time.RFC3339), "err", err)
		}
	}
	if a.opts.TLS != nil && !tlsURL(cred.MQTTURL) {
		return nil, 0, nil, fmt.Errorf("the control plane gave the broker URL %q: this agent trusts its CA and speaks only TLS to it (tls://, ssl://, mqtts://)", cred.MQTTURL)
	}
	connID := a.conns.Add(1)
	will, _ := proto.Marshal(ptr(a.state(false, connID)))
	stateTopic := proto.DeviceTopic(a.opts.DeviceID, proto.KindState)
	conn, err := a.opts.Transport.Connect(ctx, ConnectParams{
		URL: cred.MQTTURL, ClientID: a.opts.DeviceID, Username: cred.Username, Password: cred.Password,
		WillTopic: stateTopic, WillPayload: will, KeepAlive: a.opts.KeepAlive,
		OnMessage: a.onMessage, TLS: a.tls,
	})
	if errors.Is(err, ErrNotAuthorized) || certRefused(err) {
		// The broker refused the credential: revoked, re-keyed, expired,
		// or a refusal that is not about it at all (a throttle, a store
		// error). Enrolling again works only where an operator allowed it
		// (rekey, approval); until then the credential in hand is kept
		// and tried again: deleting it on a refusal anyone can provoke
		// would lock the device out for good.
		if c, eerr := a.enroll(ctx); eerr == nil {
			a.mu.Lock()
			a.cred = c
			a.mu.Unlock()
			a.log.Warn("broker refused the credential; enrolled again", "err", err)
		} else {
			a.log.Warn("broker refused the credential, and enrolling again failed; keeping it", "err", err, "enroll", eerr)
			err = fmt.Errorf("%w (enrolling again: %w)", err, eerr)
		}
		return nil, 0, nil, err
	}
	if err != nil {
		return nil, 0, nil, err
	}
	if err := conn.Subscribe(ctx, proto.DeviceTopic(a.opts.DeviceID, proto.KindCmd)); err != nil {
		conn.Close()
		return nil, 0, nil, err
	}
	hello, _ := proto.Marshal(ptr(a.state(true, connID)))
	if err := conn.Publish(stateTopic, hello).Wait(ctx); err != nil {
		conn.Close()
		return nil, 0, nil, err
	}
	a.log.Info("connected", "broker", cred.MQTTURL, "conn", connID)
	a.maybeRenew(ctx, conn)
	return conn, connID, hello, nil
}

func (a *Agent) identity() *identity {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ident
}

// certRefused reports whether a TLS handshake failed because the server
// refused this device's certificate (expired, revoked, unknown): by the
// server's clock, which may be right where the device's is not.
func certRefused(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "remote error: tls: expired certificate") || strings.Contains(s, "remote error: tls: bad certificate") ||
		strings.Contains(s, "remote error: tls: revoked certificate") || strings.Contains(s, "remote error: tls: unknown certificate")
}

// errReconnect ends a session so that the next one uses a new credential.
var errReconnect = errors.New("reconnecting with the new certificate")

// goodbye says the device is going offline (a clean shutdown), so that it
// shows offline at once.
func (a *Agent) goodbye(conn Conn, connID uint64) {
	bye, _ := proto.Marshal(ptr(a.state(false, connID)))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = conn.Publish(proto.DeviceTopic(a.opts.DeviceID, proto.KindState), bye).Wait(ctx)
}

// publish sends a window of records and acknowledges each in the outbox
// once the broker has.
func (a *Agent) publish(ctx context.Context, conn Conn, recs []outbox.Record) error {
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
	return nil
}

func (a *Agent) publishState(ctx context.Context, conn Conn, msg []byte) error {
	return conn.Publish(proto.DeviceTopic(a.opts.DeviceID, proto.KindState), msg).Wait(ctx)
}

func (a *Agent) helloMsg(connID uint64) []byte {
	b, _ := proto.Marshal(ptr(a.state(true, connID)))
	return b
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
func (a *Agent) send(ctx context.Context, conn Conn, connID uint64, hello []byte) error {
	hb := a.clk.NewTicker(a.opts.HeartbeatInterval)
	defer hb.Stop()
	for {
		recs, err := a.box.Peek(a.opts.SendWindow)
		if err != nil {
			return err
		}
		if len(recs) > 0 {
			if err := a.publish(ctx, conn, recs); err != nil {
				return err
			}
			continue
		}
		beat := false
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-conn.Done():
			return errConnLost
		case <-a.box.Notify():
		case <-hb.C():
			beat = true
		case <-a.helloNow:
			// The installed versions changed: say so now.
			hello, beat = a.helloMsg(connID), true
		case <-a.reconnect:
			a.goodbye(conn, connID)
			return errReconnect
		case <-a.renewNow:
			a.maybeRenew(ctx, conn)
		}
		if beat {
			a.maybeRenew(ctx, conn)
			if err := a.publishState(ctx, conn, hello); err != nil {
				return err
			}
		}
	}
}

// tlsURL reports whether a broker URL speaks TLS.
// tlsURL says whether every broker URL of u (a comma-separated list: the
// nodes of a broker cluster) is a TLS one.
func tlsURL(u string) bool {
	for _, one := range strings.Split(u, ",") {
		scheme, _, _ := strings.Cut(strings.TrimSpace(one), "://")
		switch scheme {
		case "tls", "ssl", "tcps", "mqtts":
		default:
			return false
		}
	}
	return u != ""
}
