package api

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
	"github.com/hangarfleet/hangar/proto"
)

// EnrollRequest is the body of POST /api/v1/enroll.
type EnrollRequest struct {
	Token    string            `json:"enroll_token,omitempty"` // or Authorization: Bearer
	DeviceID string            `json:"device_id"`
	Hardware string            `json:"hardware"`
	Labels   map[string]string `json:"labels,omitempty"`
	Version  string            `json:"version,omitempty"`
	// CSR is a PKCS#10 request (PEM) for a key the device made: the
	// control plane answers with a certificate instead of a password.
	CSR string `json:"csr,omitempty"`
}

// Credential is what an enrolled or pre-provisioned device needs to connect.
type Credential struct {
	DeviceID    string `json:"device_id"`
	MQTTURL     string `json:"mqtt_url"`
	Username    string `json:"username"`
	Password    string `json:"password,omitempty"`
	TopicPrefix string `json:"topic_prefix"`
	// Certificate is the device's certificate chain (PEM, the device's
	// first) when it enrolled with a CSR.
	Certificate string `json:"certificate,omitempty"`
	// NotAfter is when that certificate expires.
	NotAfter *time.Time `json:"not_after,omitempty"`
}

func (a *API) enroll(c echo.Context) error {
	if l := a.opts.EnrollSource; l != nil && !l.Allow(c.RealIP()) {
		a.opts.Metrics.AuthThrottled.WithLabelValues("enroll_source").Inc()
		c.Response().Header().Set("Retry-After", "10")
		return echo.NewHTTPError(http.StatusTooManyRequests, "too many enrollment attempts from this address; retry later")
	}
	var req EnrollRequest
	if err := decodeJSON(c, &req); err != nil {
		a.opts.Metrics.Enrollments.WithLabelValues("bad_request").Inc()
		return err
	}
	if l := a.opts.EnrollDevice; l != nil && proto.ValidateDeviceID(req.DeviceID) == nil && !l.Allow(req.DeviceID) {
		a.opts.Metrics.AuthThrottled.WithLabelValues("enroll_device").Inc()
		c.Response().Header().Set("Retry-After", "60")
		return echo.NewHTTPError(http.StatusTooManyRequests, "too many enrollment attempts for device "+req.DeviceID+"; retry later")
	}
	tok := req.Token
	if tok == "" {
		tok = bearer(c.Request())
	}
	ctx := c.Request().Context()
	var profile store.Profile
	var err error
	if tok != "" {
		profile, err = a.opts.Store.ProfileByToken(ctx, broker.HashPassword(tok))
	}
	if tok == "" || err != nil {
		a.opts.Metrics.Enrollments.WithLabelValues("bad_token").Inc()
		id := req.DeviceID
		if proto.ValidateDeviceID(id) != nil {
			id = fmt.Sprintf("(not a device id, %d bytes)", len(id))
		}
		a.log.Warn("enrollment refused: bad token", "device", id, "remote", c.RealIP())
		return echo.NewHTTPError(http.StatusUnauthorized, "invalid enrollment token")
	}
	en := enrollment{id: req.DeviceID, hardware: req.Hardware, labels: req.Labels, profile: profile}
	if err := en.validate(); err != nil {
		a.opts.Metrics.Enrollments.WithLabelValues("bad_request").Inc()
		return err
	}
	if req.CSR != "" && a.opts.DeviceCA != nil {
		csr, err := devcert.ParseCSR([]byte(req.CSR))
		if err != nil {
			a.opts.Metrics.Enrollments.WithLabelValues("bad_request").Inc()
			return badRequest("%v", err)
		}
		en.csr, en.key = csr, devcert.Fingerprint(csr.PublicKey)
		if held, err := a.hold(c, en); err != nil || held != nil {
			if err != nil {
				return err
			}
			return c.JSON(http.StatusAccepted, held)
		}
	} else if req.CSR == "" && (a.opts.DeviceCA != nil || a.opts.NoPasswords) {
		if a.certsOnly(ctx) {
			a.opts.Metrics.Enrollments.WithLabelValues("bad_request").Inc()
			return badRequest("this control plane authenticates devices with certificates: enroll with a certificate request (csr), or have an operator turn passwords on (hangar device passwords on)")
		}
	}
	cred, err := a.issue(c, en)
	if errors.Is(err, store.ErrRevoked) {
		a.opts.Metrics.Enrollments.WithLabelValues("revoked").Inc()
		return echo.NewHTTPError(http.StatusForbidden, "device "+req.DeviceID+" is revoked; an operator must add it again")
	}
	if errors.Is(err, store.ErrEnrolled) {
		// Someone with the fleet token asks for a credential of a device
		// that has one: a takeover, or a device that lost its credential.
		// Either way an operator decides.
		a.opts.Metrics.Enrollments.WithLabelValues("already_enrolled").Inc()
		a.log.Warn("enrollment refused: the device is already enrolled (a takeover attempt, or a device that lost its credential: hangar device rekey)",
			"device", req.DeviceID, "remote", c.RealIP())
		_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: "enrollment token", Action: "device.enroll-refused",
			Target: req.DeviceID, Reason: "already enrolled", Attrs: map[string]string{"remote": c.RealIP()}})
		return echo.NewHTTPError(http.StatusConflict, "device "+req.DeviceID+" is already enrolled; an operator must allow it to enroll again (hangar device rekey "+req.DeviceID+")")
	}
	if err != nil {
		a.opts.Metrics.Enrollments.WithLabelValues("error").Inc()
		return err
	}
	a.opts.Metrics.Enrollments.WithLabelValues("ok").Inc()
	a.log.Debug("device enrolled", "device", req.DeviceID, "hardware", req.Hardware, "profile", profile.Name)
	a.enrolled.Add(1)
	return c.JSON(http.StatusOK, cred)
}

