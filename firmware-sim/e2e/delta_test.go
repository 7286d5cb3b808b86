package e2e

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// byteCounter is a reverse proxy in front of the control plane that counts
// the response bytes of artifact and patch downloads: what the drone
// fetched over the air.
type byteCounter struct {
	*httptest.Server
	mu            sync.Mutex
	full, patches int64
}

func newByteCounter(t *testing.T, target string) *byteCounter {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	b := &byteCounter{}
	rp := httputil.NewSingleHostReverseProxy(u)
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &countW{ResponseWriter: w}
		rp.ServeHTTP(cw, r)
		b.mu.Lock()
		defer b.mu.Unlock()
		switch {
		case strings.Contains(r.URL.Path, "/deltas/") && strings.HasSuffix(r.URL.Path, "/artifact"):
			b.patches += cw.n
		case strings.HasSuffix(r.URL.Path, "/artifact"):
			b.full += cw.n
		}
	}))
	t.Cleanup(b.Close)
	return b
}

func (b *byteCounter) take() (full, patches int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	full, patches, b.full, b.patches = b.full, b.patches, 0, 0
	return full, patches
}

type countW struct {
	http.ResponseWriter
	n int64
}

func (c *countW) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countW) Flush() { http.NewResponseController(c.ResponseWriter).Flush() }

// TestRealAgentDelta: the real agent, running, takes two delta updates of
// itself: a rebuild that differs by its version string, then one with a
// small code change. Each time it fetches the patch only (counted at a
// proxy: no byte of the full artifact), makes the new build of the binary
// in place, swaps, trial-boots and commits, and the installed file is the
// release byte for byte.
func TestRealAgentDelta(t *testing.T) {
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}})
	proxy := newByteCounter(t, cp.URL())
	v1 := buildAgent(t, "1.0.0")
	v2 := buildAgent(t, "1.0.1")                                                                              // the version string
	v3 := buildTagged(t, "github.com/hangarfleet/hangar/agent/cmd/hangar-agent", "1.0.2", "hangar_patchtest") // a small code change
	installed := filepath.Join(t.TempDir(), "opt", "hangar-agent")
	copyExe(t, v1, installed)
	sup := supervise(t, installed, []string{"--server", proxy.URL, "--enroll-token", cp.enrollToken(t), "--device-id", "drone-1",
		"--hardware", "rev-b", "--state-dir", t.TempDir(), "--flight-input", "", "--root-key", kit.rootPub,
		"--install-when-flight-unknown", "--trial-deadline", "20s", "--trial-soak", "2s", "--sample-interval", "200ms", "--heartbeat", "2s", "--log-level", "info"},
		nil)
	ctx := context.Background()
	device := func() store.Device { d, _ := cp.Store().Device(ctx, "drone-1"); return d }
	builds := func(path string) string {
		b, _ := os.ReadFile(path)
		s := sha256.Sum256(b)
		return fmt.Sprintf("%x", s)
	}
	waitFor(t, 30*time.Second, "agent 1.0.0 online, reporting its build", func() (bool, string) {
		d := device()
		return d.Online && d.Version == "1.0.0" && d.Builds["agent"] == builds(v1) && d.DeltaMax > 0, fmt.Sprintf("%s %v %d", d.Version, d.Builds, d.DeltaMax)
	})
	for i, step := range []struct {
		from, to, version, what string
		counter                 uint64
	}{
		{v1, v2, "1.0.1", "a version string", 101},
		{v2, v3, "1.0.2", "a small code change", 102},
	} {
		manifest := step.to + ".manifest"
		out := kit.cli(t, "", "release", "sign", "--key", kit.relKey, "--artifact", step.to, "--version", step.version, "--hardware", "rev-b",
			"--arch", "amd64,arm64,arm", "--counter", fmt.Sprint(step.counter), "--out", manifest, "--delta-from", step.from)
		var patch string
		for _, f := range strings.Fields(out) {
			if strings.HasSuffix(f, ".patch") {
				patch = f
			}
		}
		if patch == "" {
			matches, _ := filepath.Glob(step.to + ".from-*.patch")
			if len(matches) != 1 {
				t.Fatalf("release sign --delta-from wrote no single patch: %v\n%s", matches, out)
			}
			patch = matches[0]
		}
		kit.cli(t, cp.URL(), "release", "push", "--manifest", manifest, "--keys", kit.keysFile, "--artifact", step.to,
			"--delta", patch, "--token-file", adminTokenFile(cp))
		proxy.take()
		var peakKB int
		stop := sampleRSS(sup, &peakKB)
		start := time.Now()
		kit.cli(t, cp.URL(), "device", "update", "drone-1", "--release", step.version, "--token-file", adminTokenFile(cp))
		waitFor(t, 90*time.Second, step.version+" committed", func() (bool, string) {
			u, _ := updateState(cp, "drone-1", step.counter)
			return u.State == "committed" && device().Version == step.version, u.State + " " + device().Version
		})
		stop()
		full, patches := proxy.take()
		u, _ := updateState(cp, "drone-1", step.counter)
		size, psize := fileSize(t, step.to), fileSize(t, patch)
		t.Logf("delta %d (%s): patch %d bytes for a %d-byte build (%.2f%%); fetched %d bytes of patch, %d of full artifact; offer to commit %v; agent peak RSS %.1f MB",
			i+1, step.what, psize, size, 100*float64(psize)/float64(size), patches, full, time.Since(start).Round(time.Millisecond), float64(peakKB)/1024)
		if full != 0 || patches != psize {
			t.Errorf("%s: fetched %d bytes of the full artifact and %d of the patch, want 0 and %d", step.version, full, patches, psize)
		}
		if u.Patch != uint64(psize) || u.Fallback != "" {
			t.Errorf("%s: the control plane records patch %d, fallback %q", step.version, u.Patch, u.Fallback)
		}
		// The agent logs its peak RSS once the patch is applied (before it
		// execs the new build): the figure for a patch of its own binary.
		sup.mu.Lock()
		logs := sup.log.String()
		sup.mu.Unlock()
		var rssKB int
		for _, line := range strings.Split(logs, "\n") {
			if strings.Contains(line, "delta applied") && strings.Contains(line, "version="+step.version) {
				if _, v, ok := strings.Cut(line, "peak_rss_kb="); ok {
					fmt.Sscan(v, &rssKB)
				}
			}
		}
		t.Logf("delta %d: the agent's peak RSS up to the patch applied: %.1f MB", i+1, float64(rssKB)/1024)
		if rssKB == 0 || rssKB > 25<<10 {
			t.Errorf("%s: peak RSS of the agent applying the patch: %d kB (target 25 MB)", step.version, rssKB)
		}
		if !sameFile(t, installed, step.to) {
			t.Fatalf("%s: the installed binary is not the release", step.version)
		}
		waitFor(t, 30*time.Second, "the new build's digest reported", func() (bool, string) {
			d := device()
			return d.Builds["agent"] == builds(step.to), fmt.Sprint(d.Builds)
		})
	}
}
