package scenario

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/client"
	"github.com/hangarfleet/hangar/controlplane/rollout"
)

// An action is what one timeline step does: each kind of step is one type
// that checks itself, fills its defaults and runs. Step is only its YAML
// envelope (exactly one field set); actions maps it to the action.
type action interface {
	check(c *checkCtx) error
	setDefaults()
	run(ctx context.Context, r *runner, rng *rand.Rand) (string, error)
	breaksLinks() bool
}

// checkCtx is what a check sees of the steps before it.
type checkCtx struct {
	builds, rollouts map[string]bool
}

// actions are the actions a step names (exactly one in a valid step).
func (st *Step) actions() []action {
	var out []action
	add := func(set bool, a action) {
		if set {
			out = append(out, a)
		}
	}
	add(st.Push != "", pushAction{st.Push})
	add(st.Rollout != nil, rolloutAction{st.Rollout})
	for _, o := range []struct {
		op   rollout.Op
		name string
	}{{rollout.OpPause, st.Pause}, {rollout.OpResume, st.Resume}, {rollout.OpAbort, st.Abort}, {rollout.OpPromote, st.Promote}, {rollout.OpRevert, st.Revert}} {
		add(o.name != "", opAction{o.op, o.name})
	}
	add(st.Flight != nil, flightAction{st.Flight})
	add(st.PowerCut != nil, powerAction{st.PowerCut, false})
	add(st.Offline != nil, powerAction{st.Offline, true})
	add(st.KillControlPlane != nil, killAction{st.KillControlPlane})
	add(st.RestartControlPlane != nil, restartAction{st.RestartControlPlane})
	add(st.KillBrokerNode != nil, brokerNodeAction{st.KillBrokerNode})
	add(st.LinkLoss != nil, linkLossAction{st.LinkLoss})
	add(st.SlowLink != nil, slowLinkAction{st.SlowLink})
	add(st.ClockSkew != nil, clockSkewAction{st.ClockSkew})
	add(st.ClockSync, clockSyncAction{})
	add(st.HostileDevice != nil, hostileAction{st.HostileDevice})
	add(st.Fakes != nil, fakesAction{st.Fakes})
	return out
}

type pushAction struct {
	version string
}

func (a pushAction) check(c *checkCtx) error {
	if !c.builds[a.version] {
		return fmt.Errorf("push of unknown build %s", a.version)
	}
	return nil
}

func (_ pushAction) setDefaults() {}

func (pushAction) breaksLinks() bool { return false }

func (a pushAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	return "push " + a.version, r.push(ctx, a.version)
}

type rolloutAction struct {
	*RolloutStep
}

func (a rolloutAction) check(c *checkCtx) error {
	var errs []error
	if a.Name == "" || c.rollouts[a.Name] {
		errs = append(errs, errors.New("a rollout needs a name of its own"))
	}
	c.rollouts[a.Name] = true
	if !c.builds[a.Release] {
		errs = append(errs, fmt.Errorf("rollout of unknown build %s", a.Release))
	}
	if _, err := client.RolloutArgs(append([]string{"--release", a.Release}, a.Args...)); err != nil {
		errs = append(errs, fmt.Errorf("rollout args: %w", err))
	}
	return errors.Join(errs...)
}

func (_ rolloutAction) setDefaults() {}

func (rolloutAction) breaksLinks() bool { return false }

func (a rolloutAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	rs := a.RolloutStep
	what := fmt.Sprintf("rollout %s of %s %s", rs.Name, rs.Release, strings.Join(rs.Args, " "))
	req, err := client.RolloutArgs(append([]string{"--release", rs.Release}, rs.Args...))
	if err != nil {
		return what, fmt.Errorf("rollout args: %w", err)
	}
	// The step's own fields, unless its args say otherwise.
	if rs.RevertRelease != "" {
		req.RevertRelease = rs.RevertRelease
	}
	req.Start = req.Start || !rs.NoStart
	if req.Reason == "" {
		req.Reason = "scenario " + r.s.Name
	}
	c, err := r.api()
	if err != nil {
		return what, err
	}
	res, err := c.CreateRollout(ctx, req)
	if err != nil {
		return what, err
	}
	if res.Rollout == nil {
		return what, fmt.Errorf("rollout create: no rollout in the reply")
	}
	id := res.Rollout.Spec.ID
	r.mu.Lock()
	r.ids[rs.Name] = id
	r.mu.Unlock()
	if res.Canary != "" {
		what += "; " + res.Canary
	}
	return what + " (" + id + ")", nil
}

