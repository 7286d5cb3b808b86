package broker_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/broker/mosquittotest"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/proto"
)

// wait bounds every wait on a condition; none of them should come near it.
const wait = 10 * time.Second

// negative bounds the few waits that prove something did not happen and
// have no event to wait for instead.
const negative = 300 * time.Millisecond

// testLogger writes to t.Log until the test ends (paho's goroutines may
// outlive it by a little).
func testLogger(t testing.TB) *slog.Logger {
	w := &tlogWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func newExternal(t testing.TB, m *mosquittotest.Mosquitto, edit ...func(*broker.ExternalOptions)) *broker.External {
	t.Helper()
	opts := broker.ExternalOptions{
		URL: m.URL(), Username: m.AdminUser, Password: m.AdminPassword,
		Logger: testLogger(t),
	}
	for _, f := range edit {
		f(&opts)
	}
	x, err := broker.NewExternal(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { x.Close() })
	return x
}

func startExternal(t testing.TB, m *mosquittotest.Mosquitto, h syncHandler, edit ...func(*broker.ExternalOptions)) *broker.External {
	t.Helper()
	x := newExternal(t, m, edit...)
	if err := x.Start(t.Context(), h.async); err != nil {
		t.Fatal(err)
	}
	return x
}

// syncHandler is a handler that returns when it is done; async runs it
// beside the broker's goroutine, as the ingester's writer does.
type syncHandler func(ctx context.Context, m broker.Message) error

func (h syncHandler) async(ctx context.Context, m broker.Message, done func(error)) {
	go func() { done(h(ctx, m)) }()
}

// recorder is a handler that keeps what it got.
type recorder struct {
	mu  sync.Mutex
	got []broker.Message
	ch  chan broker.Message
}

func newRecorder() *recorder { return &recorder{ch: make(chan broker.Message, 1000)} }

func (r *recorder) handle(_ context.Context, m broker.Message) error {
	r.mu.Lock()
	r.got = append(r.got, m)
	r.mu.Unlock()
	r.ch <- m
	return nil
}

func (r *recorder) messages() []broker.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// next returns the next message, or fails the test.
func (r *recorder) next(t testing.TB) broker.Message {
	t.Helper()
	select {
	case m := <-r.ch:
		return m
	case <-time.After(wait):
		t.Fatalf("no message within %v", wait)
		return broker.Message{}
	}
}

// waitPayload waits for a message with the given payload.
func (r *recorder) waitPayload(t testing.TB, payload string) broker.Message {
	t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case m := <-r.ch:
			if string(m.Payload) == payload {
				return m
			}
		case <-deadline:
			t.Fatalf("no message %q within %v; got %v", payload, wait, payloads(r.messages()))
		}
	}
}

func payloads(ms []broker.Message) []string {
	var s []string
	for _, m := range ms {
		s = append(s, string(m.Payload))
	}
	return s
}

type clientOpts struct {
	clientID, username, password string
	clean                        bool
	onLost                       func(error)
}

