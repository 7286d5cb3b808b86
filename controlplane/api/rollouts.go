package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
	"github.com/hangarfleet/hangar/proto"
)

// Rollouts is what the rollout endpoints need (rollout.Applier).
type Rollouts interface {
	Create(ctx context.Context, s rollout.Spec, actor string) (rollout.Rollout, rollout.Preview, error)
	Act(ctx context.Context, id string, op rollout.Op, actor, reason string) (rollout.Rollout, error)
	Status(ctx context.Context, id string) (rollout.StatusReport, error)
	List(ctx context.Context) ([]rollout.Rollout, error)
	DryRun(ctx context.Context, s rollout.Spec) (rollout.Preview, error)
	Devices(ctx context.Context, id string, state rollout.MemberState) ([]rollout.MemberReport, error)
}

// CreateRollout is wire.CreateRollout.
type CreateRollout = wire.CreateRollout

// CreateResult is wire.CreateResult.
type CreateResult = wire.CreateResult

// ActRequest is wire.ActRequest.
type ActRequest = wire.ActRequest

func (a *API) routeRollouts(r Rollouts) {
	a.rollouts = r
	g := a.e.Group("/api/v1/rollouts", a.limit)
	g.POST("", a.createRollout, a.operator())
	g.GET("", a.listRollouts, a.viewer())
	g.GET("/:id", a.rolloutStatus, a.viewer())
	g.GET("/:id/events", a.rolloutEvents, a.viewer())
	g.GET("/:id/devices", a.rolloutDevices, a.viewer())
	g.POST("/:id/:action", a.actRollout, a.operator())
}

func (a *API) releaseRef(ctx context.Context, name string) (rollout.ReleaseRef, store.Release, error) {
	target, version, ok := strings.Cut(name, "@")
	if !ok {
		target, version = "", name
	}
	r, err := a.rel.Store.Release(ctx, target, version)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return rollout.ReleaseRef{}, r, echo.NewHTTPError(http.StatusNotFound, "release "+name+" not found (push it first)")
		}
		return rollout.ReleaseRef{}, r, badRequest("%v", err)
	}
	return rollout.ReleaseRef{Target: r.Target, Version: r.Version, Counter: r.Counter}, r, nil
}

func (a *API) specFrom(ctx context.Context, req CreateRollout) (rollout.Spec, error) {
	var s rollout.Spec
	if req.Release == "" {
		return s, badRequest("release is required")
	}
	ref, rel, err := a.releaseRef(ctx, req.Release)
	if err != nil {
		return s, err
	}
	s.Release, s.Hardware = ref, rel.Hardware
	if req.RevertRelease != "" {
		rv, _, err := a.releaseRef(ctx, req.RevertRelease)
		if err != nil {
			return s, err
		}
		s.Revert = &rv
	}
	if s.Selector, err = proto.ParseSelector(req.Selector); err != nil {
		return s, badRequest("selector: %v", err)
	}
	if req.Stages != "" {
		if s.Stages, err = rollout.ParseStages(req.Stages); err != nil {
			return s, badRequest("%v", err)
		}
	}
	for _, b := range req.Budgets {
		label, amount, ok := strings.Cut(b, ":")
		var bud rollout.Budget
		bud.Label = label
		switch {
		case !ok || label == "":
			return s, badRequest("budget %q: label:N or label:P%%", b)
		case strings.HasSuffix(amount, "%"):
			if _, err := fmt.Sscan(strings.TrimSuffix(amount, "%"), &bud.KeepPercent); err != nil {
				return s, badRequest("budget %q: %v", b, err)
			}
		default:
			if _, err := fmt.Sscan(amount, &bud.KeepMin); err != nil {
				return s, badRequest("budget %q: %v", b, err)
			}
		}
		s.Limits.Budgets = append(s.Limits.Budgets, bud)
	}
	for _, w := range req.Windows {
		win, err := rollout.ParseWindow(w)
		if err != nil {
			return s, badRequest("%v", err)
		}
		s.Limits.Windows = append(s.Limits.Windows, win)
	}
	s.FromVersions, s.MinCanary, s.Gates, s.OnFailure, s.AutoRevert = req.FromVersions, req.MinCanary, req.Gates, req.OnFailure, req.AutoRevert
	s.Full = req.Full
	s.Limits.MaxInFlight, s.Limits.DeferredDeadline, s.Limits.OfflineDeadline = req.MaxInFlight, req.DeferredDeadline, req.OfflineDeadline
	if req.Strata != nil {
		s.Strata = req.Strata
	}
	s = s.WithDefaults()
	if err := s.Validate(); err != nil {
		return s, badRequest("%v", err)
	}
	return s, nil
}

