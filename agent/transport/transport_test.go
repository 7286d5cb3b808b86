package transport_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/hangarfleet/hangar/agent/transport"
	"github.com/hangarfleet/hangar/agent/transport/mqtt"
	"github.com/hangarfleet/hangar/agent/transport/mqttlite"
)

// The conformance tests: both transports behave alike against a real
// broker (mochi, in process, with authentication and an ACL).

var impls = []struct {
	name string
	new  func() transport.Transport
}{
	{"paho", func() transport.Transport { return &mqtt.Transport{ConnectTimeout: 30 * time.Second} }},
	{"lite", func() transport.Transport { return &mqttlite.Transport{ConnectTimeout: 30 * time.Second} }},
}

func forEach(t *testing.T, f func(t *testing.T, tr transport.Transport)) {
	for _, im := range impls {
		t.Run(im.name, func(t *testing.T) { f(t, im.new()) })
	}
}

// authHook lets in user "dev" with password "pw" (and the observer "obs"),
// and refuses subscriptions under denied/.
type authHook struct{ mochi.HookBase }

func (h *authHook) ID() string { return "test-auth" }
func (h *authHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnectAuthenticate, mochi.OnACLCheck}, []byte{b})
}
func (h *authHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	u, p := string(pk.Connect.Username), string(pk.Connect.Password)
	return (u == "dev" && p == "pw") || u == "obs"
}
func (h *authHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	return !strings.HasPrefix(topic, "denied/")
}

// disconnectHook records the clients the broker is done with: mochi calls
// OnDisconnect after it published the client's will, if any.
type disconnectHook struct {
	mochi.HookBase
	mu   sync.Mutex
	gone map[string]bool
}

func (h *disconnectHook) ID() string           { return "test-disconnects" }
func (h *disconnectHook) Provides(b byte) bool { return b == mochi.OnDisconnect }
func (h *disconnectHook) OnDisconnect(cl *mochi.Client, _ error, _ bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.gone == nil {
		h.gone = map[string]bool{}
	}
	h.gone[cl.ID] = true
}

func (h *disconnectHook) done(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gone[id]
}

func startBroker(t *testing.T, hooks ...mochi.Hook) string {
	t.Helper()
	srv := mochi.New(&mochi.Options{Logger: slog.New(slog.DiscardHandler)})
	for _, h := range append([]mochi.Hook{new(authHook)}, hooks...) {
		if err := srv.AddHook(h, nil); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("t", ln)); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() {
		// mochi's Close read-locks its client list twice over while a
		// client it is detaching waits to write-lock it: a deadlock.
		// Let the clients go first (the tests close theirs before this).
		for deadline := time.Now().Add(5 * time.Second); srv.Clients.Len() > 0 && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		srv.Close()
	})
	return "tcp://" + ln.Addr().String()
}

func params(url, id string) transport.ConnectParams {
	return transport.ConnectParams{URL: url, ClientID: id, Username: "dev", Password: "pw", KeepAlive: 30 * time.Second}
}

func connect(t *testing.T, tr transport.Transport, p transport.ConnectParams) transport.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tr.Connect(ctx, p)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

type inbox struct {
	mu  sync.Mutex
	got []string
	ch  chan struct{}
}

func newInbox() *inbox { return &inbox{ch: make(chan struct{}, 1000)} }

func (b *inbox) on(topic string, payload []byte) {
	b.mu.Lock()
	b.got = append(b.got, topic+"="+string(payload))
	b.mu.Unlock()
	b.ch <- struct{}{}
}

func (b *inbox) wait(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		b.mu.Lock()
		got := append([]string(nil), b.got...)
		b.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-b.ch:
		case <-deadline:
			t.Fatalf("got %d messages, want %d: %q", len(got), n, got)
		}
	}
}

