package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
)

// Credentials looks up how a device may authenticate (store.ErrNotFound
// or store.ErrRevoked when it may not connect), and records how it did.
type Credentials interface {
	DeviceAuth(ctx context.Context, id string) (store.DeviceAuth, error)
	NoteAuth(ctx context.Context, id, method, serial string) error
}

// Defaults of EmbeddedOptions.
const (
	DefaultMQTTAddr = ":1883"
	// DefaultMaxPacket leaves room for the topic and MQTT headers around the
	// largest message proto accepts.
	DefaultMaxPacket = proto.MaxMessageSize + 4<<10
)

// EmbeddedOptions configure the embedded broker.
type EmbeddedOptions struct {
	Addr        string // listen address; DefaultMQTTAddr when empty
	Listener    net.Listener
	Credentials Credentials
	Metrics     *metrics.Metrics
	Logger      *slog.Logger
	// ConnectRate caps accepted connections per second (0: no cap). It
	// smooths a reconnect storm after a restart.
	ConnectRate int
	// MaxClients caps concurrent connections, authenticated or not: the
	// listener closes any beyond it at once (0: no cap).
	MaxClients int64
	// ConnectTimeout and MaxConnectSize bound a connection before it
	// authenticates (defaults DefaultConnectTimeout, DefaultMaxConnectSize).
	ConnectTimeout time.Duration
	MaxConnectSize int
	// FailedAuthSource and FailedAuthDevice count failed authentications
	// per source address and per device id; once one is spent, CONNECTs
	// from that source (or for that id) are refused unchecked until it
	// refills (nil: no limit).
	FailedAuthSource, FailedAuthDevice *throttle.Limiter
	// TLS serves MQTT over TLS (nil: plain TCP).
	TLS *tls.Config
	// DeviceCAs verify device certificates (mutual TLS; needs TLS). A
	// device that presents one is known by it: its subject is the device
	// id, which must be the client id, and its serial one the store holds
	// for the device. Without one, a device authenticates with its
	// password, if the fleet allows passwords.
	DeviceCAs *x509.CertPool
}

// Embedded is an in-process mochi-mqtt broker.
type Embedded struct {
	opts   EmbeddedOptions
	srv    *mqtt.Server
	ln     *listener
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.RWMutex
	handler Handler
	closed  atomic.Bool
	ackers  sync.Map // *mqtt.Client -> *acker
	serials sync.Map // *mqtt.Client -> serial of the certificate it authenticated with
	auth    chan authReq
	ackq    chan *acker
}

var _ Bus = (*Embedded)(nil)

