// Package devcert is the device certificate authority: it issues each
// device a short-lived X.509 certificate whose subject is the device id,
// for a key the device made and kept. The broker then knows a device by
// what it can prove (mutual TLS), not by a secret the control plane handed
// out.
//
// The CA is the built-in one `hangar ca init` makes in the data directory
// (an ECDSA P-256 key that never leaves it), or the operator's own
// certificate and key.
package devcert

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Files of the built-in CA in its directory.
const (
	CertFile = "ca.pem" // the CA certificate: brokers verify device certificates with it
	KeyFile  = "ca.key" // its private key: stays here (0600)
)

// DefaultTTL is the lifetime of a device certificate. Devices renew when a
// third of it is left, so a drone switched off for up to about 20 days
// comes back with a valid certificate; one off for longer re-enrolls
// through the path the operator configured (rekey or approval).
const DefaultTTL = 30 * 24 * time.Hour

// ControlPlaneName is the subject of the certificate the control plane
// itself uses on an external broker. It is not a valid device id (':'),
// so no device certificate can carry it.
const ControlPlaneName = "hangar:control-plane"

// Errors.
var (
	ErrNoCA      = errors.New("no device CA")
	ErrCAExists  = errors.New("a device CA exists already")
	ErrBadCSR    = errors.New("invalid certificate request")
	ErrNotDevice = errors.New("not a device certificate")
)

// CA issues device certificates.
type CA struct {
	Cert *x509.Certificate
	key  crypto.Signer
	pool *x509.CertPool
}

// Pool holds the CA certificate alone: what the broker verifies device
// certificates against.
func (ca *CA) Pool() *x509.CertPool { return ca.pool }

// PEM is the CA certificate, PEM-encoded.
func (ca *CA) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// Init makes a new CA in dir. It refuses to replace one: every device
// certificate chains to it.
func Init(dir string, now time.Time) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, CertFile)); err == nil {
		return nil, fmt.Errorf("%w in %s", ErrCAExists, dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber: Serial(), Subject: pkix.Name{CommonName: "hangar device CA (" + host + ")", Organization: []string{"hangar"}},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(20, 0, 0),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	// The key first: a certificate without its key is a broken CA; a key
	// without a certificate is made again.
	if err := writeFile(filepath.Join(dir, KeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(dir, CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, err
	}
	return Load(dir)
}

// Load reads the CA in dir; ErrNoCA when there is none.
func Load(dir string) (*CA, error) {
	certFile, keyFile := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	if _, err := os.Stat(certFile); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s", ErrNoCA, dir)
	}
	return LoadFiles(certFile, keyFile)
}

// LoadFiles reads a CA certificate and its private key (PKCS#8, SEC 1 or
// PKCS#1 PEM): the operator's own CA.
func LoadFiles(certFile, keyFile string) (*CA, error) {
	cb, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("device CA: %w", err)
	}
	kb, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("device CA: %w", err)
	}
	return Parse(cb, kb)
}

// Parse reads a CA from its PEM certificate and key.
func Parse(certPEM, keyPEM []byte) (*CA, error) {
	blk, _ := pem.Decode(certPEM)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("device CA: the certificate is not a PEM CERTIFICATE")
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("device CA: %w", err)
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("device CA: the certificate is not a CA certificate (basic constraints and certSign)")
	}
	key, err := ParseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("device CA: %w", err)
	}
	if !samePublic(key.Public(), cert.PublicKey) {
		return nil, errors.New("device CA: the key does not belong to the certificate")
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, key: key, pool: pool}, nil
}

// ParseKey reads a PEM private key: PKCS#8, SEC 1 (EC) or PKCS#1 (RSA).
func ParseKey(keyPEM []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(keyPEM)
	if blk == nil {
		return nil, errors.New("the key is not PEM")
	}
	var k any
	var err error
	switch blk.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(blk.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
	default:
		return nil, fmt.Errorf("unsupported key PEM type %q", blk.Type)
	}
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("unsupported key type %T", k)
	}
	return s, nil
}

func samePublic(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

// ParseCSR reads a certificate request (DER, or PEM) and checks its
// signature (proof that the requester holds the key) and its key: ECDSA
// P-256 or P-384, Ed25519, or RSA of 2048 bits or more. Nothing else in it
// is used; the certificate's subject is the control plane's choice.
func ParseCSR(b []byte) (*x509.CertificateRequest, error) {
	if len(b) > proto.MaxCSRSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrBadCSR, len(b), proto.MaxCSRSize)
	}
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != "CERTIFICATE REQUEST" {
			return nil, fmt.Errorf("%w: PEM type %q", ErrBadCSR, blk.Type)
		}
		b = blk.Bytes
	}
	csr, err := x509.ParseCertificateRequest(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrBadCSR, err)
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	return csr, nil
}