func TestPublishSubscribe(t *testing.T) {
	forEach(t, func(t *testing.T, tr transport.Transport) {
		url := startBroker(t)
		in := newInbox()
		p := params(url, "dev-1")
		p.OnMessage = in.on
		c := connect(t, tr, p)
		ctx := context.Background()
		if err := c.Subscribe(ctx, "dev/1/cmd"); err != nil {
			t.Fatal(err)
		}
		// Another client's publish arrives; the window of 50 QoS 1
		// publishes all complete.
		other := connect(t, tr, params(url, "dev-2"))
		var toks []transport.Token
		for i := range 50 {
			toks = append(toks, other.Publish("dev/1/cmd", []byte{'a' + byte(i%26)}))
		}
		for i, tok := range toks {
			if err := tok.Wait(ctx); err != nil {
				t.Fatalf("publish %d: %v", i, err)
			}
		}
		// Order is not part of the contract (paho hands messages to
		// goroutines); every message arrives once.
		got := in.wait(t, 50)
		var want []string
		for i := range 50 {
			want = append(want, "dev/1/cmd="+string(rune('a'+i%26)))
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("messages %q, want %q", got, want)
		}
		if err := c.Subscribe(ctx, "denied/x"); err == nil || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("subscribe to a denied topic: %v, want refused", err)
		}
	})
}

func TestWrongCredential(t *testing.T) {
	forEach(t, func(t *testing.T, tr transport.Transport) {
		url := startBroker(t)
		p := params(url, "dev-1")
		p.Password = "wrong"
		c, err := tr.Connect(context.Background(), p)
		if !errors.Is(err, transport.ErrNotAuthorized) {
			if c != nil {
				c.Close()
			}
			t.Fatalf("wrong password: %v, want ErrNotAuthorized", err)
		}
		if _, err := tr.Connect(context.Background(), params("tcp://127.0.0.1:1", "dev-1")); err == nil || errors.Is(err, transport.ErrNotAuthorized) {
			t.Fatalf("nothing listening: %v, want a dial error", err)
		}
	})
}

// proxy forwards TCP to the broker; cut drops every connection abruptly,
// freeze stops forwarding while keeping them open.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	frozen chan struct{}
	done   chan struct{} // closed at cleanup: frozen pipes give up
}

func newProxy(t *testing.T, brokerURL string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: strings.TrimPrefix(brokerURL, "tcp://"), frozen: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(func() { ln.Close(); close(p.done); p.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go p.pipe(up, c)
			go p.pipe(c, up)
		}
	}()
	return p
}

func (p *proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := src.Read(buf)
		if err != nil {
			dst.Close()
			return
		}
		select {
		case <-p.frozen:
			<-p.done // hold the bytes: a link that went silent
			return
		default:
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			src.Close()
			return
		}
	}
}

func (p *proxy) url() string { return "tcp://" + p.ln.Addr().String() }

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	p.conns = nil
}

func (p *proxy) freeze() { close(p.frozen) }

func waitDone(t *testing.T, c transport.Conn, within time.Duration, what string) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(within):
		t.Fatalf("%s: the connection was not reported lost within %s", what, within)
	}
}

