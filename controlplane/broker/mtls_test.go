package broker_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
)

// certCreds is a credential store of certificate serials and passwords.
type certCreds struct {
	mu        sync.Mutex
	auth      map[string]store.DeviceAuth
	noted     []string // "id method serial"
	passwords bool
}

func (c *certCreds) DeviceAuth(_ context.Context, id string) (store.DeviceAuth, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.auth[id]
	if !ok {
		return a, store.ErrNotFound
	}
	if a.Revoked {
		return a, store.ErrRevoked
	}
	a.Passwords = c.passwords
	return a, nil
}

func (c *certCreds) NoteAuth(_ context.Context, id, method, serial string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.noted = append(c.noted, id+" "+method+" "+serial)
	return nil
}

// mtlsBroker is an embedded broker verifying device certificates of ca.
type mtlsBroker struct {
	addr  string
	ca    *devcert.CA
	roots *x509.CertPool
	creds *certCreds
	m     *metrics.Metrics
	rec   *recvEmb
}

func startMTLS(t *testing.T, mods ...func(*broker.EmbeddedOptions)) *mtlsBroker {
	t.Helper()
	dir := t.TempDir()
	srvTLS, err := devca.Ensure(filepath.Join(dir, "tls"), nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	roots, err := devca.Pool(filepath.Join(dir, "tls", devca.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := devcert.Init(filepath.Join(dir, "device-ca"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &mtlsBroker{addr: ln.Addr().String(), ca: ca, roots: roots, m: metrics.New(nil), rec: &recvEmb{},
		creds: &certCreds{auth: map[string]store.DeviceAuth{}}}
	opts := broker.EmbeddedOptions{Listener: ln, Credentials: b.creds, Metrics: b.m, TLS: srvTLS, DeviceCAs: ca.Pool()}
	for _, m := range mods {
		m(&opts)
	}
	e, err := broker.NewEmbedded(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(t.Context(), syncHandler(b.rec.handler).async); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return b
}

// cert issues a certificate for name from ca, valid from now for ttl,
// and records its serial for the device unless record is false.
func (b *mtlsBroker) cert(t testing.TB, ca *devcert.CA, id string, now time.Time, ttl time.Duration, record bool) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := devcert.ParseCSR(csrDER)
	if err != nil {
		t.Fatal(err)
	}
	var der []byte
	var serial string
	if id == devcert.ControlPlaneName {
		der, serial, err = ca.IssueControlPlane(key.Public(), now, ttl)
	} else {
		der, serial, err = ca.Issue(csr, id, now, ttl)
	}
	if err != nil {
		t.Fatal(err)
	}
	if record {
		b.creds.mu.Lock()
		a := b.creds.auth[id]
		a.Serials = append(a.Serials, serial)
		b.creds.auth[id] = a
		b.creds.mu.Unlock()
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: crypto.Signer(key)}
}

func (b *mtlsBroker) dial(t *testing.T, clientID, user, pass string, cert *tls.Certificate) (paho.Client, error) {
	t.Helper()
	cfg := &tls.Config{RootCAs: b.roots, ServerName: "127.0.0.1"}
	if cert != nil {
		c := *cert
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }
	}
	o := paho.NewClientOptions().AddBroker("tls://" + b.addr).SetClientID(clientID).SetUsername(user).SetPassword(pass).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetCleanSession(true).SetTLSConfig(cfg).
		SetProtocolVersion(4) // no fallback to 3.1: one attempt, one refusal
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, context.DeadlineExceeded
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

// TestEmbeddedMTLSRefusals: over mutual TLS the broker knows a device by
// its certificate. Without one, with an expired one, one from another CA,
// one for another device, one no longer the device's (renewed or
// re-keyed), or a revoked device's, it refuses.
func TestEmbeddedMTLSRefusals(t *testing.T) {
	b := startMTLS(t)
	now := time.Now()
	other, err := devcert.Init(filepath.Join(t.TempDir(), "other"), now)
	if err != nil {
		t.Fatal(err)
	}
	good := b.cert(t, b.ca, "d1", now, time.Hour, true)
	d2 := b.cert(t, b.ca, "d2", now, time.Hour, true)
	expired := b.cert(t, b.ca, "d1", now.Add(-3*time.Hour), time.Hour, true)
	foreign := b.cert(t, other, "d1", now, time.Hour, true)
	stale := b.cert(t, b.ca, "d1", now, time.Hour, false) // issued, then superseded
	gone := b.cert(t, b.ca, "gone", now, time.Hour, true)
	cpCert := b.cert(t, b.ca, devcert.ControlPlaneName, now, time.Hour, false)
	b.creds.mu.Lock()
	pw := b.creds.auth["d1"]
	pw.PasswordHash = broker.HashPassword("pw1")
	b.creds.auth["d1"] = pw
	g := b.creds.auth["gone"]
	g.Revoked = true
	b.creds.auth["gone"] = g
	b.creds.mu.Unlock()

	cases := []struct {
		name, client, user, pass string
		cert                     *tls.Certificate
		reason                   string // auth failure counted, "" for a handshake failure
	}{
		{"no certificate, no password", "d1", "d1", "", nil, "password_disabled"},
		{"no certificate, right password, passwords off", "d1", "d1", "pw1", nil, "password_disabled"},
		{"certificate of d2 as client id d1", "d1", "d1", "", &d2, "certificate_mismatch"},
		{"certificate of d2 with user name d1", "d2", "d1", "", &d2, "username_mismatch"},
		{"expired certificate", "d1", "d1", "", &expired, ""},
		{"certificate from another CA", "d1", "d1", "", &foreign, ""},
		{"superseded certificate", "d1", "d1", "", &stale, "certificate_superseded"},
		{"revoked device", "gone", "gone", "", &gone, "revoked"},
		{"control plane's certificate as a device", "d1", "d1", "", &cpCert, "bad_certificate"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var before float64
			if c.reason != "" {
				before = testutil.ToFloat64(b.m.AuthFailures.WithLabelValues(c.reason))
			}
			_, err := b.dial(t, c.client, c.user, c.pass, c.cert)
			if err == nil {
				t.Fatal("connection accepted")
			}
			// TLS 1.3 checks the client's certificate after the client's
			// side of the handshake: the refusal is an alert, or the
			// connection closed under the client's first write.
			if s := err.Error(); c.reason == "" && !strings.Contains(s, "certificate") && !strings.Contains(s, "connection reset") &&
				!strings.Contains(s, "broken pipe") && !strings.Contains(s, "EOF") {
				t.Errorf("refused for another reason than the TLS handshake: %v", err)
			}
			if c.reason != "" {
				if after := testutil.ToFloat64(b.m.AuthFailures.WithLabelValues(c.reason)); after != before+1 {
					t.Errorf("refusals for %s: %v -> %v", c.reason, before, after)
				}
			}
		})
	}
	// The device's own certificate works, with or without a user name,
	// and publishes carry its serial.
	for _, user := range []string{"", "d1"} {
		cl, err := b.dial(t, "d1", user, "", &good)
		if err != nil {
			t.Fatalf("good certificate (user %q) refused: %v", user, err)
		}
		if tok := cl.Publish(proto.DeviceTopic("d1", proto.KindEvent), 1, false, "x"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
	}
	b.rec.mu.Lock()
	msgs := append([]broker.Message(nil), b.rec.msgs...)
	b.rec.mu.Unlock()
	leaf, _ := x509.ParseCertificate(good.Certificate[0])
	if len(msgs) != 2 || msgs[0].Serial != devcert.SerialString(leaf.SerialNumber) {
		t.Fatalf("messages %+v: want two with the certificate's serial", msgs)
	}
	b.creds.mu.Lock()
	noted := strings.Join(b.creds.noted, ";")
	b.creds.mu.Unlock()
	// The password it still had is retired by the first certificate
	// connection (asynchronously).
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(noted, "d1 certificate "+devcert.SerialString(leaf.SerialNumber)) {
		if time.Now().After(deadline) {
			t.Fatalf("certificate authentication not recorded: %q", noted)
		}
		time.Sleep(10 * time.Millisecond)
		b.creds.mu.Lock()
		noted = strings.Join(b.creds.noted, ";")
		b.creds.mu.Unlock()
	}

	// With passwords on, the password works again.
	b.creds.mu.Lock()
	b.creds.passwords = true
	b.creds.mu.Unlock()
	if _, err := b.dial(t, "d1", "d1", "pw1", nil); err != nil {
		t.Fatalf("password with passwords on: %v", err)
	}
}

// TestEmbeddedMTLSACL: the ACL matrix holds over mutual TLS: a device's
// certificate reaches its own subtree and nothing else.
func TestEmbeddedMTLSACL(t *testing.T) {
	b := startMTLS(t)
	now := time.Now()
	c1 := b.cert(t, b.ca, "d1", now, time.Hour, true)
	c2 := b.cert(t, b.ca, "d2", now, time.Hour, true)
	certs := map[string]*tls.Certificate{"d1": &c1, "d2": &c2}
	aclMatrix(t, b.rec, func(t *testing.T, id string) (paho.Client, error) { return b.dial(t, id, id, "", certs[id]) })
}

// TestEmbeddedMTLSNotLockedOutByGuesses: bad password logins for a
// device's id spend that id's failed-login budget, but not the device's
// way in with its certificate; the certificate before a renewal works
// until the store retires it.
func TestEmbeddedMTLSNotLockedOutByGuesses(t *testing.T) {
	b := startMTLS(t, func(o *broker.EmbeddedOptions) {
		o.FailedAuthDevice = throttle.New(0.001, 2, 100)
		o.FailedAuthSource = throttle.New(0.001, 2, 100)
	})
	now := time.Now()
	prev := b.cert(t, b.ca, "d1", now, time.Hour, true)
	cur := b.cert(t, b.ca, "d1", now, time.Hour, true) // serials: [prev, cur]
	for range 5 {
		if _, err := b.dial(t, "d1", "d1", "guess", nil); err == nil {
			t.Fatal("a guessed password got in")
		}
	}
	if n := testutil.ToFloat64(b.m.AuthThrottled.WithLabelValues("mqtt_device")) + testutil.ToFloat64(b.m.AuthThrottled.WithLabelValues("mqtt_source")); n == 0 {
		t.Fatal("the guesses were not throttled")
	}
	for name, c := range map[string]*tls.Certificate{"current": &cur, "previous": &prev} {
		if _, err := b.dial(t, "d1", "d1", "", c); err != nil {
			t.Fatalf("the %s certificate after the guesses: %v", name, err)
		}
	}
}
