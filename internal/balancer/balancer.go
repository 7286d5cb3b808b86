// Package balancer is an HTTP load balancer for tests and rehearsals: each
// request goes to the next backend in turn, and to the one after when a
// backend does not answer (killed), as a load balancer with health checks
// would send it.
package balancer

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"time"
)

// Balancer is a running balancer.
type Balancer struct {
	srv      *http.Server
	ln       net.Listener
	backends []string
	next     atomic.Uint64
}

// Start listens on a free loopback port and spreads requests over
// backends (base URLs, http://host:port).
func Start(backends ...string) (*Balancer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &Balancer{backends: backends, ln: ln}
	b.srv = &http.Server{Handler: http.HandlerFunc(b.serve), ReadHeaderTimeout: 10 * time.Second}
	go b.srv.Serve(ln)
	return b, nil
}

// URL is the balancer's base URL.
func (b *Balancer) URL() string { return "http://" + b.ln.Addr().String() }

// Close stops it.
func (b *Balancer) Close() error { return b.srv.Close() }

func (b *Balancer) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<30))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	start := b.next.Add(1)
	for i := range len(b.backends) {
		target := b.backends[(int(start)+i)%len(b.backends)]
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(target, "http://"), time.Second)
		if err != nil {
			continue // down: the next one
		}
		c.Close()
		u, _ := url.Parse(target)
		rec := &response{header: http.Header{}}
		p := httputil.NewSingleHostReverseProxy(u)
		p.ErrorHandler = func(_ http.ResponseWriter, _ *http.Request, err error) { rec.err = err }
		req := r.Clone(r.Context())
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.ContentLength = int64(len(body))
		p.ServeHTTP(rec, req)
		if rec.err != nil {
			continue // died while answering: the request goes elsewhere
		}
		for k, v := range rec.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.code)
		w.Write(rec.body.Bytes())
		return
	}
	http.Error(w, "no backend answers", http.StatusBadGateway)
}

// response buffers a backend's answer, so that one that dies half-way is
// not half-sent to the client.
type response struct {
	header http.Header
	code   int
	body   bytes.Buffer
	err    error
}

func (r *response) Header() http.Header { return r.header }
func (r *response) Write(p []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.body.Write(p)
}
func (r *response) WriteHeader(c int) { r.code = c }