func (a *API) createRollout(c echo.Context) error {
	var req CreateRollout
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	ctx := c.Request().Context()
	spec, err := a.specFrom(ctx, req)
	if err != nil {
		return err
	}
	if req.DryRun {
		p, err := a.rollouts.DryRun(ctx, spec)
		if err != nil {
			return rolloutError(err)
		}
		return c.JSON(http.StatusOK, CreateResult{Preview: p})
	}
	r, p, err := a.rollouts.Create(ctx, spec, a.actor(c))
	if err != nil {
		return rolloutError(err)
	}
	if req.Start {
		if r, err = a.rollouts.Act(ctx, r.Spec.ID, rollout.OpStart, a.actor(c), req.Reason); err != nil {
			return err
		}
	}
	return c.JSON(http.StatusCreated, CreateResult{Rollout: &r, Preview: p})
}

// rolloutError maps the engine's refusals to client errors.
func rolloutError(err error) error {
	switch {
	case errors.Is(err, rollout.ErrNoTargets):
		return echo.NewHTTPError(http.StatusUnprocessableEntity, err.Error())
	case errors.Is(err, rollout.ErrState):
		return echo.NewHTTPError(http.StatusConflict, err.Error())
	case errors.Is(err, store.ErrNotFound):
		return err
	}
	var he *echo.HTTPError
	if errors.As(err, &he) {
		return err
	}
	return badRequest("%v", err)
}

func (a *API) listRollouts(c echo.Context) error {
	rs, err := a.rollouts.List(c.Request().Context())
	if err != nil {
		return err
	}
	if rs == nil {
		rs = []rollout.Rollout{}
	}
	return c.JSON(http.StatusOK, rs)
}

func (a *API) rolloutStatus(c echo.Context) error {
	rep, err := a.rollouts.Status(c.Request().Context(), c.Param("id"))
	if err != nil {
		return notFound(err, "rollout "+c.Param("id"))
	}
	return c.JSON(http.StatusOK, rep)
}

func (a *API) rolloutEvents(c echo.Context) error {
	limit, err := intParam(c, "limit", 1000, 1, 100000)
	if err != nil {
		return err
	}
	entries, err := a.opts.Store.AuditLog(c.Request().Context(), c.Param("id"), limit)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, entries)
}

func (a *API) actRollout(c echo.Context) error {
	op := rollout.Op(c.Param("action"))
	if !slices.Contains(rollout.Ops, op) {
		return echo.NewHTTPError(http.StatusNotFound, "unknown rollout action "+string(op))
	}
	var req ActRequest
	if c.Request().ContentLength != 0 {
		if err := decodeJSON(c, &req); err != nil {
			return err
		}
	}
	r, err := a.rollouts.Act(c.Request().Context(), c.Param("id"), op, a.actor(c), req.Reason)
	if errors.Is(err, store.ErrNotFound) {
		return notFound(err, "rollout "+c.Param("id"))
	}
	if err != nil {
		return rolloutError(err)
	}
	return c.JSON(http.StatusOK, r)
}

// rolloutDevices lists the rollout's devices and where each stands;
// ?state=failed (committed, in_progress, waiting, ...) filters.
func (a *API) rolloutDevices(c echo.Context) error {
	state := rollout.MemberState(c.QueryParam("state"))
	if state != "" && !slices.Contains(rollout.MemberStates, state) {
		names := make([]string, len(rollout.MemberStates))
		for i, s := range rollout.MemberStates {
			names[i] = string(s)
		}
		return echo.NewHTTPError(http.StatusBadRequest, "state must be one of "+strings.Join(names, ", "))
	}
	ms, err := a.rollouts.Devices(c.Request().Context(), c.Param("id"), state)
	if err != nil {
		return notFound(err, "rollout "+c.Param("id"))
	}
	return c.JSON(http.StatusOK, ms)
}
