// Package devca makes the development certificate authority of `hangar
// serve --tls-dev`: a CA and a server certificate for this machine, kept
// in the data directory, so that a first run speaks TLS without anyone
// buying or issuing a certificate. Production uses --tls-cert/--tls-key.
package devca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Files in the directory Ensure is given.
const (
	CAFile   = "ca.pem"     // hand it to agents (--ca-file) and clients
	caKey    = "ca.key"     // stays here
	CertFile = "server.pem" // the server's chain: its certificate, then the CA's
	KeyFile  = "server.key"
)

// Ensure returns a TLS configuration for a server named hosts (and
// localhost, 127.0.0.1, ::1), from the CA and certificate in dir, making
// what is missing; a server certificate within 30 days of expiry, or not
// naming every host, is made again with the same CA.
func Ensure(dir string, hosts []string, now time.Time) (*tls.Config, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ca, caPriv, err := loadOrMakeCA(dir, now)
	if err != nil {
		return nil, err
	}
	names := append([]string{"localhost", "127.0.0.1", "::1"}, hosts...)
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile))
	if err != nil || !fits(cert, names, now) {
		if err := makeServer(dir, ca, caPriv, names, now); err != nil {
			return nil, err
		}
		if cert, err = tls.LoadX509KeyPair(filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)); err != nil {
			return nil, err
		}
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

func fits(c tls.Certificate, names []string, now time.Time) bool {
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil || now.Add(30*24*time.Hour).After(leaf.NotAfter) {
		return false
	}
	for _, n := range names {
		if leaf.VerifyHostname(n) != nil {
			return false
		}
	}
	return true
}

func loadOrMakeCA(dir string, now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err1 := os.ReadFile(filepath.Join(dir, CAFile))
	keyPEM, err2 := os.ReadFile(filepath.Join(dir, caKey))
	if err1 == nil && err2 == nil {
		cb, _ := pem.Decode(certPEM)
		kb, _ := pem.Decode(keyPEM)
		if cb == nil || kb == nil {
			return nil, nil, fmt.Errorf("development CA in %s: not PEM", dir)
		}
		cert, err := x509.ParseCertificate(cb.Bytes)
		if err != nil {
			return nil, nil, err
		}
		key, err := x509.ParseECPrivateKey(kb.Bytes)
		if err != nil {
			return nil, nil, err
		}
		return cert, key, nil
	}
	if !errors.Is(err1, os.ErrNotExist) && err1 != nil {
		return nil, nil, err1
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "hangar development CA (" + host + ")"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	if err := write(filepath.Join(dir, caKey), "EC PRIVATE KEY", kder, 0o600); err != nil {
		return nil, nil, err
	}
	if err := write(filepath.Join(dir, CAFile), "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

func makeServer(dir string, ca *x509.Certificate, caPriv *ecdsa.PrivateKey, names []string, now time.Time) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: names[0]},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caPriv)
	if err != nil {
		return err
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	if err := write(filepath.Join(dir, KeyFile), "EC PRIVATE KEY", kder, 0o600); err != nil {
		return err
	}
	chain := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw})...)
	return os.WriteFile(filepath.Join(dir, CertFile), chain, 0o644)
}

func write(path, typ string, der []byte, perm os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), perm)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// Pool reads a PEM file of CA certificates (what agents and clients pin).
func Pool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return p, nil
}

// IssueServer makes a server certificate for names (a broker's host) from
// the development CA in dir, made if missing: the chain (certificate,
// then the CA's) and the key, PEM. Agents that pin the CA trust it.
func IssueServer(dir string, names []string, now time.Time) (chain, key []byte, err error) {
	if len(names) == 0 {
		return nil, nil, errors.New("no server name")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	ca, caPriv, err := loadOrMakeCA(dir, now)
	if err != nil {
		return nil, nil, err
	}
	tmp, err := os.MkdirTemp("", "hangar-server-cert")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(tmp)
	if err := makeServer(tmp, ca, caPriv, names, now); err != nil {
		return nil, nil, err
	}
	if chain, err = os.ReadFile(filepath.Join(tmp, CertFile)); err != nil {
		return nil, nil, err
	}
	key, err = os.ReadFile(filepath.Join(tmp, KeyFile))
	return chain, key, err
}
