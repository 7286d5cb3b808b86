package agent

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/proto"
)

// fakeTransport connects to nothing: it records publishes and lets the test
// decide whether connections succeed.
type fakeTransport struct {
	mu        sync.Mutex
	connects  []ConnectParams
	refuse    error
	published map[string][][]byte
	conns     []*fakeConn
	onConnect func(p ConnectParams)
}

var _ Transport = (*fakeTransport)(nil)

func (f *fakeTransport) Connect(ctx context.Context, p ConnectParams) (Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.connects = append(f.connects, p)
	if f.onConnect != nil {
		f.onConnect(p)
	}
	if f.refuse != nil {
		return nil, f.refuse
	}
	c := &fakeConn{t: f, done: make(chan struct{}), params: p}
	f.conns = append(f.conns, c)
	return c, nil
}

func (f *fakeTransport) count(topic string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.published[topic])
}

type fakeConn struct {
	t      *fakeTransport
	params ConnectParams
	done   chan struct{}
	once   sync.Once
}

type doneToken struct{ err error }

func (d doneToken) Wait(context.Context) error { return d.err }

func (c *fakeConn) Publish(topic string, payload []byte) Token {
	c.t.mu.Lock()
	defer c.t.mu.Unlock()
	if c.t.published == nil {
		c.t.published = map[string][][]byte{}
	}
	c.t.published[topic] = append(c.t.published[topic], append([]byte(nil), payload...))
	return doneToken{}
}
func (c *fakeConn) Subscribe(context.Context, string) error { return nil }
func (c *fakeConn) Done() <-chan struct{}                   { return c.done }
func (c *fakeConn) Close()                                  { c.once.Do(func() { close(c.done) }) }

// staticSensors returns the same reading every time.
type staticSensors struct{ s proto.Sample }

func (s staticSensors) Read(time.Time) proto.Sample { return s.s }

func enrollServer(t *testing.T, status int, calls *atomic.Int32) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		var req map[string]any
		json.NewDecoder(r.Body).Decode(&req)
		if req["enroll_token"] != "tok" {
			w.WriteHeader(401)
			w.Write([]byte(`{"error":"invalid enrollment token"}`))
			return
		}
		if status != 200 {
			w.WriteHeader(status)
			w.Write([]byte(`{"error":"device is revoked"}`))
			return
		}
		json.NewEncoder(w).Encode(Credential{DeviceID: "d1", MQTTURL: "tcp://x:1", Username: "d1", Password: "pw"})
	}))
	t.Cleanup(srv.Close)
	return srv
}

