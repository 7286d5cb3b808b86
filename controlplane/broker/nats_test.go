package broker_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/internal/natstest"
	"github.com/hangarfleet/hangar/proto"
)

// natsEnv is a three-node NATS cluster with the NATS bus on it.
type natsEnv struct {
	cluster *natstest.Cluster
	bus     *broker.NATS
	mu      sync.Mutex
	got     []broker.Message
	fail    atomic.Int32 // fail this many deliveries (not stored)
}

func startNATS(t *testing.T, creds broker.Credentials) *natsEnv {
	t.Helper()
	c, co := natstest.StartForHangar(t)
	env := &natsEnv{cluster: c}
	bus, err := broker.NewNATS(broker.NATSOptions{URL: c.URLs(), User: co.User, Password: co.Password, CalloutSeed: co.Seed,
		Credentials: creds, MQTTURL: fmt.Sprintf("tcp://127.0.0.1:%d", c.Nodes[0].MQTT), AckWait: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Close() })
	err = bus.Start(t.Context(), func(_ context.Context, m broker.Message, done func(error)) {
		if env.fail.Add(-1) >= 0 {
			done(errors.New("store down"))
			return
		}
		env.mu.Lock()
		env.got = append(env.got, m)
		env.mu.Unlock()
		done(nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	env.bus = bus
	return env
}

func (e *natsEnv) received(device string, kind proto.Kind, payload string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, m := range e.got {
		if m.Device == device && m.Kind == kind && string(m.Payload) == payload {
			n++
		}
	}
	return n
}

func (e *natsEnv) waitReceived(t *testing.T, device string, kind proto.Kind, payload string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for e.received(device, kind, payload) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s %s %q never reached the control plane", device, kind, payload)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// mqttDevice connects as a device to the given nodes' MQTT listeners (in
// that order, moving on when one is down).
func mqttDevice(t *testing.T, id, user, pass string, urls ...string) (paho.Client, error) {
	t.Helper()
	return mqttDial(t, id, user, pass, urls...)
}

// mqttDeviceUp connects a device that must get in, trying again as an
// agent does when the connection drops before the CONNACK (a loaded
// machine: the cluster's first sessions, a callout answered late).
func mqttDeviceUp(t *testing.T, id, user, pass string, urls ...string) paho.Client {
	t.Helper()
	var err error
	for attempt := 0; attempt < 10; attempt++ {
		var c paho.Client
		if c, err = mqttDial(t, id, user, pass, urls...); err == nil {
			return c
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("%s could not connect: %v", id, err)
	return nil
}

func mqttDial(t *testing.T, id, user, pass string, urls ...string) (paho.Client, error) {
	t.Helper()
	o := paho.NewClientOptions().SetClientID(id).SetUsername(user).SetPassword(pass).SetProtocolVersion(4).
		SetCleanSession(true).SetConnectTimeout(10 * time.Second).SetAutoReconnect(true).SetMaxReconnectInterval(500 * time.Millisecond).
		SetConnectRetry(false)
	for _, u := range urls {
		o.AddBroker(u)
	}
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(20 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

func mqttURL(c *natstest.Cluster, i int) string {
	return fmt.Sprintf("tcp://127.0.0.1:%d", c.Nodes[i].MQTT)
}

func natsPublish(t *testing.T, c paho.Client, topic, payload string) {
	t.Helper()
	tok := c.Publish(topic, 1, false, payload)
	if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// TestNATSACLMatrix: on a NATS cluster, devices authenticate through the
// control plane's auth callout and reach only their own topics; what one
// publishes reaches the control plane with its identity, whichever node it
// used; a command reaches the device; a wrong, unknown or revoked
// credential, a client id that is not the user, and a NATS (non-MQTT)
// connection with a device's credential are refused.
func TestNATSACLMatrix(t *testing.T) {
	creds := fakeCreds{"d1": "pw1", "d2": "pw2", "gone": ""}
	env := startNATS(t, creds)
	c := env.cluster

	// Refused connections.
	for _, tc := range []struct{ name, id, user, pass string }{
		{"wrong password", "d1", "d1", "nope"},
		{"unknown device", "ghost", "ghost", "pw"},
		{"revoked device", "gone", "gone", "pw"},
		{"client id is not the user", "d2", "d1", "pw1"},
		{"no credential", "d1", "", ""},
	} {
		if _, err := mqttDevice(t, tc.id, tc.user, tc.pass, mqttURL(c, 1)); err == nil {
			t.Errorf("%s: connected", tc.name)
		}
	}
	if nc, err := nats.Connect(c.URLs(), nats.UserInfo("d1", "pw1"), nats.Timeout(5*time.Second)); err == nil {
		nc.Close()
		t.Error("a NATS (not MQTT) connection with a device's credential was let in")
	}

	d1 := mqttDeviceUp(t, "d1", "d1", "pw1", mqttURL(c, 1))
	d2 := mqttDeviceUp(t, "d2", "d2", "pw2", mqttURL(c, 2))
	// Its own topics: stored as its own.
	for _, k := range []proto.Kind{proto.KindState, proto.KindTelemetry, proto.KindEvent} {
		natsPublish(t, d1, proto.DeviceTopic("d1", k), "own-"+string(k))
		env.waitReceived(t, "d1", k, "own-"+string(k))
	}
	// Another's topics: NATS drops the publish (and still acknowledges
	// it). The marker after it, on d1's own topic, arrives after where the
	// forged one would have.
	natsPublish(t, d1, proto.DeviceTopic("d2", proto.KindTelemetry), "forged")
	natsPublish(t, d1, proto.DeviceTopic("d1", proto.KindTelemetry), "marker")
	env.waitReceived(t, "d1", proto.KindTelemetry, "marker")
	if env.received("d2", proto.KindTelemetry, "forged") != 0 {
		t.Error("d1's publish on d2's topic reached the control plane as d2's")
	}
	// Subscriptions: its own command topic only.
	cmds := make(chan string, 4)
	tok := d1.Subscribe(proto.DeviceTopic("d1", proto.KindCmd), 1, func(_ paho.Client, m paho.Message) { cmds <- string(m.Payload()) })
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe own commands: %v", tok.Error())
	}
	spy := make(chan string, 4)
	tok = d1.Subscribe(proto.DeviceTopic("d2", proto.KindCmd), 1, func(_ paho.Client, m paho.Message) { spy <- string(m.Payload()) })
	tok.WaitTimeout(10 * time.Second)
	if st, ok := tok.(*paho.SubscribeToken); ok {
		for _, code := range st.Result() {
			if code != 0x80 {
				t.Errorf("subscription to d2's commands granted (code %#x)", code)
			}
		}
	}
	tok = d1.Subscribe(proto.TopicPrefix+"/#", 1, func(_ paho.Client, m paho.Message) {
		// (paho hands d1's own commands to every matching handler)
		if m.Topic() != proto.DeviceTopic("d1", proto.KindCmd) {
			spy <- m.Topic()
		}
	})
	tok.WaitTimeout(10 * time.Second)
	if st, ok := tok.(*paho.SubscribeToken); ok {
		for _, code := range st.Result() {
			if code != 0x80 {
				t.Errorf("wildcard subscription granted (code %#x)", code)
			}
		}
	}
	// A command to d1 arrives; one to d2 reaches d2, not d1.
	d2cmds := make(chan string, 4)
	if tok := d2.Subscribe(proto.DeviceTopic("d2", proto.KindCmd), 1, func(_ paho.Client, m paho.Message) { d2cmds <- string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	waitCmd := func(ch chan string, want string, send func()) {
		t.Helper()
		// The subscription propagates through the cluster: send again
		// until it arrives (the dispatcher resends the same way).
		deadline := time.Now().Add(20 * time.Second)
		for {
			send()
			select {
			case got := <-ch:
				if got != want {
					t.Fatalf("command %q, want %q", got, want)
				}
				return
			case <-time.After(200 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("command %q never arrived", want)
			}
		}
	}
	waitCmd(cmds, "to-d1", func() { env.bus.Publish(t.Context(), "d1", proto.KindCmd, []byte("to-d1")) })
	waitCmd(d2cmds, "to-d2", func() { env.bus.Publish(t.Context(), "d2", proto.KindCmd, []byte("to-d2")) })
	select {
	case s := <-spy:
		t.Errorf("d1 received %q meant for another", s)
	default:
	}
}

// TestNATSNodeDies: a message the control plane could not store is
// offered again; when the node a device is connected to dies, the device
// goes on through another, and every message it had acknowledged reaches
// the control plane.
func TestNATSNodeDies(t *testing.T) {
	env := startNATS(t, fakeCreds{"d1": "pw1"})
	c := env.cluster
	d1 := mqttDeviceUp(t, "d1", "d1", "pw1", mqttURL(c, 0), mqttURL(c, 1), mqttURL(c, 2))
	// Not stored the first two times: JetStream gives it again.
	env.fail.Store(2)
	natsPublish(t, d1, proto.DeviceTopic("d1", proto.KindTelemetry), "retried")
	env.waitReceived(t, "d1", proto.KindTelemetry, "retried")

	const total = 200
	var acked []string
	for i := range total {
		if i == total/2 {
			c.Nodes[0].Kill() // the node d1 is connected to
		}
		p := fmt.Sprintf("m%03d", i)
		tok := d1.Publish(proto.DeviceTopic("d1", proto.KindTelemetry), 1, false, p)
		if tok.WaitTimeout(30*time.Second) && tok.Error() == nil {
			acked = append(acked, p)
		}
	}
	if len(acked) < total/2 {
		t.Fatalf("only %d of %d publishes acknowledged", len(acked), total)
	}
	for _, p := range acked {
		env.waitReceived(t, "d1", proto.KindTelemetry, p)
	}
	if !d1.IsConnected() {
		t.Error("device not connected after the node died")
	}
	t.Logf("%d of %d acknowledged, all stored; node n1 killed half-way", len(acked), total)
}
