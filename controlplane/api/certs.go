package api

import (
	"context"
	"crypto/x509"
	"errors"
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// Held is the answer to an enrollment waiting for approval (HTTP 202).
type Held struct {
	Status string `json:"status"` // "pending"
	Device string `json:"device_id"`
	Key    string `json:"key"` // the fingerprint an operator approves
}

// hold decides whether an enrollment with a CSR waits for an operator:
// with Approval on, every enrollment does until its key is approved; a
// known device's does whatever the setting (an operator allows its new
// key, or it is refused). It returns nil when the enrollment may proceed.
func (a *API) hold(c echo.Context, e enrollment) (*Held, error) {
	ctx := c.Request().Context()
	d, err := a.opts.Store.Device(ctx, e.id)
	known := err == nil && !d.AwaitingEnrollment && !d.Revoked
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	if err == nil && d.Revoked {
		return nil, nil // refused as revoked by the store
	}
	if !a.opts.Approval {
		return nil, nil // a known device is refused by the store, unless an operator allowed a rekey
	}
	if err == nil && d.Pending != nil && d.Pending.Key == e.key && d.Pending.Approved {
		return nil, nil // approved for this key: enroll
	}
	p, err := a.opts.Store.Pend(ctx, e.id, e.key, e.hardware, c.RealIP(), a.opts.Now())
	if errors.Is(err, store.ErrExists) {
		a.opts.Metrics.Enrollments.WithLabelValues("pending_conflict").Inc()
		a.log.Warn("enrollment refused: another key waits for approval for this device", "device", e.id, "remote", c.RealIP(), "key", e.key)
		_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: "enrollment token", Action: "device.enroll-refused",
			Target: e.id, Reason: "another key waits for approval", Attrs: map[string]string{"remote": c.RealIP(), "key": e.key}})
		return nil, echo.NewHTTPError(http.StatusConflict, "another key waits for approval for device "+e.id+"; an operator decides (hangar device ls --pending)")
	}
	if err != nil {
		return nil, err
	}
	if p.New {
		// New request: say so once, loudly for a known device.
		a.opts.Metrics.Enrollments.WithLabelValues("pending").Inc()
		attrs := map[string]string{"remote": c.RealIP(), "key": e.key}
		if known {
			a.log.Warn("enrollment of a known device held for approval: a new key asks to replace its credential", "device", e.id, "remote", c.RealIP(), "key", e.key)
			_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: "enrollment token", Action: "device.enroll-held",
				Target: e.id, Reason: "known device, new key", Attrs: attrs})
		} else {
			a.log.Info("enrollment held for approval", "device", e.id, "remote", c.RealIP(), "key", e.key)
			_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: "enrollment token", Action: "device.enroll-held",
				Target: e.id, Attrs: attrs})
		}
	}
	return &Held{Status: "pending", Device: e.id, Key: e.key}, nil
}

// ApproveRequest is the body of POST /api/v1/devices/:id/approve.
type ApproveRequest struct {
	// Key, when given, must be (a prefix of at least 16 characters of) the
	// fingerprint of the waiting key: what the operator compared with the
	// device.
	Key string `json:"key,omitempty"`
}

func (a *API) approveDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	var req ApproveRequest
	if c.Request().ContentLength != 0 {
		if err := decodeJSON(c, &req); err != nil {
			return err
		}
	}
	ctx := c.Request().Context()
	key, err := a.opts.Store.Approve(ctx, id, req.Key)
	if err != nil {
		if errors.Is(err, store.ErrInvalid) {
			return echo.NewHTTPError(http.StatusConflict, err.Error())
		}
		return notFound(err, "pending enrollment of "+id)
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.approve", Target: id,
		Reason: c.QueryParam("reason"), Attrs: map[string]string{"key": key}})
	a.log.Info("enrollment approved", "device", id, "key", key)
	return c.JSON(http.StatusOK, map[string]any{"device": id, "key": key, "approved": true})
}