// enrollment is a credential to issue: a device's own enrollment (with the
// profile of its token) or an operator's add.
type enrollment struct {
	id, hardware string
	labels       map[string]string
	profile      store.Profile
	operator     bool
	csr          *x509.CertificateRequest // a certificate for its key rather than a password
	key          string                   // the CSR key's fingerprint
}

// issue validates and stores a new credential for a device and hands it to
// the broker.
func (e enrollment) validate() error {
	if err := proto.ValidateDeviceID(e.id); err != nil {
		return badRequest("%v", err)
	}
	if err := proto.ValidateLabels(e.labels); err != nil {
		return badRequest("%v", err)
	}
	if len(e.hardware) > proto.MaxLabelValueLen {
		return badRequest("hardware longer than %d characters", proto.MaxLabelValueLen)
	}
	return nil
}

func (a *API) issue(c echo.Context, e enrollment) (Credential, error) {
	if err := e.validate(); err != nil {
		return Credential{}, err
	}
	ctx := c.Request().Context()
	existed := false
	if !e.operator {
		if d, err := a.opts.Store.Device(ctx, e.id); err == nil && !d.AwaitingEnrollment && !d.Revoked {
			existed = true
		}
	}
	now := a.opts.Now()
	en := store.Enrollment{ID: e.id, Hardware: e.hardware, Labels: e.labels, Profile: e.profile.Labels, Operator: e.operator,
		Key: e.key, Now: now}
	var password, chain string
	var notAfter *time.Time
	if e.csr != nil {
		der, serial, err := a.opts.DeviceCA.Issue(e.csr, e.id, now, a.opts.CertTTL)
		if err != nil {
			return Credential{}, err
		}
		leaf, _ := x509.ParseCertificate(der)
		en.CertSerial, en.CertNotAfter, notAfter = serial, leaf.NotAfter, &leaf.NotAfter
		chain = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})) + string(a.opts.DeviceCA.PEM())
	} else if e.operator && a.certsOnly(ctx) {
		// Passwords are off: the operator pre-provisions the device,
		// which enrolls with a certificate request.
	} else {
		password = NewSecret("hgd_")
		en.CredHash = broker.HashPassword(password)
	}
	if _, err := a.opts.Store.Enroll(ctx, en); err != nil {
		return Credential{}, err
	}
	if password != "" {
		if err := a.opts.Bus.Provision(ctx, e.id, password); err != nil {
			return Credential{}, echo.NewHTTPError(http.StatusBadGateway, "broker refused the device account").SetInternal(err)
		}
	}
	actor := "device:" + e.id
	action := "device.enroll"
	if existed {
		// Only an operator's rekey lets an enrolled device enroll again
		// (the store refuses otherwise).
		action = "device.rekeyed"
		a.log.Warn("enrolled device re-keyed, as an operator allowed: its old credential no longer works", "device", e.id, "remote", c.RealIP())
	}
	attrs := map[string]string{}
	if e.profile.Name != "" && e.profile.Name != TokenEnroll {
		attrs["profile"] = e.profile.Name
	}
	if e.csr != nil {
		attrs["credential"], attrs["serial"], attrs["key"] = store.AuthCert, en.CertSerial, e.key
	} else if !e.operator {
		attrs["credential"] = store.AuthPassword
	}
	if e.operator {
		actor, action = a.actor(c), "device.add"
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: actor, Action: action, Target: e.id, Attrs: attrs})
	return Credential{
		DeviceID: e.id, MQTTURL: a.opts.MQTTURL(c.Request()), Username: e.id, Password: password,
		TopicPrefix: proto.TopicPrefix + "/dev/" + e.id, Certificate: chain, NotAfter: notAfter,
	}, nil
}

