// Package mqttlite is a second implementation of the agent's transport:
// MQTT 3.1.1 over TCP with paho's packet codec but one goroutine per
// connection (the reader) instead of paho's client, which runs ten. It
// exists for fleets of simulated drones, where a drone's footprint decides
// how many fit in one process (about 36 KB of stacks and heap per paho
// client, against a few KB here); the agent binary uses transport/mqtt.
//
// Semantics match transport/mqtt: clean session, QoS 1 publishes and
// subscriptions, a QoS 1 last will, no reconnect of its own (the agent's
// loop does that), ErrNotAuthorized when the broker refuses the credential.
// The same conformance tests run against both.
package mqttlite

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/hangarfleet/hangar/agent/transport"
)

// MaxPacket is the largest packet accepted from the broker; a larger one
// ends the connection (the agent's own commands are a few hundred bytes).
const MaxPacket = 1 << 20

// Transport dials MQTT brokers.
type Transport struct {
	// ConnectTimeout bounds the TCP and MQTT handshake, and each write
	// (default 30 s).
	ConnectTimeout time.Duration
	// Dialer dials the broker (default: a zero net.Dialer). Set its
	// LocalAddr to choose the source address.
	Dialer *net.Dialer
}

var _ transport.Transport = (*Transport)(nil)

// ErrClosed completes the tokens of a connection that was lost or closed.
var ErrClosed = errors.New("mqtt: connection closed")

// Connect dials once, sends CONNECT and waits for the CONNACK. When the
// URL lists a cluster's nodes, it tries them from a random one on until
// one answers (a refused credential is not a dead node: it ends there).
func (t *Transport) Connect(ctx context.Context, p transport.ConnectParams) (transport.Conn, error) {
	urls := transport.BrokerURLs(p.URL, rand.IntN)
	if len(urls) == 0 {
		return nil, errors.New("connect: no broker URL")
	}
	var err error
	for _, u := range urls {
		one := p
		one.URL = u
		var c transport.Conn
		if c, err = t.connect(ctx, one); err == nil || errors.Is(err, transport.ErrNotAuthorized) || ctx.Err() != nil {
			return c, err
		}
	}
	return nil, err
}

func (t *Transport) connect(ctx context.Context, p transport.ConnectParams) (transport.Conn, error) {
	timeout := t.ConnectTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	u, err := url.Parse(p.URL)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", p.URL, err)
	}
	secure := false
	switch u.Scheme {
	case "tcp", "mqtt":
	case "tls", "ssl", "tcps", "mqtts":
		secure = true
	default:
		return nil, fmt.Errorf("connect %s: scheme %q not supported (tcp://host:port, tls://host:port)", p.URL, u.Scheme)
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	d := t.Dialer
	if d == nil {
		d = &net.Dialer{}
	}
	nc, err := d.DialContext(dctx, "tcp", u.Host)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", p.URL, err)
	}
	// The handshake: bounded by the timeout and by ctx.
	stop := context.AfterFunc(dctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	_ = nc.SetDeadline(time.Now().Add(timeout))
	if secure {
		cfg := p.TLS.Clone()
		if cfg == nil {
			cfg = &tls.Config{}
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(dctx); err != nil {
			nc.Close()
			return nil, fmt.Errorf("connect %s: %w", p.URL, err)
		}
		nc = tc
	}
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion = "MQTT", 4
	cp.CleanSession = true
	cp.ClientIdentifier = p.ClientID
	cp.Keepalive = uint16(min(p.KeepAlive/time.Second, 65535))
	if p.WillTopic != "" {
		cp.WillFlag, cp.WillQos, cp.WillTopic, cp.WillMessage = true, 1, p.WillTopic, p.WillPayload
	}
	if p.Username != "" {
		cp.UsernameFlag, cp.Username = true, p.Username
	}
	if p.Password != "" {
		cp.PasswordFlag, cp.Password = true, []byte(p.Password)
	}
	if err := cp.Write(nc); err != nil {
		nc.Close()
		return nil, fmt.Errorf("connect %s: %w", p.URL, handshakeErr(dctx, err))
	}
	pk, err := readPacket(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("connect %s: %w", p.URL, handshakeErr(dctx, err))
	}
	ack, ok := pk.(*packets.ConnackPacket)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("connect %s: broker sent %s before CONNACK", p.URL, pk)
	}
	switch ack.ReturnCode {
	case packets.Accepted:
	case packets.ErrRefusedBadUsernameOrPassword, packets.ErrRefusedNotAuthorised, packets.ErrRefusedIDRejected:
		nc.Close()
		return nil, fmt.Errorf("connect %s: %w: %s", p.URL, transport.ErrNotAuthorized, packets.ConnackReturnCodes[ack.ReturnCode])
	default:
		nc.Close()
		return nil, fmt.Errorf("connect %s: refused: %s", p.URL, packets.ConnackReturnCodes[ack.ReturnCode])
	}
	if !stop() {
		nc.Close()
		return nil, fmt.Errorf("connect %s: %w", p.URL, dctx.Err())
	}
	_ = nc.SetDeadline(time.Time{})
	c := &conn{nc: nc, timeout: timeout, on: p.OnMessage, done: make(chan struct{}), pending: make(map[uint16]*token)}
	c.lastRead.Store(time.Now().UnixNano())
	c.lastWrite.Store(time.Now().UnixNano())
	if p.KeepAlive > 0 {
		c.keepAlive = p.KeepAlive
		c.mu.Lock()
		c.ping = time.AfterFunc(p.KeepAlive/2, c.keepalive)
		c.mu.Unlock()
	}
	go c.read()
	return c, nil
}

