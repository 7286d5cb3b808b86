package bench

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// UpdateOptions describe the update benchmark.
type UpdateOptions struct {
	Hangar string // hangar binary
	Agent  string // hangar-agent binary
	Size   int64  // artifact bytes
	Cuts   int    // connection cuts in the middle of the download (second run)
	Log    io.Writer
}

// UpdateResult is what the update benchmark measured.
type UpdateResult struct {
	Size            int64   `json:"artifact_bytes"`
	OfferToCommit   float64 `json:"offer_to_committed_ms"`
	PeakRSSMB       float64 `json:"agent_peak_rss_mb"`
	BaselineRSSMB   float64 `json:"agent_rss_before_mb"`
	Cuts            int     `json:"cuts"`
	FetchedWithCuts int64   `json:"bytes_fetched_with_cuts"`
	CutCommitMS     float64 `json:"offer_to_committed_with_cuts_ms"`
}

// RunUpdate measures a signed update of a payload of Size bytes on a real
// agent process: offer to committed, the agent's peak RSS, and the bytes
// fetched when the download is cut Cuts times.
func RunUpdate(ctx context.Context, o UpdateOptions) (UpdateResult, error) {
	res := UpdateResult{Size: o.Size, Cuts: o.Cuts}
	dir, err := os.MkdirTemp("", "hangar-bench-update-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	// Offline keys, as a release engineer has them.
	rootPub, rootPriv, _ := ed25519.GenerateKey(rand.Reader)
	relPub, relPriv, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Now()
	keys, err := proto.SignKeyList(rootPriv, proto.KeyList{Version: 1, Created: now.Unix(), Expires: now.Add(24 * time.Hour).Unix(),
		Keys: []proto.ReleaseKey{{ID: proto.KeyID(relPub), Public: relPub, Expires: now.Add(24 * time.Hour).Unix()}}})
	if err != nil {
		return res, err
	}
	rootPEM, _ := proto.EncodePublicKey(rootPub)
	rootFile := filepath.Join(dir, "root.pub")
	os.WriteFile(rootFile, rootPEM, 0o644)

	port, err := FreePort()
	if err != nil {
		return res, err
	}
	cp, err := startControlPlane(o.Hangar, filepath.Join(dir, "data"), []string{"--mqtt", fmt.Sprintf("127.0.0.1:%d", port), "--root-key", rootFile}, nil, o.Log)
	if err != nil {
		return res, err
	}
	defer cp.stop()
	up, _ := url.Parse(cp.url)
	proxy := &cutter{rp: httputil.NewSingleHostReverseProxy(up), upstream: up}
	ps := httptest.NewServer(proxy)
	defer ps.Close()

	// The payload's install hook keeps the file and its version.
	hook := filepath.Join(dir, "hook.sh")
	os.WriteFile(hook, []byte(`#!/bin/sh
d=$(dirname "$0")
case "$1" in
install) cp "$2" "$d/payload.bin" && echo "$3" > "$d/payload.ver" ;;
current) cat "$d/payload.ver" 2>/dev/null ;;
esac
`), 0o755)
	ag, err := start(o.Agent, []string{"--server", ps.URL, "--enroll-token", cp.enroll, "--device-id", "bench-update",
		"--hardware", "rev-b", "--state-dir", filepath.Join(dir, "agent"), "--flight-input", "", "--root-key", rootFile,
		"--install-when-flight-unknown", "--hook", "payload=" + hook, "--trial-soak", "0s", "--log-level", "warn"}, nil, o.Log)
	if err != nil {
		return res, err
	}
	defer ag.stop()
	if err := cp.waitOnline(ctx, "bench-update"); err != nil {
		return res, err
	}
	time.Sleep(time.Second)
	res.BaselineRSSMB = statusKB(ag.cmd.Process.Pid, "VmRSS") / 1024

	run := func(version string, counter uint64, cuts int) (time.Duration, int64, float64, error) {
		artifact := make([]byte, o.Size)
		rand.Read(artifact)
		sum := sha256Sum(artifact)
		m := proto.Manifest{Version: version, Counter: counter, Target: "payload", Hardware: []string{"rev-b"}, Size: uint64(o.Size),
			SHA256: sum, Created: now.Unix(), Expires: now.Add(24 * time.Hour).Unix()}
		signed, err := proto.SignManifest(relPriv, m)
		if err != nil {
			return 0, 0, 0, err
		}
		if err := cp.push(signed, keys, artifact); err != nil {
			return 0, 0, 0, err
		}
		proxy.cuts.Store(int32(cuts))
		proxy.cutAfter = o.Size / int64(cuts+1)
		proxy.served.Store(0)
		var peak atomic.Int64
		stop := make(chan struct{})
		go func() {
			for {
				if kb := int64(statusKB(ag.cmd.Process.Pid, "VmRSS")); kb > peak.Load() {
					peak.Store(kb)
				}
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		}()
		start := time.Now()
		if err := cp.update("bench-update", "payload@"+version); err != nil {
			close(stop)
			return 0, 0, 0, err
		}
		err = cp.waitUpdate(ctx, "bench-update", counter, "committed")
		took := time.Since(start)
		close(stop)
		return took, proxy.served.Load(), float64(peak.Load()) / 1024, err
	}
	took, _, peak, err := run("2.0.0", 2, 0)
	if err != nil {
		return res, err
	}
	res.OfferToCommit, res.PeakRSSMB = float64(took.Microseconds())/1000, peak
	took, fetched, _, err := run("2.0.1", 3, o.Cuts)
	if err != nil {
		return res, err
	}
	res.CutCommitMS, res.FetchedWithCuts = float64(took.Microseconds())/1000, fetched
	return res, nil
}

// PrintUpdate prints the update figures.
func PrintUpdate(w io.Writer, r UpdateResult) {
	fmt.Fprintf(w, "artifact:                         %.1f MB\n", float64(r.Size)/1e6)
	fmt.Fprintf(w, "offer to committed (loopback):    %.0f ms (no trial soak)\n", r.OfferToCommit)
	fmt.Fprintf(w, "agent RSS before / peak updating: %.1f / %.1f MB\n", r.BaselineRSSMB, r.PeakRSSMB)
	fmt.Fprintf(w, "download cut %d times:            %d bytes fetched for %d (%.3fx), committed in %.0f ms\n",
		r.Cuts, r.FetchedWithCuts, r.Size, float64(r.FetchedWithCuts)/float64(r.Size), r.CutCommitMS)
}

// cutter forwards to the control plane and cuts artifact downloads.
type cutter struct {
	rp       *httputil.ReverseProxy
	upstream *url.URL
	cutAfter int64
	cuts     atomic.Int32
	served   atomic.Int64
}

func (p *cutter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/artifact") {
		p.rp.ServeHTTP(w, r)
		return
	}
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
	cut := p.cuts.Add(-1) >= 0
	body := io.Reader(resp.Body)
	if cut {
		body = io.LimitReader(resp.Body, p.cutAfter)
	}
	n, _ := io.Copy(w, body)
	p.served.Add(n)
	if cut {
		panic(http.ErrAbortHandler)
	}
}

func (cp *controlPlane) do(method, path, ct string, body io.Reader, out any) error {
	req, _ := http.NewRequest(method, cp.url+path, body)
	req.Header.Set("Authorization", "Bearer "+cp.admin)
	if ct != "" {
		req.Header.Set("Content-Type", ct)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (cp *controlPlane) push(manifest, keys, artifact []byte) error {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range []struct {
		name string
		data []byte
	}{{"manifest", manifest}, {"keys", keys}, {"artifact", artifact}} {
		w, _ := mw.CreateFormFile(p.name, p.name)
		w.Write(p.data)
	}
	mw.Close()
	return cp.do(http.MethodPost, "/api/v1/releases", mw.FormDataContentType(), &buf, nil)
}

func (cp *controlPlane) update(device, release string) error {
	return cp.do(http.MethodPost, "/api/v1/devices/"+device+"/update", "application/json",
		strings.NewReader(`{"release":"`+release+`"}`), nil)
}

func (cp *controlPlane) waitOnline(ctx context.Context, device string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		var d struct {
			Online bool `json:"online"`
		}
		if cp.do(http.MethodGet, "/api/v1/devices/"+device, "", nil, &d) == nil && d.Online {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not online", device)
}

func (cp *controlPlane) waitUpdate(ctx context.Context, device string, counter uint64, state string) error {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		var us []struct {
			Counter uint64 `json:"counter"`
			State   string `json:"state"`
			Reason  string `json:"reason"`
		}
		if err := cp.do(http.MethodGet, "/api/v1/devices/"+device+"/updates", "", nil, &us); err == nil {
			for _, u := range us {
				if u.Counter == counter && u.State == state {
					return nil
				}
				if u.Counter == counter && (u.State == "rejected" || u.State == "failed" || u.State == "rolled_back") {
					return fmt.Errorf("update %s: %s", u.State, u.Reason)
				}
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("update %d not %s", counter, state)
}
