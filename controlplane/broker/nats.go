package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
)

// NATS is the bus on a NATS cluster: devices speak MQTT to any node (its
// MQTT listener), the control plane speaks NATS.
//
//   - Ingest. A device's QoS 1 publish is acknowledged by NATS once it is
//     stored, replicated, in the MQTT layer's own stream ($MQTT_msgs, as
//     $MQTT.msgs.<subject>). The control plane keeps a durable consumer on
//     that stream (DefaultNATSDurable), shared by every replica: each
//     message goes to one replica, which acknowledges it to JetStream
//     only once it is stored. A replica that dies leaves its messages
//     unacknowledged; JetStream gives them to another after the ack wait.
//     (A stream of our own on hangar.> would be fed by core NATS with no
//     tie to the device's PUBACK: a message could be acknowledged to the
//     device and still miss it, during a node's failover say.)
//   - Commands are published on core NATS (hangar.<id>.cmd); the device's
//     MQTT subscription receives them. The dispatcher resends until the
//     device acknowledges a command, as with every broker.
//   - Devices authenticate through the auth callout: NATS asks the
//     control plane (any replica: a queue group) about every CONNECT that
//     is not the control plane's own, and gets back a user allowed only
//     its own topics, for UserTTL; at the end NATS disconnects it and it
//     authenticates again, so a revoked device is out within UserTTL.
type NATS struct {
	opts   NATSOptions
	log    *slog.Logger
	issuer nkeys.KeyPair

	nc      *nats.Conn
	cc      jetstream.ConsumeContext
	authSub *nats.Subscription
	authQ   chan *nats.Msg
	closed  atomic.Bool
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// Defaults of NATSOptions.
const (
	DefaultNATSDurable = "hangar-ingest"
	DefaultNATSUserTTL = 10 * time.Minute
	natsMQTTStream     = "$MQTT_msgs"
	natsMQTTPrefix     = "$MQTT.msgs."
	natsAuthSubject    = "$SYS.REQ.USER.AUTH"
)

// NATSOptions configure the NATS bus.
type NATSOptions struct {
	// URL lists the cluster's nodes: nats://a:4222,nats://b:4222,...
	URL string
	// User and Password are the control plane's account: in the server's
	// authorization users and the auth callout's auth_users.
	User, Password string
	// MQTTURL is one of the cluster's MQTT listeners: the control plane
	// connects once at start so that NATS makes its MQTT streams before
	// any device publishes.
	MQTTURL string
	// CalloutSeed is the account nkey seed (SA...) that signs the auth
	// callout's answers; its public key is the callout's issuer in the
	// server configuration.
	CalloutSeed string
	// Credentials are the devices' (the store).
	Credentials Credentials
	// Durable names the shared ingest consumer (DefaultNATSDurable).
	Durable string
	// UserTTL is how long a device's authorization lasts
	// (DefaultNATSUserTTL).
	UserTTL time.Duration
	// AckWait is how long a message given to a replica waits for its
	// acknowledgement before another replica gets it (default 10 s: a
	// replica that dies holds its messages this long).
	AckWait time.Duration
	Metrics *metrics.Metrics
	Logger  *slog.Logger
	// Now is the clock of the authorizations (default time.Now).
	Now func() time.Time
	// FailedAuthSource and FailedAuthDevice count failed authentications
	// per source address and per device id; past them a CONNECT is
	// refused unchecked (nil: no limit), as on the embedded broker.
	FailedAuthSource, FailedAuthDevice *throttle.Limiter
}

// natsAuthWorkers answer callouts at once; natsAuthQueue wait beyond them,
// and past that a CONNECT is refused at once ("busy": the device tries
// again) rather than left to time out.
const (
	natsAuthWorkers = 8
	natsAuthQueue   = 4096
)

// NewNATS connects to the cluster.
func NewNATS(opts NATSOptions) (*NATS, error) {
	if opts.Durable == "" {
		opts.Durable = DefaultNATSDurable
	}
	if opts.UserTTL <= 0 {
		opts.UserTTL = DefaultNATSUserTTL
	}
	if opts.AckWait <= 0 {
		opts.AckWait = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Credentials == nil {
		return nil, errors.New("nats: no device credentials")
	}
	kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(opts.CalloutSeed)))
	if err != nil {
		return nil, fmt.Errorf("nats: auth callout seed: %w", err)
	}
	if pub, _ := kp.PublicKey(); !nkeys.IsValidPublicAccountKey(pub) {
		return nil, errors.New("nats: the auth callout seed must be an account seed (SA...)")
	}
	n := &NATS{opts: opts, log: opts.Logger.With("component", "broker", "broker", "nats"), issuer: kp, authQ: make(chan *nats.Msg, natsAuthQueue)}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.nc, err = nats.Connect(opts.URL, nats.UserInfo(opts.User, opts.Password), nats.Name("hangar control plane"),
		nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond), nats.RetryOnFailedConnect(true),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				n.log.Warn("disconnected from NATS", "err", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { n.log.Info("reconnected to NATS", "server", c.ConnectedUrlRedacted()) }))
	if err != nil {
		return nil, fmt.Errorf("nats: %w", err)
	}
	return n, nil
}