// NewEmbedded creates the broker and opens its listener; Start serves.
func NewEmbedded(opts EmbeddedOptions) (*Embedded, error) {
	if opts.Credentials == nil {
		return nil, errors.New("embedded broker: no credential store")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.New(nil)
	}
	ln := opts.Listener
	if ln == nil {
		addr := opts.Addr
		if addr == "" {
			addr = DefaultMQTTAddr
		}
		var err error
		ln, err = net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("embedded broker: %w", err)
		}
	}
	if opts.TLS != nil {
		cfg := opts.TLS
		if opts.DeviceCAs != nil {
			cfg = cfg.Clone()
			cfg.ClientAuth = tls.VerifyClientCertIfGiven
			cfg.ClientCAs = opts.DeviceCAs
		}
		// The handshake happens on the connection's first read, inside
		// the pre-CONNECT deadline.
		ln = tls.NewListener(ln, cfg)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = DefaultMaxPacket
	// Devices receive little (commands): a short outbound queue per
	// connection instead of mochi's 8192 entries saves 64 KB each.
	caps.MaximumClientWritesPending = 128
	caps.RetainAvailable = 0
	caps.MaximumSessionExpiryInterval = 3600
	caps.MaximumMessageExpiryInterval = 3600
	if opts.MaxClients > 0 {
		caps.MaximumClients = opts.MaxClients
	}
	log := opts.Logger.With("component", "broker")
	srv := mqtt.New(&mqtt.Options{
		Capabilities: caps,
		InlineClient: true,
		// mochi logs every listener and hook at Info; keep its Warn and up.
		Logger:                 slog.New(minLevel{log.With("lib", "mochi").Handler(), slog.LevelWarn}),
		SysTopicResendInterval: 60,
	})
	ctx, cancel := context.WithCancel(context.Background())
	e := &Embedded{opts: opts, srv: srv, log: log, ctx: ctx, cancel: cancel, auth: make(chan authReq)}
	for range authWorkers {
		go e.authLoop()
	}
	e.ackq = make(chan *acker, 1<<16)
	for range ackWriters {
		go e.ackLoop()
	}
	if err := srv.AddHook(&hook{e: e}, nil); err != nil {
		ln.Close()
		return nil, fmt.Errorf("embedded broker: %w", err)
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	if opts.MaxConnectSize <= 0 {
		opts.MaxConnectSize = DefaultMaxConnectSize
	}
	e.ln = &listener{ln: ln, srv: srv, log: log, rate: opts.ConnectRate, metrics: opts.Metrics,
		connectTimeout: opts.ConnectTimeout, maxConnect: opts.MaxConnectSize, maxOpen: opts.MaxClients,
		unchecked: map[*connectGuard]struct{}{}, serveDone: make(chan struct{}), handshakes: make(chan struct{}, maxHandshakes)}
	e.ln.cond = sync.NewCond(&e.ln.mu)
	if err := srv.AddListener(e.ln); err != nil {
		ln.Close()
		return nil, fmt.Errorf("embedded broker: %w", err)
	}
	return e, nil
}

// Addr is the broker's listening address.
func (e *Embedded) Addr() net.Addr { return e.ln.ln.Addr() }

// Start serves MQTT and delivers device messages to h.
func (e *Embedded) Start(ctx context.Context, h Handler) error {
	e.mu.Lock()
	e.handler = h
	e.mu.Unlock()
	if err := e.srv.Serve(); err != nil {
		return fmt.Errorf("embedded broker: %w", err)
	}
	e.log.Info("MQTT broker listening", "addr", e.Addr().String())
	return nil
}

// Publish sends a QoS1 message to a device topic.
func (e *Embedded) Publish(ctx context.Context, device string, kind proto.Kind, payload []byte) error {
	if e.closed.Load() {
		return ErrClosed
	}
	return e.srv.Publish(proto.DeviceTopic(device, kind), payload, false, 1)
}

// Provision is a no-op: the embedded broker reads credentials from the
// store at every connection.
func (e *Embedded) Provision(ctx context.Context, device, password string) error { return nil }

// Revoke disconnects the device; the store already refuses its credential.
func (e *Embedded) Revoke(ctx context.Context, device string) error {
	if cl, ok := e.srv.Clients.Get(device); ok && !cl.Net.Inline {
		_ = e.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		e.log.Info("disconnected revoked device", "device", device)
	}
	return nil
}

// DropPasswordSessions disconnects every device connected with a password
// (passwords were just turned off) and says how many.
func (e *Embedded) DropPasswordSessions() int {
	n := 0
	for _, cl := range e.srv.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		if _, cert := e.serials.Load(cl); !cert {
			_ = e.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
			n++
		}
	}
	return n
}

// Connected reports the connected client count.
func (e *Embedded) Connected() int { return int(atomic.LoadInt64(&e.srv.Info.ClientsConnected)) }

// Close stops the broker and disconnects every client.
func (e *Embedded) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	e.cancel()
	e.ln.drain()
	return e.srv.Close()
}

// authWorkers bound the credential lookups running at once, so that a
// reconnect storm queues at the broker instead of piling onto the store.
const authWorkers = 4

type authReq struct {
	id   string
	resp chan authResp
}

type authResp struct {
	auth store.DeviceAuth
	err  error
}

// credential looks id up on an auth worker rather than on the connection's
// goroutine: the store's call chain is deep, and a goroutine's stack, once
// grown, stays grown for every one of thousands of connections.
func (e *Embedded) credential(id string) (store.DeviceAuth, error) {
	req := authReq{id: id, resp: make(chan authResp, 1)}
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case e.auth <- req:
	case <-t.C:
		return store.DeviceAuth{}, errors.New("credential lookup: timed out waiting for a worker")
	case <-e.ctx.Done():
		return store.DeviceAuth{}, ErrClosed
	}
	select {
	case r := <-req.resp:
		return r.auth, r.err
	case <-e.ctx.Done():
		return store.DeviceAuth{}, ErrClosed
	}
}

func (e *Embedded) authLoop() {
	for {
		select {
		case <-e.ctx.Done():
			return
		case req := <-e.auth:
			ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
			a, err := e.opts.Credentials.DeviceAuth(ctx, req.id)
			cancel()
			req.resp <- authResp{a, err}
		}
	}
}