type opAction struct {
	op   rollout.Op
	name string
}

func (a opAction) check(c *checkCtx) error {
	if !c.rollouts[a.name] {
		return fmt.Errorf("no rollout %q before this step", a.name)
	}
	return nil
}

func (_ opAction) setDefaults() {}

func (opAction) breaksLinks() bool { return false }

func (a opAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	c, err := r.api()
	if err == nil {
		_, err = c.Act(ctx, r.id(a.name), a.op, "scenario "+r.s.Name)
	}
	return string(a.op) + " " + a.name, err
}

type powerAction struct {
	*PowerCut
	offline bool
}

func (a powerAction) check(c *checkCtx) error {
	switch {
	case a.offline && (a.Percent <= 0 || a.Percent > 100 || a.Off <= 0):
		return errors.New("offline needs percent in (0, 100] and off")
	case a.Percent <= 0 || a.Percent > 100:
		return errors.New("power_cut.percent must be in (0, 100]")
	case a.Off < 0:
		return errors.New("negative time")
	}
	return nil
}

func (a powerAction) setDefaults() {
	if !a.offline && a.Off == 0 {
		a.Off = Duration(2 * time.Second)
	}
}

func (powerAction) breaksLinks() bool { return false }

func (a powerAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	pc, what := a.PowerCut, "power cut"
	if a.offline {
		what = "switched off"
	}
	drones := r.fleet.Drones()
	n := int(float64(len(drones))*pc.Percent/100 + 0.5)
	cut := 0
	for _, i := range rng.Perm(len(drones))[:n] {
		off := drones[i].PowerCut
		if a.offline {
			off = drones[i].SwitchOff
		}
		if off(time.Duration(pc.Off)) {
			cut++
			if pc.ClockReset {
				drones[i].ResetClockTo1970()
			}
		}
	}
	if pc.ClockReset {
		what += ", clocks back to 1970"
	}
	r.mu.Lock()
	if !a.offline {
		r.rep.Figures.PowerCuts += cut
	} else {
		r.rep.Figures.SwitchedOff += cut
	}
	r.mu.Unlock()
	return fmt.Sprintf("%s: %d drones off for %v", what, cut, time.Duration(pc.Off)), nil
}

type flightAction struct {
	*Flight
}

func (a flightAction) check(c *checkCtx) error {
	if a.Percent <= 0 || a.Percent > 100 || a.For <= 0 {
		return errors.New("flight needs percent in (0, 100] and for")
	}
	return nil
}

func (flightAction) setDefaults() {}

func (flightAction) breaksLinks() bool { return false }

func (a flightAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	drones := r.fleet.Drones()
	n := int(float64(len(drones))*a.Percent/100 + 0.5)
	lands := time.Now().Add(time.Second + time.Duration(a.For))
	r.mu.Lock()
	if r.flights == nil {
		r.flights = map[string]time.Time{}
	}
	for _, i := range rng.Perm(len(drones))[:n] {
		drones[i].Sensors.Fly(time.Duration(a.For))
		r.flights[drones[i].ID] = lands
	}
	r.mu.Unlock()
	return fmt.Sprintf("%d drones take off, landing in %v", n, time.Duration(a.For)), nil
}

type killAction struct {
	*Kill
}

func (a killAction) check(c *checkCtx) error {
	if a.Down < 0 {
		return errors.New("negative time")
	}
	return nil
}

func (a killAction) setDefaults() {
	if a.Down == 0 {
		a.Down = Duration(time.Second)
	}
}

func (killAction) breaksLinks() bool { return false }

