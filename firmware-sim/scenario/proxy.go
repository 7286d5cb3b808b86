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

	mu       sync.Mutex
	conns    map[*proxyConn]struct{}
	rng      *rand.Rand
	loss     float64   // share of connections refused or cut while lossUntil
	until    time.Time // end of the lossy period
	flapping bool      // a goroutine cuts connections until `until`
	rate     int       // bytes per second per connection towards the drone, 0: no cap
	cuts     int       // connections cut or refused so far
	closed   bool
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
	p.closed = true
	for c := range p.conns {
		c.close()
		delete(p.conns, c)
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
		if refuse {
			p.cuts++
		}
		p.mu.Unlock()
		if refuse {
			down.Close()
			continue
		}
		go p.pipe(down)
	}
}

func (p *linkProxy) pipe(down net.Conn) {
	up, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
	if err != nil {
		down.Close()
		return
	}
	c := &proxyConn{down: down, up: up}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		c.close()
		return
	}
	p.conns[c] = struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, down); done <- struct{}{} }()
	go func() { p.copyCapped(down, up); done <- struct{}{} }()
	<-done
	c.close()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

// copyCapped copies towards the drone at the proxy's current rate (read
// for every chunk, so a cap set or lifted applies to open connections).
func (p *linkProxy) copyCapped(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		p.mu.Lock()
		rate := p.rate
		p.mu.Unlock()
		chunk := buf
		if rate > 0 {
			chunk = buf[:min(len(buf), max(rate/10, 1))]
		}
		n, err := src.Read(chunk)
		if n > 0 {
			if _, werr := dst.Write(chunk[:n]); werr != nil {
				return
			}
			if rate > 0 {
				time.Sleep(time.Duration(n) * time.Second / time.Duration(rate))
			}
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
	running := p.flapping
	p.flapping = true
	p.mu.Unlock()
	if running {
		return // the running one takes the new share and end
	}
	go func() {
		t := time.NewTicker(flap)
		defer t.Stop()
		for {
			p.mu.Lock()
			if time.Now().After(p.until) {
				p.flapping = false
				p.mu.Unlock()
				return
			}
			for c := range p.conns {
				if p.rng.Float64() < p.loss {
					c.close()
					delete(p.conns, c)
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
		delete(p.conns, c)
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
