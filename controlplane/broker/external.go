package broker

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/proto"
)

// Defaults of ExternalOptions.
const (
	// DefaultExternalClientID is the control plane's MQTT client id. It
	// holds a ':' so that it can never be a device id (proto.ValidateDeviceID):
	// a device's client id is bound to its account, and a device enrolled
	// as "hangar-controlplane" would otherwise take over the control plane's
	// session.
	DefaultExternalClientID = "hangar:controlplane"
	// DefaultDynsecTopic is where Mosquitto's dynamic security plugin takes
	// commands; it answers on the same topic + "/response".
	DefaultDynsecTopic = "$CONTROL/dynamic-security/v1"
	// DefaultDynsecTimeout bounds a dynamic security request whose context
	// has no deadline. The plugin drops commands from an account without
	// the right to send them, so no answer must not mean waiting forever.
	DefaultDynsecTimeout = 10 * time.Second
	// DefaultPublishTimeout bounds a Publish whose context has no deadline.
	DefaultPublishTimeout = 30 * time.Second
	// DefaultStartTimeout bounds how long Start waits for the first
	// connection and subscription.
	DefaultStartTimeout = 30 * time.Second
	// DefaultMaxReconnectInterval caps paho's reconnect backoff.
	DefaultMaxReconnectInterval = 10 * time.Second
)

// Bounds of the retries of a failing handler (see External).
const (
	handlerRetryMin = 100 * time.Millisecond
	handlerRetryMax = 5 * time.Second
)

// ExternalOptions configure the connection to an external broker.
type ExternalOptions struct {
	// URL of the broker: tcp://host:port, ssl://host:port (TLSConfig), ...
	URL string
	// Username and Password are the control plane's own account. On
	// Mosquitto it must administer the dynamic security plugin and have the
	// ACLs of ControlPlaneACLs.
	Username, Password string
	// ClientID is the control plane's client id; DefaultExternalClientID
	// when empty. It must be stable across restarts, since the broker keeps
	// the session (subscriptions and unacknowledged messages) under it, and
	// distinct for each replica.
	ClientID string
	// Shared, when set, subscribes through the shared subscription group
	// $share/<Shared>/...: replicas with the same group (and distinct
	// ClientIDs) split the device messages between them. Mosquitto 2.0
	// goes on dealing messages to the session of a replica that is down,
	// where they wait for it to return: a replica removed for good must
	// have its session removed too (persistent_client_expiration, or one
	// clean-session connection with its client id).
	Shared string
	// DynsecTopic is the dynamic security plugin's command topic;
	// DefaultDynsecTopic when empty.
	DynsecTopic string
	// NoAccounts: the broker knows devices by their certificates
	// (require_certificate, use_identity_as_username) and grants topics by
	// pattern ACLs (hangar broker-config mosquitto): there are no device
	// accounts to make or delete. Provision then refuses (no passwords on
	// such a broker) and Revoke leaves the refusal to the broker's
	// certificate revocation list; the control plane ignores whatever a
	// revoked device still sends.
	NoAccounts bool
	// TLSConfig for ssl:// and wss:// URLs.
	TLSConfig *tls.Config
	// StartTimeout: DefaultStartTimeout when zero.
	StartTimeout time.Duration
	// MaxReconnectInterval: DefaultMaxReconnectInterval when zero.
	MaxReconnectInterval time.Duration
	Metrics              *metrics.Metrics
	Logger               *slog.Logger
}

// Validate checks the options; empty fields that have a default are fine.
func (o *ExternalOptions) Validate() error {
	if o.URL == "" {
		return errors.New("no broker URL")
	}
	u, err := url.Parse(o.URL)
	if err != nil {
		return fmt.Errorf("broker URL: %w", err)
	}
	if u.Scheme == "" || u.Host == "" {
		return fmt.Errorf("broker URL %q: want scheme://host:port", o.URL)
	}
	if o.Username == "" {
		return errors.New("no broker username: the control plane needs its own account")
	}
	if o.Shared != "" && strings.ContainsAny(o.Shared, "/+#\x00") {
		return fmt.Errorf("shared subscription group %q: must not contain '/', '+', '#' or NUL", o.Shared)
	}
	if o.DynsecTopic != "" && (!strings.HasPrefix(o.DynsecTopic, "$CONTROL/") || strings.ContainsAny(o.DynsecTopic, "+#")) {
		return fmt.Errorf("dynamic security topic %q: want a $CONTROL/... topic without wildcards", o.DynsecTopic)
	}
	return nil
}