func (a killAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	what := fmt.Sprintf("kill -9 the control plane, restart after %v", time.Duration(a.Kill.Down))
	if r.cp == nil {
		return what, errors.New("the control plane was not started by this run (--server)")
	}
	cp, err := r.target(ctx)
	if err != nil {
		return what, err
	}
	killed := time.Now()
	cp.Kill()
	var failover string
	if len(r.cps) > 1 {
		// Another replica takes the scheduler over by itself.
		what = fmt.Sprintf("kill -9 the scheduler's leader (%s), restart it after %v", cp.name, time.Duration(a.Kill.Down))
		took, err := r.awaitSuccessor(ctx, cp, killed)
		if err != nil {
			return what, err
		}
		r.mu.Lock()
		r.rep.Figures.LeaderFailovers = append(r.rep.Figures.LeaderFailovers, took.Seconds())
		r.mu.Unlock()
		failover = fmt.Sprintf(", another replica leading %d ms after the kill", took.Milliseconds())
	}
	if !sleepCtx(ctx, time.Duration(a.Kill.Down)-time.Since(killed)) {
		return what, ctx.Err()
	}
	t := time.Now()
	if err := cp.Start(ctx); err != nil {
		return what, err
	}
	r.mu.Lock()
	r.rep.Figures.ControlPlaneKills++
	r.mu.Unlock()
	return what + fmt.Sprintf(" (answering again %d ms after its start%s)", time.Since(t).Milliseconds(), failover), nil
}

type restartAction struct {
	*Kill
}

func (a restartAction) check(c *checkCtx) error {
	if a.Down < 0 {
		return errors.New("negative time")
	}
	return nil
}

func (a restartAction) setDefaults() {
	if a.Down == 0 {
		a.Down = Duration(time.Second)
	}
}

func (restartAction) breaksLinks() bool { return false }

func (a restartAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	what := fmt.Sprintf("restart the control plane and its broker (down %v)", time.Duration(a.Kill.Down))
	if r.cp == nil {
		return what, errors.New("the control plane was not started by this run (--server)")
	}
	if len(r.cps) > 1 {
		return what, errors.New("restart_control_plane restarts the embedded broker: not with replicas (kill_control_plane, kill_broker_node)")
	}
	r.cp.Stop()
	if !sleepCtx(ctx, time.Duration(a.Kill.Down)) {
		return what, ctx.Err()
	}
	t := time.Now()
	if err := r.cp.Start(ctx); err != nil {
		return what, err
	}
	if err := r.waitOnline(ctx, 5*time.Minute); err != nil {
		return what, err
	}
	took := time.Since(t).Seconds()
	// The broker counts its accepts: the most within any one second
	// since it started (sampling its connected-clients gauge from here
	// missed the peak when the machine was busy).
	p, found, err := r.metric(ctx, "hangar_mqtt_accept_rate_peak")
	if err == nil && !found {
		err = errors.New("the control plane does not expose hangar_mqtt_accept_rate_peak")
	}
	if err != nil {
		return what, fmt.Errorf("accept rate: %w", err)
	}
	peak := int(p)
	r.mu.Lock()
	r.rep.Figures.Reconnects = append(r.rep.Figures.Reconnects, took)
	r.rep.Figures.PeakConnectRate = max(r.rep.Figures.PeakConnectRate, peak)
	r.mu.Unlock()
	return what + fmt.Sprintf(": every drone connected again %.1f s after it started, at most %d connections in a second", took, peak), nil
}

type linkLossAction struct {
	*LinkLoss
}

func (a linkLossAction) check(c *checkCtx) error {
	if a.Percent <= 0 || a.Percent > 100 || a.For <= 0 || a.Flap <= 0 {
		return errors.New("link_loss needs percent in (0, 100], a positive duration (for) and flap")
	}
	return nil
}

func (a linkLossAction) setDefaults() {
	if a.Flap == 0 {
		a.Flap = Duration(5 * time.Second)
	}
}

func (linkLossAction) breaksLinks() bool { return true }

