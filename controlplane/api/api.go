// Package api is the control plane's REST API (under /api/v1), its
// Prometheus endpoint and the console's static files. Everything but
// enrollment and /healthz needs a bearer token whose role allows the
// route (auth.go): viewer reads, operator ships, admin manages access.
package api

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/delivery"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/controlplane/wire"
)

// Store is what the API reads and writes.
type Store interface {
	Enroll(ctx context.Context, e store.Enrollment) (store.Device, error)
	Revoke(ctx context.Context, id string) error
	Device(ctx context.Context, id string) (store.Device, error)
	Devices(ctx context.Context, f store.DeviceFilter) ([]store.Device, error)
	CountDevices(ctx context.Context, f store.DeviceFilter) (int, error)
	Telemetry(ctx context.Context, id string, from, to time.Time, limit int) ([]store.TelemetryRow, error)
	TelemetryPoints(ctx context.Context, id string, from, to time.Time, points int) ([]store.TelemetryRow, error)
	Events(ctx context.Context, id string, after int64, limit int) ([]store.Event, error)
	QueryEvents(ctx context.Context, f store.EventFilter) ([]store.Event, error)
	FleetHistory(ctx context.Context, from, to time.Time, points int) ([]store.FleetHealth, error)
	LiveMarks(ctx context.Context) (store.LiveMarks, error)
	FleetHealth(ctx context.Context) (store.FleetHealth, error)
	TokenHash(ctx context.Context, name string) ([]byte, error)
	SetLabels(ctx context.Context, changes []store.LabelChange) error
	Import(ctx context.Context, devices []store.LabelChange, now time.Time) (int, error)
	SetProfile(ctx context.Context, name string, hash []byte, labels map[string]string, replace bool, now time.Time) error
	Profiles(ctx context.Context) ([]store.Profile, error)
	DeleteProfile(ctx context.Context, name string) error
	ProfileByToken(ctx context.Context, hash []byte) (store.Profile, error)
	AllowRekey(ctx context.Context, id string, until time.Time) error
	AddAudit(ctx context.Context, a store.Audit) (int64, error)
	AuditLog(ctx context.Context, target string, limit int) ([]store.Audit, error)
	VerifyAudit(ctx context.Context, at int64) (store.AuditVerification, error)
	DeviceAuth(ctx context.Context, id string) (store.DeviceAuth, error)
	Pend(ctx context.Context, id, key, hardware, remote string, now time.Time) (store.Pending, error)
	Approve(ctx context.Context, id, key string) (string, error)
	Deny(ctx context.Context, id string) (string, error)
	PasswordAuth(ctx context.Context) (bool, error)
	SetPasswordAuth(ctx context.Context, on bool) error
	CreateAPIToken(ctx context.Context, t store.APIToken) error
	APITokenByHash(ctx context.Context, hash []byte) (store.APIToken, error)
	APITokens(ctx context.Context) ([]store.APIToken, error)
	RevokeAPIToken(ctx context.Context, name string, now time.Time) (store.APIToken, error)
	TouchAPIToken(ctx context.Context, name string, now time.Time) error
}

// Token names in the store.
const (
	TokenAdmin  = "admin"
	TokenEnroll = "enroll"
)

// Options configure the API.
type Options struct {
	// EnrollSource and EnrollDevice limit enrollment attempts per source
	// address and per device id (nil: no limit).
	EnrollSource, EnrollDevice *throttle.Limiter
	// BodyTimeout bounds the time to send a small request body (default
	// SmallBodyTimeout).
	BodyTimeout time.Duration
	Store       Store
	Bus         broker.Bus
	Metrics     *metrics.Metrics
	Logger      *slog.Logger
	Now         func() time.Time
	// MQTTURL returns the broker address handed to an enrolling device,
	// given its request (the host it reached the API by).
	MQTTURL func(r *http.Request) string
	// Static serves the dashboard at /; nil serves nothing there.
	Static http.Handler
	// Delivery is where the delivery metrics are read from (nil: none).
	Delivery delivery.Source
	// LiveInterval is how often the live stream looks for changes
	// (default 1 s).
	LiveInterval time.Duration
	// LiveKeepAlive is how often a live stream sends a keep-alive and
	// checks its token again (default 15 s).
	LiveKeepAlive time.Duration
	// Replica names this control plane among replicas, and Leading says
	// whether it runs the rollout scheduler now (for /healthz; nil: one
	// process, always).
	Replica string
	Leading func() bool
	// Version of the control plane, for /healthz.
	Version string
	// Releases turns on release hosting and device updates (nil: off).
	Releases *ReleaseOptions
	// Rollouts turns on staged rollouts (needs Releases).
	Rollouts Rollouts
	// DeviceCA issues device certificates at enrollment (nil: devices
	// get passwords).
	DeviceCA *devcert.CA
	// CertTTL is the lifetime of a device certificate (default
	// devcert.DefaultTTL).
	CertTTL time.Duration
	// Approval holds every enrollment for an operator's approval (hangar
	// device approve); otherwise a new device enrolls at once and a known
	// one is refused.
	Approval bool
	// NoPasswords: the broker has no password accounts (an external
	// broker that knows devices by certificate only).
	NoPasswords bool
}