// Start answers the auth callout and consumes device messages into h.
func (n *NATS) Start(ctx context.Context, h Handler) error {
	var err error
	for range natsAuthWorkers {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			for {
				select {
				case <-n.ctx.Done():
					return
				case m := <-n.authQ:
					n.answer(m, false)
				}
			}
		}()
	}
	// Every replica answers, one per request.
	if n.authSub, err = n.nc.QueueSubscribe(natsAuthSubject, "hangar-auth", n.authorize); err != nil {
		return fmt.Errorf("nats: auth callout: %w", err)
	}
	if n.opts.MQTTURL != "" {
		n.touchMQTT(ctx)
	}
	js, err := jetstream.New(n.nc)
	if err != nil {
		return fmt.Errorf("nats: %w", err)
	}
	var filters []string
	for _, k := range proto.DeviceKinds {
		filters = append(filters, natsMQTTPrefix+natsDevPrefix+"*."+string(k))
	}
	sctx, cancel := context.WithTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	var cons jetstream.Consumer
	for {
		cons, err = js.CreateOrUpdateConsumer(sctx, natsMQTTStream, jetstream.ConsumerConfig{
			Durable: n.opts.Durable, FilterSubjects: filters, AckPolicy: jetstream.AckExplicitPolicy,
			AckWait: n.opts.AckWait, MaxAckPending: 20000, MaxDeliver: -1, DeliverPolicy: jetstream.DeliverAllPolicy,
		})
		if err == nil {
			break
		}
		// The MQTT layer makes its stream with the first MQTT connection.
		if !errors.Is(err, jetstream.ErrStreamNotFound) || sctx.Err() != nil {
			return fmt.Errorf("nats: ingest consumer: %w", err)
		}
		select {
		case <-sctx.Done():
			return fmt.Errorf("nats: ingest consumer: %w", err)
		case <-time.After(250 * time.Millisecond):
		}
	}
	// A few hundred in hand: what a replica that dies holds back for the
	// ack wait.
	n.cc, err = cons.Consume(func(m jetstream.Msg) { n.deliver(h, m) }, jetstream.PullMaxMessages(500))
	if err != nil {
		return fmt.Errorf("nats: consume: %w", err)
	}
	n.log.Info("consuming device messages", "stream", natsMQTTStream, "consumer", n.opts.Durable)
	return nil
}

// touchMQTT connects to the MQTT listener once as the control plane, so
// that NATS makes the MQTT layer's streams before a device publishes.
func (n *NATS) touchMQTT(ctx context.Context) {
	o := paho.NewClientOptions().AddBroker(n.opts.MQTTURL).SetClientID("hangar-controlplane").
		SetUsername(n.opts.User).SetPassword(n.opts.Password).SetProtocolVersion(4).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	t := c.Connect()
	select {
	case <-t.Done():
	case <-ctx.Done():
	}
	if t.Error() != nil {
		n.log.Warn("MQTT listener not reached at start", "url", n.opts.MQTTURL, "err", t.Error())
		return
	}
	c.Disconnect(100)
}

