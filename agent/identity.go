package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Keys makes and keeps the device's private keys. The default (FileKeys)
// keeps an ECDSA P-256 key in the state directory, readable by the agent
// alone; a TPM or secure element implements the same two calls and stores
// a handle instead of key material.
type Keys interface {
	// New makes a key and returns it with what to store to load it again.
	New() (crypto.Signer, []byte, error)
	// Load turns what New returned back into the key.
	Load(stored []byte) (crypto.Signer, error)
}

// FileKeys are software keys kept as PKCS#8 in the state directory (0600).
type FileKeys struct{}

// New makes an ECDSA P-256 key.
func (FileKeys) New() (crypto.Signer, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return k, der, nil
}

// Load reads a PKCS#8 key.
func (FileKeys) Load(stored []byte) (crypto.Signer, error) {
	k, err := x509.ParsePKCS8PrivateKey(stored)
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("stored key of type %T cannot sign", k)
	}
	return s, nil
}

// Files in the state directory.
const (
	// identityFile holds the device's key and its certificate chain, in
	// one file so that a power cut never leaves a key with another key's
	// certificate.
	identityFile = "identity.pem"
	// enrollKeyFile holds the key an enrollment is made with until its
	// certificate arrives: an enrollment held for approval stays bound to
	// it across restarts.
	enrollKeyFile = "enroll-key.pem"
	keyBlock      = "HANGAR DEVICE KEY" // what Keys.New returned
)

// identity is a key with the certificate the control plane issued for it.
type identity struct {
	key    crypto.Signer
	stored []byte
	leaf   *x509.Certificate
	cert   tls.Certificate
}

// expired reports whether the certificate has run out by the device's
// clock.
func (id *identity) expired(now time.Time) bool { return now.After(id.leaf.NotAfter) }

// renewDue reports whether a third or less of the certificate's life is
// left.
func (id *identity) renewDue(now time.Time) bool {
	life := id.leaf.NotAfter.Sub(id.leaf.NotBefore)
	return !now.Before(id.leaf.NotBefore.Add(life * 2 / 3))
}

// Fingerprint names a public key as the control plane shows it (hangar
// device ls --pending): SHA-256 of its SubjectPublicKeyInfo, hex.
func Fingerprint(pub crypto.PublicKey) string { return proto.KeyFingerprint(pub) }

// newIdentity checks a certificate chain the control plane returned for
// key: the leaf must be for this device and for this key.
func newIdentity(deviceID string, key crypto.Signer, stored []byte, chain [][]byte) (*identity, error) {
	if len(chain) == 0 {
		return nil, errors.New("no certificate")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	if leaf.Subject.CommonName != deviceID {
		return nil, fmt.Errorf("certificate is for %q, not this device", leaf.Subject.CommonName)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(leaf.PublicKey) {
		return nil, errors.New("certificate is for another key")
	}
	return &identity{key: key, stored: stored, leaf: leaf,
		cert: tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}}, nil
}

func (id *identity) marshal() []byte {
	var b bytes.Buffer
	_ = pem.Encode(&b, &pem.Block{Type: keyBlock, Bytes: id.stored})
	for _, c := range id.cert.Certificate {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c})
	}
	return b.Bytes()
}

func (a *Agent) loadIdentity() (*identity, error) {
	b, err := a.store.Load(identityFile)
	if err != nil {
		return nil, err
	}
	var stored []byte
	var chain [][]byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		switch blk.Type {
		case keyBlock:
			stored = blk.Bytes
		case "CERTIFICATE":
			chain = append(chain, blk.Bytes)
		}
	}
	if stored == nil {
		return nil, errors.New("identity file holds no key")
	}
	key, err := a.opts.Keys.Load(stored)
	if err != nil {
		return nil, fmt.Errorf("identity key: %w", err)
	}
	return newIdentity(a.opts.DeviceID, key, stored, chain)
}

// enrollKey is the key this device enrolls with: made once and kept until
// its certificate arrives.
func (a *Agent) enrollKey() (crypto.Signer, []byte, error) {
	if b, err := a.store.Load(enrollKeyFile); err == nil {
		if blk, _ := pem.Decode(b); blk != nil && blk.Type == keyBlock {
			if k, err := a.opts.Keys.Load(blk.Bytes); err == nil {
				return k, blk.Bytes, nil
			}
		}
		a.log.Warn("enrollment key unreadable; making a new one")
	}
	k, stored, err := a.opts.Keys.New()
	if err != nil {
		return nil, nil, fmt.Errorf("new device key: %w", err)
	}
	if err := a.store.Save(enrollKeyFile, pem.EncodeToMemory(&pem.Block{Type: keyBlock, Bytes: stored})); err != nil {
		return nil, nil, err
	}
	return k, stored, nil
}

// csr is a certificate request for key. Its subject is informative: the
// control plane names the certificate itself.
func (a *Agent) csr(key crypto.Signer) ([]byte, error) {
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: a.opts.DeviceID},
	}, key)
}

// saveIdentity makes id the device's identity, durably.
func (a *Agent) saveIdentity(id *identity) error {
	if err := a.store.Save(identityFile, id.marshal()); err != nil {
		return err
	}
	a.mu.Lock()
	a.ident = id
	a.mu.Unlock()
	return nil
}

// clientCertificate is what the agent presents when a TLS server asks:
// its current certificate, or none.
func (a *Agent) clientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	a.mu.Lock()
	id := a.ident
	a.mu.Unlock()
	if id == nil {
		return &tls.Certificate{}, nil
	}
	return &id.cert, nil
}

