package update

// The harness of the malicious release server tests: an in-process HTTP
// server (loopback) that serves artifacts and misbehaves on demand, and a
// rig that builds an Updater over a real state directory with the real
// Binary installer on a temporary directory (its smoke run and its exec
// replaced by recorders), so that every test can assert that the installed
// binary is still the old one, byte for byte.

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/agent/statedir"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

var (
	// hostileNow is the device's clock in these tests: an hour after the
	// fixtures were signed, well inside their validity.
	hostileNow = time.UnixMilli(prototest.Base).Add(time.Hour)
	// hostileBuild is the running agent's build time.
	hostileBuild = time.UnixMilli(prototest.Base).Add(-24 * time.Hour)
)

const (
	hostileWait       = 10 * time.Second // deadline of every wait on a condition
	hostileHardware   = "rev-b"
	hostileArch       = "arm64"
	hostileOldVersion = "1.4.2"
)

// hostilePayload returns n deterministic pseudo-random bytes.
func hostilePayload(seed byte, n int) []byte {
	var s [32]byte
	s[0] = seed
	b := make([]byte, n)
	rand.NewChaCha8(s).Read(b)
	return b
}

func hostileETag(data []byte) string {
	sum := sha256.Sum256(data)
	return `"` + hex.EncodeToString(sum[:]) + `"`
}

// --- clock ---------------------------------------------------------------

// hostileClock reads a time the test sets, while its timers and tickers run
// in real time scaled down 100 times (the updater's one-second ticker ticks
// every 10 ms): the tests wait on conditions, never on the clock.
type hostileClock struct {
	mu  sync.Mutex
	now time.Time
}

var _ clock.Clock = (*hostileClock)(nil)

func (c *hostileClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *hostileClock) Set(t time.Time) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}

func (c *hostileClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func hostileScaled(d time.Duration) time.Duration { return max(d/100, time.Millisecond) }

func (c *hostileClock) NewTimer(d time.Duration) clock.Timer {
	return clock.Real{}.NewTimer(hostileScaled(d))
}
func (c *hostileClock) NewTicker(d time.Duration) clock.Ticker {
	return clock.Real{}.NewTicker(hostileScaled(d))
}
func (c *hostileClock) AfterFunc(d time.Duration, f func()) clock.Timer {
	return clock.Real{}.AfterFunc(hostileScaled(d), f)
}

// --- the malicious release server -----------------------------------------

// hostileServer serves artifacts by path, each with its own behaviour, and
// counts requests and the bytes it managed to send.
type hostileServer struct {
	*httptest.Server
	quit chan struct{} // closed at cleanup: stalling handlers return

	mu     sync.Mutex
	routes map[string]http.HandlerFunc
	hits   map[string]int
	ranges map[string][]string // Range headers received, by path
	sent   atomic.Int64
	active atomic.Int64 // handlers running
}

func newHostileServer(t *testing.T) *hostileServer {
	s := &hostileServer{quit: make(chan struct{}), routes: map[string]http.HandlerFunc{}, hits: map[string]int{}, ranges: map[string][]string{}}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	t.Cleanup(func() { close(s.quit) }) // runs first: stalled handlers end before Close waits for them
	return s
}

func (s *hostileServer) serve(w http.ResponseWriter, r *http.Request) {
	s.active.Add(1)
	defer s.active.Add(-1)
	s.mu.Lock()
	h := s.routes[r.URL.Path]
	s.hits[r.URL.Path]++
	s.ranges[r.URL.Path] = append(s.ranges[r.URL.Path], r.Header.Get("Range"))
	s.mu.Unlock()
	if h == nil {
		http.NotFound(w, r)
		return
	}
	h(&hostileCounting{ResponseWriter: w, n: &s.sent}, r)
}

func (s *hostileServer) route(path string, h http.HandlerFunc) {
	s.mu.Lock()
	s.routes[path] = h
	s.mu.Unlock()
}

func (s *hostileServer) hitsOf(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[path]
}

func (s *hostileServer) totalHits() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, h := range s.hits {
		n += h
	}
	return n
}

type hostileCounting struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c *hostileCounting) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *hostileCounting) Flush() { http.NewResponseController(c.ResponseWriter).Flush() }

