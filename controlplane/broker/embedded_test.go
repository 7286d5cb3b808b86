package broker_test

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
)

// fakeCreds is a credential store with function-free fixed contents.
type fakeCreds map[string]string // id -> password; "" means revoked

func (f fakeCreds) DeviceAuth(_ context.Context, id string) (store.DeviceAuth, error) {
	p, ok := f[id]
	if !ok {
		return store.DeviceAuth{}, store.ErrNotFound
	}
	if p == "" {
		return store.DeviceAuth{}, store.ErrRevoked
	}
	return store.DeviceAuth{PasswordHash: broker.HashPassword(p), Passwords: true, Auth: store.AuthPassword}, nil
}

func (f fakeCreds) NoteAuth(context.Context, string, string, string) error { return nil }

var _ broker.Credentials = fakeCreds(nil)

type recvEmb struct {
	mu   sync.Mutex
	msgs []broker.Message
}

func (r *recvEmb) handler(ctx context.Context, m broker.Message) error {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
	return nil
}

func (r *recvEmb) topics() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, m := range r.msgs {
		out = append(out, m.Device+"/"+string(m.Kind)+":"+string(m.Payload))
	}
	return out
}

func startEmbedded(t *testing.T, creds fakeCreds, h syncHandler) *broker.Embedded {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), h.async); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func dialEmb(t *testing.T, addr, clientID, user, pass string) (paho.Client, error) {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).SetUsername(user).SetPassword(pass).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetCleanSession(true)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

func subscribeEmb(t *testing.T, c paho.Client, filter string, got chan<- string) byte {
	t.Helper()
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- m.Topic() + ":" + string(m.Payload()):
		default:
		}
	})
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("subscribe %q timed out", filter)
	}
	if tok.Error() != nil {
		return 0x80
	}
	return tok.(*paho.SubscribeToken).Result()[filter]
}

// TestEmbeddedConnectRefusals: only a device's own id, with its own
// password, may connect.
func TestEmbeddedConnectRefusals(t *testing.T) {
	creds := fakeCreds{"d1": "pw1", "d2": "pw2", "gone": ""}
	e := startEmbedded(t, creds, (&recvEmb{}).handler)
	addr := e.Addr().String()
	long := strings.Repeat("x", 64<<10)
	cases := []struct{ name, client, user, pass string }{
		{"wrong password", "d1", "d1", "nope"},
		{"client id of another device", "d2", "d1", "pw1"},
		{"username of another device", "d1", "d2", "pw2"},
		{"empty client id", "", "d1", "pw1"},
		{"client id #", "#", "#", "pw1"},
		{"client id +", "+", "+", "pw1"},
		{"client id with slash", "a/b", "a/b", "pw1"},
		{"64 KiB client id", long, long, "pw1"},
		{"unknown device", "d9", "d9", "pw1"},
		{"revoked device", "gone", "gone", "x"},
		{"no credentials", "d1", "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := dialEmb(t, addr, c.client, c.user, c.pass); err == nil {
				t.Fatal("connection accepted")
			}
		})
	}
	if _, err := dialEmb(t, addr, "d1", "d1", "pw1"); err != nil {
		t.Fatalf("good credential refused: %v", err)
	}
}

// TestEmbeddedACL: a device publishes and subscribes only in its own
// subtree; everything else is refused and never reaches anyone.
func TestEmbeddedACL(t *testing.T) {
	creds := fakeCreds{"d1": "pw1", "d2": "pw2"}
	var rec recvEmb
	e := startEmbedded(t, creds, rec.handler)
	addr := e.Addr().String()
	aclMatrix(t, &rec, func(t *testing.T, id string) (paho.Client, error) { return dialEmb(t, addr, id, id, creds[id]) })
}