// API is the HTTP handler.
type API struct {
	opts     Options
	log      *slog.Logger
	e        *echo.Echo
	rel      *ReleaseOptions
	rollouts Rollouts
	limit    echo.MiddlewareFunc
	usedTokens
	enrolled atomic.Uint64
	live     liveHub
	deliveryCache
}

// Enrolled counts the enrollments this API completed since it started
// (the server logs a summary line rather than one line per device).
func (a *API) Enrolled() uint64 { return a.enrolled.Load() }

// MaxBody caps request bodies (release uploads and inventory imports have
// their own limits).
const MaxBody = 64 << 10

// MaxImportBody caps an inventory import: 100,000 devices with a few labels.
const MaxImportBody = 16 << 20

// New builds the handler.
func New(opts Options) *API {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.New(nil)
	}
	a := &API{opts: opts, log: opts.Logger.With("component", "api"), usedTokens: usedTokens{used: map[string]time.Time{}},
		deliveryCache: deliveryCache{reports: map[string]deliveryEntry{}}}
	e := echo.New()
	a.e = e
	e.HideBanner, e.HidePort = true, true
	// The source address of a request is the peer's: X-Forwarded-For is
	// whatever a client writes (rate limits and the audit's "remote" read
	// it).
	e.IPExtractor = echo.ExtractIPDirect()
	e.HTTPErrorHandler = a.errorHandler
	e.Use(middleware.Recover())
	// JSON bodies are small; release pushes have their own limit.
	bodyLimit := middleware.BodyLimit(fmt.Sprint(MaxBody)) // bytes (a "K" suffix would mean 1,000)
	// A small body must arrive in time too: a client that sends one byte
	// a minute holds a connection and a goroutine for nothing.
	bodyTimeout := opts.BodyTimeout
	if bodyTimeout <= 0 {
		bodyTimeout = SmallBodyTimeout
	}
	a.limit = func(next echo.HandlerFunc) echo.HandlerFunc { return bodyDeadline(bodyTimeout)(bodyLimit(next)) }
	e.GET("/healthz", a.healthz)
	e.POST("/api/v1/enroll", a.enroll, a.limit)
	viewer, operator, admin := a.viewer(), a.operator(), a.admin()
	e.GET("/metrics", echo.WrapHandler(opts.Metrics.Handler()), viewer)
	if opts.Releases != nil {
		a.routeReleases(*opts.Releases)
		if opts.Rollouts != nil {
			a.routeRollouts(opts.Rollouts)
		}
	}
	// An inventory of a whole fleet (or its relabelling, in one change) is
	// larger than other bodies.
	big := middleware.BodyLimit(fmt.Sprint(MaxImportBody))
	e.POST("/api/v1/devices/import", a.importDevices, admin, big)
	e.POST("/api/v1/devices/labels", a.labelDevices, operator, big)
	g := e.Group("/api/v1", a.limit)
	g.GET("/whoami", a.whoami, viewer)
	g.GET("/tokens", a.listTokens, admin)
	g.POST("/tokens", a.createToken, admin)
	g.DELETE("/tokens/:name", a.revokeToken, admin)
	g.GET("/devices", a.listDevices, viewer)
	g.POST("/devices", a.addDevice, admin)
	g.GET("/devices/:id", a.getDevice, viewer)
	g.PATCH("/devices/:id/labels", a.labelDevice, operator)
	g.GET("/enroll-profiles", a.listProfiles, viewer)
	g.POST("/enroll-profiles", a.createProfile, admin)
	g.DELETE("/enroll-profiles/:name", a.deleteProfile, admin)
	g.DELETE("/devices/:id", a.revokeDevice, admin)
	g.POST("/devices/:id/rekey", a.rekeyDevice, admin)
	g.POST("/devices/:id/approve", a.approveDevice, admin)
	g.DELETE("/devices/:id/pending", a.denyDevice, admin)
	g.GET("/settings/device-passwords", a.getPasswords, viewer)
	g.PUT("/settings/device-passwords", a.setPasswords, admin)
	g.GET("/devices/:id/telemetry", a.telemetry, viewer)
	g.GET("/devices/:id/events", a.deviceEvents, viewer)
	g.GET("/events", a.events, viewer)
	e.GET("/api/v1/events/stream", a.liveStream, viewer)
	g.GET("/fleet/history", a.fleetHistory, viewer)
	g.GET("/metrics/delivery", a.deliveryMetrics, viewer)
	g.GET("/fleet/health", a.fleetHealth, viewer)
	g.GET("/audit", a.audit, viewer)
	g.GET("/audit/verify", a.verifyAudit, viewer)
	if opts.Static != nil {
		e.GET("/*", echo.WrapHandler(opts.Static))
	}
	a.e = e
	return a
}