func (o *ExternalOptions) setDefaults() {
	if o.ClientID == "" {
		o.ClientID = DefaultExternalClientID
	}
	if o.DynsecTopic == "" {
		o.DynsecTopic = DefaultDynsecTopic
	}
	if o.StartTimeout <= 0 {
		o.StartTimeout = DefaultStartTimeout
	}
	if o.MaxReconnectInterval <= 0 {
		o.MaxReconnectInterval = DefaultMaxReconnectInterval
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Metrics == nil {
		o.Metrics = metrics.New(nil)
	}
}

// External is the Bus over an external MQTT broker: Mosquitto 2.0 with its
// dynamic security plugin, reached with one paho client.
//
// Delivery. The control plane subscribes at QoS1 with a persistent session
// (clean session false, stable client id), so the broker queues device
// messages while it is away and sends them when it is back. Messages are
// acknowledged by hand, after the handler returned nil; handlers run
// concurrently (the broker's max_inflight_messages bounds how many).
//
// A handler error leaves the message unacknowledged and the handler is
// called again with it, with backoff, for as long as the connection that
// brought it lasts. Mosquitto (MQTT 3.1.1) resends an unacknowledged
// message only when the session reconnects, so doing nothing would leave it
// stuck in the in-flight window, and after max_inflight_messages such
// failures nothing would be delivered any more. Forcing a reconnect instead
// would also throw away the acknowledgements of every other handler in
// flight and redeliver all of them; the handler's errors are transient
// (the store is busy or down), so retrying in place is cheaper. When the
// connection drops, retries stop: paho drops acknowledgements made for an
// earlier connection, and the broker resends the message on the new one.
//
// Unlike the embedded broker, the broker acknowledges a device's publish
// when it has queued the message, not when the control plane has stored
// it: past that point the message is only as durable as the broker's
// persistence (persistence true, a short autosave_interval), and the queue
// is bounded by max_queued_messages.
//
// Accounts. Provision and Revoke drive the dynamic security plugin; see
// Provision for the layout of the accounts.
type External struct {
	opts       ExternalOptions
	log        *slog.Logger
	client     paho.Client
	respTopic  string
	filters    []string
	corrPrefix string

	ctx    context.Context // cancelled by Close; handlers run under it
	cancel context.CancelFunc

	// epoch changes before every connection attempt: a message or a
	// subscription from an earlier epoch belongs to a dead connection.
	epoch atomic.Uint64
	seq   atomic.Uint64 // correlation data of dynsec requests

	mu       sync.Mutex
	closed   bool
	handler  Handler
	started  chan struct{} // closed by Start
	up       chan struct{} // closed once the current connection has its subscriptions
	upErr    error         // why the subscriptions were refused
	lastErr  error         // last connection failure, for Start's error
	handlers sync.WaitGroup

	callsMu sync.Mutex
	calls   map[string]*dynsecCall

	locks keyedMutex
	// lastDropLog rate-limits the log of dropped messages (unix nanos).
	lastDropLog atomic.Int64
}

var _ Bus = (*External)(nil)

// NewExternal creates the client and starts connecting in the background,
// retrying until Close. Provision and Revoke wait for the connection,
// Publish is queued while there is none, and Start subscribes to the device
// topics.
func NewExternal(opts ExternalOptions) (*External, error) {
	opts.setDefaults()
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("external broker: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &External{
		opts:       opts,
		log:        opts.Logger.With("component", "broker", "broker", "external"),
		respTopic:  opts.DynsecTopic + "/response",
		corrPrefix: rand.Text()[:10],
		ctx:        ctx,
		cancel:     cancel,
		started:    make(chan struct{}),
		up:         make(chan struct{}),
		calls:      map[string]*dynsecCall{},
	}
	for _, k := range proto.DeviceKinds {
		f := proto.AllDevices(k)
		if opts.Shared != "" {
			f = "$share/" + opts.Shared + "/" + f
		}
		e.filters = append(e.filters, f)
	}

	co := paho.NewClientOptions().
		AddBroker(opts.URL).
		SetClientID(opts.ClientID).
		SetUsername(opts.Username).
		SetPassword(opts.Password).
		SetTLSConfig(opts.TLSConfig).
		SetProtocolVersion(4). // MQTT 3.1.1
		SetCleanSession(false).
		SetStore(nullStore{}).
		SetResumeSubs(false). // subscriptions are made again at every connection
		// The handler only queues (see Handler), so paho's router may call
		// it in order without a goroutine per message.
		SetOrderMatters(true).
		SetAutoAckDisabled(true).
		SetKeepAlive(30 * time.Second).
		SetPingTimeout(10 * time.Second).
		SetConnectTimeout(10 * time.Second).
		SetWriteTimeout(30 * time.Second).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(opts.MaxReconnectInterval).
		SetDefaultPublishHandler(e.onMessage).
		SetOnConnectHandler(e.onConnect).
		SetConnectionAttemptHandler(e.onConnectAttempt).
		SetConnectionNotificationHandler(e.onNotification)
	e.client = paho.NewClient(co)
	// The route exists before any connection: responses never reach the
	// device handler.
	e.client.AddRoute(e.respTopic, e.onDynsecResponse)
	e.client.Connect() // retries in the background until Close
	return e, nil
}

// ControlPlaneACLs are the ACLs the control plane's account needs on
// Mosquitto's dynamic security plugin (with DefaultDynsecTopic). To set
// them up, as the plugin's admin:
//
//	mosquitto_ctrl dynsec init dynamic-security.json hangar-admin
//	mosquitto_ctrl ... dynsec createRole hangar-controlplane
//	mosquitto_ctrl ... dynsec addRoleACL hangar-controlplane <acltype> <topic> allow   (for each ACL)
//	mosquitto_ctrl ... dynsec addClientRole hangar-admin hangar-controlplane
//
// The init command's admin role already holds the first three.
func ControlPlaneACLs() []DynsecACL {
	acls := []DynsecACL{
		{Type: ACLPublishClientSend, Topic: "$CONTROL/dynamic-security/#", Allow: true},
		{Type: ACLPublishClientReceive, Topic: "$CONTROL/dynamic-security/#", Allow: true},
		{Type: ACLSubscribePattern, Topic: "$CONTROL/dynamic-security/#", Allow: true},
		{Type: ACLPublishClientSend, Topic: proto.AllDevices(proto.KindCmd), Allow: true},
	}
	for _, k := range proto.DeviceKinds {
		f := proto.AllDevices(k)
		acls = append(acls,
			DynsecACL{Type: ACLSubscribePattern, Topic: f, Allow: true},
			// Mosquitto 2.0 checks the whole filter, $share prefix included.
			DynsecACL{Type: ACLSubscribePattern, Topic: "$share/+/" + f, Allow: true},
			DynsecACL{Type: ACLPublishClientReceive, Topic: f, Allow: true},
		)
	}
	return acls
}

// DeviceACLs are the ACLs of a device's role: publish its state, telemetry
// and events, receive its commands, nothing else. Device ids hold no
// wildcard, so every topic is literal.
func DeviceACLs(device string) []DynsecACL {
	cmd := proto.DeviceTopic(device, proto.KindCmd)
	var acls []DynsecACL
	for _, k := range proto.DeviceKinds {
		acls = append(acls, DynsecACL{Type: ACLPublishClientSend, Topic: proto.DeviceTopic(device, k), Allow: true})
	}
	return append(acls,
		DynsecACL{Type: ACLSubscribeLiteral, Topic: cmd, Allow: true},
		DynsecACL{Type: ACLUnsubscribeLiteral, Topic: cmd, Allow: true},
		DynsecACL{Type: ACLPublishClientReceive, Topic: cmd, Allow: true},
	)
}

// DeviceRole is the name of a device's role on the dynamic security plugin.
func DeviceRole(device string) string { return deviceRolePrefix + device }

const (
	deviceRolePrefix = "hangar-device-"
	// deviceTextName marks the broker accounts Provision created: it
	// updates or deletes no other.
	deviceTextName = "hangar device"
)

// Dynamic security ACL types (Mosquitto 2.0).
const (
	ACLPublishClientSend    = "publishClientSend"
	ACLPublishClientReceive = "publishClientReceive"
	ACLSubscribeLiteral     = "subscribeLiteral"
	ACLSubscribePattern     = "subscribePattern"
	ACLUnsubscribeLiteral   = "unsubscribeLiteral"
	ACLUnsubscribePattern   = "unsubscribePattern"
)

// DynsecACL is one ACL of a dynamic security role, as the plugin's JSON
// has it.
type DynsecACL struct {
	Type     string `json:"acltype"`
	Topic    string `json:"topic"`
	Priority int    `json:"priority"`
	Allow    bool   `json:"allow"`
}

// ErrForeignAccount is returned by Provision and Revoke when the broker
// account named after the device exists and was not made by Provision (for
// example the control plane's own account).
var ErrForeignAccount = errors.New("broker account exists and is not a hangar device")

// Start delivers device messages to h. It waits, at most StartTimeout, for
// the connection and the subscriptions, and fails if the broker refuses
// them.
func (e *External) Start(ctx context.Context, h Handler) error {
	if h == nil {
		return errors.New("external broker: nil handler")
	}
	e.mu.Lock()
	switch {
	case e.closed:
		e.mu.Unlock()
		return ErrClosed
	case e.handler != nil:
		e.mu.Unlock()
		return errors.New("external broker: already started")
	}
	e.handler = h
	close(e.started)
	e.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, e.opts.StartTimeout)
	defer cancel()
	for {
		// A connection made before Start has only the response
		// subscription; later ones subscribe to everything in onConnect.
		ep, err := e.waitUp(ctx)
		if err != nil {
			return fmt.Errorf("external broker: %w", err)
		}
		err = e.subscribe(ctx, e.filters)
		if err == nil {
			e.log.Info("subscribed to device topics", "url", e.opts.URL, "client_id", e.opts.ClientID, "filters", e.filters)
			return nil
		}
		if errors.Is(err, errSubscriptionRefused) {
			return fmt.Errorf("external broker: %w", err)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("external broker: subscribe: %w", err)
		}
		// The connection dropped under us: wait for the next one.
		e.waitEpochChange(ctx, ep)
	}
}