func TestLastWillOnlyWhenLost(t *testing.T) {
	forEach(t, func(t *testing.T, tr transport.Transport) {
		disconnects := &disconnectHook{}
		url := startBroker(t, disconnects)
		in := newInbox()
		op := params(url, "observer")
		op.Username, op.OnMessage = "obs", in.on
		obs := connect(t, tr, op)
		if err := obs.Subscribe(context.Background(), "will/#"); err != nil {
			t.Fatal(err)
		}
		// A clean close: no will.
		p := params(url, "clean")
		p.WillTopic, p.WillPayload = "will/clean", []byte("gone")
		c, err := tr.Connect(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		select {
		case <-c.Done():
		default:
			t.Fatal("Done not closed after Close")
		}
		// A lost link: the will, and Done closes.
		px := newProxy(t, url)
		p = params(px.url(), "lost")
		p.WillTopic, p.WillPayload = "will/lost", []byte("gone")
		lost := connect(t, tr, p)
		px.cut()
		waitDone(t, lost, 10*time.Second, "cut link")
		in.wait(t, 1)
		// Once the broker is done with the clean client, a will of its
		// would be queued to the observer: a marker published after that
		// comes after it.
		deadline := time.Now().Add(10 * time.Second)
		for !disconnects.done("clean") || !disconnects.done("lost") {
			if time.Now().After(deadline) {
				t.Fatal("the broker did not see both clients go")
			}
			time.Sleep(time.Millisecond)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := obs.Publish("will/marker", []byte("end")).Wait(ctx); err != nil {
			t.Fatal(err)
		}
		var got []string
		for n := 1; !slices.Contains(got, "will/marker=end"); n = len(got) + 1 {
			got = in.wait(t, n)
		}
		if len(got) != 2 || got[0] != "will/lost=gone" {
			t.Fatalf("wills %q, want only will/lost (then the marker)", got)
		}
		// A publish on a lost connection fails rather than hanging.
		if err := lost.Publish("x/y", []byte("z")).Wait(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("publish after loss: %v, want a connection error", err)
		}
	})
}

func TestSilentLinkDetectedByKeepAlive(t *testing.T) {
	forEach(t, func(t *testing.T, tr transport.Transport) {
		url := startBroker(t)
		px := newProxy(t, url)
		p := params(px.url(), "silent")
		p.KeepAlive = time.Second
		c := connect(t, tr, p)
		tok := c.Publish("a/b", []byte("before"))
		if err := tok.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		px.freeze()
		pending := c.Publish("a/b", []byte("during"))
		// Nothing comes back: the keep-alive must notice (1.5 periods,
		// with slack for a loaded machine).
		waitDone(t, c, 15*time.Second, "silent link")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := pending.Wait(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a publish never acknowledged: %v, want a connection error", err)
		}
	})
}

func TestConnectHonoursContext(t *testing.T) {
	forEach(t, func(t *testing.T, tr transport.Transport) {
		// A listener that accepts and never answers.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		accepted := make(chan struct{}, 1)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				select {
				case accepted <- struct{}{}:
				default:
				}
				go io.Copy(io.Discard, c)
			}
		}()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		type result struct {
			c   transport.Conn
			err error
		}
		res := make(chan result, 1)
		go func() {
			c, err := tr.Connect(ctx, params("tcp://"+ln.Addr().String(), "x"))
			res <- result{c, err}
		}()
		// Cancel in the handshake (the listener took the connection and
		// will never answer), then Connect must return: well before its
		// own 30 s timeout would end it.
		select {
		case <-accepted:
		case r := <-res:
			if r.c != nil {
				r.c.Close()
			}
			t.Fatalf("Connect returned before the listener accepted: %v", r.err)
		case <-time.After(10 * time.Second):
			t.Fatal("the listener accepted nothing")
		}
		cancel()
		select {
		case r := <-res:
			if r.err == nil {
				r.c.Close()
				t.Fatal("connected to a mute listener")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Connect did not return 10 s after its context ended: it does not honour it")
		}
	})
}

// A broker URL may list a cluster's nodes: a connection gets through while
// one is down, whichever it tries first; with none up it fails.
func TestBrokerList(t *testing.T) {
	forEach(t, func(t *testing.T, tr transport.Transport) {
		url := startBroker(t)
		for range 4 { // the start is random: both orders come up
			c, err := tr.Connect(context.Background(), params("tcp://127.0.0.1:1,"+url, "dev-1"))
			if err != nil {
				t.Fatalf("a list with one node down: %v", err)
			}
			c.Close()
		}
		if _, err := tr.Connect(context.Background(), params("tcp://127.0.0.1:1, tcp://127.0.0.1:2", "dev-1")); err == nil {
			t.Fatal("connected with every node down")
		}
	})
}

func TestBrokerURLs(t *testing.T) {
	list := "tcp://a:1883, tcp://b:1883,tcp://c:1883,"
	for start, want := range [][]string{
		{"tcp://a:1883", "tcp://b:1883", "tcp://c:1883"},
		{"tcp://b:1883", "tcp://c:1883", "tcp://a:1883"},
		{"tcp://c:1883", "tcp://a:1883", "tcp://b:1883"},
	} {
		got := transport.BrokerURLs(list, func(n int) int {
			if n != 3 {
				t.Fatalf("picked among %d", n)
			}
			return start
		})
		if !slices.Equal(got, want) {
			t.Errorf("start %d: %v, want %v", start, got, want)
		}
	}
	if got := transport.BrokerURLs("tls://one:8883", nil); !slices.Equal(got, []string{"tls://one:8883"}) {
		t.Errorf("one broker: %v", got)
	}
}
