// Package client is a typed client of the control plane's REST API, used
// by the hangar CLI, the scenario runner and the tests. It links no server
// code: the types it speaks are the store's, the rollout engine's and
// package wire's.
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
)

// Client calls the control plane's REST API with a bearer token.
type Client struct {
	base  string
	token string
	http  *http.Client
}

// New returns a client for the API at base ("https://host:port").
func New(base, token string) *Client {
	return &Client{base: strings.TrimRight(base, "/"), token: token, http: &http.Client{Timeout: 30 * time.Minute}}
}

// TrustCA makes the client accept only TLS certificates that chain to
// the PEM certificates given (the control plane's CA).
func (c *Client) TrustCA(pemCerts []byte) error {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemCerts) {
		return fmt.Errorf("no PEM certificate")
	}
	c.http.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, Proxy: http.ProxyFromEnvironment}
	return nil
}

// SetHTTPClient replaces the HTTP client (tests, custom transports).
func (c *Client) SetHTTPClient(h *http.Client) { c.http = h }

// Base is the API's address.
func (c *Client) Base() string { return c.base }

// APIError is an error response of the API.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Message, e.Status) }

// Do sends a request with an optional JSON body and decodes a JSON reply
// into out (when not nil).
func (c *Client) Do(ctx context.Context, method, path string, q url.Values, body, out any) error {
	_, err := c.do(ctx, method, path, q, body, out)
	return err
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, body, out any) (http.Header, error) {
	var rd io.Reader
	ct := ""
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd, ct = bytes.NewReader(b), "application/json"
	}
	return c.doRaw(ctx, method, path, q, ct, rd, out)
}

// DoRaw sends a body of any content type.
func (c *Client) DoRaw(ctx context.Context, method, path string, q url.Values, contentType string, rd io.Reader, out any) error {
	_, err := c.doRaw(ctx, method, path, q, contentType, rd, out)
	return err
}

func (c *Client) doRaw(ctx context.Context, method, path string, q url.Values, contentType string, rd io.Reader, out any) (http.Header, error) {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var e wire.Error
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(data))
		}
		return nil, &APIError{Status: resp.StatusCode, Message: e.Error}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return nil, fmt.Errorf("%s %s: decode reply: %w", method, path, err)
		}
	}
	return resp.Header, nil
}

// Whoami is the principal of the client's token.
func (c *Client) Whoami(ctx context.Context) (wire.Principal, error) {
	var p wire.Principal
	return p, c.Do(ctx, http.MethodGet, "/api/v1/whoami", nil, nil, &p)
}

// Health is the fleet's health summary now.
func (c *Client) Health(ctx context.Context) (store.FleetHealth, error) {
	var h store.FleetHealth
	return h, c.Do(ctx, http.MethodGet, "/api/v1/fleet/health", nil, nil, &h)
}

// DeviceQuery selects devices (see GET /api/v1/devices).
type DeviceQuery struct {
	Selector string // k=v,k2=v2
	Online   *bool
	Version  string
	Search   string
	Sort     string
	Limit    int
	Offset   int
	Pending  bool
	Auth     string
}

func (q DeviceQuery) values() url.Values {
	v := url.Values{}
	set := func(k, s string) {
		if s != "" {
			v.Set(k, s)
		}
	}
	set("selector", q.Selector)
	if q.Online != nil {
		v.Set("online", strconv.FormatBool(*q.Online))
	}
	set("version", q.Version)
	set("q", q.Search)
	set("sort", q.Sort)
	set("auth", q.Auth)
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	if q.Offset > 0 {
		v.Set("offset", strconv.Itoa(q.Offset))
	}
	if q.Pending {
		v.Set("pending", "true")
	}
	return v
}

// Devices lists devices; total is the number the query selects, paging
// aside (-1 when the server did not say: no page was asked for).
func (c *Client) Devices(ctx context.Context, q DeviceQuery) (ds []store.Device, total int, err error) {
	h, err := c.do(ctx, http.MethodGet, "/api/v1/devices", q.values(), nil, &ds)
	if err != nil {
		return nil, 0, err
	}
	total = -1
	if s := h.Get("X-Total-Count"); s != "" {
		total, _ = strconv.Atoi(s)
	}
	return ds, total, nil
}

// Device is one device.
func (c *Client) Device(ctx context.Context, id string) (store.Device, error) {
	var d store.Device
	return d, c.Do(ctx, http.MethodGet, "/api/v1/devices/"+url.PathEscape(id), nil, nil, &d)
}

// Import pre-provisions devices and sets their labels, in one change.
func (c *Client) Import(ctx context.Context, devices []store.LabelChange) (wire.ImportResult, error) {
	var r wire.ImportResult
	return r, c.Do(ctx, http.MethodPost, "/api/v1/devices/import", nil, wire.LabelsRequest{Devices: devices}, &r)
}

// EventQuery selects device events (see GET /api/v1/events).
type EventQuery struct {
	Device   string
	After    int64 // a cursor: events after it, oldest first
	Since    string
	Kind     string
	Severity string
	Limit    int
}