// hostileHonest serves data as the control plane does: ETag, Range, If-Range.
func hostileHonest(data []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", hostileETag(data))
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}
}

// hostileEndless sends prefix and then junk forever (chunked, no length), up
// to limit bytes, stopping when the client goes away.
func hostileEndless(prefix []byte, limit int64) http.HandlerFunc {
	junk := hostilePayload(0xEE, 32<<10)
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.WriteHeader(http.StatusOK)
		sent := int64(0)
		if n, err := w.Write(prefix); err != nil {
			return
		} else {
			sent += int64(n)
		}
		for sent < limit && r.Context().Err() == nil {
			n, err := w.Write(junk)
			sent += int64(n)
			if err != nil {
				return
			}
		}
	}
}

// hostileCut ignores Range, declares the whole length and sends only the first
// n bytes before dropping the connection.
func hostileCut(data []byte, n int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(http.StatusOK)
		w.Write(data[:n])
		w.(http.Flusher).Flush()
		// Returning short of the declared length makes the server close the
		// connection: the client sees an unexpected EOF.
	}
}

// hostileChunks honours Range (and If-Range), but every response stops after
// chunk bytes and the connection drops: the client must resume.
func hostileChunks(data []byte, chunk int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := 0
		etag := hostileETag(data)
		w.Header().Set("ETag", etag)
		if rg := r.Header.Get("Range"); rg != "" && (r.Header.Get("If-Range") == "" || r.Header.Get("If-Range") == etag) {
			v, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(rg, "bytes="), "-"))
			if err != nil || v >= len(data) {
				w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
				return
			}
			start = v
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(data)-1, len(data)))
			w.Header().Set("Content-Length", strconv.Itoa(len(data)-start))
			w.WriteHeader(http.StatusPartialContent)
		} else {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.WriteHeader(http.StatusOK)
		}
		w.Write(data[start:min(start+chunk, len(data))])
		w.(http.Flusher).Flush()
	}
}

// serveThenStall sends data (chunked, no length) and then holds the
// connection open without another byte until the client leaves.
func (s *hostileServer) serveThenStall(data []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		w.Write(data)
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-s.quit:
		}
	}
}

// --- installer recorder ------------------------------------------------------

// hostileInstaller is the real Binary installer with every call recorded.
type hostileInstaller struct {
	*Binary

	mu        sync.Mutex
	installs  [][]byte // the artifact's bytes as Install saw them
	activates int
	commits   int
	rollbacks int
	execs     []string // argv0 of every exec the Binary asked for
}

var _ Installer = (*hostileInstaller)(nil)

func (r *hostileInstaller) Install(ctx context.Context, m proto.Manifest, artifact string) error {
	b, _ := os.ReadFile(artifact)
	r.mu.Lock()
	r.installs = append(r.installs, b)
	r.mu.Unlock()
	return r.Binary.Install(ctx, m, artifact)
}

func (r *hostileInstaller) Activate(ctx context.Context, m proto.Manifest) error {
	r.mu.Lock()
	r.activates++
	r.mu.Unlock()
	return r.Binary.Activate(ctx, m)
}

func (r *hostileInstaller) Commit(ctx context.Context, m proto.Manifest) error {
	r.mu.Lock()
	r.commits++
	r.mu.Unlock()
	return r.Binary.Commit(ctx, m)
}

func (r *hostileInstaller) Rollback(ctx context.Context, m proto.Manifest) error {
	r.mu.Lock()
	r.rollbacks++
	r.mu.Unlock()
	return r.Binary.Rollback(ctx, m)
}

// reset forgets the calls so far (after a legitimate install).
func (r *hostileInstaller) reset() {
	r.mu.Lock()
	r.installs, r.activates, r.commits, r.rollbacks, r.execs = nil, 0, 0, 0, nil
	r.mu.Unlock()
}

func (r *hostileInstaller) calls() (installs [][]byte, activates, commits, rollbacks int, execs []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.installs...), r.activates, r.commits, r.rollbacks, append([]string(nil), r.execs...)
}

// --- reports -------------------------------------------------------------

type hostileReport struct {
	proto.UpdateReport
	Cmd string
}