// hook authenticates connections, enforces ACLs and hands device publishes
// to the handler before they are acknowledged.
type hook struct {
	mqtt.HookBase
	e *Embedded
}

func (h *hook) ID() string { return "hangar" }

func (h *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnPublish, mqtt.OnWillSent, mqtt.OnDisconnect,
	}, []byte{b})
}

func (h *hook) refuse(cl *mqtt.Client, reason string) bool {
	h.e.opts.Metrics.AuthFailures.WithLabelValues(reason).Inc()
	h.e.log.Debug("refused connection", "client", truncate(cl.ID), "remote", cl.Net.Remote, "reason", reason)
	return false
}

func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if peerCertificate(cl.Net.Conn) != nil {
		// A verified certificate cannot be guessed: the failed-login
		// limits, which protect passwords, do not apply to it (else a
		// stranger sending bad logins for a device's id would lock the
		// device out).
		return h.authenticate(cl, pk)
	}
	id := cl.ID
	src, _, _ := net.SplitHostPort(cl.Net.Remote)
	if l := h.e.opts.FailedAuthSource; l != nil && l.Spent(src) {
		h.e.opts.Metrics.AuthThrottled.WithLabelValues("mqtt_source").Inc()
		return false
	}
	if l := h.e.opts.FailedAuthDevice; l != nil && l.Spent(id) {
		h.e.opts.Metrics.AuthThrottled.WithLabelValues("mqtt_device").Inc()
		return false
	}
	if !h.authenticate(cl, pk) {
		if l := h.e.opts.FailedAuthSource; l != nil {
			l.Allow(src)
		}
		if l := h.e.opts.FailedAuthDevice; l != nil && proto.ValidateDeviceID(id) == nil {
			l.Allow(id)
		}
		return false
	}
	return true
}

func (h *hook) authenticate(cl *mqtt.Client, pk packets.Packet) bool {
	id := cl.ID
	if err := proto.ValidateDeviceID(id); err != nil {
		return h.refuse(cl, "bad_client_id")
	}
	cert := peerCertificate(cl.Net.Conn)
	if cert != nil {
		// The TLS handshake verified the chain and the validity period;
		// the certificate names the device.
		name, err := devcert.DeviceID(cert)
		if err != nil {
			return h.refuse(cl, "bad_certificate")
		}
		if name != id {
			return h.refuse(cl, "certificate_mismatch")
		}
		if u := string(pk.Connect.Username); u != "" && u != id {
			return h.refuse(cl, "username_mismatch")
		}
	} else if string(pk.Connect.Username) != id {
		return h.refuse(cl, "username_mismatch")
	}
	if pk.Connect.WillFlag && pk.Connect.WillTopic != proto.DeviceTopic(id, proto.KindState) {
		return h.refuse(cl, "bad_will_topic")
	}
	a, err := h.e.credential(id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return h.refuse(cl, "unknown_device")
	case errors.Is(err, store.ErrRevoked):
		return h.refuse(cl, "revoked")
	case err != nil:
		h.e.log.Error("credential lookup failed", "device", id, "err", err)
		return h.refuse(cl, "store_error")
	}
	if cert != nil {
		serial := devcert.SerialString(cert.SerialNumber)
		if !slices.Contains(a.Serials, serial) {
			// Superseded by a renewal the device has used, or by an
			// operator's re-key: that key no longer speaks for it.
			return h.refuse(cl, "certificate_superseded")
		}
		h.e.serials.Store(cl, serial)
		if a.Auth != store.AuthCert || a.PasswordHash != nil || len(a.Serials) > 1 && a.Serials[0] == serial {
			h.e.noteAuth(id, store.AuthCert, serial)
		}
		return true
	}
	if a.PasswordHash == nil {
		return h.refuse(cl, "no_password")
	}
	if !a.Passwords && h.e.opts.DeviceCAs != nil {
		// Without a device CA, passwords are the only way in.
		return h.refuse(cl, "password_disabled")
	}
	if !CheckPassword(a.PasswordHash, string(pk.Connect.Password)) {
		return h.refuse(cl, "bad_password")
	}
	if a.Auth != store.AuthPassword {
		h.e.noteAuth(id, store.AuthPassword, "")
	}
	return true
}