// deliver hands one stored device message to the handler.
func (n *NATS) deliver(h Handler, m jetstream.Msg) {
	subj := strings.TrimPrefix(m.Subject(), natsMQTTPrefix)
	rest, ok := strings.CutPrefix(subj, natsDevPrefix)
	i := strings.LastIndexByte(rest, '.')
	if !ok || i < 0 {
		_ = m.Term()
		return
	}
	id := strings.ReplaceAll(rest[:i], "//", ".")
	kind := proto.Kind(rest[i+1:])
	if proto.ValidateDeviceID(id) != nil || !DeviceMayPublish(id, proto.DeviceTopic(id, kind)) {
		if n.opts.Metrics != nil {
			n.opts.Metrics.DecodeErrors.WithLabelValues("topic").Inc()
		}
		_ = m.Term()
		return
	}
	// Received when NATS stored it (a backlog redelivered later is not
	// "seen now").
	received := time.Now()
	if md, err := m.Metadata(); err == nil && !md.Timestamp.IsZero() && md.Timestamp.Before(received) {
		received = md.Timestamp
	}
	h(n.ctx, Message{Device: id, Kind: kind, Payload: m.Data(), Received: received}, func(err error) {
		if err != nil {
			// Stored nowhere: JetStream offers it again (to any replica).
			_ = m.NakWithDelay(time.Second)
			return
		}
		_ = m.Ack()
	})
}