// aclMatrix checks what devices d1 and d2, connected by dial, may publish
// and subscribe to.
func aclMatrix(t *testing.T, rec *recvEmb, dial func(t *testing.T, id string) (paho.Client, error)) {
	t.Helper()
	d1, err := dial(t, "d1")
	if err != nil {
		t.Fatal(err)
	}
	d2, err := dial(t, "d2")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 10)
	if code := subscribeEmb(t, d2, proto.DeviceTopic("d2", proto.KindCmd), got); code != 1 {
		t.Fatalf("own cmd topic: SUBACK %#x", code)
	}
	for _, filter := range []string{"#", "+/+/+/+/+", "hangar/v1/dev/+/cmd", "hangar/v1/dev/d1/cmd", "hangar/v1/dev/d2/+",
		"hangar/v1/dev/d2/telemetry", "hangar/v1/dev/d2/#", "hangar/v1/dev/d2/csr", "$SYS/#", "hangar/#"} {
		if code := subscribeEmb(t, d2, filter, got); code != 0x80 {
			t.Errorf("subscribe %q: SUBACK %#x, want refusal 0x80", filter, code)
		}
	}
	// d1 publishes in its own subtree: delivered. Into d2's subtree or
	// outside: refused (MQTT 3.1.1 has no negative PUBACK, so the broker
	// drops the connection) and never delivered.
	if tok := d1.Publish(proto.DeviceTopic("d1", proto.KindTelemetry), 1, false, "ok"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("own publish: %v", tok.Error())
	}
	for _, topic := range []string{
		proto.DeviceTopic("d2", proto.KindCmd), proto.DeviceTopic("d2", proto.KindTelemetry), proto.DeviceTopic("d2", proto.KindCSR),
		"hangar/v1/dev/d1/cmd", "hangar/v1/dev/d1/other", "elsewhere", "$SYS/x",
	} {
		c, err := dial(t, "d1")
		if err != nil {
			t.Fatal(err)
		}
		tok := c.Publish(topic, 1, false, "forged")
		// Refused: the broker closes the connection (or, for $-topics,
		// drops the publish without acknowledging it).
		if tok.WaitTimeout(2*time.Second) && tok.Error() == nil {
			t.Errorf("publish to %q acknowledged", topic)
		}
		if !strings.HasPrefix(topic, "$") {
			waitClosedEmb(t, c)
		}
	}
	select {
	case m := <-got:
		t.Fatalf("d2 received forged message %q", m)
	default:
	}
	want := []string{"d1/telemetry:ok"}
	if got := rec.topics(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("control plane received %v, want %v", got, want)
	}
}

func waitClosedEmb(t *testing.T, c paho.Client) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for c.IsConnectionOpen() {
		if time.Now().After(deadline) {
			t.Fatal("a refused publish did not close the connection")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEmbeddedAckAfterStore: a publish is acknowledged only once the
// handler has returned; a handler error leaves it unacknowledged.
func TestEmbeddedAckAfterStore(t *testing.T) {
	release := make(chan struct{})
	var calls sync.WaitGroup
	calls.Add(1)
	fail := true
	var mu sync.Mutex
	h := func(ctx context.Context, m broker.Message) error {
		mu.Lock()
		f := fail
		fail = false
		mu.Unlock()
		if f {
			return fmt.Errorf("disk full")
		}
		calls.Done()
		<-release
		return nil
	}
	e := startEmbedded(t, fakeCreds{"d1": "pw1"}, h)
	c, err := dialEmb(t, e.Addr().String(), "d1", "d1", "pw1")
	if err != nil {
		t.Fatal(err)
	}
	tok := c.Publish(proto.DeviceTopic("d1", proto.KindTelemetry), 1, false, "x")
	tok.WaitTimeout(5 * time.Second)
	if tok.Error() == nil {
		t.Fatal("publish acknowledged although the handler failed")
	}
	c, err = dialEmb(t, e.Addr().String(), "d1", "d1", "pw1")
	if err != nil {
		t.Fatal(err)
	}
	tok = c.Publish(proto.DeviceTopic("d1", proto.KindTelemetry), 1, false, "x")
	calls.Wait() // the handler holds the message
	if tok.WaitTimeout(200 * time.Millisecond) {
		t.Fatal("publish acknowledged before the handler returned")
	}
	close(release)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish not acknowledged after the handler returned: %v", tok.Error())
	}
}

// TestEmbeddedRevokeDisconnects: Revoke drops a connected device.
func TestEmbeddedRevokeDisconnects(t *testing.T) {
	e := startEmbedded(t, fakeCreds{"d1": "pw1"}, (&recvEmb{}).handler)
	c, err := dialEmb(t, e.Addr().String(), "d1", "d1", "pw1")
	if err != nil {
		t.Fatal(err)
	}
	if e.Connected() != 1 {
		t.Fatalf("connected = %d", e.Connected())
	}
	if err := e.Revoke(t.Context(), "d1"); err != nil {
		t.Fatal(err)
	}
	waitClosedEmb(t, c)
}

// TestEmbeddedConnectRateCap: with ConnectRate 40, a burst of 100 raw TCP
// connections is accepted at most 40 (and one at the window's edge) in any
// second, all are accepted in the end, and the metrics say so.
func TestEmbeddedConnectRateCap(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(nil)
	e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{}, ConnectRate: 40, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), syncHandler(nil).async); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	const n = 100
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	deadline := time.Now().Add(30 * time.Second)
	for testutil.ToFloat64(m.Accepted) < n && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if got := testutil.ToFloat64(m.Accepted); got != n {
		t.Fatalf("accepted %v connections, want %d", got, n)
	}
	if peak := testutil.ToFloat64(m.AcceptPeak); peak > 41 || peak < 20 {
		t.Fatalf("peak accept rate %v in one second, want about 40 and never above 41", peak)
	}
}