// RekeyRequest is the body of POST /api/v1/devices/:id/rekey.
type RekeyRequest struct {
	// Within is how long the device's next enrollment may re-key it (a
	// Go duration; default 24h, at most 30 days).
	Within string `json:"within,omitempty"`
}

// DefaultRekeyWithin is how long a rekey allowance lasts by default.
const DefaultRekeyWithin = 24 * time.Hour

// rekeyDevice lets an enrolled device enroll again once, for a while: the
// operator's answer to a drone that lost its credential (a wiped state
// directory, a restored control-plane database).
func (a *API) rekeyDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	var req RekeyRequest
	if c.Request().ContentLength != 0 {
		if err := decodeJSON(c, &req); err != nil {
			return err
		}
	}
	within := DefaultRekeyWithin
	if req.Within != "" {
		if within, err = time.ParseDuration(req.Within); err != nil || within <= 0 || within > 30*24*time.Hour {
			return badRequest("within must be a duration from 1s to 720h, not %q", req.Within)
		}
	}
	ctx := c.Request().Context()
	until := a.opts.Now().Add(within)
	if err := a.opts.Store.AllowRekey(ctx, id, until); err != nil {
		if errors.Is(err, store.ErrRevoked) {
			return echo.NewHTTPError(http.StatusConflict, "device "+id+" is revoked: add it again (hangar device add) to give it a credential")
		}
		return notFound(err, "device "+id)
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.rekey", Target: id,
		Reason: c.QueryParam("reason"), Attrs: map[string]string{"until": until.UTC().Format(time.RFC3339)}})
	a.log.Info("device may enroll again", "device", id, "until", until)
	return c.JSON(http.StatusOK, map[string]any{"device": id, "until": until.UTC()})
}

// AddDeviceRequest is the body of POST /api/v1/devices.
type AddDeviceRequest struct {
	ID       string            `json:"id"`
	Hardware string            `json:"hardware,omitempty"`
	Labels   map[string]string `json:"labels,omitempty"`
}