// Publish sends a QoS1 message to a device topic and waits for the broker's
// acknowledgement, or for ctx (DefaultPublishTimeout if it has no
// deadline). On error the message may or may not have reached the broker;
// it is not sent again (see nullStore): the caller retries.
func (e *External) Publish(ctx context.Context, device string, kind proto.Kind, payload []byte) error {
	if e.isClosed() {
		return ErrClosed
	}
	topic := proto.DeviceTopic(device, kind)
	if _, _, err := proto.ParseTopic(topic); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := e.publish(ctx, topic, payload); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// publish publishes at QoS1 on a live connection. paho would only store
// a message published while it is reconnecting, for a resend that
// nullStore disables, so wait for the connection first.
func (e *External) publish(ctx context.Context, topic string, payload []byte) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultPublishTimeout)
		defer cancel()
	}
	if _, err := e.waitUp(ctx); err != nil {
		return err
	}
	return wait(ctx, e.client.Publish(topic, 1, false, payload))
}

// nullStore is a paho.Store that keeps nothing, so paho never resends our
// publishes after a reconnect. A resent dynamic security command could undo
// a later one (a createClient replayed after the Revoke that followed it),
// and a resent command would reach a device after the caller gave up on it.
// It also keeps clear of a race in paho v1.5.1, whose resume() walks the
// store on a new connection while publishes already go out on it (a data
// race on the DUP flag, then "close of closed channel" in claimID).
//
// The price: the token of a publish in flight when the connection drops
// never completes (its message id stays taken), so every wait on a token
// is bounded by a context.
type nullStore struct{}