// TestEmbeddedPreconnectFlood: connections that never authenticate cost
// the broker little and end: 3,000 announcing a 256 MiB CONNECT are
// closed at once, 1,000 that send part of a header and 500 that send part
// of a small CONNECT are closed at the connect deadline; the heap stays
// bounded meanwhile, and a good device stays connected throughout.
func TestEmbeddedPreconnectFlood(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(nil)
	e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1"}, Metrics: m, ConnectTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), syncHandler(nil).async); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	good, err := dialEmb(t, ln.Addr().String(), "d1", "d1", "pw1")
	if err != nil {
		t.Fatal(err)
	}
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse
	}
	before := heap()
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	flood := func(n int, first []byte) {
		for range n {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
			if _, err := c.Write(first); err != nil {
				t.Fatal(err)
			}
		}
	}
	flood(3000, []byte{0x10, 0xff, 0xff, 0xff, 0x7f}) // CONNECT of 256 MiB, announced
	flood(1000, []byte{0x10, 0x80})                   // a header that never ends
	flood(500, []byte{0x10, 0x80, 0x7d, 0, 4, 'M'})   // 16,000 bytes announced, 3 sent
	refused := func(reason string) float64 { return testutil.ToFloat64(m.PreconnectRefused.WithLabelValues(reason)) }
	waitCond(t, 30*time.Second, "the oversized CONNECTs refused", func() bool { return refused("too_large") == 3000 })
	during := heap()
	t.Logf("heap: %.1f MB before, %.1f MB with 1,500 half-open connections waiting for their deadline (%d refused as too large)",
		float64(before)/1e6, float64(during)/1e6, int(refused("too_large")))
	if grew := int64(during) - int64(before); grew > 48<<20 {
		t.Errorf("the heap grew by %d MB for connections that never authenticated", grew>>20)
	}
	waitCond(t, 30*time.Second, "the stalled connections closed at the deadline", func() bool { return refused("timeout") == 1500 })
	for _, c := range conns[:10] {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a refused connection is still open")
		}
	}
	if !good.IsConnectionOpen() {
		t.Fatal("the good device was disconnected by the flood")
	}
}