func (a *API) addDevice(c echo.Context) error {
	var req AddDeviceRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if d, err := a.opts.Store.Device(c.Request().Context(), req.ID); err == nil && !d.Revoked && !d.AwaitingEnrollment {
		// Adding again would mint a second credential and end the
		// device's current one: that is a rekey, asked for as such.
		return echo.NewHTTPError(http.StatusConflict, "device "+req.ID+" exists and is enrolled: hangar device label to change its labels, hangar device rekey to let it enroll again")
	}
	cred, err := a.issue(c, enrollment{id: req.ID, hardware: req.Hardware, labels: req.Labels, operator: true})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, cred)
}

func (a *API) listDevices(c echo.Context) error {
	f := store.DeviceFilter{}
	sel, err := proto.ParseSelector(c.QueryParam("selector"))
	if err != nil {
		return badRequest("selector: %v", err)
	}
	f.Labels = sel
	for _, l := range c.QueryParams()["label"] {
		one, err := proto.ParseSelector(l)
		if err != nil {
			return badRequest("label: %v", err)
		}
		for k, v := range one {
			f.Labels[k] = v
		}
	}
	if s := c.QueryParam("online"); s != "" {
		on, err := strconv.ParseBool(s)
		if err != nil {
			return badRequest("online must be true or false, not %q", s)
		}
		f.Online = &on
	}
	f.Version = c.QueryParam("version")
	if s := c.QueryParam("pending"); s != "" {
		if f.Pending, err = strconv.ParseBool(s); err != nil {
			return badRequest("pending must be true or false, not %q", s)
		}
	}
	switch f.Auth = c.QueryParam("auth"); f.Auth {
	case "", store.AuthCert, store.AuthPassword:
	default:
		return badRequest("auth must be %s or %s, not %q", store.AuthPassword, store.AuthCert, f.Auth)
	}
	if f.Limit, err = intParam(c, "limit", 0, 0, 1_000_000); err != nil {
		return err
	}
	if f.Offset, err = intParam(c, "offset", 0, 0, 100_000_000); err != nil {
		return err
	}
	f.Search = c.QueryParam("q")
	if len(f.Search) > 64 {
		return badRequest("q: at most 64 characters")
	}
	f.Sort = c.QueryParam("sort")
	if f.Sort != "" && !slices.Contains(store.DeviceSorts, strings.TrimPrefix(f.Sort, "-")) {
		return badRequest("sort must be one of %s (- before it: descending), not %q", strings.Join(store.DeviceSorts, ", "), f.Sort)
	}
	ctx := c.Request().Context()
	ds, err := a.opts.Store.Devices(ctx, f)
	if err != nil {
		return err
	}
	// The whole count, for paging: only when a page was asked for.
	if f.Limit > 0 || f.Offset > 0 {
		n, err := a.opts.Store.CountDevices(ctx, f)
		if err != nil {
			return err
		}
		c.Response().Header().Set("X-Total-Count", strconv.Itoa(n))
	}
	return c.JSON(http.StatusOK, ds)
}

func (a *API) deviceID(c echo.Context) (string, error) {
	id := c.Param("id")
	if err := proto.ValidateDeviceID(id); err != nil {
		return "", badRequest("%v", err)
	}
	return id, nil
}

func (a *API) getDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	d, err := a.opts.Store.Device(c.Request().Context(), id)
	if err != nil {
		return notFound(err, "device "+id)
	}
	return c.JSON(http.StatusOK, d)
}

func notFound(err error, what string) error {
	if errors.Is(err, store.ErrNotFound) {
		return echo.NewHTTPError(http.StatusNotFound, what+" not found")
	}
	return err
}