func (a linkLossAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	what := fmt.Sprintf("link loss: %g%% of connections cut every %v and refused, for %v", a.LinkLoss.Percent,
		time.Duration(a.LinkLoss.Flap), time.Duration(a.LinkLoss.For))
	if r.mqttProxy == nil {
		return what, errors.New("link faults need the control plane this run starts (not --server)")
	}
	for _, p := range []*linkProxy{r.mqttProxy, r.httpProxy} {
		p.lossy(ctx, a.LinkLoss.Percent/100, time.Duration(a.LinkLoss.For), time.Duration(a.LinkLoss.Flap))
	}
	return what, nil
}

type slowLinkAction struct {
	*SlowLink
}

func (a slowLinkAction) check(c *checkCtx) error {
	if a.BytesPerSecond < 0 {
		return errors.New("negative rate")
	}
	return nil
}

func (_ slowLinkAction) setDefaults() {}

func (slowLinkAction) breaksLinks() bool { return true }

func (a slowLinkAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	what := fmt.Sprintf("downloads capped at %d bytes/s per connection", a.SlowLink.BytesPerSecond)
	if r.httpProxy == nil {
		return what, errors.New("link faults need the control plane this run starts (not --server)")
	}
	r.httpProxy.setRate(a.SlowLink.BytesPerSecond)
	return what, nil
}

type clockSkewAction struct {
	*ClockSkew
}

func (a clockSkewAction) check(c *checkCtx) error {
	if a.Percent <= 0 || a.Percent > 100 {
		return errors.New("clock_skew.percent must be in (0, 100]")
	}
	return nil
}

func (_ clockSkewAction) setDefaults() {}

func (clockSkewAction) breaksLinks() bool { return false }

func (a clockSkewAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	drones := r.fleet.Drones()
	n := int(float64(len(drones))*a.ClockSkew.Percent/100 + 0.5)
	for _, i := range rng.Perm(len(drones))[:n] {
		drones[i].SetClock(time.Duration(a.ClockSkew.Offset))
	}
	return fmt.Sprintf("clock skew: %d drones' clocks %v off", n, time.Duration(a.ClockSkew.Offset)), nil
}

type clockSyncAction struct{}

func (_ clockSyncAction) check(c *checkCtx) error {
	return nil
}

func (_ clockSyncAction) setDefaults() {}

func (clockSyncAction) breaksLinks() bool { return false }

func (_ clockSyncAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	for _, d := range r.fleet.Drones() {
		d.SetClock(0)
	}
	return "every drone's clock set right", nil
}

type hostileAction struct {
	*Hostile
}

func (_ hostileAction) check(c *checkCtx) error {
	return nil
}

func (_ hostileAction) setDefaults() {}

func (hostileAction) breaksLinks() bool { return false }

func (a hostileAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	victim := a.Hostile.Victim
	if victim == "" {
		victim = r.fleet.ID(0)
	}
	what := "hostile device against " + victim
	h, err := r.hostile(ctx, victim)
	if err != nil {
		return what, err
	}
	r.mu.Lock()
	r.rep.Hostile = h
	r.mu.Unlock()
	return what + fmt.Sprintf(": %d attempts; recorded %.0f decode errors, %.0f ACL denials, %.0f auth failures; healthy %v",
		len(h.Attempts), h.DecodeErrors, h.ACLDenials, h.AuthFailures, h.Healthy), nil
}

type fakesAction struct {
	*Fakes
}

func (a fakesAction) check(c *checkCtx) error {
	if a.Count <= 0 || len(a.Claims) == 0 {
		return errors.New("fakes need a positive count and claims")
	}
	return nil
}

func (_ fakesAction) setDefaults() {}

func (fakesAction) breaksLinks() bool { return false }

func (a fakesAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	what := fmt.Sprintf("%d fake devices claiming %v enroll", a.Fakes.Count, a.Fakes.Claims)
	f, err := r.startFakes(r.fakeCtx, a.Fakes)
	if err != nil {
		return what, err
	}
	r.mu.Lock()
	r.fakes = append(r.fakes, f)
	r.mu.Unlock()
	return what, nil
}