// dial connects a paho client once, without retries.
func dial(m *mosquittotest.Mosquitto, o clientOpts) (paho.Client, error) {
	po := paho.NewClientOptions().
		AddBroker(m.URL()).
		SetClientID(o.clientID).
		SetUsername(o.username).
		SetPassword(o.password).
		SetProtocolVersion(4).
		SetCleanSession(o.clean).
		SetOrderMatters(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(5 * time.Second)
	if o.onLost != nil {
		po.SetConnectionLostHandler(func(_ paho.Client, err error) { o.onLost(err) })
	}
	c := paho.NewClient(po)
	tok := c.Connect()
	if !tok.WaitTimeout(wait) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

// device connects as a provisioned device and fails the test if it cannot.
func device(t testing.TB, m *mosquittotest.Mosquitto, id, password string) paho.Client {
	t.Helper()
	c, err := dial(m, clientOpts{clientID: id, username: id, password: password, clean: true})
	if err != nil {
		t.Fatalf("device %s: connect: %v", id, err)
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

func mustWait(t testing.TB, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(wait) {
		t.Fatalf("paho token not done within %v", wait)
	}
	if err := tok.Error(); err != nil {
		t.Fatal(err)
	}
}

func publish(t testing.TB, c paho.Client, topic, payload string) {
	t.Helper()
	mustWait(t, c.Publish(topic, 1, false, payload))
}

// subscribe returns the SUBACK return code (0x80: refused).
func subscribe(t testing.TB, c paho.Client, filter string, h paho.MessageHandler) byte {
	t.Helper()
	// Not Subscribe: it keys its result by the filter without a $share
	// prefix, and a lookup of the full filter would read 0, "granted".
	tok := c.SubscribeMultiple(map[string]byte{filter: 1}, h)
	mustWait(t, tok)
	rc, ok := tok.(*paho.SubscribeToken).Result()[filter]
	if !ok {
		t.Fatalf("subscribe %q: no return code in %v", filter, tok.(*paho.SubscribeToken).Result())
	}
	return rc
}

func provision(t testing.TB, x *broker.External, id, password string) {
	t.Helper()
	if err := x.Provision(t.Context(), id, password); err != nil {
		t.Fatal(err)
	}
}

// inbox collects the messages a paho client receives, in order.
type inbox struct {
	mu  sync.Mutex
	got []string // topic + " " + payload
	ch  chan string
}

func newInbox() *inbox { return &inbox{ch: make(chan string, 1000)} }

func (b *inbox) handler(_ paho.Client, m paho.Message) {
	s := m.Topic() + " " + string(m.Payload())
	b.mu.Lock()
	b.got = append(b.got, s)
	b.mu.Unlock()
	b.ch <- s
}

// waitFor waits for want, and returns what came before it.
func (b *inbox) waitFor(t testing.TB, want string) []string {
	t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case s := <-b.ch:
			if s == want {
				b.mu.Lock()
				defer b.mu.Unlock()
				i := slices.Index(b.got, want)
				return slices.Clone(b.got[:i])
			}
		case <-deadline:
			b.mu.Lock()
			defer b.mu.Unlock()
			t.Fatalf("did not receive %q within %v; got %q", want, wait, b.got)
			return nil
		}
	}
}

// observer is a second client of the control plane's account that sees
// every device message in the order the broker sends them: when a marker
// published after a refused message arrives, the refused one would have
// arrived before it.
func observer(t testing.TB, m *mosquittotest.Mosquitto) *inbox {
	t.Helper()
	c, err := dial(m, clientOpts{clientID: "observer", username: m.AdminUser, password: m.AdminPassword, clean: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Disconnect(0) })
	b := newInbox()
	for _, k := range proto.DeviceKinds {
		if rc := subscribe(t, c, proto.AllDevices(k), b.handler); rc != 1 {
			t.Fatalf("observer: subscribe %s: return code %#x", proto.AllDevices(k), rc)
		}
	}
	return b
}

func TestExternalDeliversDeviceMessages(t *testing.T) {
	m := mosquittotest.Start(t)
	rec := newRecorder()
	x := startExternal(t, m, rec.handle)
	provision(t, x, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")

	want := map[proto.Kind]string{
		proto.KindState: "state-1", proto.KindTelemetry: "telemetry-1", proto.KindEvent: "event-1",
	}
	for k, p := range want {
		publish(t, d, proto.DeviceTopic("drone-1", k), p)
	}
	got := map[proto.Kind]string{}
	for range want {
		msg := rec.next(t)
		if msg.Device != "drone-1" {
			t.Errorf("device = %q", msg.Device)
		}
		if msg.Received.IsZero() {
			t.Error("Received not set")
		}
		got[msg.Kind] = string(msg.Payload)
	}
	for k, p := range want {
		if got[k] != p {
			t.Errorf("kind %s: payload %q, want %q", k, got[k], p)
		}
	}
}

// The broker's copy of a message must stay unacknowledged while the
// handler has not returned nil: a control plane that goes away in the
// middle gets it again in its next session. With paho's automatic
// acknowledgement, the second session would get nothing.
func TestExternalAcksOnlyAfterHandlerReturned(t *testing.T) {
	m := mosquittotest.Start(t)
	inHandler := make(chan broker.Message, 1)
	x1 := startExternal(t, m, func(ctx context.Context, msg broker.Message) error {
		inHandler <- msg
		<-ctx.Done() // a store that never commits
		return ctx.Err()
	})
	provision(t, x1, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), "p1")
	select {
	case msg := <-inHandler:
		if string(msg.Payload) != "p1" {
			t.Fatalf("payload %q", msg.Payload)
		}
	case <-time.After(wait):
		t.Fatal("handler not called")
	}
	x1.Close()

	rec := newRecorder()
	x2 := startExternal(t, m, rec.handle) // same client id, same session
	rec.waitPayload(t, "p1")
	x2.Close()

	// Now it was acknowledged: a third session must not get it again.
	rec3 := newRecorder()
	startExternal(t, m, rec3.handle)
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), "p2")
	rec3.waitPayload(t, "p2")
	time.Sleep(negative) // handlers run concurrently: let a resent p1 show up
	if got := payloads(rec3.messages()); slices.Contains(got, "p1") {
		t.Fatalf("p1 delivered again after it was handled: %q", got)
	}
}