// handshakeErr prefers the reason the handshake was cut short (the
// caller's context, or the timeout) to the I/O error it caused.
func handshakeErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// readPacket reads one packet. The fixed header is decoded here so that a
// length over MaxPacket is refused before anything that size is allocated
// (paho's ReadPacket allocates the announced length first).
func readPacket(r io.Reader) (packets.ControlPacket, error) {
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return nil, err
	}
	fh := packets.FixedHeader{MessageType: b[0] >> 4, Dup: b[0]&0x08 != 0, Qos: b[0] >> 1 & 0x03, Retain: b[0]&0x01 != 0}
	n, shift := 0, 0
	for i := 0; ; i++ {
		if i == 4 {
			return nil, errors.New("mqtt: malformed remaining length")
		}
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return nil, err
		}
		n |= int(b[0]&0x7f) << shift
		shift += 7
		if b[0]&0x80 == 0 {
			break
		}
	}
	if n > MaxPacket {
		return nil, fmt.Errorf("mqtt: packet of %d bytes, over %d", n, MaxPacket)
	}
	fh.RemainingLength = n
	cp, err := packets.NewControlPacketWithHeader(fh)
	if err != nil {
		return nil, err
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, err
	}
	if err := cp.Unpack(bytes.NewBuffer(body)); err != nil {
		return nil, fmt.Errorf("mqtt: %w", err)
	}
	return cp, nil
}

type conn struct {
	nc        net.Conn
	timeout   time.Duration
	on        func(topic string, payload []byte)
	keepAlive time.Duration
	lastRead  atomic.Int64 // unix nanoseconds
	lastWrite atomic.Int64

	wmu     sync.Mutex // one packet at a time on the wire
	mu      sync.Mutex
	pending map[uint16]*token // publishes and subscribes waiting for their ack
	ping    *time.Timer       // keep-alive, when on
	nextID  uint16
	closed  bool
	err     error
	done    chan struct{}
}

type token struct {
	done   chan struct{}
	err    error
	result []byte // SUBACK return codes
}

func (t *token) Wait(ctx context.Context) error {
	select {
	case <-t.done:
		return t.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (t *token) complete(err error) {
	t.err = err
	close(t.done)
}

func (c *conn) Done() <-chan struct{} { return c.done }

// Close disconnects cleanly: the broker does not publish the last will.
// When a write is stuck (a peer that stopped reading) it does not wait for
// it: the socket is closed, which ends that write.
func (c *conn) Close() {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if !closed && c.wmu.TryLock() {
		_ = c.nc.SetWriteDeadline(time.Now().Add(250 * time.Millisecond))
		_ = packets.NewControlPacket(packets.Disconnect).Write(c.nc)
		c.wmu.Unlock()
	}
	c.fail(ErrClosed)
}

// fail ends the connection: every pending token completes with err.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		// Another goroutine is ending it: Done is closed when fail returns,
		// whichever call returns first.
		<-c.done
		return
	}
	c.closed, c.err = true, err
	pending := c.pending
	c.pending = nil
	if c.ping != nil {
		c.ping.Stop()
	}
	c.mu.Unlock()
	_ = c.nc.Close()
	for _, t := range pending {
		t.complete(err)
	}
	close(c.done)
}

