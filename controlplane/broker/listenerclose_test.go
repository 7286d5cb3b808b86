package broker

import (
	"context"
	"net"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
)

type oneDevice struct{}

func (oneDevice) DeviceAuth(_ context.Context, id string) (store.DeviceAuth, error) {
	if id != "d1" {
		return store.DeviceAuth{}, store.ErrNotFound
	}
	return store.DeviceAuth{PasswordHash: HashPassword("pw"), Passwords: true, Auth: store.AuthPassword}, nil
}

func (oneDevice) NoteAuth(context.Context, string, string, string) error { return nil }

// TestListenerCloseOwnSnapshot: closing the listener disconnects its
// clients itself and never calls mochi's close function, whose
// Clients.GetByListener takes the read lock twice and can deadlock against
// a connecting client (mochi-mqtt/server#488, open in v2.7.9).
func TestListenerCloseOwnSnapshot(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewEmbedded(EmbeddedOptions{Listener: ln, Credentials: oneDevice{}, Metrics: metrics.New(nil)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), func(_ context.Context, _ Message, done func(error)) { done(nil) }); err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	lost := make(chan error, 1)
	o := paho.NewClientOptions().AddBroker("tcp://" + ln.Addr().String()).SetClientID("d1").
		SetUsername("d1").SetPassword("pw").SetAutoReconnect(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	defer c.Disconnect(0)
	e.ln.Close(func(string) { t.Error("the listener used mochi's closeClients") })
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the client on the closed listener is still connected")
	}
}