// A handler error means the message was not stored: it is handed over
// again, and acknowledged only once a call succeeded.
func TestExternalRetriesFailedHandler(t *testing.T) {
	m := mosquittotest.Start(t)
	var calls atomic.Int32
	done := make(chan broker.Message, 10)
	x := startExternal(t, m, func(ctx context.Context, msg broker.Message) error {
		if calls.Add(1) == 1 {
			return errors.New("database is locked")
		}
		done <- msg
		return nil
	})
	provision(t, x, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindEvent), "e1")
	select {
	case msg := <-done:
		if string(msg.Payload) != "e1" || msg.Kind != proto.KindEvent {
			t.Fatalf("got %+v", msg)
		}
	case <-time.After(wait):
		t.Fatalf("not retried after a handler error (%d calls)", calls.Load())
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d handler calls, want 2", n)
	}
	x.Close()

	rec := newRecorder()
	startExternal(t, m, rec.handle)
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindEvent), "e2")
	rec.waitPayload(t, "e2")
	time.Sleep(negative)
	if got := payloads(rec.messages()); slices.Contains(got, "e1") {
		t.Fatalf("e1 delivered again after a successful retry: %q", got)
	}
}

// Handlers wait for a group commit: many must be in flight at once. With
// handlers run one at a time this test cannot finish.
func TestExternalHandlersRunConcurrently(t *testing.T) {
	const n = 16 // below Mosquitto's default max_inflight_messages (20)
	m := mosquittotest.Start(t)
	var inFlight atomic.Int32
	all := make(chan struct{})
	var once sync.Once
	x := startExternal(t, m, func(ctx context.Context, msg broker.Message) error {
		if inFlight.Add(1) == n {
			once.Do(func() { close(all) })
		}
		select {
		case <-all:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	provision(t, x, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")
	for i := range n {
		publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), fmt.Sprint(i))
	}
	select {
	case <-all:
	case <-time.After(wait):
		t.Fatalf("only %d of %d handlers in flight at once", inFlight.Load(), n)
	}
}

func TestExternalQueuedWhileAway(t *testing.T) {
	m := mosquittotest.Start(t)
	rec := newRecorder()
	x := startExternal(t, m, rec.handle)
	provision(t, x, "drone-1", "pw-1")
	x.Close()

	d := device(t, m, "drone-1", "pw-1")
	for i := range 5 {
		publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), fmt.Sprint("q", i))
	}
	startExternal(t, m, rec.handle)
	want := map[string]bool{"q0": true, "q1": true, "q2": true, "q3": true, "q4": true}
	for len(want) > 0 {
		delete(want, string(rec.next(t).Payload))
	}
}

