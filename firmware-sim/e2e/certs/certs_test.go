package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/agent/transport"
	"github.com/hangarfleet/hangar/agent/transport/mqttlite"
	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/internal/freeport"
)

// fleet is a control plane serving TLS with a device CA, on a clock the
// test moves, with agents built on the same clock.
type fleet struct {
	t      *testing.T
	srv    *server.Server
	clk    *clock.Fake
	roots  *tls.Config // trusts the control plane's CA
	data   string      // the data directory
	enroll string
	admin  string
	cancel context.CancelFunc
	done   chan error
}

func logger() *slog.Logger {
	if os.Getenv("HANGAR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func listen(t *testing.T) net.Listener {
	ln, err := freeport.Listen()
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func startFleet(t *testing.T, opts server.Options) *fleet {
	t.Helper()
	data := t.TempDir()
	cfg, err := devca.Ensure(filepath.Join(data, "tls"), nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	pool, err := devca.Pool(filepath.Join(data, "tls", devca.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := devcert.Init(filepath.Join(data, "device-ca"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	f := &fleet{t: t, clk: clock.NewFake(time.Now()), roots: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, data: data, done: make(chan error, 1)}
	opts.DataDir, opts.TLS, opts.DeviceCA, opts.Now, opts.Logger = data, cfg, ca, f.clk.Now, logger()
	opts.HTTPListener, opts.MQTTListener = listen(t), listen(t)
	f.srv, err = server.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	f.enroll, f.admin = f.srv.EnrollToken, f.srv.AdminToken
	var ctx context.Context
	ctx, f.cancel = context.WithCancel(context.Background())
	go func() { f.done <- f.srv.Run(ctx) }()
	t.Cleanup(func() { f.cancel(); <-f.done })
	// Time runs: agents' heartbeats and backoff move with the clock.
	stop := make(chan struct{})
	go func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				f.clk.Advance(50 * time.Millisecond)
			}
		}
	}()
	t.Cleanup(func() { close(stop) })
	return f
}

// device is an agent run by the test.
type device struct {
	*agent.Agent
	id, state string
	cancel    context.CancelFunc
	done      chan struct{}
}

func (f *fleet) start(id, state string) *device {
	f.t.Helper()
	a, err := agent.New(agent.Options{
		DeviceID: id, ServerURL: f.srv.URL(), EnrollToken: f.enroll, StateDir: state, NoSync: true,
		TLS: f.roots, Clock: f.clk, Logger: logger().With("device", id),
		HeartbeatInterval: time.Second, SampleInterval: time.Second, BackoffMin: 100 * time.Millisecond, BackoffMax: 2 * time.Second,
	})
	if err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := &device{Agent: a, id: id, state: state, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(d.done); _ = a.Run(ctx) }()
	f.t.Cleanup(d.stop)
	return d
}

func (d *device) stop() {
	d.cancel()
	<-d.done
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, status := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (last: %s)", timeout, what, status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (f *fleet) device(id string) store.Device {
	d, err := f.srv.Store().Device(context.Background(), id)
	if err != nil {
		return store.Device{}
	}
	return d
}

func (f *fleet) serials(id string) []string {
	a, err := f.srv.Store().DeviceAuth(context.Background(), id)
	if err != nil {
		return nil
	}
	return a.Serials
}

// api calls the REST API as the admin.
func (f *fleet) api(method, path string, body any) (int, string) {
	f.t.Helper()
	var r *bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	} else {
		r = bytes.NewReader(nil)
	}
	req, _ := http.NewRequest(method, f.srv.URL()+path, r)
	req.Header.Set("Authorization", "Bearer "+f.admin)
	req.Header.Set("Content-Type", "application/json")
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: f.roots}}
	resp, err := c.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

// connectWith tries an MQTT connection as id with the identity kept in a
// state directory (as saved earlier), the way a copy of it would.
func (f *fleet) connectWith(identity []byte, id string) error {
	cert, err := tls.X509KeyPair(certPEM(identity), keyPEM(identity))
	if err != nil {
		f.t.Fatal(err)
	}
	cfg := f.roots.Clone()
	cfg.Certificates = []tls.Certificate{cert}
	c, err := (&mqttlite.Transport{}).Connect(context.Background(), transport.ConnectParams{
		URL: "tls://" + f.srv.MQTTAddr(), ClientID: id, Username: id, KeepAlive: 30 * time.Second, TLS: cfg,
		OnMessage: func(string, []byte) {},
	})
	if err == nil {
		c.Close()
	}
	return err
}

// certPEM and keyPEM split an agent's identity file into what
// tls.X509KeyPair reads.
func certPEM(identity []byte) []byte {
	i := bytes.Index(identity, []byte("-----BEGIN CERTIFICATE-----"))
	return identity[i:]
}

func keyPEM(identity []byte) []byte {
	i := bytes.Index(identity, []byte("-----BEGIN CERTIFICATE-----"))
	return bytes.Replace(identity[:i], []byte("HANGAR DEVICE KEY"), []byte("PRIVATE KEY"), 2)
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCertificateLifecycle: a device enrolls with a key it made and gets a
// certificate, never a password; it renews with a third of the
// certificate's life left (the clock moved), over its own connection,
// and the renewed-away certificate stops working once the new one is in
// use. Past expiry and offline, it gets back in only through an
// operator's rekey.
func TestCertificateLifecycle(t *testing.T) {
	f := startFleet(t, server.Options{CertTTL: 30 * 24 * time.Hour})
	state := t.TempDir()
	d := f.start("c-1", state)
	waitFor(t, 30*time.Second, "the device online with a certificate", func() (bool, string) {
		dev := f.device("c-1")
		return dev.Online && dev.Auth == store.AuthCert, fmt.Sprintf("online=%v auth=%q", dev.Online, dev.Auth)
	})
	cred := string(readFile(t, filepath.Join(state, "credential.json")))
	if strings.Contains(cred, "password") {
		t.Fatalf("a device with a certificate keeps a password: %s", cred)
	}
	if _, err := os.Stat(filepath.Join(state, "enroll-key.pem")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("enrollment key left behind: %v", err)
	}
	if st, err := os.Stat(filepath.Join(state, "identity.pem")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("identity file: %v %v", st, err)
	}
	first := readFile(t, filepath.Join(state, "identity.pem"))
	s1 := f.serials("c-1")
	if len(s1) != 1 {
		t.Fatalf("serials %v", s1)
	}
	if auth, _ := f.srv.Store().DeviceAuth(context.Background(), "c-1"); auth.PasswordHash != nil {
		t.Fatal("a certificate device has a password credential")
	}

	// 21 days on: a third of 30 is left, so it renews.
	f.clk.Advance(21 * 24 * time.Hour)
	waitFor(t, 30*time.Second, "a renewed certificate in use", func() (bool, string) {
		s := f.serials("c-1")
		return len(s) == 1 && s[0] != s1[0], fmt.Sprint(s)
	})
	second := readFile(t, filepath.Join(state, "identity.pem"))
	if bytes.Equal(first, second) {
		t.Fatal("the identity file did not change")
	}
	if bytes.Equal(keyPEM(first), keyPEM(second)) {
		t.Error("the renewal kept the old key")
	}
	if err := f.connectWith(first, "c-1"); !errors.Is(err, transport.ErrNotAuthorized) {
		t.Errorf("the renewed-away certificate: %v, want not authorized", err)
	}
	waitFor(t, 10*time.Second, "the device connected", func() (bool, string) { return d.Connected(), "" })
	audit, _ := f.srv.Store().AuditLog(context.Background(), "c-1", 20)
	var actions []string
	for _, a := range audit {
		actions = append(actions, a.Action)
	}
	if !strings.Contains(strings.Join(actions, " "), "device.cert-renewed") {
		t.Errorf("renewal not audited: %v", actions)
	}

	// Switched off for 40 days: past expiry, it is refused at the
	// handshake, and its enrollment is refused as a known device...
	d.stop()
	f.clk.Advance(40 * 24 * time.Hour)
	d = f.start("c-1", state)
	waitFor(t, 30*time.Second, "the expired device's re-enrollment refused", func() (bool, string) {
		audit, _ := f.srv.Store().AuditLog(context.Background(), "c-1", 50)
		for _, a := range audit {
			if a.Action == "device.enroll-refused" {
				return true, ""
			}
		}
		return false, "no refusal yet"
	})
	if d.Connected() {
		t.Fatal("a device past its certificate's expiry connected")
	}
	// ...until an operator lets it enroll again.
	if code, body := f.api("POST", "/api/v1/devices/c-1/rekey", nil); code != 200 {
		t.Fatalf("rekey: %d %s", code, body)
	}
	waitFor(t, 30*time.Second, "the device back with a new certificate", func() (bool, string) {
		s := f.serials("c-1")
		return d.Connected() && len(s) == 1 && s[0] != s1[0], fmt.Sprint(s)
	})
	if err := f.connectWith(second, "c-1"); err == nil {
		t.Error("the expired certificate still connects")
	}
}

// TestEnrollmentApproval: with approval on, a new device waits until an
// operator approves the key it asked with; approving another key fails;
// a second key asking for the same id is refused while the first waits.
func TestEnrollmentApproval(t *testing.T) {
	f := startFleet(t, server.Options{Approval: true})
	state := t.TempDir()
	d := f.start("c-2", state)
	var pending []store.Device
	waitFor(t, 30*time.Second, "the enrollment pending", func() (bool, string) {
		code, body := f.api("GET", "/api/v1/devices?pending=true", nil)
		if code != 200 {
			return false, body
		}
		pending = nil
		_ = json.Unmarshal([]byte(body), &pending)
		return len(pending) == 1 && pending[0].Pending != nil, body
	})
	key := pending[0].Pending.Key
	b, _ := os.ReadFile(filepath.Join(state, "enroll-key.pem"))
	if len(b) == 0 {
		t.Fatal("the agent keeps no enrollment key while it waits")
	}
	if d.Connected() {
		t.Fatal("connected before approval")
	}
	// Someone else with the token asks for the same id with another key.
	other := f.start("c-2", t.TempDir())
	waitFor(t, 30*time.Second, "the second key refused", func() (bool, string) {
		audit, _ := f.srv.Store().AuditLog(context.Background(), "c-2", 50)
		for _, a := range audit {
			if a.Action == "device.enroll-refused" && a.Attrs["key"] != key {
				return true, ""
			}
		}
		return false, "not yet"
	})
	other.stop()
	if code, body := f.api("POST", "/api/v1/devices/c-2/approve", map[string]string{"key": "0123456789abcdef"}); code != 409 {
		t.Fatalf("approving another key: %d %s", code, body)
	}
	if code, body := f.api("POST", "/api/v1/devices/c-2/approve", map[string]string{"key": key[:16]}); code != 200 {
		t.Fatalf("approve: %d %s", code, body)
	}
	waitFor(t, 30*time.Second, "the approved device online with a certificate", func() (bool, string) {
		dev := f.device("c-2")
		return d.Connected() && dev.Auth == store.AuthCert && dev.Pending == nil, fmt.Sprintf("%+v", dev.Pending)
	})
	first := readFile(t, filepath.Join(state, "identity.pem"))
	if fp := agent.Fingerprint(mustLeafKey(t, first)); fp != key {
		t.Fatalf("the device's certificate is for key %s, approved %s", fp, key)
	}

	// The known device asks with a new key (a replaced board, say): held,
	// and its current certificate keeps working until an operator
	// approves the new key; then the old one, still within its validity,
	// stops working.
	k2, stored2, err := agent.FileKeys{}.New()
	if err != nil {
		t.Fatal(err)
	}
	csr := csrPEM(t, k2)
	enroll := func() (int, map[string]any) {
		body, _ := json.Marshal(map[string]any{"enroll_token": f.enroll, "device_id": "c-2", "csr": csr})
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: f.roots}}
		resp, err := c.Post(f.srv.URL()+"/api/v1/enroll", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out
	}
	if code, out := enroll(); code != http.StatusAccepted || out["status"] != "pending" {
		t.Fatalf("a known device's new key: %d %v", code, out)
	}
	if err := f.connectWith(first, "c-2"); err != nil {
		t.Fatalf("the current certificate while a new key waits: %v", err)
	}
	if code, body := f.api("POST", "/api/v1/devices/c-2/approve", map[string]string{"key": agent.Fingerprint(k2.Public())}); code != 200 {
		t.Fatalf("approve the new key: %d %s", code, body)
	}
	code, out := enroll()
	if code != 200 || out["certificate"] == nil {
		t.Fatalf("the approved new key: %d %v", code, out)
	}
	if err := f.connectWith(first, "c-2"); !errors.Is(err, transport.ErrNotAuthorized) {
		t.Fatalf("the replaced certificate, still valid: %v, want not authorized", err)
	}
	der, _ := pemBlocks(out["certificate"].(string))
	if err := f.connectWith(identityPEM(stored2, der), "c-2"); err != nil {
		t.Fatalf("the new certificate: %v", err)
	}
}

func csrPEM(t *testing.T, k crypto.Signer) string {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// pemBlocks returns the first certificate of a PEM chain.
func pemBlocks(chain string) ([]byte, bool) {
	blk, _ := pem.Decode([]byte(chain))
	if blk == nil {
		return nil, false
	}
	return blk.Bytes, true
}

func mustLeafKey(t *testing.T, identity []byte) any {
	t.Helper()
	cert, err := tls.X509KeyPair(certPEM(identity), keyPEM(identity))
	if err != nil {
		t.Fatal(err)
	}
	return cert.Leaf.PublicKey
}

// TestPasswordDeviceMovesToCertificate: a device enrolled with a password
// (before the control plane had a device CA) keeps connecting, asks for a
// certificate over its connection, moves to it, and its password stops
// working. The operator sees who still uses passwords and turns them off
// for the fleet; a device still on its password is then refused.
func TestPasswordDeviceMovesToCertificate(t *testing.T) {
	f := startFleet(t, server.Options{})
	ctx := context.Background()
	if err := f.srv.Store().SetPasswordAuth(ctx, true); err != nil { // as a migrated database has it
		t.Fatal(err)
	}
	// Two devices enrolled as the previous release did: no CSR.
	legacy := func(id string) map[string]any {
		body, _ := json.Marshal(map[string]any{"enroll_token": f.enroll, "device_id": id})
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: f.roots}}
		resp, err := c.Post(f.srv.URL()+"/api/v1/enroll", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var cred map[string]any
		json.NewDecoder(resp.Body).Decode(&cred)
		if pw, _ := cred["password"].(string); resp.StatusCode != 200 || pw == "" || cred["certificate"] != nil {
			t.Fatalf("legacy enrollment: %d %v", resp.StatusCode, cred)
		}
		return cred
	}
	credA, credB := legacy("p-a"), legacy("p-b")
	stateA := t.TempDir()
	b, _ := json.Marshal(map[string]any{"device_id": "p-a", "mqtt_url": credA["mqtt_url"], "username": "p-a", "password": credA["password"]})
	if err := os.WriteFile(filepath.Join(stateA, "credential.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	passwordConnect := func(id string, cred map[string]any) error {
		c, err := (&mqttlite.Transport{}).Connect(ctx, transport.ConnectParams{
			URL: cred["mqtt_url"].(string), ClientID: id, Username: id, Password: cred["password"].(string),
			KeepAlive: 30 * time.Second, TLS: f.roots, OnMessage: func(string, []byte) {},
		})
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := passwordConnect("p-b", credB); err != nil {
		t.Fatalf("legacy password device: %v", err)
	}
	d := f.start("p-a", stateA)
	waitFor(t, 30*time.Second, "the password device on a certificate", func() (bool, string) {
		dev := f.device("p-a")
		return d.Connected() && dev.Auth == store.AuthCert, dev.Auth
	})
	waitFor(t, 10*time.Second, "its password retired", func() (bool, string) {
		a, _ := f.srv.Store().DeviceAuth(ctx, "p-a")
		return a.PasswordHash == nil, "password still there"
	})
	if err := passwordConnect("p-a", credA); err == nil {
		t.Fatal("the retired password still connects")
	}
	if strings.Contains(string(readFile(t, filepath.Join(stateA, "credential.json"))), "password") {
		t.Error("the agent keeps its old password")
	}
	code, body := f.api("GET", "/api/v1/settings/device-passwords", nil)
	if code != 200 || !strings.Contains(body, `"using_passwords":["p-b"]`) || !strings.Contains(body, `"enabled":true`) {
		t.Fatalf("password users: %d %s", code, body)
	}
	if code, body := f.api("PUT", "/api/v1/settings/device-passwords", map[string]bool{"enabled": false}); code != 200 {
		t.Fatalf("passwords off: %d %s", code, body)
	}
	if err := passwordConnect("p-b", credB); !errors.Is(err, transport.ErrNotAuthorized) {
		t.Fatalf("password device with passwords off: %v", err)
	}
	// New enrollments without a CSR are refused too.
	body2, _ := json.Marshal(map[string]any{"enroll_token": f.enroll, "device_id": "p-c"})
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: f.roots}}
	resp, err := c.Post(f.srv.URL()+"/api/v1/enroll", "application/json", bytes.NewReader(body2))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("password enrollment with passwords off: HTTP %d", resp.StatusCode)
	}
}

// TestArtifactDownloadWithCertificate: a device with a certificate (and
// no password) is let through to artifact downloads by its certificate;
// without one, with a superseded one, or with one from another CA it is
// refused.
func TestArtifactDownloadWithCertificate(t *testing.T) {
	f := startFleet(t, server.Options{})
	state := t.TempDir()
	d := f.start("c-9", state)
	waitFor(t, 30*time.Second, "the device online with a certificate", func() (bool, string) {
		return d.Connected() && f.device("c-9").Auth == store.AuthCert, ""
	})
	identity := readFile(t, filepath.Join(state, "identity.pem"))
	other, err := devcert.Init(filepath.Join(t.TempDir(), "other"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	k, stored, _ := agent.FileKeys{}.New()
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	csr, _ := devcert.ParseCSR(der)
	foreignDER, _, _ := other.Issue(csr, "c-9", time.Now(), time.Hour)
	get := func(id []byte) int {
		cfg := f.roots.Clone()
		if id != nil {
			kp, err := tls.X509KeyPair(certPEM(id), keyPEM(id))
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{kp}
		}
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
		resp, err := c.Get(f.srv.URL() + "/api/v1/releases/agent/9.9.9/artifact")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// Past authentication, the release does not exist: 404.
	if code := get(identity); code != http.StatusNotFound {
		t.Errorf("with the device's certificate: HTTP %d, want 404 (authenticated, no such release)", code)
	}
	for name, id := range map[string][]byte{"no certificate": nil, "another CA's": identityPEM(stored, foreignDER)} {
		if code := get(id); code != http.StatusUnauthorized {
			t.Errorf("%s: HTTP %d, want 401", name, code)
		}
	}
	// Revoked: its certificate no longer opens anything.
	if code, body := f.api("DELETE", "/api/v1/devices/c-9", nil); code != http.StatusNoContent {
		t.Fatalf("revoke: %d %s", code, body)
	}
	if code := get(identity); code != http.StatusUnauthorized {
		t.Errorf("a revoked device's certificate: HTTP %d, want 401", code)
	}
}