func (nullStore) Open()                             {}
func (nullStore) Put(string, packets.ControlPacket) {}
func (nullStore) Get(string) packets.ControlPacket  { return nil }
func (nullStore) All() []string                     { return nil }
func (nullStore) Del(string)                        {}
func (nullStore) Close()                            {}
func (nullStore) Reset()                            {}

// Provision creates or updates the broker account of a device through the
// dynamic security plugin: username and client id are the device id (so a
// device can only connect under its own id), and its own role,
// DeviceRole(device), grants DeviceACLs(device).
//
// One role per device, rather than one shared role: Mosquitto 2.0.11's
// plugin does not substitute %u or %c in ACL topics (it matches them
// literally), and it kicks every client of a role whose ACLs change, so a
// change to a shared role would disconnect the whole fleet at once.
//
// It is idempotent. A device that enrolls again gets its new password
// (modifyClient, which also disconnects a session using the old one), and a
// revoked device that is added again is re-created. Calls for one device are
// serialized in this process; calls for different devices run concurrently
// (the plugin handles one command at a time anyway).
func (e *External) Provision(ctx context.Context, device, password string) error {
	if e.isClosed() {
		return ErrClosed
	}
	if e.opts.NoAccounts {
		return errors.New("provision: this broker authenticates devices by certificate only")
	}
	if err := proto.ValidateDeviceID(device); err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	if password == "" {
		return errors.New("provision: empty password")
	}
	if device == e.opts.ClientID || device == e.opts.Username {
		// Never a device: with this client id it would take over the
		// control plane's session.
		return fmt.Errorf("provision %s: %w", device, ErrForeignAccount)
	}
	defer e.locks.lock(device)()
	role := DeviceRole(device)
	acls := DeviceACLs(device)
	roles := []map[string]any{{"rolename": role}}
	rs, err := e.dynsec(ctx,
		dynsecCommand{"command": "createRole", "rolename": role, "textname": deviceTextName, "acls": acls},
		dynsecCommand{"command": "createClient", "username": device, "password": password, "clientid": device,
			"textname": deviceTextName, "roles": roles},
	)
	if err != nil {
		return fmt.Errorf("provision %s: %w", device, err)
	}
	roleExisted := rs[0].Error == dynsecRoleExists
	if rs[0].Error != "" && !roleExisted {
		return fmt.Errorf("provision %s: %w", device, rs[0].err())
	}
	switch rs[1].Error {
	case "":
		if !roleExisted {
			return nil
		}
		// Left by an interrupted Provision or Revoke: make sure it grants
		// what it should. Nobody is connected with it yet.
		rs, err = e.dynsec(ctx, dynsecCommand{"command": "modifyRole", "rolename": role, "acls": acls})
		if err == nil {
			err = rs[0].err()
		}
		if err != nil {
			return fmt.Errorf("provision %s: %w", device, err)
		}
		return nil
	case dynsecClientExists:
	default:
		return fmt.Errorf("provision %s: %w", device, rs[1].err())
	}

	// The account exists: a device enrolling again.
	if err := e.checkOwned(ctx, device); err != nil {
		return fmt.Errorf("provision %s: %w", device, err)
	}
	rs, err = e.dynsec(ctx,
		dynsecCommand{"command": "modifyRole", "rolename": role, "acls": acls},
		dynsecCommand{"command": "modifyClient", "username": device, "password": password, "clientid": device,
			"textname": deviceTextName, "roles": roles},
		dynsecCommand{"command": "enableClient", "username": device},
	)
	if err == nil {
		err = errors.Join(rs[0].err(), rs[1].err(), rs[2].err())
	}
	if err != nil {
		return fmt.Errorf("provision %s: %w", device, err)
	}
	e.log.Info("device account updated", "device", device)
	return nil
}