func (a *API) revokeDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	d, err := a.opts.Store.Device(ctx, id)
	if err != nil {
		return notFound(err, "device "+id)
	}
	already := d.Revoked
	if !already {
		if err := a.opts.Store.Revoke(ctx, id); err != nil {
			return notFound(err, "device "+id)
		}
	}
	if err := a.opts.Bus.Revoke(ctx, id); err != nil {
		a.log.Error("broker revoke failed", "device", id, "err", err)
		return echo.NewHTTPError(http.StatusBadGateway, "device revoked in the store, but the broker did not remove its account; retry").SetInternal(err)
	}
	if already {
		// Idempotent: the broker's side is done again (a retry after it
		// failed), nothing new is recorded.
		return c.JSON(http.StatusOK, map[string]any{"device": id, "already_revoked": true})
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.revoke", Target: id, Reason: c.QueryParam("reason")})
	a.log.Info("device revoked", "device", id)
	return c.NoContent(http.StatusNoContent)
}

func intParam(c echo.Context, name string, def, lo, hi int) (int, error) {
	s := c.QueryParam(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		return 0, badRequest("%s must be an integer from %d to %d, not %q", name, lo, hi, s)
	}
	return n, nil
}

func (a *API) timeParam(c echo.Context, name string, def time.Time) (time.Time, error) {
	s := c.QueryParam(name)
	if s == "" {
		return def, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	// A duration is that long ago, written -1h or 1h.
	if d, err := time.ParseDuration(s); err == nil && d != 0 {
		if d > 0 {
			d = -d
		}
		return a.opts.Now().Add(d), nil
	}
	return time.Time{}, badRequest("%s must be an RFC 3339 time or a duration back from now such as -1h, not %q", name, s)
}

// TelemetryResponse is the body of GET /devices/:id/telemetry.
type TelemetryResponse struct {
	Device  string          `json:"device"`
	From    time.Time       `json:"from"`
	To      time.Time       `json:"to"`
	Samples []proto.Reading `json:"samples"`
}

func (a *API) telemetry(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	now := a.opts.Now()
	to, err := a.timeParam(c, "to", now)
	if err != nil {
		return err
	}
	from, err := a.timeParam(c, "from", to.Add(-time.Hour))
	if err != nil {
		return err
	}
	if !from.Before(to) {
		return badRequest("from must be before to")
	}
	limit, err := intParam(c, "limit", 1000, 1, 100_000)
	if err != nil {
		return err
	}
	// points: about that many samples spread over the range (a chart),
	// instead of the first limit samples.
	points, err := intParam(c, "points", 0, 0, 10_000)
	if err != nil {
		return err
	}
	var rows []store.TelemetryRow
	if points > 0 {
		rows, err = a.opts.Store.TelemetryPoints(c.Request().Context(), id, from, to, points)
	} else {
		rows, err = a.opts.Store.Telemetry(c.Request().Context(), id, from, to, limit)
	}
	if err != nil {
		return notFound(err, "device "+id)
	}
	out := TelemetryResponse{Device: id, From: from.UTC(), To: to.UTC(), Samples: make([]proto.Reading, len(rows))}
	for i := range rows {
		out.Samples[i] = rows[i].Sample.Reading(rows[i].Base)
	}
	return c.JSON(http.StatusOK, out)
}

func (a *API) deviceEvents(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	return a.listEvents(c, id)
}

func (a *API) events(c echo.Context) error { return a.listEvents(c, "") }

// listEvents: newest first by default; with after=ID (a cursor, as a
// follower reads) oldest first. since and until take RFC 3339 times or a
// duration back from now ("1h").
func (a *API) listEvents(c echo.Context, id string) error {
	f := store.EventFilter{Device: id, Kind: c.QueryParam("kind"), MinSeverity: c.QueryParam("severity")}
	after, err := intParam(c, "after", 0, 0, 1<<62)
	if err != nil {
		return err
	}
	before, err := intParam(c, "before", 0, 0, 1<<62)
	if err != nil {
		return err
	}
	f.After, f.Before = int64(after), int64(before)
	if f.Limit, err = intParam(c, "limit", 100, 1, 10_000); err != nil {
		return err
	}
	switch o := c.QueryParam("order"); o {
	case "":
		f.Newest = after == 0
	case "newest", "oldest":
		f.Newest = o == "newest"
	default:
		return badRequest("order must be newest or oldest, not %q", o)
	}
	if f.Since, err = a.timeParam(c, "since", time.Time{}); err != nil {
		return err
	}
	if f.Until, err = a.timeParam(c, "until", time.Time{}); err != nil {
		return err
	}
	evs, err := a.opts.Store.QueryEvents(c.Request().Context(), f)
	if err != nil {
		if errors.Is(err, store.ErrInvalid) {
			return badRequest("%v", err)
		}
		return notFound(err, "device "+id)
	}
	return c.JSON(http.StatusOK, evs)
}

func (a *API) fleetHealth(c echo.Context) error {
	h, err := a.opts.Store.FleetHealth(c.Request().Context())
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, h)
}