// noteAuth records a change in how a device authenticates, off the
// connection's path.
func (e *Embedded) noteAuth(id, method, serial string) {
	go func() {
		ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
		defer cancel()
		if err := e.opts.Credentials.NoteAuth(ctx, id, method, serial); err != nil && e.ctx.Err() == nil {
			e.log.Warn("recording how a device authenticated", "device", id, "err", err)
		}
	}()
}

// peerCertificate is the verified client certificate of a TLS connection,
// or nil.
func peerCertificate(c net.Conn) *x509.Certificate {
	if g, ok := c.(*connectGuard); ok {
		c = g.Conn
	}
	t, ok := c.(*tls.Conn)
	if !ok {
		return nil
	}
	st := t.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.PeerCertificates) == 0 {
		return nil
	}
	return st.PeerCertificates[0]
}

func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	var ok bool
	if write {
		ok = DeviceMayPublish(cl.ID, topic)
	} else {
		ok = DeviceMaySubscribe(cl.ID, topic)
	}
	if !ok {
		access := "subscribe"
		if write {
			access = "publish"
		}
		h.e.opts.Metrics.ACLDenials.WithLabelValues(access).Inc()
		h.e.log.Warn("ACL denied", "device", cl.ID, "access", access, "topic", truncate(topic))
	}
	return ok
}

func (h *hook) message(cl *mqtt.Client, topic string, payload []byte) (Message, Handler, bool) {
	id, kind, err := proto.ParseTopic(topic)
	if err != nil || id != cl.ID || kind == proto.KindCmd {
		return Message{}, nil, false // the ACL check has already refused it
	}
	h.e.mu.RLock()
	handler := h.e.handler
	h.e.mu.RUnlock()
	serial, _ := h.e.serials.Load(cl)
	sn, _ := serial.(string)
	return Message{Device: id, Kind: kind, Payload: payload, Received: time.Now(), Serial: sn}, handler, handler != nil
}

// OnPublish hands a device's publish to the handler and takes over its
// acknowledgement from mochi: the PUBACK is written by the client's acker
// once the message is stored, so a device can keep several messages in
// flight while the store commits them in groups.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	msg, handler, ok := h.message(cl, pk.TopicName, pk.Payload)
	if !ok {
		return pk, packets.ErrRejectPacket
	}
	if pk.FixedHeader.Qos == 0 {
		handler(h.e.ctx, msg, func(error) {})
		return pk, packets.ErrRejectPacket
	}
	a := h.e.acker(cl)
	if !a.reserve() {
		h.e.log.Warn("device has too many unacknowledged messages, disconnecting", "device", cl.ID, "limit", maxUnacked)
		cl.Stop(packets.ErrReceiveMaximum)
		return pk, packets.ErrRejectPacket
	}
	id := pk.PacketID
	handler(h.e.ctx, msg, func(err error) { a.done(id, err) })
	return pk, packets.ErrRejectPacket
}

func (h *hook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	msg, handler, ok := h.message(cl, pk.TopicName, pk.Payload)
	if !ok {
		return
	}
	handler(h.e.ctx, msg, func(err error) {
		if err != nil && !h.e.closed.Load() {
			h.e.log.Warn("last will not stored", "device", cl.ID, "err", err)
		}
	})
}

func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	h.e.ackers.Delete(cl)
	h.e.serials.Delete(cl)
}

// maxUnacked bounds the messages of one connection waiting for storage; a
// device that sends more without reading its PUBACKs is disconnected.
const maxUnacked = 1024

// ackWriteTimeout bounds how long a PUBACK write may block on a device that
// does not read: such a device is disconnected, and holds one ack writer
// for at most this long.
const ackWriteTimeout = 2 * time.Second

// ackWriters is how many goroutines write PUBACKs. A fixed pool, rather
// than a goroutine per connection with acknowledgements pending, creates no
// goroutine (and no stack) per message.
const ackWriters = 16

// acker writes one connection's PUBACKs in the order its messages arrived.
// It is queued to the ack writers at most once at a time, so its writes
// never reorder.
type acker struct {
	e           *Embedded
	cl          *mqtt.Client
	mu          sync.Mutex
	pending     []ackItem
	running     bool
	outstanding int
}

type ackItem struct {
	id  uint16
	err error
}

func (e *Embedded) acker(cl *mqtt.Client) *acker {
	if a, ok := e.ackers.Load(cl); ok {
		return a.(*acker)
	}
	a, _ := e.ackers.LoadOrStore(cl, &acker{e: e, cl: cl})
	return a.(*acker)
}