// Revoke deletes the device's account and role. Mosquitto's plugin
// disconnects the sessions of a deleted client itself (2.0.11 kicks by
// username in deleteClient, as it does in disableClient and when a
// password or role changes), and the client id is bound to the account,
// so no other session can carry on under the device's identity. A missing
// account is not an error: Revoke can be retried.
func (e *External) Revoke(ctx context.Context, device string) error {
	if e.isClosed() {
		return ErrClosed
	}
	if e.opts.NoAccounts {
		e.log.Warn("revoked a device of a certificate-only broker: it is refused once the broker reloads its revocation list (hangar broker-config mosquitto --crl-only, then restart the broker)", "device", device)
		return nil
	}
	if err := proto.ValidateDeviceID(device); err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	defer e.locks.lock(device)()
	if err := e.checkOwned(ctx, device); err != nil && !errors.Is(err, errNoClient) {
		return fmt.Errorf("revoke %s: %w", device, err)
	}
	rs, err := e.dynsec(ctx,
		dynsecCommand{"command": "deleteClient", "username": device},
		dynsecCommand{"command": "deleteRole", "rolename": DeviceRole(device)},
	)
	if err != nil {
		return fmt.Errorf("revoke %s: %w", device, err)
	}
	if rs[0].Error != "" && rs[0].Error != dynsecClientNotFound {
		return fmt.Errorf("revoke %s: %w", device, rs[0].err())
	}
	if rs[1].Error != "" && rs[1].Error != dynsecRoleNotFound {
		return fmt.Errorf("revoke %s: %w", device, rs[1].err())
	}
	e.log.Info("device account deleted", "device", device)
	return nil
}

