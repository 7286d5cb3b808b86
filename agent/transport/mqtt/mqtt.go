// Package mqtt is the agent's default transport: MQTT 3.1.1 over TCP with
// paho. paho's own reconnect logic is switched off; the agent reconnects
// with jittered backoff so that a fleet does not stampede a restarted
// broker.
package mqtt

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/hangarfleet/hangar/agent/transport"
)

// Transport dials MQTT brokers with paho.
type Transport struct {
	// ConnectTimeout bounds the TCP and MQTT handshake (default 30 s).
	ConnectTimeout time.Duration
	// Dialer dials the broker (default: a net.Dialer with the connect
	// timeout). Set its LocalAddr to choose the source address.
	Dialer *net.Dialer
}

var _ transport.Transport = (*Transport)(nil)

type conn struct {
	c    paho.Client
	done chan struct{}
	once sync.Once
}

// Connect dials once.
func (t *Transport) Connect(ctx context.Context, p transport.ConnectParams) (transport.Conn, error) {
	timeout := t.ConnectTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	cn := &conn{done: make(chan struct{})}
	o := paho.NewClientOptions().
		SetClientID(p.ClientID).
		SetUsername(p.Username).
		SetPassword(p.Password).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(timeout).
		SetWriteTimeout(timeout).
		SetOrderMatters(false).
		SetMessageChannelDepth(16).
		SetConnectionLostHandler(func(paho.Client, error) { cn.lost() })
	// The URL may list a broker cluster's nodes: this connection tries
	// them from a random one on, so that a fleet spreads over them and a
	// dead node costs one failed dial.
	for _, u := range transport.BrokerURLs(p.URL, rand.IntN) {
		o.AddBroker(u)
	}
	o.SetCustomOpenConnectionFn(t.openBounded)
	if p.TLS != nil {
		o.SetTLSConfig(p.TLS)
	}
	if p.KeepAlive > 0 {
		o.SetKeepAlive(p.KeepAlive)
		o.SetPingTimeout(p.KeepAlive / 2)
	}
	if p.WillTopic != "" {
		o.SetBinaryWill(p.WillTopic, p.WillPayload, 1, false)
	}
	if p.OnMessage != nil {
		on := p.OnMessage
		o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { on(m.Topic(), m.Payload()) })
	}
	cn.c = paho.NewClient(o)
	tok := cn.c.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		cn.c.Disconnect(0)
		return nil, ctx.Err()
	}
	if err := tok.Error(); err != nil {
		if errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword) || errors.Is(err, packets.ErrorRefusedNotAuthorised) ||
			errors.Is(err, packets.ErrorRefusedIDRejected) {
			return nil, fmt.Errorf("connect %s: %w: %v", p.URL, transport.ErrNotAuthorized, err)
		}
		return nil, fmt.Errorf("connect %s: %w", p.URL, err)
	}
	return cn, nil
}

func (c *conn) lost() { c.once.Do(func() { close(c.done) }) }

func (c *conn) Done() <-chan struct{} { return c.done }

func (c *conn) Close() {
	c.c.Disconnect(250)
	c.lost()
}

type token struct{ t paho.Token }

func (t token) Wait(ctx context.Context) error {
	select {
	case <-t.t.Done():
		return t.t.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *conn) Publish(topic string, payload []byte) transport.Token {
	return token{c.c.Publish(topic, 1, false, payload)}
}

func (c *conn) Subscribe(ctx context.Context, topic string) error {
	t := c.c.Subscribe(topic, 1, nil)
	select {
	case <-t.Done():
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return errors.New("subscribe: connection lost")
	}
	if err := t.Error(); err != nil {
		return fmt.Errorf("subscribe %s: %w", topic, err)
	}
	if st, ok := t.(*paho.SubscribeToken); ok {
		// MQTT 3.1.1 grants with 0, 1 or 2 and refuses with 0x80; a
		// broker may answer another failure code (mochi says 0x91 when it
		// mistakes the packet id for one in flight): anything at or above
		// 0x80 is no subscription.
		for _, code := range st.Result() {
			if code >= 0x80 {
				return fmt.Errorf("subscribe %s: refused by the broker (code %#x)", topic, code)
			}
		}
	}
	return nil
}