func (a *API) denyDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	key, err := a.opts.Store.Deny(ctx, id)
	if err != nil {
		return notFound(err, "pending enrollment of "+id)
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.deny", Target: id,
		Reason: c.QueryParam("reason"), Attrs: map[string]string{"key": key}})
	return c.JSON(http.StatusOK, map[string]any{"device": id, "key": key, "denied": true})
}

// Passwords is the fleet's password authentication setting.
type Passwords struct {
	Enabled bool `json:"enabled"`
	// Available: false when the control plane has no device CA, so that
	// passwords are the only way devices authenticate (and stay on).
	Available bool `json:"certificates_available"`
	// Using lists the devices that last authenticated with a password.
	Using []string `json:"using_passwords"`
}

func (a *API) passwords(ctx context.Context) (Passwords, error) {
	on, err := a.opts.Store.PasswordAuth(ctx)
	if err != nil {
		return Passwords{}, err
	}
	p := Passwords{Enabled: on || a.opts.DeviceCA == nil, Available: a.opts.DeviceCA != nil, Using: []string{}}
	ds, err := a.opts.Store.Devices(ctx, store.DeviceFilter{Auth: store.AuthPassword})
	if err != nil {
		return Passwords{}, err
	}
	for _, d := range ds {
		p.Using = append(p.Using, d.ID)
	}
	return p, nil
}

func (a *API) getPasswords(c echo.Context) error {
	p, err := a.passwords(c.Request().Context())
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, p)
}

func (a *API) setPasswords(c echo.Context) error {
	var req struct {
		Enabled *bool `json:"enabled"`
	}
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if req.Enabled == nil {
		return badRequest("want {\"enabled\": true|false}")
	}
	if !*req.Enabled && a.opts.DeviceCA == nil {
		return echo.NewHTTPError(http.StatusConflict, "this control plane has no device CA: passwords are how its devices authenticate (serve over TLS with a device CA first)")
	}
	ctx := c.Request().Context()
	if err := a.opts.Store.SetPasswordAuth(ctx, *req.Enabled); err != nil {
		return err
	}
	action := "device.passwords-off"
	if *req.Enabled {
		action = "device.passwords-on"
	}
	p, err := a.passwords(ctx)
	if err != nil {
		return err
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: action,
		Reason: c.QueryParam("reason")})
	dropped := 0
	if d, ok := a.opts.Bus.(interface{ DropPasswordSessions() int }); ok && !*req.Enabled {
		dropped = d.DropPasswordSessions() // their next CONNECT is refused
	}
	a.log.Warn("device password authentication changed", "enabled", *req.Enabled, "devices_using_passwords", len(p.Using), "disconnected", dropped)
	return c.JSON(http.StatusOK, p)
}

// certsOnly says whether devices must authenticate with certificates.
func (a *API) certsOnly(ctx context.Context) bool {
	if a.opts.NoPasswords {
		return true
	}
	if a.opts.DeviceCA == nil {
		return false
	}
	on, err := a.opts.Store.PasswordAuth(ctx)
	return err == nil && !on
}

// deviceByCert is the device a verified TLS client certificate names, if
// the certificate still speaks for it ("" otherwise).
func (a *API) deviceByCert(c echo.Context) string {
	st := c.Request().TLS
	if a.opts.DeviceCA == nil || st == nil || len(st.PeerCertificates) == 0 {
		return ""
	}
	// The listener asks for a certificate without checking it, so that a
	// device whose certificate expired still reaches enrollment: it is
	// checked here.
	leaf := st.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range st.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: a.opts.DeviceCA.Pool(), Intermediates: inter, CurrentTime: a.opts.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return ""
	}
	id, err := devcert.DeviceID(leaf)
	if err != nil {
		return ""
	}
	auth, err := a.opts.Store.DeviceAuth(c.Request().Context(), id)
	if err != nil {
		return ""
	}
	serial := devcert.SerialString(leaf.SerialNumber)
	for _, s := range auth.Serials {
		if s == serial {
			return id
		}
	}
	return ""
}