// natsTopic maps an MQTT topic to its NATS subject as the MQTT layer
// does: "/" is ".", and "." is "//".
func natsTopic(topic string) string {
	var b strings.Builder
	for i := 0; i < len(topic); i++ {
		switch c := topic[i]; c {
		case '/':
			b.WriteByte('.')
		case '.':
			b.WriteString("//")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// natsDevPrefix is what the subjects of device topics start with.
var natsDevPrefix = natsTopic(proto.TopicPrefix + "/dev/")

// natsSubject is the NATS subject of a device topic.
func natsSubject(device string, kind proto.Kind) string {
	return natsTopic(proto.DeviceTopic(device, kind))
}

// Publish sends a command on core NATS; the device's MQTT subscription
// gets it (the dispatcher resends until the device acknowledges).
func (n *NATS) Publish(ctx context.Context, device string, kind proto.Kind, payload []byte) error {
	if n.closed.Load() {
		return ErrClosed
	}
	if err := n.nc.Publish(natsSubject(device, kind), payload); err != nil {
		return fmt.Errorf("nats publish: %w", err)
	}
	return nil
}

// Provision is a no-op: the auth callout reads the store at each CONNECT.
func (n *NATS) Provision(ctx context.Context, device, password string) error { return nil }

// Revoke is a no-op beyond the store: the device is refused at its next
// CONNECT, at the latest when its authorization ends (UserTTL).
func (n *NATS) Revoke(ctx context.Context, device string) error { return nil }

// Connected is unknown here.
func (n *NATS) Connected() int { return -1 }

// Close stops consuming (messages in hand stay unacknowledged: JetStream
// offers them again) and disconnects.
func (n *NATS) Close() error {
	if n.closed.Swap(true) {
		return nil
	}
	if n.cc != nil {
		n.cc.Stop()
	}
	if n.authSub != nil {
		_ = n.authSub.Unsubscribe()
	}
	n.cancel()
	n.wg.Wait()
	n.nc.Close()
	return nil
}

// authorize answers one auth callout request: a device is let in as a
// user allowed only its own topics, if its credential is good.
func (n *NATS) authorize(m *nats.Msg) {
	select {
	case n.authQ <- m:
	default:
		n.answer(m, true) // refused at once: busy
	}
}

func (n *NATS) answer(m *nats.Msg, busy bool) {
	req, err := jwt.DecodeAuthorizationRequestClaims(string(m.Data))
	if err != nil {
		n.log.Warn("auth callout: not a request from a server", "err", err)
		return
	}
	var id, reason string
	switch src, dev := req.ClientInformation.Host, req.ConnectOptions.Username; {
	case busy:
		id, reason = dev, "busy"
	case n.opts.FailedAuthSource != nil && n.opts.FailedAuthSource.Spent(src):
		id, reason = dev, "throttled_source"
	case n.opts.FailedAuthDevice != nil && n.opts.FailedAuthDevice.Spent(dev):
		id, reason = dev, "throttled_device"
	default:
		if id, reason = n.check(req); reason != "" {
			// Counted, as on the embedded broker: a source that keeps
			// failing, or a device id tried too often, is refused
			// unchecked for a while.
			if l := n.opts.FailedAuthSource; l != nil {
				l.Allow(src)
			}
			if l := n.opts.FailedAuthDevice; l != nil && proto.ValidateDeviceID(dev) == nil {
				l.Allow(dev)
			}
		}
	}
	resp := jwt.NewAuthorizationResponseClaims(req.UserNkey)
	resp.Audience = req.Server.ID
	if reason != "" {
		n.log.Debug("auth callout: refused", "device", id, "reason", reason, "host", req.ClientInformation.Host)
		if n.opts.Metrics != nil {
			n.opts.Metrics.AuthFailures.WithLabelValues(reason).Inc()
		}
		resp.Error = "not authorized"
	} else {
		uc := jwt.NewUserClaims(req.UserNkey)
		uc.Name = id
		uc.Audience = "$G" // the server's global account, where the MQTT streams are
		uc.Expires = n.opts.Now().Add(n.opts.UserTTL).Unix()
		uc.AllowedConnectionTypes.Add(jwt.ConnectionTypeMqtt)
		for _, k := range proto.DeviceKinds {
			uc.Pub.Allow.Add(natsSubject(id, k))
		}
		uc.Sub.Allow.Add(natsSubject(id, proto.KindCmd))
		if resp.Jwt, err = uc.Encode(n.issuer); err != nil {
			n.log.Error("auth callout: sign user", "err", err)
			return
		}
	}
	tok, err := resp.Encode(n.issuer)
	if err != nil {
		n.log.Error("auth callout: sign response", "err", err)
		return
	}
	_ = m.Respond([]byte(tok))
}

// check decides a CONNECT: the reason it is refused, or "".
func (n *NATS) check(req *jwt.AuthorizationRequestClaims) (id, reason string) {
	ci, co := req.ClientInformation, req.ConnectOptions
	id = co.Username
	switch {
	case ci.Type != "" && ci.Type != jwt.ConnectionTypeMqtt && !strings.EqualFold(ci.Type, "mqtt"):
		return id, "not_mqtt"
	case proto.ValidateDeviceID(id) != nil || strings.Contains(id, "."):
		// NATS refuses MQTT client ids with a "." itself.
		return id, "bad_client_id"
	case ci.MQTT != id:
		return id, "username_mismatch"
	}
	ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
	defer cancel()
	a, err := n.opts.Credentials.DeviceAuth(ctx, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return id, "unknown_device"
	case errors.Is(err, store.ErrRevoked) || (err == nil && a.Revoked):
		return id, "revoked"
	case err != nil:
		n.log.Error("auth callout: credential lookup failed", "device", id, "err", err)
		return id, "store_error"
	case a.PasswordHash == nil || !a.Passwords:
		return id, "no_password"
	case !CheckPassword(a.PasswordHash, co.Password):
		return id, "bad_password"
	}
	if a.Auth != store.AuthPassword {
		// A change in how the device authenticates is recorded off the
		// callout's path (a reconnect storm must not queue on row locks).
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
			defer cancel()
			if err := n.opts.Credentials.NoteAuth(ctx, id, store.AuthPassword, ""); err != nil && n.ctx.Err() == nil {
				n.log.Warn("recording how a device authenticated", "device", id, "err", err)
			}
		}()
	}
	return id, ""
}
