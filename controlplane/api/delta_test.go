package api_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/client"
	"github.com/hangarfleet/hangar/controlplane/delta"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/controlplane/wire"
	"github.com/hangarfleet/hangar/proto"
)

// fakeSender records the commands the API sends.
type fakeSender struct {
	mu   sync.Mutex
	sent []proto.Command
}

var _ api.Sender = (*fakeSender)(nil)

func (f *fakeSender) Send(_ context.Context, _ string, cmd proto.Command, _ bool) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent = append(f.sent, cmd)
	return "c-" + string(rune('0'+len(f.sent))), nil
}

func (f *fakeSender) last() proto.Command {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent[len(f.sent)-1]
}

type deltaEnv struct {
	srv    *httptest.Server
	db     *sqlstore.DB
	c      *client.Client
	admin  string
	send   *fakeSender
	key    ed25519.PrivateKey
	keys   []byte
	old    []byte // the build devices run
	new    []byte // the release's
	patch  []byte
	full   proto.Manifest
	signed []byte // the full manifest
}

func newDeltaEnv(t *testing.T) *deltaEnv {
	t.Helper()
	dir := t.TempDir()
	db := sqlstoretest.Open(t, sqlstore.Options{})
	rootPub, root, _ := ed25519.GenerateKey(rand.Reader)
	relPub, key, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Now()
	keys, err := proto.SignKeyList(root, proto.KeyList{Version: 1, Created: now.Unix(), Expires: now.Add(time.Hour).Unix(),
		Keys: []proto.ReleaseKey{{ID: proto.KeyID(relPub), Public: relPub, Expires: now.Add(time.Hour).Unix()}}})
	if err != nil {
		t.Fatal(err)
	}
	e := &deltaEnv{db: db, admin: api.NewSecret("hga_"), send: &fakeSender{}, key: key, keys: keys}
	db.SetToken(t.Context(), api.TokenAdmin, broker.HashPassword(e.admin), now)
	a := api.New(api.Options{Store: db, Bus: &fakeBus{}, MQTTURL: func(*http.Request) string { return "tcp://broker:1883" },
		Releases: &api.ReleaseOptions{Store: db, Send: e.send, Roots: []ed25519.PublicKey{rootPub}, Dir: filepath.Join(dir, "artifacts")}})
	e.srv = httptest.NewServer(a)
	t.Cleanup(e.srv.Close)
	e.c = client.New(e.srv.URL, e.admin)

	e.old = make([]byte, 64<<10)
	rand.Read(e.old)
	e.new = append(bytes.Clone(e.old[:40<<10]), []byte("the new part of the build")...)
	e.new = append(e.new, e.old[40<<10:]...)
	if e.patch, err = delta.Make(e.old, e.new); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(e.new)
	e.full = proto.Manifest{Version: "2.0.0", Counter: 20, Target: proto.TargetAgent, Hardware: []string{"rev-b"}, Arch: []string{"arm64"},
		Size: uint64(len(e.new)), SHA256: sum[:], Created: now.Unix(), Expires: now.Add(time.Hour).Unix()}
	e.signed = e.sign(t, e.full)
	if _, err := e.c.PushRelease(t.Context(), e.signed, keys, bytes.NewReader(e.new)); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *deltaEnv) sign(t *testing.T, m proto.Manifest) []byte {
	t.Helper()
	b, err := proto.SignManifest(e.key, m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// deltaManifest is the full manifest with the delta of patch from base.
func (e *deltaEnv) deltaManifest(base, patch []byte) proto.Manifest {
	m := e.full
	bs, ps := sha256.Sum256(base), sha256.Sum256(patch)
	m.Delta = &proto.Delta{BaseSHA256: bs[:], BaseSize: uint64(len(base)), PatchSHA256: ps[:], PatchSize: uint64(len(patch)), BaseVersion: "1.9.0"}
	return m
}

func httpStatus(err error) int {
	var ae *client.APIError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

// A delta is pushed to its release, listed with it, and refused when it
// does not match the release, is not a delta, or its patch is not what its
// manifest says.
func TestPushDelta(t *testing.T) {
	e := newDeltaEnv(t)
	ctx := t.Context()
	d, err := e.c.PushDelta(ctx, "agent", "2.0.0", e.sign(t, e.deltaManifest(e.old, e.patch)), bytes.NewReader(e.patch))
	if err != nil {
		t.Fatal(err)
	}
	oldSum, patchSum := sha256.Sum256(e.old), sha256.Sum256(e.patch)
	if d.BaseSHA256 != hex.EncodeToString(oldSum[:]) || d.PatchSHA256 != hex.EncodeToString(patchSum[:]) || d.PatchSize != uint64(len(e.patch)) ||
		d.BaseVersion != "1.9.0" || d.PushedBy != "admin" {
		t.Fatalf("pushed delta %+v", d)
	}
	rel, err := e.c.Release(ctx, "agent", "2.0.0")
	if err != nil || len(rel.Deltas) != 1 || rel.Deltas[0].PatchSHA256 != d.PatchSHA256 {
		t.Fatalf("release %+v %v", rel, err)
	}
	if au, _ := e.db.AuditLog(ctx, "agent@2.0.0", 10); len(au) == 0 || au[0].Action != "release.delta.push" || au[0].Attrs["patch"] != d.PatchSHA256 {
		t.Fatalf("audit %+v", au)
	}

	other := make([]byte, 32<<10)
	rand.Read(other)
	otherPatch, err := delta.Make(other, e.new)
	if err != nil {
		t.Fatal(err)
	}
	corrupt := bytes.Clone(otherPatch)
	corrupt[len(corrupt)-1] ^= 1
	shorter := e.new[:len(e.new)-10] // a patch that makes another build
	shortPatch, err := delta.Make(other, shorter)
	if err != nil {
		t.Fatal(err)
	}
	notPatch := bytes.Repeat([]byte("x"), 100)
	mod := func(f func(m *proto.Manifest)) proto.Manifest {
		m := e.deltaManifest(other, otherPatch)
		f(&m)
		return m
	}
	for _, tc := range []struct {
		name     string
		version  string
		manifest []byte
		patch    []byte
		status   int
		says     string
	}{
		{"same base again", "2.0.0", e.sign(t, e.deltaManifest(e.old, e.patch)), e.patch, http.StatusConflict, "already has a delta"},
		{"no such release", "2.1.0", e.sign(t, mod(func(m *proto.Manifest) { m.Version = "2.1.0" })), otherPatch, http.StatusNotFound, "not found"},
		{"not a delta", "2.0.0", e.signed, e.new, http.StatusUnprocessableEntity, "not a delta manifest"},
		{"other counter", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Counter++ })), otherPatch, http.StatusUnprocessableEntity, "counter"},
		{"other result", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.SHA256 = oldSum[:] })), otherPatch, http.StatusUnprocessableEntity, "result sha256"},
		{"other size", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Size-- })), otherPatch, http.StatusUnprocessableEntity, "result size"},
		{"other hardware", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Hardware = []string{"rev-b", "rev-c"} })), otherPatch, http.StatusUnprocessableEntity, "hardware"},
		{"other arch", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Arch = []string{"arm"} })), otherPatch, http.StatusUnprocessableEntity, "arch"},
		{"other expiry", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Expires++ })), otherPatch, http.StatusUnprocessableEntity, "expiry"},
		{"created at another time", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Created -= 3600 })), otherPatch, http.StatusUnprocessableEntity, "creation time"},
		{"other version", "2.0.0", e.sign(t, mod(func(m *proto.Manifest) { m.Version = "2.0.1" })), otherPatch, http.StatusUnprocessableEntity, "version"},
		{"patch digest", "2.0.0", e.sign(t, e.deltaManifest(other, otherPatch)), corrupt, http.StatusUnprocessableEntity, "patch digest differs"},
		{"patch size", "2.0.0", e.sign(t, e.deltaManifest(other, otherPatch)), otherPatch[:len(otherPatch)-1], http.StatusUnprocessableEntity, "patch has"},
		{"not a patch", "2.0.0", e.sign(t, e.deltaManifest(other, notPatch)), notPatch, http.StatusUnprocessableEntity, "not a BSDIFF40"},
		{"patch of another build", "2.0.0", e.sign(t, e.deltaManifest(other, shortPatch)), shortPatch, http.StatusUnprocessableEntity, "the patch makes"},
		{"unsigned", "2.0.0", []byte("junk"), otherPatch, http.StatusUnprocessableEntity, "release refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.c.PushDelta(ctx, "agent", tc.version, tc.manifest, bytes.NewReader(tc.patch))
			if httpStatus(err) != tc.status || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("got %v, want HTTP %d saying %q", err, tc.status, tc.says)
			}
		})
	}
	if rel, _ := e.c.Release(ctx, "agent", "2.0.0"); len(rel.Deltas) != 1 {
		t.Fatalf("a refused delta was stored: %+v", rel.Deltas)
	}
	// A delta manifest is not a release.
	dm := e.deltaManifest(e.old, e.patch)
	dm.Version, dm.Counter = "3.0.0", 30
	if _, err := e.c.PushRelease(ctx, e.sign(t, dm), e.keys, bytes.NewReader(e.new)); httpStatus(err) != http.StatusUnprocessableEntity ||
		!strings.Contains(err.Error(), "a delta manifest") {
		t.Fatalf("a delta manifest pushed as a release: %v", err)
	}
}

