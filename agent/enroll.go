package agent

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Credential is what enrollment returns and the agent keeps (0600) in its
// state directory.
type Credential struct {
	DeviceID string `json:"device_id"`
	MQTTURL  string `json:"mqtt_url"`
	Username string `json:"username"`
	// Password is set for a device that authenticates with one; a device
	// with a certificate keeps it (and its key) in identity.pem.
	Password string `json:"password,omitempty"`
}

// enrollReply is the control plane's answer to an enrollment.
type enrollReply struct {
	Credential
	Certificate string `json:"certificate,omitempty"` // PEM chain, the device's first
	Status      string `json:"status,omitempty"`      // "pending": held for an operator's approval
	Key         string `json:"key,omitempty"`         // fingerprint of the key waiting for approval
}

const credentialFile = "credential.json"

func loadCredential(s Store) (*Credential, error) {
	b, err := s.Load(credentialFile)
	if err != nil {
		return nil, err
	}
	var c Credential
	if err := json.Unmarshal(b, &c); err != nil || c.Username == "" || c.MQTTURL == "" {
		return nil, fmt.Errorf("credential file unreadable: %v", err)
	}
	return &c, nil
}

// ErrRevoked is returned by enrollment when the control plane refuses the
// device for good (an operator revoked it).
var ErrRevoked = errors.New("device revoked by the control plane")

// ErrAlreadyEnrolled is returned by enrollment when the device id has a
// credential already: the control plane never re-keys it on the fleet
// token's word; an operator must allow it (hangar device rekey).
var ErrAlreadyEnrolled = errors.New("device already enrolled; an operator must allow it to enroll again")

// ErrPendingApproval is returned by enrollment while an operator has not
// approved it (hangar device approve).
var ErrPendingApproval = errors.New("enrollment waits for an operator's approval")

func (a *Agent) saveCredential() {
	a.mu.Lock()
	c := a.cred
	a.mu.Unlock()
	if c == nil {
		return
	}
	b, _ := json.Marshal(c)
	if err := a.store.Save(credentialFile, b); err != nil {
		a.log.Error("saving the credential", "err", err)
	}
}

// enroll asks the control plane for a credential with the fleet
// enrollment token, and stores it. Over TLS it sends a certificate request
// for a key made on the device, and gets a certificate; otherwise (or
// from a control plane without a device CA) a password.
func (a *Agent) enroll(ctx context.Context) (*Credential, error) {
	if a.opts.ServerURL == "" {
		return nil, errors.New("enroll: no control plane URL configured")
	}
	req := map[string]any{
		"enroll_token": a.opts.EnrollToken,
		"device_id":    a.opts.DeviceID,
		"hardware":     a.opts.Hardware,
		"labels":       a.opts.Labels,
		"version":      a.opts.Version,
	}
	var key crypto.Signer
	var stored []byte
	if a.tls != nil {
		var err error
		if key, stored, err = a.enrollKey(); err != nil {
			return nil, fmt.Errorf("enroll: %w", err)
		}
		der, err := a.csr(key)
		if err != nil {
			return nil, fmt.Errorf("enroll: %w", err)
		}
		req["csr"] = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	}
	status, data, err := a.postEnroll(ctx, req)
	if err != nil {
		return nil, err
	}
	if status == http.StatusBadRequest && key != nil && bytes.Contains(data, []byte(`unknown field \"csr\"`)) {
		// A control plane from before device certificates: a password.
		delete(req, "csr")
		key = nil
		if status, data, err = a.postEnroll(ctx, req); err != nil {
			return nil, err
		}
	}
	resp := &http.Response{StatusCode: status}
	if resp.StatusCode == http.StatusAccepted {
		var r enrollReply
		_ = json.Unmarshal(data, &r)
		fp := ""
		if key != nil {
			fp = Fingerprint(key.Public())
		}
		a.log.Warn("enrollment waits for an operator's approval: compare the key fingerprint with hangar device ls --pending", "key", fp)
		return nil, fmt.Errorf("enroll: %w (key %s)", ErrPendingApproval, fp)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		_ = json.Unmarshal(data, &e)
		switch resp.StatusCode {
		case http.StatusForbidden:
			return nil, fmt.Errorf("enroll: %w: %s", ErrRevoked, e.Error)
		case http.StatusConflict:
			return nil, fmt.Errorf("enroll: %w: %s", ErrAlreadyEnrolled, e.Error)
		}
		return nil, fmt.Errorf("enroll: HTTP %d: %s", resp.StatusCode, e.Error)
	}
	r, id, err := a.parseEnrollReply(data, key, stored)
	if err != nil {
		return nil, err
	}
	if id != nil {
		if err := a.saveIdentity(id); err != nil {
			return nil, fmt.Errorf("enroll: %w", err)
		}
	}
	c := r.Credential
	b, _ := json.Marshal(c)
	if err := a.store.Save(credentialFile, b); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	// Only now: until both files are saved, enrolling again with the same
	// key gets the same device its certificate again.
	_ = a.store.Remove(enrollKeyFile)
	if id != nil {
		a.log.Info("enrolled with a device certificate", "broker", c.MQTTURL, "expires", id.leaf.NotAfter.UTC().Format(time.RFC3339))
	} else {
		a.log.Info("enrolled with a password", "broker", c.MQTTURL)
	}
	return &c, nil
}

func (a *Agent) postEnroll(ctx context.Context, req map[string]any) (int, []byte, error) {
	body, _ := json.Marshal(req)
	url := strings.TrimRight(a.opts.ServerURL, "/") + "/api/v1/enroll"
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, nil, fmt.Errorf("enroll: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := a.opts.HTTPClient.Do(hreq)
	if err != nil {
		return 0, nil, fmt.Errorf("enroll: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return 0, nil, fmt.Errorf("enroll: %w", err)
	}
	return resp.StatusCode, data, nil
}

// parseEnrollReply checks an enrollment reply: a credential for this
// device, with a certificate for the key it sent, or a password.
func (a *Agent) parseEnrollReply(data []byte, key crypto.Signer, stored []byte) (enrollReply, *identity, error) {
	var r enrollReply
	if err := json.Unmarshal(data, &r); err != nil {
		return r, nil, fmt.Errorf("enroll: unusable reply: %v", err)
	}
	if r.DeviceID != a.opts.DeviceID || r.Username == "" || r.MQTTURL == "" {
		return r, nil, errors.New("enroll: unusable reply: not a credential for this device")
	}
	if r.Certificate == "" {
		if r.Password == "" {
			return r, nil, errors.New("enroll: unusable reply: neither a certificate nor a password")
		}
		return r, nil, nil
	}
	if key == nil {
		return r, nil, errors.New("enroll: unusable reply: a certificate this agent did not ask for")
	}
	var chain [][]byte
	rest := []byte(r.Certificate)
	for len(chain) < proto.MaxCertChain {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type == "CERTIFICATE" {
			chain = append(chain, blk.Bytes)
		}
	}
	id, err := newIdentity(a.opts.DeviceID, key, stored, chain)
	if err != nil {
		return r, nil, fmt.Errorf("enroll: unusable reply: %w", err)
	}
	r.Password = ""
	return r, id, nil
}
