package devcert

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func csrFor(t testing.TB, key any, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestIssue: the certificate names the device the control plane says,
// whatever the request asked for, is for the request's key, for client
// authentication only, and verifies against the CA.
func TestIssue(t *testing.T) {
	now := time.Now()
	ca, err := Init(filepath.Join(t.TempDir(), "ca"), now)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der := csrFor(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "someone-else"}, DNSNames: []string{"evil.example"}})
	csr, err := ParseCSR(der)
	if err != nil {
		t.Fatal(err)
	}
	cert, serial, err := ca.Issue(csr, "d-1", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(cert)
	if id, err := DeviceID(leaf); err != nil || id != "d-1" {
		t.Fatalf("device id %q %v", id, err)
	}
	if len(leaf.DNSNames) != 0 || !leaf.PublicKey.(*ecdsa.PublicKey).Equal(&key.PublicKey) || SerialString(leaf.SerialNumber) != serial {
		t.Fatalf("certificate %+v", leaf)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: now}); err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, CurrentTime: now}); err == nil {
		t.Error("a device certificate works as a server certificate")
	}
	if _, _, err := ca.Issue(csr, "a/b", now, time.Hour); err == nil {
		t.Error("issued for an invalid device id")
	}
	// Init refuses to replace the CA; Load reads it back.
	dir := filepath.Join(t.TempDir(), "ca2")
	if _, err := Init(dir, now); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(dir, now); !errors.Is(err, ErrCAExists) {
		t.Fatalf("second Init: %v", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "none")); !errors.Is(err, ErrNoCA) {
		t.Fatalf("Load of nothing: %v", err)
	}
}

// TestParseCSRRefuses: weak keys, broken signatures, other PEM types and
// oversized requests are refused.
func TestParseCSRRefuses(t *testing.T) {
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	good, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	broken := csrFor(t, good, nil)
	broken[len(broken)-3] ^= 0xff
	for name, b := range map[string][]byte{
		"RSA 1024":      csrFor(t, small, nil),
		"P-224":         csrFor(t, p224, nil),
		"bad signature": broken,
		"certificate":   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: csrFor(t, good, nil)}),
		"oversized":     append(csrFor(t, good, nil), make([]byte, 8<<10)...),
		"garbage":       []byte("not a request"),
		"empty":         nil,
	} {
		if _, err := ParseCSR(b); !errors.Is(err, ErrBadCSR) {
			t.Errorf("%s: %v", name, err)
		}
	}
	for name, b := range map[string][]byte{
		"P-256 DER": csrFor(t, good, nil),
		"Ed25519":   csrFor(t, ed, nil),
		"P-256 PEM": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrFor(t, good, nil)}),
	} {
		if _, err := ParseCSR(b); err != nil {
			t.Errorf("%s refused: %v", name, err)
		}
	}
}

// FuzzParseCSR: nothing a device sends as a request panics the parser,
// and what it accepts has a key the CA can certify.
func FuzzParseCSR(f *testing.F) {
	good, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	f.Add(csrFor(f, good, nil))
	f.Add(csrFor(f, ed, &x509.CertificateRequest{Subject: pkix.Name{CommonName: strings.Repeat("x", 100)}}))
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrFor(f, good, nil)}))
	ca, err := Init(filepath.Join(f.TempDir(), "ca"), time.Now())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		csr, err := ParseCSR(b)
		if err != nil {
			if !errors.Is(err, ErrBadCSR) {
				t.Fatalf("refusal not marked: %v", err)
			}
			return
		}
		if _, _, err := ca.Issue(csr, "d-1", time.Now(), time.Hour); err != nil {
			t.Fatalf("accepted a request the CA cannot certify: %v", err)
		}
	})
}