func TestExternalPublishReachesDevice(t *testing.T) {
	m := mosquittotest.Start(t)
	x := startExternal(t, m, newRecorder().handle)
	provision(t, x, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")
	in := newInbox()
	cmd := proto.DeviceTopic("drone-1", proto.KindCmd)
	if rc := subscribe(t, d, cmd, in.handler); rc != 1 {
		t.Fatalf("subscribe to own cmd topic: return code %#x", rc)
	}
	if err := x.Publish(t.Context(), "drone-1", proto.KindCmd, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	in.waitFor(t, cmd+" ping")

	if err := x.Publish(t.Context(), "+", proto.KindCmd, nil); err == nil {
		t.Error("Publish to device \"+\" succeeded")
	}
	if err := x.Publish(t.Context(), "drone-1", "cmd/#", nil); err == nil {
		t.Error("Publish to kind \"cmd/#\" succeeded")
	}
}

// Replicas in one shared subscription group split the device messages.
func TestExternalShared(t *testing.T) {
	m := mosquittotest.Start(t)
	var mu sync.Mutex
	by := map[string][]string{}
	all := make(chan string, 100)
	handler := func(name string) syncHandler {
		return func(_ context.Context, msg broker.Message) error {
			mu.Lock()
			by[name] = append(by[name], string(msg.Payload))
			mu.Unlock()
			all <- string(msg.Payload)
			return nil
		}
	}
	replica := func(name string) *broker.External {
		return startExternal(t, m, handler(name), func(o *broker.ExternalOptions) {
			o.ClientID, o.Shared = "hangar:controlplane-"+name, "ingest"
		})
	}
	a := replica("a")
	b := replica("b")
	provision(t, a, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")

	// collect publishes n messages and checks that each was handled once.
	collect := func(prefix string, n int, after func()) {
		t.Helper()
		for i := range n {
			publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), fmt.Sprint(prefix, i))
		}
		if after != nil {
			after()
		}
		seen := map[string]bool{}
		for len(seen) < n {
			select {
			case p := <-all:
				if seen[p] {
					t.Fatalf("%s handled twice", p)
				}
				seen[p] = true
			case <-time.After(wait):
				t.Fatalf("%s: got %d of %d messages", prefix, len(seen), n)
			}
		}
	}
	collect("x", 20, nil)
	time.Sleep(negative) // a message delivered to both would show up now
	mu.Lock()
	if len(by["a"]) == 0 || len(by["b"]) == 0 || len(by["a"])+len(by["b"]) != 20 {
		t.Errorf("the group did not share the load: a=%q b=%q", by["a"], by["b"])
	}
	mu.Unlock()

	// Mosquitto 2.0 keeps dealing messages to the persistent session of a
	// replica that is down: they wait for it, and are not lost.
	b.Close()
	collect("y", 10, func() { b = replica("b") })
}

func TestExternalDeviceACL(t *testing.T) {
	m := mosquittotest.Start(t)
	x := startExternal(t, m, newRecorder().handle)
	provision(t, x, "drone-1", "pw-1")
	provision(t, x, "drone-2", "pw-2")

	t.Run("subscribe", func(t *testing.T) {
		d := device(t, m, "drone-1", "pw-1")
		for _, f := range []string{
			"#",
			"+/v1/dev/drone-1/cmd",
			"+/#",
			"hangar/#",
			"hangar/v1/dev/+/cmd",
			"hangar/v1/dev/drone-1/#",
			"hangar/v1/dev/drone-1/+",
			"hangar/v1/dev/drone-2/cmd",
			"hangar/v1/dev/drone-1/telemetry",
			"hangar/v1/dev/drone-1/state",
			"$CONTROL/dynamic-security/v1/response",
			"$CONTROL/#",
			"$SYS/#",
			"$share/g/hangar/v1/dev/drone-1/cmd",
			"$share/g/hangar/v1/dev/+/telemetry",
		} {
			if rc := subscribe(t, d, f, func(paho.Client, paho.Message) {}); rc != 0x80 {
				t.Errorf("subscribe %q: return code %#x, want 0x80 (refused)", f, rc)
			}
		}
		if rc := subscribe(t, d, proto.DeviceTopic("drone-1", proto.KindCmd), func(paho.Client, paho.Message) {}); rc != 1 {
			t.Errorf("subscribe to own cmd topic: return code %#x, want 1", rc)
		}
	})

	t.Run("publish to another device's topics", func(t *testing.T) {
		obs := observer(t, m)
		d := device(t, m, "drone-1", "pw-1")
		for _, k := range proto.DeviceKinds {
			publish(t, d, proto.DeviceTopic("drone-2", k), "forged")
		}
		marker := proto.DeviceTopic("drone-1", proto.KindTelemetry)
		publish(t, d, marker, "marker")
		if before := obs.waitFor(t, marker+" marker"); len(before) > 0 {
			t.Fatalf("forged messages delivered: %q", before)
		}
	})

	t.Run("publish commands", func(t *testing.T) {
		d1 := device(t, m, "drone-1", "pw-1")
		d2 := device(t, m, "drone-2", "pw-2")
		in1, in2 := newInbox(), newInbox()
		cmd1, cmd2 := proto.DeviceTopic("drone-1", proto.KindCmd), proto.DeviceTopic("drone-2", proto.KindCmd)
		subscribe(t, d1, cmd1, in1.handler)
		subscribe(t, d2, cmd2, in2.handler)
		publish(t, d1, cmd2, "forged") // to another device
		publish(t, d1, cmd1, "forged") // to itself
		for _, id := range []string{"drone-1", "drone-2"} {
			if err := x.Publish(t.Context(), id, proto.KindCmd, []byte("marker")); err != nil {
				t.Fatal(err)
			}
		}
		if before := in1.waitFor(t, cmd1+" marker"); len(before) > 0 {
			t.Errorf("drone-1 got forged commands: %q", before)
		}
		if before := in2.waitFor(t, cmd2+" marker"); len(before) > 0 {
			t.Errorf("drone-2 got forged commands: %q", before)
		}
	})

	t.Run("publish to $CONTROL", func(t *testing.T) {
		d := device(t, m, "drone-1", "pw-1")
		publish(t, d, "$CONTROL/dynamic-security/v1",
			`{"commands":[{"command":"createClient","username":"evil","password":"evil"},`+
				`{"command":"setClientPassword","username":"drone-2","password":"evil"}]}`)
		// The broker handled that publish before it acknowledged it.
		if c, err := dial(m, clientOpts{clientID: "evil", username: "evil", password: "evil", clean: true}); err == nil {
			c.Disconnect(0)
			t.Fatal("a device created an account through $CONTROL")
		}
		if c, err := dial(m, clientOpts{clientID: "drone-2", username: "drone-2", password: "evil", clean: true}); err == nil {
			c.Disconnect(0)
			t.Fatal("a device changed another device's password through $CONTROL")
		}
		device(t, m, "drone-2", "pw-2")
	})

	t.Run("connect", func(t *testing.T) {
		for _, tc := range []struct {
			name                         string
			clientID, username, password string
			clean                        bool
		}{
			{"other client id", "drone-2", "drone-1", "pw-1", true},
			{"client id not the username", "drone-1x", "drone-1", "pw-1", true},
			{"empty client id", "", "drone-1", "pw-1", true},
			{"empty client id, persistent", "", "drone-1", "pw-1", false},
			{"client id #", "#", "drone-1", "pw-1", true},
			{"client id +", "+", "drone-1", "pw-1", true},
			{"client id a/b", "a/b", "drone-1", "pw-1", true},
			{"client id 64 KiB", strings.Repeat("d", 64<<10), "drone-1", "pw-1", true},
			{"wrong password", "drone-1", "drone-1", "pw-2", true},
			{"empty password", "drone-1", "drone-1", "", true},
			{"other device's password", "drone-2", "drone-2", "pw-1", true},
			{"unknown device", "drone-9", "drone-9", "pw-1", true},
			{"no username", "drone-1", "", "pw-1", true},
			{"control plane's client id", broker.DefaultExternalClientID, "drone-1", "pw-1", false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				c, err := dial(m, clientOpts{clientID: tc.clientID, username: tc.username, password: tc.password, clean: tc.clean})
				if err == nil {
					c.Disconnect(0)
					t.Fatal("connected")
				}
				t.Logf("refused: %v", err)
			})
		}
		// And the right way works, so the refusals above mean something.
		device(t, m, "drone-1", "pw-1")
	})
}