// rawPush posts parts in the given order (name, body) to path.
func rawPush(t *testing.T, e *deltaEnv, path string, parts ...[2][]byte) (int, string) {
	t.Helper()
	var body bytes.Buffer
	w := multipart.NewWriter(&body)
	for _, p := range parts {
		fw, err := w.CreateFormFile(string(p[0]), string(p[0]))
		if err != nil {
			t.Fatal(err)
		}
		fw.Write(p[1])
	}
	w.Close()
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+path, &body)
	req.Header.Set("Content-Type", w.FormDataContentType())
	req.Header.Set("Authorization", "Bearer "+e.admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestPushStoresWhatWasVerified: a manifest or key list sent after the
// artifact (or twice) is refused, by both push routes: what is stored and
// offered must be the manifest the artifact was verified against, not a
// later part (another counter, another hardware, junk).
func TestPushStoresWhatWasVerified(t *testing.T) {
	e := newDeltaEnv(t)
	good := e.sign(t, e.deltaManifest(e.old, e.patch))
	evil := e.deltaManifest(e.old, e.patch)
	evil.Counter, evil.Hardware = 99, []string{"rev-z"}
	for name, parts := range map[string][][2][]byte{
		"manifest after the patch": {{[]byte("manifest"), good}, {[]byte("artifact"), e.patch}, {[]byte("manifest"), e.sign(t, evil)}},
		"junk after the patch":     {{[]byte("manifest"), good}, {[]byte("artifact"), e.patch}, {[]byte("manifest"), []byte("junk")}},
		"two manifests":            {{[]byte("manifest"), e.sign(t, evil)}, {[]byte("manifest"), good}, {[]byte("artifact"), e.patch}},
	} {
		if code, msg := rawPush(t, e, "/api/v1/releases/agent/2.0.0/deltas", parts...); code != http.StatusBadRequest {
			t.Errorf("delta push, %s: HTTP %d %s", name, code, msg)
		}
	}
	if rel, _ := e.c.Release(t.Context(), "agent", "2.0.0"); len(rel.Deltas) != 0 {
		t.Fatalf("stored: %+v", rel.Deltas)
	}
	other := e.full
	other.Version, other.Counter = "2.1.0", 21
	sum := sha256.Sum256(e.old)
	other.Size, other.SHA256 = uint64(len(e.old)), sum[:]
	signed := e.sign(t, other)
	for name, parts := range map[string][][2][]byte{
		"manifest after the artifact": {{[]byte("manifest"), signed}, {[]byte("keys"), e.keys}, {[]byte("artifact"), e.old}, {[]byte("manifest"), e.signed}},
		"keys after the artifact":     {{[]byte("manifest"), signed}, {[]byte("keys"), e.keys}, {[]byte("artifact"), e.old}, {[]byte("keys"), []byte("junk")}},
		"two key lists":               {{[]byte("manifest"), signed}, {[]byte("keys"), []byte("junk")}, {[]byte("keys"), e.keys}, {[]byte("artifact"), e.old}},
	} {
		if code, msg := rawPush(t, e, "/api/v1/releases", parts...); code != http.StatusBadRequest {
			t.Errorf("release push, %s: HTTP %d %s", name, code, msg)
		}
	}
	if _, err := e.c.Release(t.Context(), "agent", "2.1.0"); httpStatus(err) != http.StatusNotFound {
		t.Fatalf("a refused release was stored: %v", err)
	}
	// In order, once each, the same bodies are taken.
	if code, msg := rawPush(t, e, "/api/v1/releases/agent/2.0.0/deltas", [2][]byte{[]byte("manifest"), good}, [2][]byte{[]byte("artifact"), e.patch}); code != http.StatusCreated {
		t.Fatalf("the delta in order: HTTP %d %s", code, msg)
	}
}

// A delta downloads as the artifact does: by its digest, resumable with
// Range and If-Range on the quoted digest.
func TestDeltaDownload(t *testing.T) {
	e := newDeltaEnv(t)
	d, err := e.c.PushDelta(t.Context(), "agent", "2.0.0", e.sign(t, e.deltaManifest(e.old, e.patch)), bytes.NewReader(e.patch))
	if err != nil {
		t.Fatal(err)
	}
	get := func(method, path string, hdr ...string) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, e.srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+e.admin)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	url := store.DeltaURL("agent", "2.0.0", d.PatchSHA256)
	resp, body := get(http.MethodGet, url)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, e.patch) || resp.Header.Get("ETag") != `"`+d.PatchSHA256+`"` {
		t.Fatalf("GET: %d, %d bytes, etag %s", resp.StatusCode, len(body), resp.Header.Get("ETag"))
	}
	resp, _ = get(http.MethodHead, url)
	if resp.StatusCode != http.StatusOK || resp.ContentLength != int64(len(e.patch)) {
		t.Fatalf("HEAD: %d, length %d", resp.StatusCode, resp.ContentLength)
	}
	resp, body = get(http.MethodGet, url, "Range", "bytes=10-", "If-Range", `"`+d.PatchSHA256+`"`)
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, e.patch[10:]) {
		t.Fatalf("resume: %d, %d bytes", resp.StatusCode, len(body))
	}
	resp, body = get(http.MethodGet, url, "Range", "bytes=10-", "If-Range", `"`+strings.Repeat("0", 64)+`"`)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, e.patch) {
		t.Fatalf("resume of another file: %d, %d bytes (want all of it)", resp.StatusCode, len(body))
	}
	if resp, _ := get(http.MethodGet, store.DeltaURL("agent", "2.0.0", strings.Repeat("ab", 32))); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown delta: %d", resp.StatusCode)
	}
	if resp, _ := get(http.MethodGet, store.DeltaURL("agent", "9.9.9", d.PatchSHA256)); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("delta of an unknown release: %d", resp.StatusCode)
	}
}