func (s hostileReport) String() string {
	return fmt.Sprintf("%s %s v%s #%d check=%q reason=%q", s.Cmd, s.State, s.Version, s.Counter, s.Check, s.Reason)
}

type hostileReports struct {
	mu      sync.Mutex
	list    []hostileReport
	changed chan struct{}
}

func newHostileReports() *hostileReports { return &hostileReports{changed: make(chan struct{})} }

func (l *hostileReports) add(r proto.UpdateReport, cmd string) {
	l.mu.Lock()
	l.list = append(l.list, hostileReport{r, cmd})
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

func (l *hostileReports) all() []hostileReport {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]hostileReport(nil), l.list...)
}

func (l *hostileReports) forCmd(cmd string) []hostileReport {
	var out []hostileReport
	for _, r := range l.all() {
		if r.Cmd == cmd {
			out = append(out, r)
		}
	}
	return out
}

// find returns the first report matching pred.
func (l *hostileReports) find(pred func(hostileReport) bool) (hostileReport, bool) {
	for _, r := range l.all() {
		if pred(r) {
			return r, true
		}
	}
	return hostileReport{}, false
}

// wait returns the first report matching pred, waiting for it until the
// deadline.
func (l *hostileReports) wait(t *testing.T, what string, pred func(hostileReport) bool) hostileReport {
	t.Helper()
	deadline := time.NewTimer(hostileWait)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		ch := l.changed
		for _, r := range l.list {
			if pred(r) {
				l.mu.Unlock()
				return r
			}
		}
		l.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("no report %s within %v; reports:\n%s", what, hostileWait, l.dump())
		}
	}
}

// waitState waits for a report of cmd in state st.
func (l *hostileReports) waitState(t *testing.T, cmd string, st proto.UpdateState) hostileReport {
	t.Helper()
	return l.wait(t, fmt.Sprintf("%q for %s", st, cmd), func(r hostileReport) bool { return r.Cmd == cmd && r.State == st })
}

func (l *hostileReports) dump() string {
	var b strings.Builder
	for _, r := range l.all() {
		fmt.Fprintf(&b, "  %s\n", r)
	}
	return b.String()
}

// waitFor polls cond (for conditions that no report announces) until the
// deadline.
func hostileWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hostileWait)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", hostileWait, what)
		}
		<-tick.C
	}
}

// --- signed releases -----------------------------------------------------

type hostileRelease struct {
	m      proto.Manifest
	data   []byte
	signed []byte
	path   string // on the hostile server
}