func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ECDSA curve %s (want P-256 or P-384)", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("RSA key of %d bits (want 2048 or more)", k.N.BitLen())
		}
	default:
		return fmt.Errorf("key type %T", pub)
	}
	return nil
}

// Fingerprint names a public key: the SHA-256 of its SubjectPublicKeyInfo,
// hex, as an operator compares it with what the device logs.
func Fingerprint(pub any) string { return proto.KeyFingerprint(pub) }

// Issue makes a certificate for device id over the CSR's key, valid from
// a few minutes before now (clock skew) for ttl. It returns the DER
// certificate and its serial (hex).
func (ca *CA) Issue(csr *x509.CertificateRequest, id string, now time.Time, ttl time.Duration) ([]byte, string, error) {
	if err := proto.ValidateDeviceID(id); err != nil {
		return nil, "", err
	}
	return ca.issue(csr.PublicKey, id, now, ttl)
}

// IssueControlPlane makes the control plane's own client certificate for
// an external broker (subject ControlPlaneName).
func (ca *CA) IssueControlPlane(pub crypto.PublicKey, now time.Time, ttl time.Duration) ([]byte, string, error) {
	return ca.issue(pub, ControlPlaneName, now, ttl)
}

func (ca *CA) issue(pub crypto.PublicKey, name string, now time.Time, ttl time.Duration) ([]byte, string, error) {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if err := checkKey(pub); err != nil {
		return nil, "", err
	}
	sn := Serial()
	notAfter := now.Add(ttl)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn, Subject: pkix.Name{CommonName: name, Organization: []string{"hangar"}},
		NotBefore: now.Add(-5 * time.Minute), NotAfter: notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key)
	if err != nil {
		return nil, "", err
	}
	return der, SerialString(sn), nil
}

// CRL is a certificate revocation list of the given serials (hex), for
// brokers that read one (Mosquitto's crlfile).
func (ca *CA) CRL(serials []string, now time.Time, next time.Duration) ([]byte, error) {
	var entries []x509.RevocationListEntry
	for _, s := range serials {
		n, ok := new(big.Int).SetString(s, 16)
		if !ok {
			return nil, fmt.Errorf("serial %q is not hex", s)
		}
		entries = append(entries, x509.RevocationListEntry{SerialNumber: n, RevocationTime: now})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number: big.NewInt(now.UnixMilli()), ThisUpdate: now, NextUpdate: now.Add(next),
		RevokedCertificateEntries: entries,
	}, ca.Cert, ca.key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), nil
}

// DeviceID is the device a verified certificate names: its subject's
// common name, which must be a valid device id and the certificate's only
// name (no other subject attribute smuggles a second one in).
func DeviceID(c *x509.Certificate) (string, error) {
	id := c.Subject.CommonName
	cns := 0
	for _, n := range c.Subject.Names {
		if n.Type.Equal([]int{2, 5, 4, 3}) {
			cns++
		}
	}
	if cns != 1 {
		// Go reads the last CN, OpenSSL (Mosquitto) the first: one only.
		return "", fmt.Errorf("%w: %d common names", ErrNotDevice, cns)
	}
	if err := proto.ValidateDeviceID(id); err != nil {
		return "", fmt.Errorf("%w: %v", ErrNotDevice, err)
	}
	if len(c.DNSNames)+len(c.EmailAddresses)+len(c.IPAddresses)+len(c.URIs) > 0 {
		return "", fmt.Errorf("%w: it has subject alternative names", ErrNotDevice)
	}
	return id, nil
}

// VerifyRenewal checks sig, by the key of a device's current certificate,
// over msg (proto.RenewalSigned): ECDSA over its SHA-256 (ASN.1), Ed25519
// over the message, RSA PKCS #1 v1.5 over its SHA-256.
func VerifyRenewal(pub crypto.PublicKey, msg, sig []byte) error {
	sum := sha256.Sum256(msg)
	ok := false
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, sum[:], sig)
	case ed25519.PublicKey:
		ok = ed25519.Verify(k, msg, sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPKCS1v15(k, crypto.SHA256, sum[:], sig) == nil
	}
	if !ok {
		return errors.New("the current certificate's key did not sign the request")
	}
	return nil
}

// Serial returns a random positive 127-bit serial number.
func Serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n.Add(n, big.NewInt(1))
}

// SerialString is a serial in the form the store keeps: lower-case hex.
func SerialString(n *big.Int) string { return strings.ToLower(n.Text(16)) }

func writeFile(path string, b []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err2 := f.Sync(); err == nil {
		err = err2
	}
	if err2 := f.Close(); err == nil {
		err = err2
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
