package mqtt

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// MaxPacket is the largest packet the agent accepts from the broker
// (commands are a few KiB). paho allocates whatever length a packet
// announces, up to 256 MiB: the connection is read through a scanner that
// ends it at the first header announcing more, before paho sees it.
const MaxPacket = 1 << 20

// errPacketTooLarge ends a connection whose broker announced a packet over
// MaxPacket.
var errPacketTooLarge = errors.New("mqtt: the broker announced a packet over the limit")

// openBounded dials like paho (tcp://, mqtt://, and TLS for ssl://, tls://,
// tcps://, mqtts://) and bounds what the broker may announce.
func (t *Transport) openBounded(uri *url.URL, o paho.ClientOptions) (net.Conn, error) {
	d := t.Dialer
	if d == nil {
		d = &net.Dialer{Timeout: o.ConnectTimeout}
	}
	var c net.Conn
	var err error
	switch uri.Scheme {
	case "tcp", "mqtt":
		c, err = d.Dial("tcp", uri.Host)
	case "ssl", "tls", "tcps", "mqtts":
		c, err = tls.DialWithDialer(d, "tcp", uri.Host, o.TLSConfig)
	default:
		return nil, fmt.Errorf("mqtt: unsupported broker URL scheme %q", uri.Scheme)
	}
	if err != nil {
		return nil, err
	}
	return &boundedConn{Conn: c, max: MaxPacket}, nil
}

// boundedConn follows the MQTT packet framing of what it reads.
type boundedConn struct {
	net.Conn
	max int

	state  int // 0: fixed header byte, 1: remaining length, 2: body
	length int
	mult   int
	digits int
	remain int
}

func (b *boundedConn) Read(p []byte) (int, error) {
	n, err := b.Conn.Read(p)
	if serr := b.scan(p[:n]); serr != nil {
		b.Conn.Close()
		return 0, serr
	}
	return n, err
}

func (b *boundedConn) scan(buf []byte) error {
	for i := 0; i < len(buf); {
		switch b.state {
		case 0:
			b.state, b.length, b.mult, b.digits = 1, 0, 1, 0
			i++
		case 1:
			c := buf[i]
			i++
			b.length += int(c&0x7f) * b.mult
			b.digits++
			if c&0x80 != 0 {
				if b.digits == 4 {
					return errors.New("mqtt: malformed remaining length from the broker")
				}
				b.mult <<= 7
				continue
			}
			if b.length > b.max {
				return fmt.Errorf("%w: %d bytes, at most %d", errPacketTooLarge, b.length, b.max)
			}
			b.remain, b.state = b.length, 2
			if b.remain == 0 {
				b.state = 0
			}
		case 2:
			k := min(b.remain, len(buf)-i)
			b.remain -= k
			i += k
			if b.remain == 0 {
				b.state = 0
			}
		}
	}
	return nil
}
