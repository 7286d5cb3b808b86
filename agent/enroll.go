package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// Credential is what enrollment returns and the agent keeps (0600) in its
// state directory.
type Credential struct {
	DeviceID string `json:"device_id"`
	MQTTURL  string `json:"mqtt_url"`
	Username string `json:"username"`
	Password string `json:"password"`
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

// enroll asks the control plane for an MQTT credential with the fleet
// enrollment token, and stores it.
func (a *Agent) enroll(ctx context.Context) (*Credential, error) {
	if a.opts.ServerURL == "" {
		return nil, errors.New("enroll: no control plane URL configured")
	}
	body, _ := json.Marshal(map[string]any{
		"enroll_token": a.opts.EnrollToken,
		"device_id":    a.opts.DeviceID,
		"hardware":     a.opts.Hardware,
		"labels":       a.opts.Labels,
		"version":      a.opts.Version,
	})
	url := strings.TrimRight(a.opts.ServerURL, "/") + "/api/v1/enroll"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.opts.HTTPClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
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
	var c Credential
	if err := json.Unmarshal(data, &c); err != nil || c.Username == "" || c.Password == "" || c.MQTTURL == "" {
		return nil, fmt.Errorf("enroll: unusable reply: %v", err)
	}
	b, _ := json.Marshal(c)
	if err := a.store.Save(credentialFile, b); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	a.log.Info("enrolled", "broker", c.MQTTURL)
	return &c, nil
}
