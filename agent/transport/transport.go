// Package transport defines the agent's link to the broker. The agent owns
// the reconnect loop (exponential backoff with full jitter), so a Transport
// only dials; transport/mqtt is the paho implementation.
package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"time"
)

// Transport opens connections to the broker.
type Transport interface {
	Connect(ctx context.Context, p ConnectParams) (Conn, error)
}

// ConnectParams describe one connection.
type ConnectParams struct {
	URL      string // tcp://host:port
	ClientID string
	Username string
	Password string
	// WillTopic and WillPayload are the last will, published by the broker
	// when the connection is lost without a clean disconnect.
	WillTopic   string
	WillPayload []byte
	KeepAlive   time.Duration
	// OnMessage receives messages on subscribed topics. It is called from
	// the transport's goroutine and must not block.
	OnMessage func(topic string, payload []byte)
	// TLS is the client configuration for tls:// (ssl://, mqtts://) URLs.
	TLS *tls.Config
}

// Conn is one live connection.
type Conn interface {
	// Publish sends a QoS1 message; the Token completes on PUBACK or when
	// the connection is lost.
	Publish(topic string, payload []byte) Token
	// Subscribe subscribes with QoS1 and waits for the SUBACK.
	Subscribe(ctx context.Context, topic string) error
	// Done is closed when the connection is lost or closed.
	Done() <-chan struct{}
	// Close disconnects cleanly (no last will).
	Close()
}

// Token is a pending publish.
type Token interface {
	Wait(ctx context.Context) error
}

// ErrNotAuthorized is returned by Connect when the broker refuses the
// credential: the agent then enrolls again.
var ErrNotAuthorized = errors.New("broker refused the credential")

// BrokerURLs splits ConnectParams.URL, which may list a broker cluster's
// nodes (comma-separated), and rotates the list to start at a random one
// (pick(n) in [0, n)): a fleet spreads over the nodes, and a connection
// tries the next when one is down.
func BrokerURLs(list string, pick func(int) int) []string {
	var urls []string
	for _, u := range strings.Split(list, ",") {
		if u = strings.TrimSpace(u); u != "" {
			urls = append(urls, u)
		}
	}
	if len(urls) < 2 {
		return urls
	}
	i := pick(len(urls))
	return append(urls[i:], urls[:i]...)
}
