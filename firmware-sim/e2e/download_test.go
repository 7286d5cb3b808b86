package e2e

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/update"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/proto"
)

// cuttingProxy forwards HTTP to the control plane and cuts the first few
// artifact downloads after a number of body bytes, as a flaky LTE link does.
type cuttingProxy struct {
	upstream *url.URL
	rp       *httputil.ReverseProxy
	cutAfter int64
	cuts     atomic.Int32 // cuts left
	// rate, when set, caps artifact bytes per second (a slow link).
	rate     int64
	served   atomic.Int64 // artifact body bytes sent to the agent
	requests atomic.Int32
	active   atomic.Int32 // artifact requests being served
	longest  atomic.Int64 // nanoseconds the longest artifact response took
}

func (p *cuttingProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/artifact") {
		p.rp.ServeHTTP(w, r)
		return
	}
	p.requests.Add(1)
	p.active.Add(1)
	defer p.active.Add(-1)
	start := time.Now()
	defer func() {
		for d := int64(time.Since(start)); ; {
			if old := p.longest.Load(); d <= old || p.longest.CompareAndSwap(old, d) {
				break
			}
		}
	}()
	req, _ := http.NewRequestWithContext(r.Context(), r.Method, p.upstream.String()+r.URL.RequestURI(), nil)
	req.Header = r.Header.Clone()
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, vs := range resp.Header {
		w.Header()[k] = vs
	}
	w.WriteHeader(resp.StatusCode)
	body := io.Reader(resp.Body)
	cut := p.cuts.Add(-1) >= 0
	if cut {
		body = io.LimitReader(resp.Body, p.cutAfter)
	}
	var n int64
	if p.rate > 0 {
		chunk := p.rate / 20
		for {
			m, err := io.CopyN(w, body, chunk)
			n += m
			p.served.Add(m)
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
			if err != nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	} else {
		n, _ = io.Copy(w, body)
		p.served.Add(n)
	}
	if cut {
		// Drop the connection mid-body.
		panic(http.ErrAbortHandler)
	}
}

// waitIdle waits until no artifact request is being served: the agent may
// read the last byte, verify, install and report before the handler that
// sent it has counted it.
func (p *cuttingProxy) waitIdle(t *testing.T) {
	t.Helper()
	waitFor(t, 10*time.Second, "artifact downloads finished", func() (bool, string) {
		n := p.active.Load()
		return n == 0, fmt.Sprintf("%d artifact requests in progress", n)
	})
}

// recorder is an installer that keeps what it was given.
type recorder struct {
	mu        sync.Mutex
	installed []byte
	version   string
}

func (r *recorder) Install(_ context.Context, m proto.Manifest, artifact string) error {
	b, err := os.ReadFile(artifact)
	r.mu.Lock()
	r.installed, r.version = b, m.Version
	r.mu.Unlock()
	return err
}
func (r *recorder) Activate(context.Context, proto.Manifest) error { return nil }
func (r *recorder) Check(context.Context, proto.Manifest) error    { return nil }
func (r *recorder) Commit(context.Context, proto.Manifest) error   { return nil }
func (r *recorder) Rollback(context.Context, proto.Manifest) error { return nil }
func (r *recorder) Running(m proto.Manifest) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.version == m.Version
}
func (r *recorder) Installed(m proto.Manifest) bool { return r.Running(m) }