// LabelRequest is the body of PATCH /api/v1/devices/:id/labels: operator
// labels to set and to remove.
type LabelRequest struct {
	Set    map[string]string `json:"set,omitempty"`
	Remove []string          `json:"remove,omitempty"`
}

// LabelsRequest is wire.LabelsRequest.
type LabelsRequest = wire.LabelsRequest

// checkLabelChanges validates label changes; an import may name a device
// with no labels (pre-provisioned all the same), a label change may not.
func (a *API) checkLabelChanges(cs []store.LabelChange, allowEmpty bool) error {
	if len(cs) == 0 {
		return badRequest("no devices")
	}
	seen := make(map[string]bool, len(cs))
	for _, c := range cs {
		if err := proto.ValidateDeviceID(c.Device); err != nil {
			return badRequest("%v", err)
		}
		if seen[c.Device] {
			return badRequest("device %s appears twice", c.Device)
		}
		seen[c.Device] = true
		if err := proto.ValidateLabels(c.Set); err != nil {
			return badRequest("device %s: %v", c.Device, err)
		}
		for _, k := range c.Remove {
			if err := proto.ValidateLabels(map[string]string{k: "x"}); err != nil {
				return badRequest("device %s: remove: %v", c.Device, err)
			}
			if _, ok := c.Set[k]; ok {
				return badRequest("device %s: label %s both set and removed", c.Device, k)
			}
		}
		if len(c.Set) == 0 && len(c.Remove) == 0 && !allowEmpty {
			return badRequest("device %s: nothing to set or remove", c.Device)
		}
	}
	return nil
}

func (a *API) setLabels(c echo.Context, cs []store.LabelChange) error {
	if err := a.checkLabelChanges(cs, false); err != nil {
		return err
	}
	ctx := c.Request().Context()
	if err := a.opts.Store.SetLabels(ctx, cs); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return echo.NewHTTPError(http.StatusNotFound, err.Error()+" (nothing was changed; pre-provision devices with import)")
		}
		return err
	}
	if len(cs) > maxAuditedChanges {
		_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.label",
			Attrs: map[string]string{"devices": fmt.Sprint(len(cs))}})
		return nil
	}
	for _, ch := range cs {
		_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.label", Target: ch.Device,
			Attrs: labelAttrs(ch)})
	}
	return nil
}

// maxAuditedChanges: a label change of more devices is audited as one
// entry (with the count), not one per device.
const maxAuditedChanges = 100

func labelAttrs(ch store.LabelChange) map[string]string {
	attrs := map[string]string{}
	for k, v := range ch.Set {
		attrs["set:"+k] = v
	}
	for _, k := range ch.Remove {
		attrs["remove:"+k] = ""
	}
	return attrs
}

func (a *API) labelDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	var req LabelRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if err := a.setLabels(c, []store.LabelChange{{Device: id, Set: req.Set, Remove: req.Remove}}); err != nil {
		return err
	}
	d, err := a.opts.Store.Device(c.Request().Context(), id)
	if err != nil {
		return notFound(err, "device "+id)
	}
	a.nudge(TopicFleet) // labels are not among the watermarks
	return c.JSON(http.StatusOK, d)
}