// An operator's update offers the delta from the build the device
// reports, unless the full artifact is asked for or the device patches
// nothing.
func TestDeviceUpdateOffersDelta(t *testing.T) {
	e := newDeltaEnv(t)
	ctx := t.Context()
	d, err := e.c.PushDelta(ctx, "agent", "2.0.0", e.sign(t, e.deltaManifest(e.old, e.patch)), bytes.NewReader(e.patch))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, id := range []string{"d1", "d2"} {
		if _, err := e.db.Enroll(ctx, store.Enrollment{ID: id, Hardware: "rev-b", CredHash: []byte("h"), Now: now}); err != nil {
			t.Fatal(err)
		}
	}
	oldSum := sha256.Sum256(e.old)
	hello := func(id string, deltas uint64) {
		s := proto.State{Proto: proto.ProtocolVersion, Online: true, Boot: 1, Conn: 1, Version: "1.9.0", Hardware: "rev-b", Arch: "arm64",
			Builds: map[string][]byte{proto.TargetAgent: oldSum[:]}, Deltas: deltas}
		if _, err := e.db.WriteIngest(ctx, []store.IngestItem{{Device: id, Kind: store.IngestState, State: &s, Received: now}}); err != nil {
			t.Fatal(err)
		}
	}
	hello("d1", 1<<20)
	hello("d2", 0) // takes full artifacts only
	update := func(id string, full bool) wire.UpdateResponse {
		t.Helper()
		var resp wire.UpdateResponse
		if err := e.c.Do(ctx, http.MethodPost, "/api/v1/devices/"+id+"/update", nil, wire.UpdateRequest{Release: "2.0.0", Full: full}, &resp); err != nil {
			t.Fatal(err)
		}
		return resp
	}
	resp := update("d1", false)
	offer := e.send.last().Update
	if resp.Delta == nil || resp.Delta.PatchSHA256 != d.PatchSHA256 || resp.Size != d.PatchSize {
		t.Fatalf("response %+v", resp)
	}
	if offer.URL != store.DeltaURL("agent", "2.0.0", d.PatchSHA256) || offer.FullURL != store.ArtifactURL("agent", "2.0.0") ||
		!bytes.Equal(offer.Keys, e.keys) {
		t.Fatalf("delta offer %+v", offer)
	}
	if m, err := proto.DecodeManifestUnverified(offer.Manifest); err != nil || m.Delta == nil {
		t.Fatalf("offered manifest %+v %v", m, err)
	}
	for _, tc := range []struct {
		id   string
		full bool
	}{{"d1", true}, {"d2", false}} {
		resp := update(tc.id, tc.full)
		offer := e.send.last().Update
		if resp.Delta != nil || resp.Size != e.full.Size || offer.URL != store.ArtifactURL("agent", "2.0.0") || offer.FullURL != "" ||
			!bytes.Equal(offer.Manifest, e.signed) {
			t.Fatalf("%s (full %v): response %+v, offer %+v", tc.id, tc.full, resp, offer)
		}
	}
}