// updateThrough pushes a random artifact of size bytes as fc-firmware
// 2.0.0, runs an agent that reaches the control plane through proxy (and
// uses client for HTTP when not nil), offers it the release and waits for
// the commit. It returns the artifact and what the agent installed.
func updateThrough(t *testing.T, kit *releaseKit, cp *controlPlane, proxy *cuttingProxy, device string, size int, client *http.Client) (content, installed []byte) {
	t.Helper()
	ps := httptest.NewServer(proxy)
	t.Cleanup(ps.Close)
	artifact := filepath.Join(t.TempDir(), "fc-firmware.bin")
	content = make([]byte, size)
	rand.Read(content)
	os.WriteFile(artifact, content, 0o644)
	kit.cli(t, "", "release", "sign", "--key", kit.relKey, "--artifact", artifact, "--version", "2.0.0", "--hardware", "rev-b",
		"--target", "fc-firmware", "--counter", "20", "--out", artifact+".manifest")
	kit.cli(t, cp.URL(), "release", "push", "--manifest", artifact+".manifest", "--keys", kit.keysFile, "--artifact", artifact,
		"--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))

	rec := &recorder{}
	a, err := agent.New(agent.Options{
		DeviceID: device, Hardware: "rev-b", Version: "1.0.0", ServerURL: ps.URL, EnrollToken: cp.enrollToken(t),
		StateDir: t.TempDir(), SampleInterval: 100 * time.Millisecond, BackoffMin: 50 * time.Millisecond, BackoffMax: time.Second,
		HTTPClient: client, Logger: testLogger(t),
		Update: &agent.UpdateOptions{Roots: []ed25519.PublicKey{kit.rootKey(t)}, Policy: update.Policy{AllowUnknownFlight: true},
			TrialSoak: time.Millisecond, Installers: map[string]update.Installer{"fc-firmware": rec}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	waitFor(t, 30*time.Second, "agent online", func() (bool, string) {
		d, _ := cp.Store().Device(ctx, device)
		return d.Online, "offline"
	})
	kit.cli(t, cp.URL(), "device", "update", device, "--release", "fc-firmware@2.0.0", "--token-file", filepath.Join(cp.dataDir, server.AdminTokenFile))
	waitFor(t, 60*time.Second, "2.0.0 committed", func() (bool, string) {
		u, _ := updateState(cp, device, 20)
		return u.State == "committed", u.State
	})
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return content, rec.installed
}

// TestInterruptedDownload: the artifact download is cut three times in the
// middle; the agent resumes each time where it stopped (HTTP Range) and
// fetches only the rest.
func TestInterruptedDownload(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	up, _ := url.Parse(cp.URL())
	const size = 6 << 20
	proxy := &cuttingProxy{upstream: up, rp: httputil.NewSingleHostReverseProxy(up), cutAfter: 1 << 20}
	proxy.cuts.Store(3)
	content, got := updateThrough(t, kit, cp, proxy, "drone-dl", size, nil)
	if string(got) != string(content) {
		t.Fatal("installed bytes differ from the release")
	}
	proxy.waitIdle(t)
	served := proxy.served.Load()
	t.Logf("artifact %d bytes, cut 3 times after 1 MiB each: %d requests, %d body bytes fetched (%.3fx the artifact)",
		size, proxy.requests.Load(), served, float64(served)/size)
	if proxy.requests.Load() != 4 {
		t.Errorf("%d download requests, want 4 (three cut, one to finish)", proxy.requests.Load())
	}
	if served > size+64<<10 {
		t.Errorf("fetched %d bytes for a %d byte artifact: downloads started over instead of resuming", served, size)
	}
	// The agent reports the commit (an event) and then says hello again
	// with its new payload versions (a state message): the second comes
	// after the first.
	waitFor(t, 30*time.Second, "fc-firmware 2.0.0 in the device's payloads", func() (bool, string) {
		d, err := cp.Store().Device(context.Background(), "drone-dl")
		if err != nil {
			return false, err.Error()
		}
		return d.Payloads["fc-firmware"] == "2.0.0", fmt.Sprintf("device payloads %v", d.Payloads)
	})
}

// TestSlowDownloadOutlastsRequestTimeout: a download that takes longer
// than the agent's HTTP request timeout (enrollment's) is not cut by it;
// only a stall would end it.
func TestSlowDownloadOutlastsRequestTimeout(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	up, _ := url.Parse(cp.URL())
	const size = 1 << 20
	proxy := &cuttingProxy{upstream: up, rp: httputil.NewSingleHostReverseProxy(up), rate: 400 << 10} // ~2.5 s
	const timeout = time.Second
	updateThrough(t, kit, cp, proxy, "drone-slow", size, &http.Client{Timeout: timeout})
	proxy.waitIdle(t)
	// The premise: the download did take longer than the timeout (the
	// rate limit sleeps at least 2.5 s in all).
	if d := time.Duration(proxy.longest.Load()); d <= timeout {
		t.Fatalf("the download took %v, not longer than the %v request timeout: the test proves nothing", d, timeout)
	}
	if n := proxy.requests.Load(); n != 1 {
		t.Errorf("%d download requests for one slow download, want 1: the request timeout cut it", n)
	}
	if served := proxy.served.Load(); served != size {
		t.Errorf("served %d bytes, want %d", served, size)
	}
}