func (a *acker) reserve() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.outstanding >= maxUnacked {
		return false
	}
	a.outstanding++
	return true
}

func (a *acker) done(id uint16, err error) {
	a.mu.Lock()
	a.pending = append(a.pending, ackItem{id, err})
	start := !a.running
	a.running = true
	a.mu.Unlock()
	if start {
		a.e.ackq <- a
	}
}

func (e *Embedded) ackLoop() {
	for {
		select {
		case <-e.ctx.Done():
			return
		case a := <-e.ackq:
			a.run()
		}
	}
}

func (a *acker) run() {
	for {
		a.mu.Lock()
		batch := a.pending
		a.pending = nil
		a.outstanding -= len(batch)
		if len(batch) == 0 {
			a.running = false
			a.mu.Unlock()
			return
		}
		a.mu.Unlock()
		if a.cl.Closed() {
			continue
		}
		// All PUBACKs due go out in one write: a device streaming many
		// messages costs one system call per commit, not per message.
		buf := make([]byte, 0, 4*len(batch))
		var failed error
		for _, it := range batch {
			if it.err != nil {
				failed = it.err
				break
			}
			buf = append(buf, packets.Puback<<4, 2, byte(it.id>>8), byte(it.id))
		}
		if len(buf) > 0 {
			if err := a.write(buf); err != nil {
				a.cl.Stop(err)
				continue
			}
		}
		if failed != nil {
			// Not stored: drop the connection without acknowledging, so
			// that the device keeps the message and sends it again.
			// Later messages of this connection are not acknowledged
			// either.
			if !a.e.closed.Load() {
				a.e.log.Warn("message not stored, disconnecting device", "device", a.cl.ID, "err", failed)
			}
			a.cl.Stop(failed)
		}
	}
}