var errNoClient = errors.New("no such broker account")

// checkOwned makes sure the account named device is one Provision made.
func (e *External) checkOwned(ctx context.Context, device string) error {
	rs, err := e.dynsec(ctx, dynsecCommand{"command": "getClient", "username": device})
	if err != nil {
		return err
	}
	if rs[0].Error == dynsecClientNotFound {
		return errNoClient
	}
	if err := rs[0].err(); err != nil {
		return err
	}
	var data struct {
		Client struct {
			TextName string `json:"textname"`
			ClientID string `json:"clientid"`
		} `json:"client"`
	}
	if err := json.Unmarshal(rs[0].Data, &data); err != nil {
		return fmt.Errorf("dynamic security getClient: %w", err)
	}
	if data.Client.TextName != deviceTextName || data.Client.ClientID != device {
		return fmt.Errorf("%w: %q", ErrForeignAccount, device)
	}
	return nil
}

// Connected returns -1: Mosquitto does not tell a client who else is
// connected, short of $SYS totals (every client, updated every
// sys_interval) or a plugin.
func (e *External) Connected() int { return -1 }

// Close stops the handlers (their messages stay unacknowledged, the broker
// keeps them for the next session) and disconnects.
func (e *External) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	e.mu.Unlock()
	e.cancel()
	e.handlers.Wait()
	e.client.Disconnect(250)
	return nil
}

func (e *External) isClosed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closed
}

// onConnectAttempt runs synchronously before every dial, initial or not:
// everything from the previous connection is now stale.
func (e *External) onConnectAttempt(_ *url.URL, cfg *tls.Config) *tls.Config {
	e.mu.Lock()
	e.epoch.Add(1)
	select {
	case <-e.up:
		e.up = make(chan struct{})
	default:
	}
	e.upErr = nil
	e.mu.Unlock()
	return cfg
}

func (e *External) onNotification(_ paho.Client, n paho.ConnectionNotification) {
	var err error
	switch n := n.(type) {
	case paho.ConnectionNotificationBrokerFailed:
		err = n.Reason
	case paho.ConnectionNotificationFailed:
		err = n.Reason
	case paho.ConnectionNotificationLost:
		e.log.Warn("connection to broker lost; reconnecting", "url", e.opts.URL, "err", n.Reason)
		return
	default:
		return
	}
	if err == nil || e.isClosed() {
		return
	}
	e.mu.Lock()
	first := e.lastErr == nil || e.lastErr.Error() != err.Error()
	e.lastErr = err
	e.mu.Unlock()
	if first {
		e.log.Error("cannot connect to broker", "url", e.opts.URL, "user", e.opts.Username, "err", err)
	}
}