// Events lists device events: newest first, or oldest first after a cursor.
func (c *Client) Events(ctx context.Context, q EventQuery) ([]store.Event, error) {
	path := "/api/v1/events"
	if q.Device != "" {
		path = "/api/v1/devices/" + url.PathEscape(q.Device) + "/events"
	}
	v := url.Values{}
	for k, s := range map[string]string{"since": q.Since, "kind": q.Kind, "severity": q.Severity} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if q.After > 0 {
		v.Set("after", strconv.FormatInt(q.After, 10))
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	var evs []store.Event
	return evs, c.Do(ctx, http.MethodGet, path, v, nil, &evs)
}

// PushRelease uploads a signed manifest, its key list and the artifact.
func (c *Client) PushRelease(ctx context.Context, manifest, keys []byte, artifact io.Reader) (store.Release, error) {
	var r store.Release
	err := c.upload(ctx, "/api/v1/releases", []part{{"manifest", manifest}, {"keys", keys}}, artifact, &r)
	return r, err
}

// PushDelta uploads a delta of a pushed release: its signed manifest and
// the patch. The release's key list verifies it.
func (c *Client) PushDelta(ctx context.Context, target, version string, manifest []byte, patch io.Reader) (store.ReleaseDelta, error) {
	var d store.ReleaseDelta
	path := "/api/v1/releases/" + url.PathEscape(target) + "/" + url.PathEscape(version) + "/deltas"
	err := c.upload(ctx, path, []part{{"manifest", manifest}}, patch, &d)
	return d, err
}

// Release is one pushed release, with its deltas.
func (c *Client) Release(ctx context.Context, target, version string) (store.Release, error) {
	var r store.Release
	return r, c.Do(ctx, http.MethodGet, "/api/v1/releases/"+url.PathEscape(target)+"/"+url.PathEscape(version), nil, nil, &r)
}

type part struct {
	name string
	b    []byte
}

// upload posts a multipart body of small parts, then the artifact,
// streamed: the artifact is never held in memory.
func (c *Client) upload(ctx context.Context, path string, parts []part, artifact io.Reader, out any) error {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	done := make(chan struct{})
	go func() {
		defer close(done)
		err := func() error {
			for _, p := range parts {
				w, err := mw.CreateFormFile(p.name, p.name)
				if err != nil {
					return err
				}
				if _, err := w.Write(p.b); err != nil {
					return err
				}
			}
			w, err := mw.CreateFormFile("artifact", "artifact")
			if err != nil {
				return err
			}
			if _, err := io.Copy(w, artifact); err != nil {
				return err
			}
			return mw.Close()
		}()
		pw.CloseWithError(err)
	}()
	err := c.DoRaw(ctx, http.MethodPost, path, nil, mw.FormDataContentType(), pr, out)
	pr.Close()
	<-done // the artifact is no longer read when this returns
	return err
}

// Releases lists the pushed releases.
func (c *Client) Releases(ctx context.Context) ([]store.Release, error) {
	var rs []store.Release
	return rs, c.Do(ctx, http.MethodGet, "/api/v1/releases", nil, nil, &rs)
}

// CreateRollout creates (or, with DryRun, previews) a rollout.
func (c *Client) CreateRollout(ctx context.Context, req wire.CreateRollout) (wire.CreateResult, error) {
	var res wire.CreateResult
	return res, c.Do(ctx, http.MethodPost, "/api/v1/rollouts", nil, req, &res)
}

// Rollouts lists the rollouts, newest first.
func (c *Client) Rollouts(ctx context.Context) ([]rollout.Rollout, error) {
	var rs []rollout.Rollout
	return rs, c.Do(ctx, http.MethodGet, "/api/v1/rollouts", nil, nil, &rs)
}

// Rollout is a rollout's status with what its last plan measured.
func (c *Client) Rollout(ctx context.Context, id string) (rollout.StatusReport, error) {
	var r rollout.StatusReport
	return r, c.Do(ctx, http.MethodGet, "/api/v1/rollouts/"+url.PathEscape(id), nil, nil, &r)
}

// Act pauses, resumes, aborts, promotes, reverts or starts a rollout.
func (c *Client) Act(ctx context.Context, id string, op rollout.Op, reason string) (rollout.Rollout, error) {
	var r rollout.Rollout
	return r, c.Do(ctx, http.MethodPost, "/api/v1/rollouts/"+url.PathEscape(id)+"/"+url.PathEscape(string(op)), nil, wire.ActRequest{Reason: reason}, &r)
}

// RolloutEvents is a rollout's audit trail, newest first.
func (c *Client) RolloutEvents(ctx context.Context, id string) ([]store.Audit, error) {
	var es []store.Audit
	return es, c.Do(ctx, http.MethodGet, "/api/v1/rollouts/"+url.PathEscape(id)+"/events", nil, nil, &es)
}

// RolloutDevices lists a rollout's members (in one state, or all).
func (c *Client) RolloutDevices(ctx context.Context, id string, state rollout.MemberState) ([]rollout.MemberReport, error) {
	q := url.Values{}
	if state != "" {
		q.Set("state", string(state))
	}
	var ms []rollout.MemberReport
	return ms, c.Do(ctx, http.MethodGet, "/api/v1/rollouts/"+url.PathEscape(id)+"/devices", q, nil, &ms)
}

// CreateToken makes a named token; its secret is in the reply only.
func (c *Client) CreateToken(ctx context.Context, req wire.CreateToken) (wire.CreatedToken, error) {
	var t wire.CreatedToken
	return t, c.Do(ctx, http.MethodPost, "/api/v1/tokens", nil, req, &t)
}

// Delivery is the delivery metrics over [from, to] (RFC 3339 or a
// duration back from now; empty: the server's default window).
func (c *Client) Delivery(ctx context.Context, from, to string) (wire.DeliveryReport, error) {
	q := url.Values{}
	if from != "" {
		q.Set("from", from)
	}
	if to != "" {
		q.Set("to", to)
	}
	var r wire.DeliveryReport
	return r, c.Do(ctx, http.MethodGet, "/api/v1/metrics/delivery", q, nil, &r)
}