// Echo exposes the router so that other parts (releases, rollouts) can add
// their routes under the same authentication.
func (a *API) Echo() *echo.Echo { return a.e }

// Viewer, Operator and Admin are the middlewares that require a token
// of at least that role, for routes added elsewhere.
func (a *API) Viewer() echo.MiddlewareFunc   { return a.viewer() }
func (a *API) Operator() echo.MiddlewareFunc { return a.operator() }
func (a *API) Admin() echo.MiddlewareFunc    { return a.admin() }

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.e.ServeHTTP(w, r) }

// Error is wire.Error.
type Error = wire.Error

func (a *API) errorHandler(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	code := http.StatusInternalServerError
	msg := "internal error"
	var he *echo.HTTPError
	switch {
	case errors.As(err, &he):
		code = he.Code
		msg = fmt.Sprint(he.Message)
		if he.Internal != nil && code >= 500 {
			a.log.Error("request failed", "method", c.Request().Method, "path", c.Path(), "err", he.Internal)
		}
	case errors.Is(err, store.ErrNotFound):
		code, msg = http.StatusNotFound, err.Error()
	case errors.Is(err, store.ErrInvalid):
		code, msg = http.StatusBadRequest, err.Error()
	default:
		a.log.Error("request failed", "method", c.Request().Method, "path", c.Path(), "err", err)
	}
	if code == http.StatusRequestEntityTooLarge {
		limit := MaxBody
		if c.Path() == "/api/v1/devices/import" || c.Path() == "/api/v1/devices/labels" {
			limit = MaxImportBody
		}
		msg = fmt.Sprintf("request body larger than %d bytes", limit)
	}
	if c.Request().Method == http.MethodHead {
		_ = c.NoContent(code)
		return
	}
	_ = c.JSON(code, Error{Error: msg})
}

func badRequest(format string, args ...any) error {
	return echo.NewHTTPError(http.StatusBadRequest, fmt.Sprintf(format, args...))
}

// bearer returns the token of an Authorization: Bearer header.
func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// decodeJSON reads a JSON body strictly: unknown fields and trailing data
// are errors, so that a typo in a field name is not silently ignored.
func decodeJSON(c echo.Context, v any) error {
	ct := c.Request().Header.Get("Content-Type")
	if ct != "" && !strings.HasPrefix(ct, "application/json") {
		return echo.NewHTTPError(http.StatusUnsupportedMediaType, "body must be application/json")
	}
	dec := json.NewDecoder(c.Request().Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) || strings.Contains(err.Error(), "too large") {
			return echo.NewHTTPError(http.StatusRequestEntityTooLarge)
		}
		if errors.Is(err, io.EOF) {
			return badRequest("empty body")
		}
		return badRequest("invalid JSON body: %v", err)
	}
	if dec.More() {
		return badRequest("invalid JSON body: data after the object")
	}
	return nil
}

// NewSecret returns a random 256-bit token with a readable prefix.
func NewSecret(prefix string) string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return prefix + base64.RawURLEncoding.EncodeToString(b[:])
}

func (a *API) healthz(c echo.Context) error {
	leading := a.opts.Leading == nil || a.opts.Leading()
	return c.JSON(http.StatusOK, map[string]any{"status": "ok", "version": a.opts.Version, "replica": a.opts.Replica, "leading": leading})
}

// SmallBodyTimeout is how long a request with a small body (everything
// but release pushes and inventories) may take to send it.
const SmallBodyTimeout = 10 * time.Second

// bodyDeadline bounds the time to read a request's body.
func bodyDeadline(d time.Duration) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			_ = http.NewResponseController(c.Response().Writer).SetReadDeadline(time.Now().Add(d))
			return next(c)
		}
	}
}

// actor is who the audit log records for an operator's request: the
// name of the token that authenticated it. What the client says about
// whom it acts for (X-Hangar-Actor) is recorded as that, unverified.
func (a *API) actor(c echo.Context) string {
	actor := principal(c).Name
	if actor == "" {
		actor = "unauthenticated"
	}
	if u := c.Request().Header.Get("X-Hangar-Actor"); u != "" && len(u) <= 64 && printableASCII(u) {
		actor += fmt.Sprintf(" on behalf of %q (unverified)", u)
	}
	return actor
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// verifyAudit walks the audit log's hash chain (?at=ID: and returns the
// hash of entry ID, to compare with a head kept elsewhere).
func (a *API) verifyAudit(c echo.Context) error {
	var at int64
	if s := c.QueryParam("at"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 1 {
			return badRequest("at must be an entry id, not %q", s)
		}
		at = n
	}
	v, err := a.opts.Store.VerifyAudit(c.Request().Context(), at)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, v)
}

func (a *API) audit(c echo.Context) error {
	limit, err := intParam(c, "limit", 100, 1, 10000)
	if err != nil {
		return err
	}
	entries, err := a.opts.Store.AuditLog(c.Request().Context(), c.QueryParam("target"), limit)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, entries)
}