// onConnect runs (in its own goroutine) after every connection: the session
// may be new (broker restarted without persistence), so subscribe again.
func (e *External) onConnect(paho.Client) {
	ep := e.epoch.Load()
	e.mu.Lock()
	started := e.handler != nil
	e.lastErr = nil
	e.mu.Unlock()
	filters := []string{e.respTopic}
	if e.opts.NoAccounts {
		filters = nil
	}
	if started {
		filters = append(filters, e.filters...)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	err := e.subscribe(ctx, filters)
	cancel()
	if err != nil && !errors.Is(err, errSubscriptionRefused) {
		// The connection is gone or going; the next one tries again.
		e.log.Warn("subscribe after connect failed", "err", err)
		return
	}
	if err != nil {
		e.log.Error("broker refused the control plane's subscriptions; check its ACLs", "user", e.opts.Username, "err", err)
	} else {
		e.log.Info("connected to broker", "url", e.opts.URL, "client_id", e.opts.ClientID, "devices", started)
	}
	e.mu.Lock()
	if e.epoch.Load() == ep {
		e.upErr = err
		select {
		case <-e.up:
		default:
			close(e.up)
		}
	}
	e.mu.Unlock()
}

var errSubscriptionRefused = errors.New("subscription refused")

// subscribe subscribes at QoS1 and checks the broker's return codes (0x80
// is a refusal, which for MQTT 3.1.1 is all an ACL denial says).
func (e *External) subscribe(ctx context.Context, filters []string) error {
	if len(filters) == 0 {
		return nil // nothing yet (no device accounts, Start not called)
	}
	m := make(map[string]byte, len(filters))
	for _, f := range filters {
		m[f] = 1
	}
	t := e.client.SubscribeMultiple(m, nil)
	if err := wait(ctx, t); err != nil {
		return err
	}
	// SubscribeMultiple keys the result by the filters as sent ($share
	// prefix included; Subscribe would strip it).
	res := t.(*paho.SubscribeToken).Result()
	var refused []string
	for _, f := range filters {
		if code, ok := res[f]; !ok || code == 0x80 {
			refused = append(refused, f)
		}
	}
	if len(refused) > 0 {
		e.opts.Metrics.ACLDenials.WithLabelValues("subscribe").Add(float64(len(refused)))
		return fmt.Errorf("%w: %s", errSubscriptionRefused, strings.Join(refused, ", "))
	}
	return nil
}

// waitUp waits for a connection with its subscriptions and returns its
// epoch.
func (e *External) waitUp(ctx context.Context) (uint64, error) {
	for {
		e.mu.Lock()
		up, closed := e.up, e.closed
		e.mu.Unlock()
		if closed {
			return 0, ErrClosed
		}
		select {
		case <-up:
			e.mu.Lock()
			err, cur := e.upErr, e.up
			e.mu.Unlock()
			if cur != up {
				continue // reconnected meanwhile
			}
			return e.epoch.Load(), err
		case <-e.ctx.Done():
			return 0, ErrClosed
		case <-ctx.Done():
			e.mu.Lock()
			last := e.lastErr
			e.mu.Unlock()
			if last != nil {
				return 0, fmt.Errorf("not connected to %s: %w (last error: %v)", e.opts.URL, ctx.Err(), last)
			}
			return 0, fmt.Errorf("not connected to %s: %w", e.opts.URL, ctx.Err())
		}
	}
}

// waitEpochChange waits until a new connection attempt started.
func (e *External) waitEpochChange(ctx context.Context, ep uint64) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for e.epoch.Load() == ep {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// onMessage handles a message on the device subscriptions. paho runs it in
// its own goroutine (order does not matter) and sends the acknowledgement
// only when we call Ack.
func (e *External) onMessage(_ paho.Client, m paho.Message) {
	ep := e.epoch.Load()
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return
	}
	e.handlers.Add(1)
	e.mu.Unlock()
	defer e.handlers.Done()

	id, kind, err := proto.ParseTopic(m.Topic())
	if err == nil && kind == proto.KindCmd {
		err = errors.New("command topic")
	}
	if err != nil {
		// Only an account with more rights than a device can publish
		// there. Acknowledge, or the broker would send it forever.
		e.opts.Metrics.DecodeErrors.WithLabelValues("topic").Inc()
		e.logDrop(m.Topic(), err)
		m.Ack()
		return
	}
	// The session may deliver queued messages before Start.
	select {
	case <-e.started:
	case <-e.ctx.Done():
		return
	}
	e.mu.Lock()
	h := e.handler
	e.mu.Unlock()

	msg := Message{Device: id, Kind: kind, Payload: m.Payload(), Received: time.Now()}
	e.deliver(h, msg, m, ep, 1, handlerRetryMin)
}

// deliver hands msg to the handler and acknowledges it once stored. A
// failure is retried with backoff while the connection that brought the
// message lasts (see External).
func (e *External) deliver(h Handler, msg Message, m paho.Message, ep uint64, attempt int, backoff time.Duration) {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return
	}
	e.handlers.Add(1)
	e.mu.Unlock()
	h(e.ctx, msg, func(err error) {
		defer e.handlers.Done()
		if err == nil {
			m.Ack()
			return
		}
		if e.ctx.Err() != nil {
			return // closing; the broker keeps it for the next session
		}
		if e.epoch.Load() != ep {
			e.log.Debug("handler failed after reconnect; the broker resends the message", "device", msg.Device, "kind", msg.Kind, "err", err)
			return
		}
		if attempt == 1 {
			e.log.Warn("message not stored; retrying", "device", msg.Device, "kind", msg.Kind, "err", err)
		} else {
			e.log.Debug("message not stored; retrying", "device", msg.Device, "kind", msg.Kind, "attempt", attempt, "err", err)
		}
		time.AfterFunc(backoff, func() {
			e.deliver(h, msg, m, ep, attempt+1, min(2*backoff, handlerRetryMax))
		})
	})
}