func hostileSignKeys(t *testing.T, root ed25519.PrivateKey, k proto.KeyList) []byte {
	t.Helper()
	b, err := proto.SignKeyList(root, k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func hostileKeys(t *testing.T) []byte {
	return hostileSignKeys(t, prototest.RootKey, prototest.KeyList())
}

func hostileSignManifest(t *testing.T, key ed25519.PrivateKey, m proto.Manifest) []byte {
	t.Helper()
	b, err := proto.SignManifest(key, m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newRelease is a hostileRelease of data with the given counter and version,
// signed by the release key, after mods are applied to its manifest.
func newHostileRelease(t *testing.T, counter uint64, version string, data []byte, mods ...func(*proto.Manifest)) hostileRelease {
	t.Helper()
	m := prototest.Manifest(data)
	m.Counter, m.Version = counter, version
	for _, f := range mods {
		f(&m)
	}
	return hostileRelease{m: m, data: data, signed: hostileSignManifest(t, prototest.ReleaseKey, m), path: fmt.Sprintf("/artifact/%d-%s", counter, version)}
}

func hostileCmd(id string, manifest, keys []byte, url string) proto.Command {
	return proto.Command{ID: id, Kind: proto.CmdUpdate, Issued: prototest.Base, Rollout: "r-hostile",
		Update: &proto.UpdateOffer{Manifest: manifest, Keys: keys, URL: url}}
}

// --- the rig -------------------------------------------------------------

type hostileRig struct {
	t       *testing.T
	srv     *hostileServer
	clk     *hostileClock
	rep     *hostileReports
	store   *statedir.Dir
	bin     *Binary
	inst    *hostileInstaller
	binPath string
	oldBin  []byte // the installed binary before any attack
	counter uint64 // the agent release the updater records as installed
	opts    Options
	keys    []byte // the root-signed key list of the fixtures

	u      *Updater
	cancel context.CancelFunc
	done   chan error
}

// newHostileRig builds an updater that trusts prototest.RootKey, on rev-b arm64,
// and starts its Run loop; mods adjust its options first.
func newHostileRig(t *testing.T, mods ...func(*Options)) *hostileRig {
	t.Helper()
	dir := t.TempDir()
	r := &hostileRig{t: t, srv: newHostileServer(t), clk: &hostileClock{now: hostileNow}, rep: newHostileReports(), keys: hostileKeys(t)}
	var err error
	if r.store, err = statedir.Open(filepath.Join(dir, "state"), true); err != nil {
		t.Fatal(err)
	}
	r.binPath = filepath.Join(dir, "bin", "hangar-agent")
	if err := os.MkdirAll(filepath.Dir(r.binPath), 0o755); err != nil {
		t.Fatal(err)
	}
	r.oldBin = append([]byte("hangar-agent "+hostileOldVersion+"\n"), hostilePayload(0x01, 32<<10)...)
	if err := os.WriteFile(r.binPath, r.oldBin, 0o755); err != nil {
		t.Fatal(err)
	}
	r.inst = &hostileInstaller{}
	r.bin = &Binary{
		Path: r.binPath, Version: hostileOldVersion, Args: []string{r.binPath}, Env: []string{},
		Smoke: func(ctx context.Context, path, version string) error { return nil },
	}
	r.bin.exec = func(argv0 string, argv, env []string) error {
		r.inst.mu.Lock()
		r.inst.execs = append(r.inst.execs, argv0)
		r.inst.mu.Unlock()
		return nil
	}
	r.inst.Binary = r.bin
	r.opts = Options{
		Roots:      []ed25519.PublicKey{prototest.RootKey.Public().(ed25519.PublicKey)},
		Hardware:   hostileHardware,
		Arch:       hostileArch,
		BuildTime:  hostileBuild,
		Store:      r.store,
		Dir:        filepath.Join(dir, "state", "staging"),
		Clock:      r.clk,
		BaseURL:    r.srv.URL,
		Installers: map[string]Installer{proto.TargetAgent: r.inst},
		Report:     r.rep.add,
		Policy:     Policy{AllowUnknownFlight: true},
		RetryMin:   time.Millisecond,
		RetryMax:   5 * time.Millisecond,
	}
	for _, f := range mods {
		f(&r.opts)
	}
	if r.u, err = New(r.opts); err != nil {
		t.Fatal(err)
	}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *hostileRig) start() {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan error, 1)
	u := r.u
	go func() { r.done <- u.Run(ctx) }()
}

// stop ends the Run loop and waits for it.
func (r *hostileRig) stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			r.t.Errorf("Run: %v", err)
		}
	case <-time.After(hostileWait):
		r.t.Errorf("Run did not return within %v of its context's end", hostileWait)
	}
	r.cancel = nil
}

// restart is an agent restart: a new Updater over the same state directory,
// booted, running build runningVersion.
func (r *hostileRig) restart(runningVersion string) {
	r.t.Helper()
	r.stop()
	r.bin.Version = runningVersion
	u, err := New(r.opts)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := u.Boot(context.Background()); err != nil {
		r.t.Fatalf("Boot: %v", err)
	}
	r.u = u
	r.start()
}

// rebase makes the current binary the reference of assertNotInstalled,
// after a legitimate install of counter.
func (r *hostileRig) rebase(counter uint64) {
	r.t.Helper()
	b, err := os.ReadFile(r.binPath)
	if err != nil {
		r.t.Fatal(err)
	}
	r.oldBin, r.counter = b, counter
	r.inst.reset()
}

func (r *hostileRig) offer(id string, rel hostileRelease, keys []byte) error {
	return r.u.Offer(hostileCmd(id, rel.signed, keys, rel.path))
}

func (r *hostileRig) stateFile() []byte {
	b, err := r.store.Load(stateFile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		r.t.Fatal(err)
	}
	return b
}

