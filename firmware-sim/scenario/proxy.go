package scenario

import (
	"context"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// linkProxy stands between the drones and the control plane (one for MQTT,
// one for HTTP) and breaks the link on demand: there is no tc netem on the
// machines this runs on, so faults are injected in process.
type linkProxy struct {
	ln       net.Listener
	upstream string

	mu    sync.Mutex
	conns map[*proxyConn]struct{}
	rng   *rand.Rand
	loss  float64   // share of connections refused or cut while lossUntil
	until time.Time // end of the lossy period
	rate  int       // bytes per second per connection towards the drone, 0: no cap
	cuts  int       // connections cut so far
}

type proxyConn struct {
	down, up net.Conn
}

func (c *proxyConn) close() {
	c.down.Close()
	c.up.Close()
}

func newLinkProxy(upstream string, seed uint64) (*linkProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &linkProxy{ln: ln, upstream: upstream, conns: map[*proxyConn]struct{}{}, rng: rand.New(rand.NewPCG(seed, 11))}
	go p.serve()
	return p, nil
}

func (p *linkProxy) Addr() string { return p.ln.Addr().String() }

func (p *linkProxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.close()
	}
}

func (p *linkProxy) serve() {
	for {
		down, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		refuse := time.Now().Before(p.until) && p.rng.Float64() < p.loss
		rate := p.rate
		if refuse {
			p.cuts++
		}
		p.mu.Unlock()
		if refuse {
			down.Close()
			continue
		}
		go p.pipe(down, rate)
	}
}

func (p *linkProxy) pipe(down net.Conn, rate int) {
	up, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
	if err != nil {
		down.Close()
		return
	}
	c := &proxyConn{down: down, up: up}
	p.mu.Lock()
	p.conns[c] = struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, down); done <- struct{}{} }()
	go func() { copyRate(down, up, rate); done <- struct{}{} }()
	<-done
	c.close()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

// copyRate copies at most rate bytes a second (0: no cap).
func copyRate(dst io.Writer, src io.Reader, rate int) {
	if rate <= 0 {
		io.Copy(dst, src)
		return
	}
	chunk := max(rate/20, 512)
	buf := make([]byte, chunk)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
			<-tick.C
		}
		if err != nil {
			return
		}
	}
}

// lossy cuts a share of the live connections now and refuses that share
// of new ones until the end of the period; every flap it cuts again.
func (p *linkProxy) lossy(ctx context.Context, share float64, period, flap time.Duration) {
	p.mu.Lock()
	p.loss, p.until = share, time.Now().Add(period)
	p.mu.Unlock()
	go func() {
		t := time.NewTicker(flap)
		defer t.Stop()
		for {
			p.mu.Lock()
			if time.Now().After(p.until) {
				p.mu.Unlock()
				return
			}
			for c := range p.conns {
				if p.rng.Float64() < share {
					c.close()
					p.cuts++
				}
			}
			p.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// cutAll closes every live connection (a broker restart, seen from the
// drones).
func (p *linkProxy) cutAll() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.conns)
	for c := range p.conns {
		c.close()
	}
	p.cuts += n
	return n
}

func (p *linkProxy) setRate(bytesPerSecond int) {
	p.mu.Lock()
	p.rate = bytesPerSecond
	p.mu.Unlock()
}

func (p *linkProxy) cutCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cuts
}