func waitCond(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Failed authentications are limited per source address and per device
// id: past the limit, CONNECTs are refused unchecked (counted), and other
// devices are not affected by one id's failures.
func TestEmbeddedFailedAuthThrottled(t *testing.T) {
	for _, c := range []struct {
		name          string
		src, dev      *throttle.Limiter
		otherDeviceOK bool
		kind          string
	}{
		{"per device id", nil, throttle.New(0.001, 3, 100), true, "mqtt_device"},
		{"per source address", throttle.New(0.001, 3, 100), nil, false, "mqtt_source"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			m := metrics.New(nil)
			e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1", "d2": "pw2"}, Metrics: m,
				FailedAuthSource: c.src, FailedAuthDevice: c.dev})
			if err != nil {
				t.Fatal(err)
			}
			if err := e.Start(t.Context(), syncHandler(nil).async); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { e.Close() })
			addr := ln.Addr().String()
			for range 3 {
				if _, err := dialEmb(t, addr, "d1", "d1", "guess"); err == nil {
					t.Fatal("a wrong password was accepted")
				}
			}
			if _, err := dialEmb(t, addr, "d1", "d1", "pw1"); err == nil {
				t.Fatal("past the limit, a CONNECT was checked and accepted")
			}
			// (paho tries MQTT 3.1.1, then 3.1: a dial may be two CONNECTs.)
			if got := testutil.ToFloat64(m.AuthThrottled.WithLabelValues(c.kind)); got < 1 {
				t.Errorf("throttled %v, want at least 1", got)
			}
			_, err = dialEmb(t, addr, "d2", "d2", "pw2")
			if c.otherDeviceOK && err != nil {
				t.Errorf("another device is refused for d1's failures: %v", err)
			}
			if !c.otherDeviceOK && err == nil {
				t.Error("the throttled source connected another device")
			}
		})
	}
}

// TestEmbeddedMaxConnections: connections beyond the cap, authenticated
// or not, are closed at once; a slot frees when a connection ends.
func TestEmbeddedMaxConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(nil)
	e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1"}, Metrics: m, MaxClients: 3})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), syncHandler(nil).async); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	var held []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	over, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	over.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := over.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("the connection over the cap was not closed: %v", err)
	}
	if got := testutil.ToFloat64(m.PreconnectRefused.WithLabelValues("max_connections")); got != 1 {
		t.Fatalf("refused for the cap: %v", got)
	}
	held[0].Close()
	waitCond(t, 10*time.Second, "a slot freed", func() bool {
		c, err := dialEmb(t, ln.Addr().String(), "d1", "d1", "pw1")
		if err == nil {
			c.Disconnect(0)
		}
		return err == nil
	})
	// The held connections end before the broker does (mochi's Close
	// races with a connection still being established).
	for _, c := range held[1:] {
		c.Close()
	}
	waitCond(t, 10*time.Second, "the held connections ended", func() bool {
		return testutil.ToFloat64(m.PreconnectRefused.WithLabelValues("closed")) == 3
	})
}

// TestEmbeddedCloseWithClients: Close disconnects the clients still
// connected (and one that has not sent its CONNECT) and returns.
func TestEmbeddedCloseWithClients(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1", "d2": "pw2"}, Metrics: metrics.New(nil)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), syncHandler(nil).async); err != nil {
		t.Fatal(err)
	}
	c1, err := dialEmb(t, ln.Addr().String(), "d1", "d1", "pw1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dialEmb(t, ln.Addr().String(), "d2", "d2", "pw2"); err != nil {
		t.Fatal(err)
	}
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	done := make(chan error, 1)
	go func() { done <- e.Close() }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Close hangs with clients connected")
	}
	waitCond(t, 10*time.Second, "the client disconnected", func() bool { return !c1.IsConnectionOpen() })
}