func (a *API) labelDevices(c echo.Context) error {
	var req LabelsRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if err := a.setLabels(c, req.Devices); err != nil {
		return err
	}
	a.nudge(TopicFleet)
	return c.JSON(http.StatusOK, map[string]int{"labelled": len(req.Devices)})
}

// ImportResult is wire.ImportResult.
type ImportResult = wire.ImportResult

func (a *API) importDevices(c echo.Context) error {
	var req LabelsRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if err := a.checkLabelChanges(req.Devices, true); err != nil {
		return err
	}
	ctx := c.Request().Context()
	created, err := a.opts.Store.Import(ctx, req.Devices, a.opts.Now())
	if err != nil {
		return err
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.import",
		Attrs: map[string]string{"devices": fmt.Sprint(len(req.Devices)), "created": fmt.Sprint(created)}})
	a.nudge(TopicFleet)
	return c.JSON(http.StatusOK, ImportResult{Created: created, Labelled: len(req.Devices) - created})
}

// ProfileRequest is the body of POST /api/v1/enroll-profiles.
type ProfileRequest struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels"`
	// Replace an existing profile of that name (its token stops working).
	Replace bool `json:"replace,omitempty"`
}

// ProfileToken is a new enrollment profile with its token (shown once).
type ProfileToken struct {
	store.Profile
	Token string `json:"token"`
}

func (a *API) createProfile(c echo.Context) error {
	var req ProfileRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if err := proto.ValidateLabels(map[string]string{req.Name: "x"}); err != nil || req.Name == "" || strings.Contains(req.Name, "/") {
		return badRequest("profile name %q: 1 to 63 letters, digits, '-', '_' and '.'", req.Name)
	}
	if err := proto.ValidateLabels(req.Labels); err != nil {
		return badRequest("%v", err)
	}
	if len(req.Labels) == 0 {
		return badRequest("a profile gives labels: at least one")
	}
	tok := NewSecret("hge_")
	now := a.opts.Now()
	ctx := c.Request().Context()
	if err := a.opts.Store.SetProfile(ctx, req.Name, broker.HashPassword(tok), req.Labels, req.Replace, now); err != nil {
		if errors.Is(err, store.ErrExists) {
			return echo.NewHTTPError(http.StatusConflict, "enrollment profile "+req.Name+" exists: its token is in use; replace it explicitly (replace: true, hangar enroll-profile create --replace) or choose another name")
		}
		return err
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: now, Actor: a.actor(c), Action: "enroll-profile.create", Target: req.Name,
		Attrs: req.Labels})
	return c.JSON(http.StatusCreated, ProfileToken{Profile: store.Profile{Name: req.Name, Labels: req.Labels, Created: now.UTC()}, Token: tok})
}

func (a *API) listProfiles(c echo.Context) error {
	ps, err := a.opts.Store.Profiles(c.Request().Context())
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, ps)
}

func (a *API) deleteProfile(c echo.Context) error {
	name := c.Param("name")
	ctx := c.Request().Context()
	if err := a.opts.Store.DeleteProfile(ctx, name); err != nil {
		return notFound(err, "enrollment profile "+name)
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "enroll-profile.delete", Target: name})
	return c.NoContent(http.StatusNoContent)
}

// fleetHistory is the fleet health summary over time (from, to: RFC 3339
// or a duration back from now; default the last 24 hours), thinned to at
// most points (default 300) summaries.
func (a *API) fleetHistory(c echo.Context) error {
	now := a.opts.Now()
	from, err := a.timeParam(c, "from", now.Add(-24*time.Hour))
	if err != nil {
		return err
	}
	to, err := a.timeParam(c, "to", now)
	if err != nil {
		return err
	}
	points, err := intParam(c, "points", 300, 2, 5000)
	if err != nil {
		return err
	}
	hs, err := a.opts.Store.FleetHistory(c.Request().Context(), from, to, points)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, hs)
}
