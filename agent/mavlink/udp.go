package mavlink

import (
	"net"
	"sync"
)

// udpConn is a listening UDP socket for gomavlib.EndpointCustom: it reads
// datagrams from any peer and writes to the peer heard from last (the
// flight controller, or mavlink-router). gomavlib's own UDP server
// endpoint links two more networking libraries into the agent.
type udpConn struct {
	pc   *net.UDPConn
	mu   sync.Mutex
	peer *net.UDPAddr
}

func listenUDP(addr string) (*udpConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	pc, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	return &udpConn{pc: pc}, nil
}

// Read returns one datagram.
func (c *udpConn) Read(p []byte) (int, error) {
	n, from, err := c.pc.ReadFromUDP(p)
	if err == nil {
		c.mu.Lock()
		c.peer = from
		c.mu.Unlock()
	}
	return n, err
}

// Write sends to the last peer; until one was heard, the frame is dropped.
func (c *udpConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	peer := c.peer
	c.mu.Unlock()
	if peer == nil {
		return len(p), nil
	}
	return c.pc.WriteToUDP(p, peer)
}

func (c *udpConn) Close() error { return c.pc.Close() }

// LocalAddr is the address it listens on.
func (c *udpConn) LocalAddr() net.Addr { return c.pc.LocalAddr() }
