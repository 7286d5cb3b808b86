package proto

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
)

// Key files are PEM: "PRIVATE KEY" (PKCS #8) and "PUBLIC KEY" (PKIX), as
// openssl writes them, so that they can be inspected and generated with
// common tools (openssl genpkey -algorithm ed25519).

// KeyFingerprint names a device's public key: the SHA-256 of its
// SubjectPublicKeyInfo, hex. The agent logs it and the control plane shows
// it (hangar device ls --pending) so that an operator approves the key the
// device holds. "" for a key x509 cannot encode.
func KeyFingerprint(pub any) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// EncodePrivateKey returns the PEM of an Ed25519 private key.
func EncodePrivateKey(k ed25519.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// EncodePublicKey returns the PEM of an Ed25519 public key.
func EncodePublicKey(k ed25519.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParsePrivateKey reads an Ed25519 private key from PEM.
func ParsePrivateKey(data []byte) (ed25519.PrivateKey, error) {
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "PRIVATE KEY" {
		return nil, errors.New("not a PEM private key")
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, err
	}
	ek, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("a %T key, not Ed25519", k)
	}
	return ek, nil
}

// ParsePublicKey reads an Ed25519 public key from PEM, or from the
// standard base64 of its 32 bytes.
func ParsePublicKey(data []byte) (ed25519.PublicKey, error) {
	if b, _ := pem.Decode(data); b != nil {
		if b.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("PEM %q, not a public key", b.Type)
		}
		k, err := x509.ParsePKIXPublicKey(b.Bytes)
		if err != nil {
			return nil, err
		}
		ek, ok := k.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("a %T key, not Ed25519", k)
		}
		return ek, nil
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(data)))
	if err != nil || len(raw) != ed25519.PublicKeySize {
		return nil, errors.New("neither a PEM public key nor the base64 of 32 bytes")
	}
	return ed25519.PublicKey(raw), nil
}