func (e *External) logDrop(topic string, err error) {
	now := time.Now().UnixNano()
	last := e.lastDropLog.Load()
	if now-last < int64(time.Second) || !e.lastDropLog.CompareAndSwap(last, now) {
		return
	}
	e.log.Warn("dropped message on a topic outside the device layout", "topic", truncate(topic), "err", err)
}

// wait waits for a paho token or ctx.
func wait(ctx context.Context, t paho.Token) error {
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Dynamic security plugin protocol: a JSON object {"commands": [...]} on
// DynsecTopic; the answer, {"responses": [...]} with one response per
// command carrying its correlationData, is published to every subscriber
// of the response topic (other replicas and admins too), so the
// correlation data must be unique across processes.

type dynsecCommand map[string]any

type dynsecResponse struct {
	Command         string          `json:"command"`
	Error           string          `json:"error,omitempty"`
	CorrelationData string          `json:"correlationData,omitempty"`
	Data            json.RawMessage `json:"data,omitempty"`
}

// Errors of the plugin that Provision and Revoke expect.
const (
	dynsecClientExists   = "Client already exists"
	dynsecRoleExists     = "Role already exists"
	dynsecClientNotFound = "Client not found"
	dynsecRoleNotFound   = "Role not found"
)

// DynsecError is an error answered by the dynamic security plugin.
type DynsecError struct {
	Command, Message string
}

func (e *DynsecError) Error() string {
	return fmt.Sprintf("dynamic security %s: %s", e.Command, e.Message)
}

func (r dynsecResponse) err() error {
	if r.Error == "" {
		return nil
	}
	return &DynsecError{Command: r.Command, Message: r.Error}
}

type dynsecCall struct {
	want int
	got  []dynsecResponse
	done chan struct{}
}

// dynsec sends commands in one request and returns their responses in the
// same order.
func (e *External) dynsec(ctx context.Context, cmds ...dynsecCommand) ([]dynsecResponse, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultDynsecTimeout)
		defer cancel()
	}
	corr := fmt.Sprintf("hangar-%s-%d", e.corrPrefix, e.seq.Add(1))
	names := make([]string, len(cmds))
	for i, c := range cmds {
		c["correlationData"] = corr
		names[i], _ = c["command"].(string)
	}
	b, err := json.Marshal(map[string]any{"commands": cmds})
	if err != nil {
		return nil, err
	}
	call := &dynsecCall{want: len(cmds), done: make(chan struct{})}
	e.callsMu.Lock()
	e.calls[corr] = call
	e.callsMu.Unlock()
	defer func() {
		e.callsMu.Lock()
		delete(e.calls, corr)
		e.callsMu.Unlock()
	}()
	if err := e.publish(ctx, e.opts.DynsecTopic, b); err != nil {
		return nil, fmt.Errorf("dynamic security %s: %w", strings.Join(names, "+"), err)
	}
	select {
	case <-call.done:
	case <-ctx.Done():
		return nil, fmt.Errorf("dynamic security %s: no response (does %q administer the plugin?): %w",
			strings.Join(names, "+"), e.opts.Username, ctx.Err())
	case <-e.ctx.Done():
		return nil, ErrClosed
	}
	e.callsMu.Lock()
	rs := call.got
	e.callsMu.Unlock()
	for i, r := range rs {
		if r.Command != names[i] {
			return nil, fmt.Errorf("dynamic security: response %d is for %q, not %q", i, r.Command, names[i])
		}
	}
	return rs, nil
}

func (e *External) onDynsecResponse(_ paho.Client, m paho.Message) {
	m.Ack()
	var body struct {
		Responses []dynsecResponse `json:"responses"`
	}
	if err := json.Unmarshal(m.Payload(), &body); err != nil {
		e.log.Warn("malformed dynamic security response", "err", err)
		return
	}
	e.callsMu.Lock()
	defer e.callsMu.Unlock()
	for _, r := range body.Responses {
		c := e.calls[r.CorrelationData]
		if c == nil || len(c.got) == c.want {
			continue // another process's, or a late one
		}
		c.got = append(c.got, r)
		if len(c.got) == c.want {
			close(c.done)
		}
	}
}

// keyedMutex serializes work per key.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