// TestEmbeddedCloseWhileClientsChurn: Close returns while devices keep
// connecting and leaving. (The deadlock of mochi's own listener close,
// mochi-mqtt/server#488, needs a connect to land within nanoseconds, so
// this rarely meets it; TestListenerCloseOwnSnapshot pins the fix.)
func TestEmbeddedCloseWhileClientsChurn(t *testing.T) {
	creds := fakeCreds{}
	for i := range 4 {
		creds[fmt.Sprintf("d%d", i)] = "pw"
	}
	for round := range 5 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: creds, Metrics: metrics.New(nil)})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Start(t.Context(), syncHandler(nil).async); err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var connects atomic.Int64
		for i := range 4 {
			id := fmt.Sprintf("d%d", i)
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					o := paho.NewClientOptions().AddBroker("tcp://" + ln.Addr().String()).SetClientID(id).
						SetUsername(id).SetPassword("pw").SetAutoReconnect(false).SetConnectTimeout(2 * time.Second)
					c := paho.NewClient(o)
					if tok := c.Connect(); tok.WaitTimeout(3*time.Second) && tok.Error() == nil {
						connects.Add(1)
						c.Disconnect(0)
					}
				}
			})
		}
		waitCond(t, 10*time.Second, "clients churning", func() bool { return connects.Load() >= 20 })
		done := make(chan error, 1)
		go func() { done <- e.Close() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Fatalf("round %d: Close hangs while clients connect and leave", round)
		}
		close(stop)
		wg.Wait()
	}
}

// pipeListener hands the broker one end of a synchronous pipe per dial:
// a write to a peer that does not read blocks at once, with no kernel
// buffer in between.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *pipeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }

func (l *pipeListener) dial() net.Conn {
	srv, cl := net.Pipe()
	l.conns <- srv
	return cl
}

// TestEmbeddedCutsOffPublisherThatDoesNotRead: a device that publishes
// QoS1 and never reads its acknowledgements is disconnected once a
// PUBACK write has waited for it for the write timeout, instead of the
// broker buffering for it without end; another device is unaffected.
func TestEmbeddedCutsOffPublisherThatDoesNotRead(t *testing.T) {
	var rec recvEmb
	ln := newPipeListener()
	e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1", "d2": "pw2"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), syncHandler(rec.handler).async); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	connect := func(id, pw string) net.Conn {
		conn := ln.dial()
		// Closed before the broker, whose Close writes a DISCONNECT that
		// a synchronous pipe would hold until someone reads it.
		t.Cleanup(func() { conn.Close() })
		cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
		cp.ProtocolName, cp.ProtocolVersion, cp.ClientIdentifier = "MQTT", 4, id
		cp.UsernameFlag, cp.PasswordFlag, cp.Username, cp.Password = true, true, id, []byte(pw)
		cp.CleanSession, cp.Keepalive = true, 60
		if err := cp.Write(conn); err != nil {
			t.Fatal(err)
		}
		ack, err := packets.ReadPacket(conn)
		if err != nil || ack.(*packets.ConnackPacket).ReturnCode != 0 {
			t.Fatalf("connect: %v %v", ack, err)
		}
		return conn
	}
	publish := func(conn net.Conn, id string, n uint16) error {
		pub := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
		pub.Qos, pub.TopicName, pub.MessageID, pub.Payload = 1, proto.DeviceTopic(id, proto.KindEvent), n, []byte("x")
		return pub.Write(conn)
	}
	mute := connect("d1", "pw1")
	start := time.Now()

	var sent int
	for n := uint16(1); ; n++ {
		if err := publish(mute, "d1", n); err != nil {
			break // the broker closed the connection
		}
		sent++
		if time.Since(start) > 30*time.Second {
			t.Fatalf("a publisher that does not read is still connected after %d messages", sent)
		}
	}
	if sent > 1100 {
		t.Errorf("%d messages taken from a publisher that reads nothing", sent)
	}
	t.Logf("cut off after %v, %d messages", time.Since(start), sent)
	// The other device publishes and is acknowledged.
	good := connect("d2", "pw2")

	if err := publish(good, "d2", 1); err != nil {
		t.Fatal(err)
	}
	good.SetReadDeadline(time.Now().Add(10 * time.Second))
	ack, err := packets.ReadPacket(good)
	if _, ok := ack.(*packets.PubackPacket); err != nil || !ok {
		t.Fatalf("the other device's PUBACK: %v %v", ack, err)
	}
}
