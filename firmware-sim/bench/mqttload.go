package bench

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// loadConn is a minimal MQTT 3.1.1 client for load generation: CONNECT,
// QoS1 PUBLISH and PUBACK only. The benchmark runs thousands of them on the
// same machine as the server, so they must cost far less than paho.
type loadConn struct {
	c  net.Conn
	w  *bufio.Writer
	mu sync.Mutex // guards w, sent, nextID

	sent      map[uint16]pending
	ackedSeqs []uint64 // sequence numbers acknowledged, in order
	nextID    uint16
	acked     func(lat time.Duration)
	closed    chan struct{}
	err       error
}

type pending struct {
	at  time.Time
	seq uint64
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendRemaining(b []byte, n int) []byte {
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func dialMQTT(addr, clientID, user, pass string, keepAlive time.Duration, acked func(time.Duration), cfg *tls.Config) (*loadConn, error) {
	var c net.Conn
	var err error
	if cfg != nil {
		c, err = tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
	} else {
		c, err = net.DialTimeout("tcp", addr, 10*time.Second)
	}
	if err != nil {
		return nil, err
	}
	var body []byte
	body = appendString(body, "MQTT")
	flags := byte(0xC2) // username, password, clean session
	if pass == "" {
		flags = 0x82 // a certificate says who it is: no password
	}
	body = append(body, 4, flags) // protocol level 4
	body = binary.BigEndian.AppendUint16(body, uint16(keepAlive/time.Second))
	body = appendString(body, clientID)
	body = appendString(body, user)
	if pass != "" {
		body = appendString(body, pass)
	}
	pkt := appendRemaining([]byte{0x10}, len(body))
	pkt = append(pkt, body...)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(pkt); err != nil {
		c.Close()
		return nil, err
	}
	var ack [4]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("connack: %w", err)
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		c.Close()
		return nil, fmt.Errorf("connection refused (code %d)", ack[3])
	}
	c.SetDeadline(time.Time{})
	l := &loadConn{c: c, w: bufio.NewWriterSize(c, 4096), sent: map[uint16]pending{}, acked: acked, closed: make(chan struct{})}
	go l.readLoop()
	return l, nil
}

var errInflight = errors.New("too many messages in flight")

// publish sends a QoS1 PUBLISH; at most maxInflight may await their PUBACK.
func (l *loadConn) publish(topic string, payload []byte, maxInflight int, seq uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return l.err
	}
	if len(l.sent) >= maxInflight {
		return errInflight
	}
	l.nextID++
	if l.nextID == 0 {
		l.nextID = 1
	}
	id := l.nextID
	hdr := appendRemaining([]byte{0x32}, 2+len(topic)+2+len(payload))
	l.w.Write(hdr)
	l.w.Write(binary.BigEndian.AppendUint16(nil, uint16(len(topic))))
	l.w.WriteString(topic)
	l.w.Write(binary.BigEndian.AppendUint16(nil, id))
	l.w.Write(payload)
	l.sent[id] = pending{time.Now(), seq}
	if err := l.w.Flush(); err != nil {
		l.err = err
		return err
	}
	return nil
}

func (l *loadConn) pingreq() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w.Write([]byte{0xC0, 0})
	return l.w.Flush()
}

func (l *loadConn) readLoop() {
	defer close(l.closed)
	r := bufio.NewReader(l.c)
	for {
		h, err := r.ReadByte()
		if err != nil {
			l.fail(err)
			return
		}
		n, mul := 0, 1
		for {
			d, err := r.ReadByte()
			if err != nil {
				l.fail(err)
				return
			}
			n += int(d&0x7f) * mul
			mul *= 128
			if d&0x80 == 0 {
				break
			}
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			l.fail(err)
			return
		}
		if h>>4 == 4 && n >= 2 { // PUBACK
			id := binary.BigEndian.Uint16(body)
			l.mu.Lock()
			p, ok := l.sent[id]
			delete(l.sent, id)
			if ok {
				l.ackedSeqs = append(l.ackedSeqs, p.seq)
			}
			l.mu.Unlock()
			if ok {
				l.acked(time.Since(p.at))
			}
		}
	}
}

func (l *loadConn) fail(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
	}
	l.mu.Unlock()
}

func (l *loadConn) inflight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sent)
}

// acknowledged is the sequence numbers the broker acknowledged.
func (l *loadConn) acknowledged() []uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]uint64(nil), l.ackedSeqs...)
}

func (l *loadConn) close() {
	l.c.Close()
	<-l.closed
}
