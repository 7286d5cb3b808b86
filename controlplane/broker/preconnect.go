package broker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Before a client has authenticated, it may cost the broker little: a
// connection must send its CONNECT within ConnectTimeout, that CONNECT may
// announce at most MaxConnectSize bytes, and nothing is allocated for it
// beyond what actually arrived. mochi reads the fixed header, allocates
// the announced length and sets no deadline before CONNECT: 3,000
// connections announcing large CONNECTs took its heap past 800 MB. The
// guard sits between the listener and mochi (a net.Conn wrapper; mochi's
// hooks run only after it has read the packet).

// Defaults of the pre-CONNECT guard.
const (
	DefaultConnectTimeout = 10 * time.Second
	// DefaultMaxConnectSize bounds a CONNECT: client id, user name and
	// password of at most a few hundred bytes, and a last will (the
	// device's offline State, about 100 bytes).
	DefaultMaxConnectSize = 16 << 10
)

var (
	errNotConnect   = errors.New("the first packet is not a CONNECT")
	errConnectLarge = errors.New("CONNECT larger than allowed")
)

// connectGuard is a connection whose first packet must be a CONNECT, in
// time and within size; mochi reads it through the guard.
type connectGuard struct {
	net.Conn
	maxSize int
	refused func(reason string)

	mu      sync.Mutex
	checked bool
	pending []byte
	err     error

	closeOnce sync.Once
	onClose   func()
	// onChecked is called once the first packet was read (or refused).
	onChecked func()
}

// Close closes the connection and tells the listener, once.
func (g *connectGuard) Close() error {
	err := g.Conn.Close()
	g.closeOnce.Do(func() {
		if g.onClose != nil {
			g.onClose()
		}
	})
	return err
}

func guardConnect(c net.Conn, timeout time.Duration, maxSize int, refused func(string)) *connectGuard {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	return &connectGuard{Conn: c, maxSize: maxSize, refused: refused}
}

func (g *connectGuard) Read(p []byte) (int, error) {
	g.mu.Lock()
	if !g.checked {
		g.checked = true
		g.pending, g.err = g.readConnect()
		if g.err != nil {
			g.Close()
		}
		if g.onChecked != nil {
			g.onChecked()
		}
	}
	if len(g.pending) > 0 {
		n := copy(p, g.pending)
		g.pending = g.pending[n:]
		g.mu.Unlock()
		return n, nil
	}
	err := g.err
	g.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return g.Conn.Read(p)
}

// readConnect reads the whole first packet, checking it as it goes.
func (g *connectGuard) readConnect() ([]byte, error) {
	head := make([]byte, 0, 5)
	var one [1]byte
	if _, err := io.ReadFull(g.Conn, one[:]); err != nil {
		g.refuse("timeout", err)
		return nil, err
	}
	if one[0]>>4 != 1 {
		g.refused("not_connect")
		return nil, errNotConnect
	}
	head = append(head, one[0])
	length, mult := 0, 1
	for i := 0; ; i++ {
		if _, err := io.ReadFull(g.Conn, one[:]); err != nil {
			g.refuse("timeout", err)
			return nil, err
		}
		head = append(head, one[0])
		length += int(one[0]&0x7f) * mult
		if one[0]&0x80 == 0 {
			break
		}
		if i == 3 {
			g.refused("not_connect")
			return nil, errNotConnect
		}
		mult <<= 7
	}
	if length > g.maxSize {
		g.refused("too_large")
		return nil, fmt.Errorf("%w: %d bytes announced, at most %d", errConnectLarge, length, g.maxSize)
	}
	// Grow with what arrives, never with what was announced.
	pkt := head
	chunk := make([]byte, min(length, 512))
	for got := 0; got < length; {
		n, err := g.Conn.Read(chunk[:min(len(chunk), length-got)])
		pkt = append(pkt, chunk[:n]...)
		got += n
		if err != nil {
			g.refuse("timeout", err)
			return nil, err
		}
	}
	// Authenticated or not is mochi's to say from here; the deadline of
	// the CONNECT ends.
	_ = g.Conn.SetReadDeadline(time.Time{})
	return pkt, nil
}

func (g *connectGuard) refuse(timeout string, err error) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		g.refused(timeout)
		return
	}
	g.refused("closed")
}
