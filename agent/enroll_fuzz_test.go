package agent

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"testing"
	"time"
)

// FuzzEnrollReply: whatever the enrollment endpoint answers (a hostile or
// broken control plane, or someone in between), the agent takes only a
// credential for itself: a certificate for the key it sent, or a password.
func FuzzEnrollReply(f *testing.F) {
	key, stored, err := FileKeys{}.New()
	if err != nil {
		f.Fatal(err)
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert := func(cn string, pub any) string {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, other)
		if err != nil {
			f.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	}
	reply := func(id, certPEM, password string) []byte {
		b, _ := json.Marshal(map[string]string{"device_id": id, "mqtt_url": "tls://cp:8883", "username": id, "certificate": certPEM, "password": password})
		return b
	}
	f.Add(reply("d1", cert("d1", key.Public()), ""))
	f.Add(reply("d1", cert("d2", key.Public()), ""))
	f.Add(reply("d1", cert("d1", &other.PublicKey), ""))
	f.Add(reply("d1", "", "hgd_secret"))
	f.Add(reply("d2", "", "hgd_secret"))
	f.Add([]byte(`{"device_id":"d1","mqtt_url":"tls://x","username":"d1","certificate":"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}`))
	a := &Agent{opts: Options{DeviceID: "d1", Keys: FileKeys{}}}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, id, err := a.parseEnrollReply(data, key, stored)
		if err != nil {
			return
		}
		if r.DeviceID != "d1" || r.MQTTURL == "" || r.Username == "" {
			t.Fatalf("accepted a credential for someone else: %+v", r.Credential)
		}
		switch {
		case id != nil:
			if id.leaf.Subject.CommonName != "d1" || !key.Public().(*ecdsa.PublicKey).Equal(id.leaf.PublicKey) {
				t.Fatalf("accepted a certificate for %q / another key", id.leaf.Subject.CommonName)
			}
			if r.Password != "" {
				t.Fatal("kept a password beside a certificate")
			}
		case r.Password == "":
			t.Fatal("accepted a reply with neither a certificate nor a password")
		}
	})
}

// TestCallersHTTPClientPresentsCertificate: a client the caller passes
// (the simulator's, with its own dialer) presents the device certificate
// like the agent's own, so downloads authenticate.
func TestCallersHTTPClientPresentsCertificate(t *testing.T) {
	base := &tls.Config{}
	a, err := New(Options{DeviceID: "d1", StateDir: t.TempDir(), NoSync: true, TLS: base,
		HTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: base}}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.box.Close()
	tr := a.opts.HTTPClient.Transport.(*http.Transport)
	if tr.TLSClientConfig.GetClientCertificate == nil {
		t.Fatal("the caller's HTTP client presents no certificate")
	}
	if base.GetClientCertificate != nil {
		t.Fatal("the caller's TLS configuration was changed")
	}
}