func (c *conn) write(p packets.ControlPacket, timeout time.Duration) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.nc.SetWriteDeadline(time.Now().Add(timeout))
	err := p.Write(c.nc)
	if err != nil {
		c.fail(fmt.Errorf("mqtt: write: %w", err))
		return err
	}
	c.lastWrite.Store(time.Now().UnixNano())
	return nil
}

// register allocates a packet id for a token waiting for its ack.
func (c *conn) register() (uint16, *token, error) {
	t := &token{done: make(chan struct{})}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, nil, c.err
	}
	if len(c.pending) >= 65535 {
		return 0, nil, errors.New("mqtt: 65535 messages in flight")
	}
	for {
		c.nextID++
		if c.nextID == 0 {
			continue
		}
		if _, used := c.pending[c.nextID]; !used {
			break
		}
	}
	c.pending[c.nextID] = t
	return c.nextID, t, nil
}

func (c *conn) take(id uint16) *token {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.pending[id]
	delete(c.pending, id)
	return t
}

// Publish sends a QoS 1 message; its token completes on the PUBACK, or
// with an error when the connection ends first.
func (c *conn) Publish(topic string, payload []byte) transport.Token {
	id, t, err := c.register()
	if err != nil {
		return &token{done: closedChan, err: err}
	}
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.Qos, p.TopicName, p.MessageID, p.Payload = 1, topic, id, payload
	_ = c.write(p, c.timeout) // a failed write fails the token
	return t
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Subscribe subscribes with QoS 1 and waits for the SUBACK.
func (c *conn) Subscribe(ctx context.Context, topic string) error {
	id, t, err := c.register()
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", topic, err)
	}
	p := packets.NewControlPacket(packets.Subscribe).(*packets.SubscribePacket)
	p.MessageID, p.Topics, p.Qoss = id, []string{topic}, []byte{1}
	_ = c.write(p, c.timeout)
	if err := t.Wait(ctx); err != nil {
		if ctx.Err() == nil {
			return fmt.Errorf("subscribe %s: connection lost: %w", topic, err)
		}
		return err
	}
	for _, code := range t.result {
		if code >= 0x80 { // 0x80 refuses; a broker may send another failure code (see the paho transport)
			return fmt.Errorf("subscribe %s: refused by the broker (code %#x)", topic, code)
		}
	}
	return nil
}

// read is the connection's goroutine: acks complete tokens, publishes go
// to OnMessage (acknowledged after it returns).
func (c *conn) read() {
	for {
		pk, err := readPacket(c.nc)
		if err != nil {
			c.fail(fmt.Errorf("mqtt: read: %w", err))
			return
		}
		c.lastRead.Store(time.Now().UnixNano())
		switch p := pk.(type) {
		case *packets.PubackPacket:
			if t := c.take(p.MessageID); t != nil {
				t.complete(nil)
			}
		case *packets.SubackPacket:
			if t := c.take(p.MessageID); t != nil {
				t.result = p.ReturnCodes
				t.complete(nil)
			}
		case *packets.PublishPacket:
			if c.on != nil {
				c.on(p.TopicName, p.Payload)
			}
			switch p.Qos {
			case 1:
				ack := packets.NewControlPacket(packets.Puback).(*packets.PubackPacket)
				ack.MessageID = p.MessageID
				if c.write(ack, c.timeout) != nil {
					return
				}
			case 2:
				// Subscriptions are QoS 1, so a broker never sends QoS 2.
				c.fail(errors.New("mqtt: broker sent a QoS 2 publish to a QoS 1 subscription"))
				return
			}
		case *packets.PingrespPacket:
		default:
			c.fail(fmt.Errorf("mqtt: unexpected packet from the broker: %s", pk))
			return
		}
	}
}

// keepalive runs on a timer every half keep-alive period: it pings when
// nothing was written for that long, and ends a connection that has been
// silent for one and a half periods (a PINGRESP would have arrived).
func (c *conn) keepalive() {
	now := time.Now()
	if now.Sub(time.Unix(0, c.lastRead.Load())) > c.keepAlive*3/2 {
		c.fail(errors.New("mqtt: no answer from the broker within 1.5 keep-alive periods"))
		return
	}
	if now.Sub(time.Unix(0, c.lastWrite.Load())) >= c.keepAlive/2 {
		if c.write(packets.NewControlPacket(packets.Pingreq), c.timeout) != nil {
			return
		}
	}
	c.mu.Lock()
	if !c.closed {
		c.ping.Reset(c.keepAlive / 2)
	}
	c.mu.Unlock()
}