// write sends raw PUBACK packets. It takes the client's lock, as mochi does
// for every write, so that packets never interleave on the wire.
func (a *acker) write(buf []byte) error {
	a.cl.Lock()
	defer a.cl.Unlock()
	conn := a.cl.Net.Conn
	_ = conn.SetWriteDeadline(time.Now().Add(ackWriteTimeout))
	_, err := conn.Write(buf)
	_ = conn.SetWriteDeadline(time.Time{})
	return err
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// listener is a mochi listener over a net.Listener we opened (so that the
// port is known before serving), with an optional accept-rate cap.
type listener struct {
	ln      net.Listener
	srv     *mqtt.Server
	log     *slog.Logger
	rate    int
	metrics *metrics.Metrics
	wg      sync.WaitGroup
	end     atomic.Bool
	window  acceptWindow

	connectTimeout time.Duration
	maxConnect     int
	maxOpen        int64
	open           atomic.Int64

	// Connections that have not sent their CONNECT yet: mochi's Close
	// must not run while one of them is being set up (it races with
	// NewClient), so drain ends them first and waits.
	mu         sync.Mutex
	cond       *sync.Cond
	unchecked  map[*connectGuard]struct{}
	served     atomic.Bool
	serveDone  chan struct{}
	handshakes chan struct{} // TLS handshakes in progress
	closed     atomic.Bool   // Close ran (drain only stops accepting)
}

// drain stops accepting, ends the connections that have not sent their
// CONNECT, and waits until mochi has let go of them.
func (l *listener) drain() {
	l.end.Store(true)
	_ = l.ln.Close()
	if l.served.Load() {
		<-l.serveDone
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for g := range l.unchecked {
		_ = g.Conn.Close()
	}
	for len(l.unchecked) > 0 {
		l.cond.Wait()
	}
}

// acceptWindow finds the most accepts within any one second: the accept
// times of the last second, and the largest count seen.
type acceptWindow struct {
	times []time.Time // times[head:] are within the last second
	head  int
	peak  int
}

func (w *acceptWindow) add(now time.Time) (peak int, grew bool) {
	for w.head < len(w.times) && now.Sub(w.times[w.head]) >= time.Second {
		w.head++
	}
	if w.head > len(w.times)/2 {
		w.times = append(w.times[:0], w.times[w.head:]...)
		w.head = 0
	}
	w.times = append(w.times, now)
	if n := len(w.times) - w.head; n > w.peak {
		w.peak = n
		return w.peak, true
	}
	return w.peak, false
}

func (l *listener) ID() string              { return "tcp" }
func (l *listener) Address() string         { return l.ln.Addr().String() }
func (l *listener) Protocol() string        { return "tcp" }
func (l *listener) Init(*slog.Logger) error { return nil }

func (l *listener) Serve(establish listeners.EstablishFn) {
	l.served.Store(true)
	defer close(l.serveDone)
	var interval time.Duration
	if l.rate > 0 {
		interval = time.Second / time.Duration(l.rate)
	}
	next := time.Now()
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if !l.end.Load() {
				l.log.Error("accept failed", "err", err)
			}
			return
		}
		if interval > 0 {
			// Pace accepted connections: excess clients wait in the
			// kernel's accept queue instead of all authenticating at once.
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			}
			next = maxTime(next, time.Now()).Add(interval)
		}
		l.metrics.Accepted.Inc()
		if peak, grew := l.window.add(time.Now()); grew {
			l.metrics.AcceptPeak.Set(float64(peak))
		}
		if l.maxOpen > 0 && l.open.Load() >= l.maxOpen {
			// Full: closed before it costs anything (mochi would read its
			// CONNECT to answer "server busy").
			l.metrics.PreconnectRefused.WithLabelValues("max_connections").Inc()
			conn.Close()
			continue
		}
		l.open.Add(1)
		g := guardConnect(conn, l.connectTimeout, l.maxConnect, func(reason string) {
			l.metrics.PreconnectRefused.WithLabelValues(reason).Inc()
		})
		g.onClose = func() { l.open.Add(-1) }
		g.onChecked = func() {
			l.mu.Lock()
			delete(l.unchecked, g)
			l.cond.Broadcast()
			l.mu.Unlock()
		}
		l.mu.Lock()
		l.unchecked[g] = struct{}{}
		l.mu.Unlock()
		conn = g
		run := func() {
			if err := establish(l.ID(), conn); err != nil {
				l.log.Debug("connection ended", "remote", conn.RemoteAddr().String(), "err", err)
			}
		}
		tc, ok := g.Conn.(*tls.Conn)
		if !ok {
			go run()
			continue
		}
		// The TLS handshake runs on a goroutine of its own, which ends
		// with it, at most maxHandshakes at once (beyond, accepting
		// waits): a handshake flood holds a bounded number of goroutines
		// and their crypto-grown stacks, and the connection's goroutine
		// starts small. (Reading records grows it again: TLS record
		// decryption on mochi's read goroutine is what costs a TLS
		// connection most, see docs/benchmarks.md.)
		l.handshakes <- struct{}{}
		go func() {
			err := handshake(tc, l.connectTimeout)
			<-l.handshakes
			if err != nil {
				l.metrics.PreconnectRefused.WithLabelValues("tls_handshake").Inc()
				l.log.Debug("TLS handshake failed", "remote", tc.RemoteAddr().String(), "err", err)
				g.Close()
				g.onChecked()
				return
			}
			go run()
		}()
	}
}

// maxHandshakes bounds the TLS handshakes in progress at once: each holds
// a goroutine and its grown stack until it ends (within the CONNECT
// deadline).
const maxHandshakes = 1024

// handshake completes the TLS handshake within the pre-CONNECT deadline;
// the read deadline (the CONNECT's) stays.
func handshake(tc *tls.Conn, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	_ = tc.SetWriteDeadline(deadline)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	err := tc.HandshakeContext(ctx)
	_ = tc.SetWriteDeadline(time.Time{})
	return err
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (l *listener) Close(_ listeners.CloseFn) {
	if l.closed.Swap(true) {
		return
	}
	l.end.Store(true)
	l.ln.Close()
	// Not closeClients: mochi's (Clients.GetByListener, v2.7.9) takes the
	// clients' read lock twice, and a client connecting or leaving in
	// between deadlocks the broker for good (mochi-mqtt/server#488). One
	// snapshot under one read lock, then the same disconnect.
	for _, cl := range l.srv.Clients.GetAll() {
		if cl.Net.Listener == l.ID() && !cl.Closed() {
			_ = l.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// minLevel drops records below a level.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (m minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= m.min && m.Handler.Enabled(ctx, l)
}

func (m minLevel) WithAttrs(as []slog.Attr) slog.Handler {
	return minLevel{m.Handler.WithAttrs(as), m.min}
}
func (m minLevel) WithGroup(n string) slog.Handler { return minLevel{m.Handler.WithGroup(n), m.min} }