// renewRetry is how long the agent waits for an answer to a certificate
// request before it asks again; renewAfterRefusal how long after a
// refusal.
const (
	renewRetry        = 10 * time.Minute
	renewAfterRefusal = time.Hour
)

// signRenewal signs msg with the current key: ECDSA and RSA over its
// SHA-256, Ed25519 over the message (devcert.VerifyRenewal).
func signRenewal(key crypto.Signer, msg []byte) ([]byte, error) {
	if _, ok := key.Public().(ed25519.PublicKey); ok {
		return key.Sign(rand.Reader, msg, crypto.Hash(0))
	}
	sum := sha256.Sum256(msg)
	return key.Sign(rand.Reader, sum[:], crypto.SHA256)
}

// invited notes the control plane's invitation to move to a certificate.
func (a *Agent) invited() {
	a.mu.Lock()
	a.renewInvited = true
	a.mu.Unlock()
	select {
	case a.renewNow <- struct{}{}:
	default:
	}
}

// maybeRenew asks for a new certificate over the live connection when a
// third or less of the current one's life is left, or when the device
// still authenticates with a password and the control plane speaks TLS
// (the move to certificates, with no site visit). A new key is made for
// each request; the old one keeps working until the new certificate
// arrives.
func (a *Agent) maybeRenew(ctx context.Context, conn Conn) {
	if a.tls == nil {
		return
	}
	now := a.clk.Now()
	a.mu.Lock()
	id, cred, pending, asked, invited, refused := a.ident, a.cred, a.renewKey, a.renewAsked, a.renewInvited, a.renewRefused
	a.mu.Unlock()
	switch {
	case id != nil && !id.renewDue(now):
		return
	case id == nil && (cred == nil || cred.Password == "" || !invited):
		// A password device asks only when the control plane says it
		// issues certificates (an older one would refuse the topic).
		return
	case pending != nil && now.Sub(asked) < renewRetry && now.After(asked):
		return // an answer may still come
	case !refused.IsZero() && now.Sub(refused) < renewAfterRefusal && now.After(refused):
		return
	}
	key, stored, err := a.opts.Keys.New()
	if err != nil {
		a.log.Warn("certificate renewal: new key", "err", err)
		return
	}
	der, err := a.csr(key)
	if err != nil {
		a.log.Warn("certificate renewal: request", "err", err)
		return
	}
	reqID := fmt.Sprintf("%d-%d", a.boot, now.UnixMilli())
	req := proto.CertRequest{ID: reqID, CSR: der}
	if id != nil {
		// Prove the current certificate: a broker that does not say
		// which certificate a connection used cannot tell a superseded
		// one from it.
		sig, err := signRenewal(id.key, proto.RenewalSigned(der))
		if err != nil {
			a.log.Warn("certificate renewal: signing", "err", err)
			return
		}
		req.Cert, req.Sig = id.leaf.Raw, sig
	}
	body, err := proto.Marshal(&req)
	if err != nil {
		a.log.Warn("certificate renewal: request", "err", err)
		return
	}
	a.mu.Lock()
	a.renewKey, a.renewStored, a.renewID, a.renewAsked = key, stored, reqID, now
	a.mu.Unlock()
	if err := conn.Publish(proto.DeviceTopic(a.opts.DeviceID, proto.KindCSR), body).Wait(ctx); err != nil {
		a.log.Warn("certificate renewal: publish", "err", err)
		return
	}
	if id != nil {
		a.log.Info("asked for a new certificate", "expires", id.leaf.NotAfter.UTC().Format(time.RFC3339), "key", Fingerprint(key.Public()))
	} else {
		a.log.Info("asked for a device certificate to replace the password", "key", Fingerprint(key.Public()))
	}
}

// onCertificate takes the control plane's answer to a certificate request.
func (a *Agent) onCertificate(cmd proto.Command) {
	g := cmd.Cert
	a.mu.Lock()
	key, stored, reqID := a.renewKey, a.renewStored, a.renewID
	a.mu.Unlock()
	if key == nil || g.Request != reqID {
		a.log.Info("certificate for a request this agent no longer waits for; ignored", "request", g.Request)
		return
	}
	if g.Error != "" {
		a.log.Warn("the control plane refused a new certificate; asking again later", "err", g.Error, "in", renewAfterRefusal)
		a.mu.Lock()
		a.renewKey, a.renewRefused = nil, a.clk.Now()
		a.mu.Unlock()
		return
	}
	id, err := newIdentity(a.opts.DeviceID, key, stored, g.Chain)
	if err != nil {
		a.errors.Add(1)
		a.log.Warn("unusable certificate from the control plane", "err", err)
		return
	}
	if err := a.saveIdentity(id); err != nil {
		a.log.Error("saving the new certificate", "err", err)
		return
	}
	a.mu.Lock()
	a.renewKey, a.renewStored, a.renewID = nil, nil, ""
	wasPassword := a.cred != nil && a.cred.Password != ""
	if wasPassword {
		c := *a.cred
		c.Password = ""
		a.cred = &c
	}
	a.mu.Unlock()
	if wasPassword {
		a.saveCredential()
	}
	a.log.Info("new device certificate", "expires", id.leaf.NotAfter.UTC().Format(time.RFC3339))
	// Connect with it now: the control plane retires the previous
	// credential once the device has used the new one.
	select {
	case a.reconnect <- struct{}{}:
	default:
	}
}
