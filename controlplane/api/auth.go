package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
)

// Principal is wire.Principal.
type Principal = wire.Principal

const principalKey = "hangar.principal"

// principal is the request's authenticated principal (zero when the route
// needs none).
func principal(c echo.Context) Principal {
	p, _ := c.Get(principalKey).(Principal)
	return p
}

// authenticate finds the principal of the request's bearer token.
func (a *API) authenticate(c echo.Context) (Principal, error) {
	tok := bearer(c.Request())
	if tok == "" {
		c.Response().Header().Set("WWW-Authenticate", `Bearer realm="hangar"`)
		return Principal{}, echo.NewHTTPError(http.StatusUnauthorized, "missing bearer token")
	}
	ctx := c.Request().Context()
	sum := sha256.Sum256([]byte(tok))
	if h, err := a.opts.Store.TokenHash(ctx, TokenAdmin); err == nil && subtle.ConstantTimeCompare(h, sum[:]) == 1 {
		return Principal{Name: TokenAdmin, Role: store.RoleAdmin}, nil
	}
	t, err := a.opts.Store.APITokenByHash(ctx, sum[:])
	invalid := func(msg string) error {
		c.Response().Header().Set("WWW-Authenticate", `Bearer realm="hangar", error="invalid_token"`)
		return echo.NewHTTPError(http.StatusUnauthorized, msg)
	}
	switch {
	case errors.Is(err, store.ErrNotFound):
		return Principal{}, invalid("invalid token")
	case err != nil:
		return Principal{}, err
	case t.Revoked != nil:
		return Principal{}, invalid(fmt.Sprintf("token %s was revoked", t.Name))
	case !t.Valid(a.opts.Now()):
		return Principal{}, invalid(fmt.Sprintf("token %s expired at %s", t.Name, t.Expires.UTC().Format(time.RFC3339)))
	}
	a.touch(c, t.Name)
	return Principal{Name: t.Name, Role: t.Role, Expires: t.Expires}, nil
}

// touch records a token's use, at most once a minute per token.
func (a *API) touch(c echo.Context, name string) {
	now := a.opts.Now()
	a.usedMu.Lock()
	last, ok := a.used[name]
	if ok && now.Sub(last) < time.Minute {
		a.usedMu.Unlock()
		return
	}
	a.used[name] = now
	a.usedMu.Unlock()
	_ = a.opts.Store.TouchAPIToken(c.Request().Context(), name, now)
}

// require admits requests whose token has at least the role.
func (a *API) require(role string) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			p, err := a.authenticate(c)
			if err != nil {
				return err
			}
			if store.RoleRank(p.Role) < store.RoleRank(role) {
				return echo.NewHTTPError(http.StatusForbidden,
					fmt.Sprintf("token %s is %s; this needs %s", p.Name, p.Role, role))
			}
			c.Set(principalKey, p)
			return next(c)
		}
	}
}

// Middlewares for each role.
func (a *API) viewer() echo.MiddlewareFunc   { return a.require(store.RoleViewer) }
func (a *API) operator() echo.MiddlewareFunc { return a.require(store.RoleOperator) }
func (a *API) admin() echo.MiddlewareFunc    { return a.require(store.RoleAdmin) }

type usedTokens struct {
	usedMu sync.Mutex
	used   map[string]time.Time
}

// reservedNames are actors the control plane writes in the audit log
// itself: no token may pose as one.
var reservedNames = map[string]bool{TokenAdmin: true, TokenEnroll: true, "rollout-engine": true, "unauthenticated": true, "hangar": true}

var tokenName = regexp.MustCompile(`^[a-z0-9][a-z0-9._@-]{0,63}$`)

// CreateToken is wire.CreateToken.
type CreateToken = wire.CreateToken

// CreatedToken is wire.CreatedToken.
type CreatedToken = wire.CreatedToken

// TokenPrefix starts every named token.
const TokenPrefix = "hgt_"

func (a *API) createToken(c echo.Context) error {
	var req CreateToken
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if !tokenName.MatchString(req.Name) {
		return badRequest("token name %q: 1 to 64 of a-z 0-9 . _ @ -, starting with a letter or digit", req.Name)
	}
	if reservedNames[req.Name] {
		return echo.NewHTTPError(http.StatusConflict, fmt.Sprintf("%q is reserved: the audit log uses it for the control plane's own actions", req.Name))
	}
	if store.RoleRank(req.Role) == 0 {
		return badRequest("role must be viewer, operator or admin, not %q", req.Role)
	}
	now := a.opts.Now()
	t := store.APIToken{Name: req.Name, Role: req.Role, Created: now, CreatedBy: principal(c).Name}
	if req.ExpiresIn != "" {
		d, err := time.ParseDuration(req.ExpiresIn)
		if err != nil || d <= 0 {
			return badRequest("expires_in must be a positive duration such as 720h, not %q", req.ExpiresIn)
		}
		exp := now.Add(d)
		t.Expires = &exp
	}
	secret := NewSecret(TokenPrefix)
	sum := sha256.Sum256([]byte(secret))
	t.Hash = sum[:]
	ctx := c.Request().Context()
	if err := a.opts.Store.CreateAPIToken(ctx, t); err != nil {
		if errors.Is(err, store.ErrExists) {
			return echo.NewHTTPError(http.StatusConflict, fmt.Sprintf("a token named %s exists (names are not reused, also after revocation)", req.Name))
		}
		return err
	}
	attrs := map[string]string{"role": t.Role}
	if t.Expires != nil {
		attrs["expires"] = t.Expires.UTC().Format(time.RFC3339)
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: now, Actor: a.actor(c), Action: "token.create", Target: t.Name, Attrs: attrs})
	return c.JSON(http.StatusCreated, CreatedToken{APIToken: t, Token: secret})
}

func (a *API) listTokens(c echo.Context) error {
	ts, err := a.opts.Store.APITokens(c.Request().Context())
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, ts)
}

// RevokedToken is wire.RevokedToken.
type RevokedToken = wire.RevokedToken

func (a *API) revokeToken(c echo.Context) error {
	name := c.Param("name")
	if name == TokenAdmin {
		return echo.NewHTTPError(http.StatusConflict, "the bootstrap admin token is not a named token: replace it with hangar serve --new-admin-token")
	}
	ctx := c.Request().Context()
	t, err := a.opts.Store.RevokeAPIToken(ctx, name, a.opts.Now())
	if err != nil {
		return err
	}
	if t.Revoked != nil {
		return c.JSON(http.StatusOK, RevokedToken{Name: name, AlreadyRevoked: true})
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "token.revoke", Target: name,
		Reason: c.QueryParam("reason")})
	return c.JSON(http.StatusOK, RevokedToken{Name: name})
}

// whoami tells the dashboard and the CLI what the token may do.
func (a *API) whoami(c echo.Context) error {
	return c.JSON(http.StatusOK, principal(c))
}