func TestExternalReprovision(t *testing.T) {
	m := mosquittotest.Start(t)
	x := startExternal(t, m, newRecorder().handle)
	provision(t, x, "drone-1", "old")
	lost := make(chan error, 1)
	c, err := dial(m, clientOpts{clientID: "drone-1", username: "drone-1", password: "old", clean: true,
		onLost: func(err error) { lost <- err }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(0)

	provision(t, x, "drone-1", "new")
	select {
	case err := <-lost:
		t.Logf("session with the old password ended: %v", err)
	case <-time.After(wait):
		t.Fatal("session with the old password still connected")
	}
	if c, err := dial(m, clientOpts{clientID: "drone-1", username: "drone-1", password: "old", clean: true}); err == nil {
		c.Disconnect(0)
		t.Fatal("old password still accepted")
	}
	rec := newRecorder()
	x.Close()
	startExternal(t, m, rec.handle)
	d := device(t, m, "drone-1", "new")
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindState), "hello")
	rec.waitPayload(t, "hello") // and its rights are intact
}

func TestExternalRevoke(t *testing.T) {
	m := mosquittotest.Start(t)
	rec := newRecorder()
	x := startExternal(t, m, rec.handle)
	provision(t, x, "drone-1", "pw-1")
	lost := make(chan error, 1)
	c, err := dial(m, clientOpts{clientID: "drone-1", username: "drone-1", password: "pw-1", clean: false,
		onLost: func(err error) { lost <- err }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(0)

	if err := x.Revoke(t.Context(), "drone-1"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-lost:
		t.Logf("revoked session ended: %v", err)
	case <-time.After(wait):
		t.Fatal("revoked device still connected")
	}
	if c, err := dial(m, clientOpts{clientID: "drone-1", username: "drone-1", password: "pw-1", clean: false}); err == nil {
		c.Disconnect(0)
		t.Fatal("revoked device reconnected")
	}
	if err := x.Revoke(t.Context(), "drone-1"); err != nil {
		t.Fatalf("second Revoke: %v", err)
	}

	// An operator may add it again.
	provision(t, x, "drone-1", "pw-2")
	d := device(t, m, "drone-1", "pw-2")
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindState), "back")
	rec.waitPayload(t, "back")
}