func newTestAgent(t *testing.T, opts Options) *Agent {
	t.Helper()
	if opts.DeviceID == "" {
		opts.DeviceID = "d1"
	}
	if opts.StateDir == "" {
		opts.StateDir = t.TempDir()
	}
	if opts.Rand == nil {
		opts.Rand = rand.New(rand.NewPCG(1, 2))
	}
	a, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestBackoffFullJitter(t *testing.T) {
	a := newTestAgent(t, Options{BackoffMin: time.Second, BackoffMax: 30 * time.Second, Transport: &fakeTransport{}})
	for n := range 10 {
		window := min(time.Second<<n, 30*time.Second)
		var sum time.Duration
		seenLow, seenHigh := false, false
		const draws = 2000
		for range draws {
			d := a.backoff(n)
			if d < 0 || d > window {
				t.Fatalf("attempt %d: wait %v outside [0, %v]", n, d, window)
			}
			sum += d
			seenLow = seenLow || d < window/10
			seenHigh = seenHigh || d > window*9/10
		}
		// Full jitter: uniform over the whole window, mean near half of it.
		mean := sum / draws
		if mean < window*4/10 || mean > window*6/10 || !seenLow || !seenHigh {
			t.Errorf("attempt %d: mean %v of window %v, low %v high %v: not full jitter", n, mean, window, seenLow, seenHigh)
		}
	}
}

func TestBootEpochMonotonic(t *testing.T) {
	dir := t.TempDir()
	clk := clock.NewFake(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
	a := newTestAgent(t, Options{StateDir: dir, Clock: clk, Transport: &fakeTransport{}})
	first := a.Boot()
	if first != uint64(clk.Now().Unix()) {
		t.Fatalf("boot = %d", first)
	}
	a.box.Close()
	// After a power cut the clock reads 1970: the epoch still grows.
	clk.Set(time.Unix(5, 0))
	b := newTestAgent(t, Options{StateDir: dir, Clock: clk, Transport: &fakeTransport{}})
	if b.Boot() != first+1 {
		t.Fatalf("boot after clock reset = %d, want %d", b.Boot(), first+1)
	}
	if b.reboots != 1 {
		t.Fatalf("reboots = %d", b.reboots)
	}
	b.box.Close()
}

// TestEnrollConnectSend: the agent enrolls, keeps the credential, connects
// with a last will on its state topic, says hello and sends telemetry.
func TestEnrollConnectSend(t *testing.T) {
	var calls atomic.Int32
	srv := enrollServer(t, 200, &calls)
	tr := &fakeTransport{}
	bat := uint8(50)
	dir := t.TempDir()
	a := newTestAgent(t, Options{ServerURL: srv.URL, EnrollToken: "tok", StateDir: dir, Transport: tr,
		SampleInterval: time.Millisecond, BatchSize: 3, Sensors: staticSensors{proto.Sample{Battery: &bat}}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	telemetry := proto.DeviceTopic("d1", proto.KindTelemetry)
	// Without a link figure from the flight stack, a connected agent
	// reports its own link as up.
	linkUp := func() bool {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		for _, b := range tr.published[telemetry] {
			if m, err := proto.DecodeBatch(b); err == nil && m.Samples[len(m.Samples)-1].Link == 100 {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(10 * time.Second)
	for tr.count(telemetry) < 3 || !linkUp() {
		if time.Now().After(deadline) {
			t.Fatal("no telemetry sent with the link up")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	tr.mu.Lock()
	p := tr.connects[0]
	hello, _ := proto.DecodeState(tr.published[proto.DeviceTopic("d1", proto.KindState)][0])
	first, _ := proto.DecodeBatch(tr.published[telemetry][0])
	tr.mu.Unlock()
	if p.ClientID != "d1" || p.Username != "d1" || p.Password != "pw" || p.WillTopic != proto.DeviceTopic("d1", proto.KindState) {
		t.Fatalf("connect params %+v", p)
	}
	will, err := proto.DecodeState(p.WillPayload)
	if err != nil || will.Online || will.Conn != hello.Conn || !hello.Online || hello.Boot != a.Boot() {
		t.Fatalf("will %+v hello %+v (%v)", will, hello, err)
	}
	if len(first.Samples) != 3 || *first.Samples[0].Battery != 50 || first.Seq < 2 {
		t.Fatalf("first batch %+v", first)
	}

	if calls.Load() != 1 {
		t.Fatalf("enrolled %d times", calls.Load())
	}
	// A restart reuses the stored credential.
	b := newTestAgent(t, Options{ServerURL: srv.URL, EnrollToken: "tok", StateDir: dir, Transport: tr})
	if b.cred == nil || b.cred.Password != "pw" {
		t.Fatal("credential not kept across restarts")
	}
	b.box.Close()
}

// TestReenrollOnRefusedCredential: when the broker refuses the credential,
// the agent drops it and enrolls again.
func TestReenrollOnRefusedCredential(t *testing.T) {
	var calls atomic.Int32
	srv := enrollServer(t, 200, &calls)
	tr := &fakeTransport{refuse: ErrNotAuthorized}
	a := newTestAgent(t, Options{ServerURL: srv.URL, EnrollToken: "tok", Transport: tr, BackoffMin: time.Millisecond, BackoffMax: 2 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for calls.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("enrolled %d times", calls.Load())
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
}

// TestRevokedBacksOff: a revoked device waits the maximum backoff between
// attempts instead of hammering the control plane.
func TestRevokedBacksOff(t *testing.T) {
	var calls atomic.Int32
	srv := enrollServer(t, 403, &calls)
	a := newTestAgent(t, Options{ServerURL: srv.URL, EnrollToken: "tok", Transport: &fakeTransport{}, BackoffMin: time.Millisecond, BackoffMax: time.Hour})
	err := a.session(context.Background())
	if !errors.Is(err, ErrRevoked) {
		t.Fatalf("session: %v", err)
	}
	a.box.Close()
}

// TestPingAndMalformedCommand: a ping is answered with an ack event; a
// malformed command is counted as an error and answered with nothing.
func TestPingAndMalformedCommand(t *testing.T) {
	a := newTestAgent(t, Options{Transport: &fakeTransport{}})
	defer a.box.Close()
	ping, _ := proto.Marshal(&proto.Command{ID: "c-7", Kind: proto.CmdPing})
	a.onMessage(proto.DeviceTopic("d1", proto.KindCmd), ping)
	a.onMessage(proto.DeviceTopic("d1", proto.KindCmd), []byte{0xff, 0x00})
	a.onMessage(proto.DeviceTopic("other", proto.KindCmd), ping)
	if len(a.cmds) != 1 {
		t.Fatalf("%d commands queued, want 1", len(a.cmds))
	}
	if a.errors.Load() != 1 {
		t.Fatalf("errors = %d", a.errors.Load())
	}
	a.dispatch(context.Background(), <-a.cmds)
	recs, err := a.box.Peek(10)
	if err != nil || len(recs) != 1 {
		t.Fatalf("peek: %v %v", recs, err)
	}
	ev, err := proto.DecodeEvent(recs[0].Data)
	if err != nil || ev.Kind != proto.EventAck || ev.Cmd != "c-7" {
		t.Fatalf("ack event %+v %v", ev, err)
	}
}

// A start after a clean stop is not counted as a reboot; one after a
// crash (no clean stop recorded) is.
func TestRebootsCountUnplannedRestarts(t *testing.T) {
	dir := t.TempDir()
	a := newTestAgent(t, Options{StateDir: dir, Transport: &fakeTransport{}})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.Run(ctx); err != nil {
		t.Fatal(err)
	}
	b := newTestAgent(t, Options{StateDir: dir, Transport: &fakeTransport{}})
	if b.reboots != 0 {
		t.Fatalf("reboots after a clean stop = %d", b.reboots)
	}
	b.box.Close() // crash: no Run ending
	c := newTestAgent(t, Options{StateDir: dir, Transport: &fakeTransport{}})
	if c.reboots != 1 {
		t.Fatalf("reboots after a crash = %d", c.reboots)
	}
	c.box.Close()
}
