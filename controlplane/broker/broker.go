// Package broker connects the control plane to devices over MQTT: an
// embedded mochi-mqtt broker that authenticates devices against the store
// and enforces per-device topic ACLs, or an external broker (Mosquitto with
// its dynamic security plugin) reached through paho.
//
// Both give the same guarantee to ingest: a device's QoS1 publish is
// acknowledged only after the Handler returned nil, that is after the
// message is durably stored. A Handler error leaves the message
// unacknowledged, so the device sends it again.
package broker

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Message is a publish from a device on one of its own topics.
type Message struct {
	Device   string
	Kind     proto.Kind
	Payload  []byte
	Received time.Time
	// Serial is the certificate the device's connection authenticated
	// with ("" for a password, or a broker that does not say).
	Serial string
}

// Handler takes a device message and calls done exactly once: with nil
// when the message is durably handled, or with an error when it could not
// be (it is then not acknowledged, and the device sends it again). done may
// run before Handler returns or later from another goroutine. A Handler is
// called in the order messages arrive from one device, and should only
// queue the message: devices keep several messages in flight, and waiting
// for storage here would make each device wait for one commit per message.
type Handler func(ctx context.Context, m Message, done func(error))

// CallSync calls h and waits for its done.
func CallSync(ctx context.Context, h Handler, m Message) error {
	ch := make(chan error, 1)
	h(ctx, m, func(err error) { ch <- err })
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Bus is what the control plane needs from MQTT, whichever broker runs it.
type Bus interface {
	// Start begins delivering device messages to h.
	Start(ctx context.Context, h Handler) error
	// Publish sends a QoS1 message to a device topic (commands).
	Publish(ctx context.Context, device string, kind proto.Kind, payload []byte) error
	// Provision gives a device access with the given password.
	Provision(ctx context.Context, device, password string) error
	// Revoke removes a device's access and disconnects it.
	Revoke(ctx context.Context, device string) error
	// Connected reports how many devices are connected, or -1 if unknown.
	Connected() int
	Close() error
}

// ErrClosed is returned after Close.
var ErrClosed = errors.New("broker closed")

// HashPassword is how device MQTT passwords are stored. They are 256-bit
// random values made by the control plane, so a fast hash is enough: there
// is nothing to brute-force, and a reconnect storm of thousands of devices
// must not cost a bcrypt each.
func HashPassword(password string) []byte {
	h := sha256.Sum256([]byte(password))
	return h[:]
}

// CheckPassword compares in constant time.
func CheckPassword(hash []byte, password string) bool {
	return subtle.ConstantTimeCompare(hash, HashPassword(password)) == 1
}

// DeviceMayPublish reports whether device may publish on topic: only to the
// state, telemetry and event topics of its own subtree.
func DeviceMayPublish(device, topic string) bool {
	for _, k := range proto.DeviceKinds {
		if topic == proto.DeviceTopic(device, k) {
			return true
		}
	}
	return false
}

// DeviceMaySubscribe reports whether device may subscribe to filter: only
// its own command topic, and never through a wildcard.
func DeviceMaySubscribe(device, filter string) bool {
	return filter == proto.DeviceTopic(device, proto.KindCmd)
}