// adminCommand sends a dynamic security command as the admin, the way an
// operator's mosquitto_ctrl would, and fails the test on an error answer.
func adminCommand(t testing.TB, m *mosquittotest.Mosquitto, command string) {
	t.Helper()
	c, err := dial(m, clientOpts{clientID: "operator", username: m.AdminUser, password: m.AdminPassword, clean: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(0)
	in := newInbox()
	subscribe(t, c, broker.DefaultDynsecTopic+"/response", in.handler)
	publish(t, c, broker.DefaultDynsecTopic, `{"commands":[`+command+`]}`)
	select {
	case r := <-in.ch:
		if strings.Contains(r, `"error"`) {
			t.Fatalf("dynamic security: %s", r)
		}
	case <-time.After(wait):
		t.Fatal("no dynamic security response")
	}
}

// Device ids share the broker's namespace of usernames: Provision and
// Revoke must leave alone the accounts they did not make, the control
// plane's own first.
func TestExternalForeignAccounts(t *testing.T) {
	m := mosquittotest.Start(t)
	x := startExternal(t, m, newRecorder().handle)
	adminCommand(t, m, `{"command":"createClient","username":"other-app","password":"secret"}`)
	for _, id := range []string{m.AdminUser, "other-app"} {
		if proto.ValidateDeviceID(id) != nil {
			t.Fatalf("test needs accounts named like devices, not %q", id)
		}
		if err := x.Provision(t.Context(), id, "taken"); !errors.Is(err, broker.ErrForeignAccount) {
			t.Errorf("Provision(%q) = %v, want ErrForeignAccount", id, err)
		}
		if err := x.Revoke(t.Context(), id); !errors.Is(err, broker.ErrForeignAccount) {
			t.Errorf("Revoke(%q) = %v, want ErrForeignAccount", id, err)
		}
	}
	if err := x.Provision(t.Context(), broker.DefaultExternalClientID, "taken"); err == nil {
		t.Errorf("Provision(%q) succeeded", broker.DefaultExternalClientID)
	}
	for _, acct := range [][2]string{{m.AdminUser, m.AdminPassword}, {"other-app", "secret"}} {
		c, err := dial(m, clientOpts{clientID: "check", username: acct[0], password: acct[1], clean: true})
		if err != nil {
			t.Fatalf("account %s damaged: %v", acct[0], err)
		}
		c.Disconnect(0)
	}
	for _, id := range []string{"", "a/b", "+", "#", strings.Repeat("x", 65)} {
		if err := x.Provision(t.Context(), id, "pw"); err == nil {
			t.Errorf("Provision(%q) succeeded", id)
		}
	}
}

func counter(t testing.TB, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// Only an account with more rights than a device can publish on a topic
// that matches the subscriptions but not the device layout; such messages
// are counted and dropped, and acknowledged so that they do not come back.
func TestExternalDropsForeignTopics(t *testing.T) {
	m := mosquittotest.Start(t)
	adminCommand(t, m, `{"command":"createRole","rolename":"rogue","acls":[`+
		`{"acltype":"publishClientSend","topic":"hangar/v1/dev/+/state","allow":true}]},`+
		`{"command":"createClient","username":"rogue","password":"secret","roles":[{"rolename":"rogue"}]}`)
	met := metrics.New(nil)
	rec := newRecorder()
	x := startExternal(t, m, rec.handle, func(o *broker.ExternalOptions) { o.Metrics = met })
	c, err := dial(m, clientOpts{clientID: "rogue", username: "rogue", password: "secret", clean: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(0)
	publish(t, c, "hangar/v1/dev/bad$id/state", "bad id")
	publish(t, c, "hangar/v1/dev/"+strings.Repeat("x", 65)+"/state", "long id")
	publish(t, c, proto.DeviceTopic("drone-9", proto.KindState), "marker")
	rec.waitPayload(t, "marker")
	drops := met.DecodeErrors.WithLabelValues("topic")
	deadline := time.Now().Add(wait)
	for counter(t, drops) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%v topic drops counted, want 2", counter(t, drops))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := payloads(rec.messages()); len(got) != 1 {
		t.Fatalf("handler got %q", got)
	}

	x.Close()
	rec2 := newRecorder()
	startExternal(t, m, rec2.handle)
	publish(t, c, proto.DeviceTopic("drone-9", proto.KindState), "marker-2")
	rec2.waitPayload(t, "marker-2")
	time.Sleep(negative)
	if got := counter(t, drops); got != 2 {
		t.Fatalf("dropped messages delivered again: %v drops", got)
	}
}

func TestExternalProvisionConcurrent(t *testing.T) {
	m := mosquittotest.Start(t)
	x := startExternal(t, m, newRecorder().handle)
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		id := fmt.Sprintf("drone-%d", i)
		for range 2 { // the same device enrolling twice at once
			wg.Go(func() { errs <- x.Provision(t.Context(), id, "pw-"+id) })
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for i := range n {
		id := fmt.Sprintf("drone-%d", i)
		device(t, m, id, "pw-"+id).Disconnect(0)
	}
}

func TestExternalSurvivesBrokerRestart(t *testing.T) {
	m := mosquittotest.Start(t)
	rec := newRecorder()
	x := startExternal(t, m, rec.handle)
	provision(t, x, "drone-1", "pw-1")
	d := device(t, m, "drone-1", "pw-1")
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), "before")
	rec.waitPayload(t, "before")
	d.Disconnect(0)

	m.Restart(t)

	d = device(t, m, "drone-1", "pw-1")
	publish(t, d, proto.DeviceTopic("drone-1", proto.KindTelemetry), "after")
	rec.waitPayload(t, "after")

	in := newInbox()
	cmd := proto.DeviceTopic("drone-1", proto.KindCmd)
	subscribe(t, d, cmd, in.handler)
	if err := x.Publish(t.Context(), "drone-1", proto.KindCmd, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	in.waitFor(t, cmd+" ping")
	provision(t, x, "drone-2", "pw-2") // and the $CONTROL API still answers
}

func TestExternalStartFailsWithBadCredentials(t *testing.T) {
	m := mosquittotest.Start(t)
	x := newExternal(t, m, func(o *broker.ExternalOptions) {
		o.Password = "wrong"
		o.StartTimeout = 2 * time.Second
	})
	err := x.Start(t.Context(), syncHandler(newRecorder().handle).async)
	if err == nil {
		t.Fatal("Start succeeded with a wrong password")
	}
	if !strings.Contains(err.Error(), "not Authorized") {
		t.Errorf("error does not say why: %v", err)
	}
	t.Log(err)
}

func TestExternalOptionsValidate(t *testing.T) {
	ok := broker.ExternalOptions{URL: "tcp://127.0.0.1:1883", Username: "u", ClientID: "c", DynsecTopic: broker.DefaultDynsecTopic}
	for _, tc := range []struct {
		name string
		edit func(*broker.ExternalOptions)
		ok   bool
	}{
		{"ok", func(*broker.ExternalOptions) {}, true},
		{"shared", func(o *broker.ExternalOptions) { o.Shared = "ingest" }, true},
		{"no url", func(o *broker.ExternalOptions) { o.URL = "" }, false},
		{"no scheme", func(o *broker.ExternalOptions) { o.URL = "127.0.0.1:1883" }, false},
		{"no user", func(o *broker.ExternalOptions) { o.Username = "" }, false},
		{"defaults", func(o *broker.ExternalOptions) { o.ClientID, o.DynsecTopic = "", "" }, true},
		{"shared with slash", func(o *broker.ExternalOptions) { o.Shared = "a/b" }, false},
		{"shared with wildcard", func(o *broker.ExternalOptions) { o.Shared = "+" }, false},
		{"dynsec topic wildcard", func(o *broker.ExternalOptions) { o.DynsecTopic = "$CONTROL/#" }, false},
		{"dynsec topic outside $CONTROL", func(o *broker.ExternalOptions) { o.DynsecTopic = "dynsec" }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := ok
			tc.edit(&o)
			if err := o.Validate(); (err == nil) != tc.ok {
				t.Errorf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
	if _, err := broker.NewExternal(broker.ExternalOptions{URL: "tcp://127.0.0.1:1"}); err == nil {
		t.Error("NewExternal without a username succeeded")
	}
}

// The broker's ACLs for a device must say what the embedded broker's hook
// says.
func TestDeviceACLsMatchEmbedded(t *testing.T) {
	const id = "drone-1"
	acls := broker.DeviceACLs(id)
	var topics []string
	for _, other := range []string{id, "drone-2"} {
		for _, k := range append(slices.Clone(proto.DeviceKinds), proto.KindCmd) {
			topics = append(topics, proto.DeviceTopic(other, k))
		}
	}
	topics = append(topics, "#", "hangar/v1/dev/+/cmd", proto.DeviceSubtree(id))
	has := func(typ, topic string) bool {
		return slices.ContainsFunc(acls, func(a broker.DynsecACL) bool { return a.Type == typ && a.Topic == topic && a.Allow })
	}
	for _, topic := range topics {
		if got, want := has(broker.ACLPublishClientSend, topic), broker.DeviceMayPublish(id, topic); got != want {
			t.Errorf("publish %s: dynsec %v, embedded %v", topic, got, want)
		}
		if got, want := has(broker.ACLSubscribeLiteral, topic), broker.DeviceMaySubscribe(id, topic); got != want {
			t.Errorf("subscribe %s: dynsec %v, embedded %v", topic, got, want)
		}
	}
	for _, a := range acls {
		if strings.ContainsAny(a.Topic, "+#%") || a.Type == broker.ACLSubscribePattern || !a.Allow {
			t.Errorf("device ACL %+v: want only literal allows", a)
		}
	}
}

// rawConnect sends a CONNECT with a will by hand and returns the open
// connection and the CONNACK return code; closing the connection without
// DISCONNECT makes the broker publish the will.
func rawConnect(t testing.TB, m *mosquittotest.Mosquitto, id, password, willTopic, will string) (net.Conn, byte) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", m.Addr(), wait)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion = "MQTT", 4
	cp.CleanSession = true
	cp.Keepalive = 30
	cp.ClientIdentifier = id
	cp.UsernameFlag, cp.Username = true, id
	cp.PasswordFlag, cp.Password = true, []byte(password)
	cp.WillFlag, cp.WillQos, cp.WillTopic, cp.WillMessage = true, 1, willTopic, []byte(will)
	conn.SetDeadline(time.Now().Add(wait))
	if err := cp.Write(conn); err != nil {
		t.Fatal(err)
	}
	p, err := packets.ReadPacket(conn)
	if err != nil {
		t.Fatalf("read CONNACK: %v", err)
	}
	ack, ok := p.(*packets.ConnackPacket)
	if !ok {
		t.Fatalf("got %T, want CONNACK", p)
	}
	conn.SetDeadline(time.Time{})
	return conn, ack.ReturnCode
}

// A device's last will goes through the same ACL as its publishes.
// Mosquitto 2.0.11 accepts any will topic at CONNECT and checks it when it
// sends the will, dropping it silently when denied. Takeovers make the
// order deterministic: a connection that takes over a client id sends the
// old connection's will before its own CONNACK.
func TestExternalDeviceWill(t *testing.T) {
	m := mosquittotest.Start(t)
	rec := newRecorder()
	x := startExternal(t, m, rec.handle)
	provision(t, x, "drone-1", "pw-1")
	provision(t, x, "drone-2", "pw-2")
	obs := observer(t, m)
	state1, state2 := proto.DeviceTopic("drone-1", proto.KindState), proto.DeviceTopic("drone-2", proto.KindState)

	for i, will := range []struct{ topic, payload string }{
		{state1, "will-0"},    // sent when the next connection takes over
		{state2, "forged"},    // denied at the next takeover
		{state1, "will-last"}, // sent when the connection drops
	} {
		c, rc := rawConnect(t, m, "drone-1", "pw-1", will.topic, will.payload)
		if rc != 0 {
			t.Fatalf("connection %d: CONNACK return code %d", i, rc)
		}
		if i == 2 {
			c.Close() // without DISCONNECT
		}
	}
	before := obs.waitFor(t, state1+" will-last")
	if want := []string{state1 + " will-0"}; !slices.Equal(before, want) {
		t.Fatalf("wills before the last one: %q, want %q", before, want)
	}
	msg := rec.waitPayload(t, "will-last")
	if msg.Device != "drone-1" || msg.Kind != proto.KindState {
		t.Fatalf("handler got %+v", msg)
	}
}
