package mavlink

import (
	"net"
	"sync"
)

// UDPConn is a listening UDP socket for gomavlib.EndpointCustom: it reads
// datagrams from any peer and writes to the peer heard from last (the
// flight controller, or mavlink-router). gomavlib's own UDP server
// endpoint links two more networking libraries into the agent.
type UDPConn struct {
	pc   *net.UDPConn
	mu   sync.Mutex
	peer *net.UDPAddr
}

// ListenUDP listens on addr (HOST:PORT; port 0 picks one).
func ListenUDP(addr string) (*UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	pc, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	return &UDPConn{pc: pc}, nil
}

// Read returns one datagram.
func (c *UDPConn) Read(p []byte) (int, error) {
	n, from, err := c.pc.ReadFromUDP(p)
	if err == nil {
		c.mu.Lock()
		c.peer = from
		c.mu.Unlock()
	}
	return n, err
}

// Write sends to the last peer; until one was heard, the frame is dropped.
func (c *UDPConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	peer := c.peer
	c.mu.Unlock()
	if peer == nil {
		return len(p), nil
	}
	return c.pc.WriteToUDP(p, peer)
}

func (c *UDPConn) Close() error { return c.pc.Close() }

// LocalAddr is the address it listens on.
func (c *UDPConn) LocalAddr() net.Addr { return c.pc.LocalAddr() }