func (r *hostileRig) stagedFiles() []string {
	entries, _ := os.ReadDir(r.opts.Dir)
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// assertRejected checks that cmd was reported rejected by check (for the
// clock check: deferred, as the device waits for a trustworthy clock).
func (r *hostileRig) assertRejected(cmd string, check proto.Check) {
	r.t.Helper()
	want := proto.UpdateRejected
	if check == proto.CheckClock {
		want = proto.UpdateDeferred
	}
	rep, ok := r.rep.find(func(s hostileReport) bool { return s.Cmd == cmd && s.State == want })
	if !ok {
		r.t.Errorf("%s: no %s report; reports:\n%s", cmd, want, r.rep.dump())
		return
	}
	if rep.Check != string(check) {
		r.t.Errorf("%s: rejected with check %q, want %q (reason %q)", cmd, rep.Check, check, rep.Reason)
	}
}

// assertAddressed checks that every report of cmd is filed under the
// release its manifest names (target and counter, even when the manifest
// failed verification): the control plane matches reports to a rollout by
// target and counter, and an unaddressed refusal looks like silence until
// the rollout's device timeout. Each report must also give a reason when
// it refuses or defers.
func (r *hostileRig) assertAddressed(cmd string, manifest []byte) {
	r.t.Helper()
	claimed, err := proto.DecodeManifestUnverified(manifest)
	reps := r.rep.forCmd(cmd)
	if len(reps) == 0 {
		r.t.Errorf("%s: no report", cmd)
	}
	for _, rep := range reps {
		if err == nil && (rep.Target != claimed.Target || rep.Counter != claimed.Counter || rep.Version != claimed.Version) {
			r.t.Errorf("%s: reported %s under %s #%d, want the offered %s %s #%d", cmd, rep, rep.Target, rep.Counter, claimed.Target, claimed.Version, claimed.Counter)
		}
		if rep.Rollout != "r-hostile" {
			r.t.Errorf("%s: reported %s for rollout %q, want the offer's", cmd, rep, rep.Rollout)
		}
		switch rep.State {
		case proto.UpdateRejected, proto.UpdateFailed, proto.UpdateDeferred:
			if rep.Reason == "" {
				r.t.Errorf("%s: reported %s without a reason", cmd, rep)
			}
		}
	}
}

// assertNotInstalled checks that nothing was installed: Install, Activate
// and exec never called, the binary unchanged byte for byte, no sibling
// left beside it, nothing reported as installing, on trial or committed
// for cmd (and no other state in forbidden).
func (r *hostileRig) assertNotInstalled(cmd string, forbidden ...proto.UpdateState) {
	r.t.Helper()
	installs, activates, commits, rollbacks, execs := r.inst.calls()
	if len(installs) != 0 || activates != 0 || commits != 0 || rollbacks != 0 || len(execs) != 0 {
		r.t.Errorf("%s: installer called: %d installs, %d activates, %d commits, %d rollbacks, execs %v", cmd, len(installs), activates, commits, rollbacks, execs)
	}
	got, err := os.ReadFile(r.binPath)
	if err != nil || !bytes.Equal(got, r.oldBin) {
		r.t.Errorf("%s: the installed binary changed (%d bytes, want the old %d bytes; err %v)", cmd, len(got), len(r.oldBin), err)
	}
	_, next, prev := siblings(r.binPath)
	for _, p := range []string{next, prev} {
		if _, err := os.Stat(p); err == nil {
			r.t.Errorf("%s: %s left beside the binary", cmd, p)
		}
	}
	forbidden = append(forbidden, proto.UpdateTrial, proto.UpdateCommitted, proto.UpdateRolledBack)
	for _, rep := range r.rep.forCmd(cmd) {
		for _, f := range forbidden {
			if rep.State == f {
				r.t.Errorf("%s: reported %s", cmd, rep)
			}
		}
	}
	if c := r.u.AgentCounter(); c != r.counter {
		r.t.Errorf("%s: the updater records agent release %d as installed, want %d", cmd, c, r.counter)
	}
}

// newLockedRig is a rig whose device is in a maintenance lock (offers are
// deferred until the lock file is removed); it returns the lock's path.
func newLockedRig(t *testing.T) (*hostileRig, string) {
	t.Helper()
	lock := filepath.Join(t.TempDir(), "maintenance.lock")
	if err := os.WriteFile(lock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return newHostileRig(t, func(o *Options) { o.Policy.LockFile = lock }), lock
}
