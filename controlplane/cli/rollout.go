package cli

import (
	"context"
	"errors"
	"fmt"
	"github.com/hangarfleet/hangar/controlplane/client"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
)

func rolloutCreate(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("rollout create")
	g.register(fs)
	makeReq := client.RolloutFlags(fs)
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	req, err := makeReq()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	res, err := c.CreateRollout(ctx, req)
	if err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, res)
	}
	w := g.env.Stdout
	if req.DryRun {
		fmt.Fprintf(w, "dry run: %s to %d devices (create with the same flags takes these, as long as the fleet does not change)\n", res.Spec.Release, res.Targeted)
	} else {
		fmt.Fprintf(w, "rollout %s: %s to %d devices, %s, stages %s\n", res.Rollout.Spec.ID, res.Spec.Release, res.Targeted, res.Rollout.State.Status, stagesList(res.Spec.Stages))
	}
	printPreview(w, res.Preview)
	return nil
}

func stagesList(ss []rollout.Stage) string {
	parts := make([]string, len(ss))
	for i, s := range ss {
		parts[i] = s.String()
	}
	return strings.Join(parts, ",")
}

// printPreview shows which devices each stage takes and which the
// selector matches but the rollout leaves out.
func printPreview(w io.Writer, p rollout.Preview) {
	total := 0
	for i, st := range p.Stages {
		total += len(st.Devices)
		offline := ""
		if len(st.Offline) > 0 {
			offline = fmt.Sprintf(" (%d offline now: offered when they come back)", len(st.Offline))
		}
		fmt.Fprintf(w, "stage %d (%s): %d new devices, %d in all%s: %s\n", i+1, st.Stage, len(st.Devices), total, offline, preview(st.Devices, 8))
		if p.Transfer.Delta > 0 {
			fmt.Fprintf(w, "  %s\n", transferLine(st.Transfer))
		}
	}
	if p.Transfer.Delta > 0 {
		fmt.Fprintf(w, "in all: %s\n", transferLine(p.Transfer))
	} else if p.Transfer.Full > 0 {
		fmt.Fprintf(w, "in all: full artifacts to %d devices, %s (no delta from the builds they report)\n", p.Transfer.Full, humanBytes(p.Transfer.FullBytes))
	}
	if p.Canary != "" {
		fmt.Fprintf(w, "canary: %s\n", p.Canary)
	}
	if len(p.Excluded) > 0 {
		by := rollout.ExclusionCounts(p.Excluded)
		fmt.Fprintf(w, "left out: %d devices the selector matches\n", len(p.Excluded))
		for _, r := range slices.Sorted(maps.Keys(by)) {
			var ids []string
			for _, e := range p.Excluded {
				if e.Reason == r {
					ids = append(ids, e.Device)
				}
			}
			fmt.Fprintf(w, "  %d %s: %s\n", by[r], r, preview(ids, 5))
		}
	}
}

// transferLine says what offers send: deltas and full artifacts, their
// bytes and what the deltas save.
func transferLine(t rollout.Transfer) string {
	line := fmt.Sprintf("delta to %d devices (%s), full to %d (%s)", t.Delta, humanBytes(t.DeltaBytes), t.Full, humanBytes(t.FullBytes))
	if t.Fallback > 0 {
		line += fmt.Sprintf(", %d fell back from a delta to the full artifact", t.Fallback)
	}
	if t.Saved >= 0 {
		return line + ", " + humanBytes(t.Saved) + " saved"
	}
	return line + ", " + humanBytes(-t.Saved) + " more than full artifacts"
}

func preview(ids []string, n int) string {
	if len(ids) <= n {
		return strings.Join(ids, " ")
	}
	return strings.Join(ids[:n], " ") + fmt.Sprintf(" ... (%d more)", len(ids)-n)
}

func rolloutList(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("rollout ls")
	g.register(fs)
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var rs []rollout.Rollout
	if err := c.Do(ctx, http.MethodGet, "/api/v1/rollouts", nil, nil, &rs); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, rs)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tRELEASE\tSTATUS\tSTAGE\tCREATED\tBY\tREASON")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\n", r.Spec.ID, r.Spec.Release, r.State.Status, r.State.Stage+1, len(r.Spec.Stages),
			r.Created.Local().Format(time.DateTime), r.CreatedBy, r.State.Reason)
	}
	return tw.Flush()
}

func rolloutID(g *globals, name string, args []string, extra func(fsAdder)) (string, error) {
	fs := g.newFlags("rollout " + name)
	g.register(fs)
	if extra != nil {
		extra(fs)
	}
	pos, err := parse(fs, args)
	if err != nil {
		return "", err
	}
	if len(pos) != 1 {
		return "", fmt.Errorf("%w: rollout %s takes one rollout id (or latest)", ErrUsage, name)
	}
	if pos[0] != "latest" {
		return pos[0], nil
	}
	// "latest": the rollout created last.
	c, err := g.client()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var rs []rollout.Rollout
	if err := c.Do(ctx, http.MethodGet, "/api/v1/rollouts", nil, nil, &rs); err != nil {
		return "", err
	}
	if len(rs) == 0 {
		return "", errors.New("no rollout yet: rollout create")
	}
	latest := rs[0]
	for _, r := range rs[1:] {
		if r.Created.After(latest.Created) {
			latest = r
		}
	}
	return latest.Spec.ID, nil
}

type fsAdder interface {
	String(name, value, usage string) *string
}

func rolloutAct(ctx context.Context, g *globals, op rollout.Op, args []string) error {
	var reason *string
	id, err := rolloutID(g, string(op), args, func(fs fsAdder) { reason = fs.String("reason", "", "why (recorded in the rollout's events)") })
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var r rollout.Rollout
	if err := c.Do(ctx, http.MethodPost, "/api/v1/rollouts/"+url.PathEscape(id)+"/"+string(op), nil, api.ActRequest{Reason: *reason}, &r); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, r)
	}
	fmt.Fprintf(g.env.Stdout, "rollout %s: %s\n", id, op)
	return nil
}

func bar(done, total, width int) string {
	if total == 0 {
		return "[" + strings.Repeat(" ", width) + "]"
	}
	n := done * width / total
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

func printStatus(w io.Writer, rep rollout.StatusReport) {
	s, st := rep.Spec, rep.State
	n := rep.Members
	if n == 0 {
		n = rep.Targeted
	}
	sel := labelString(s.Selector)
	if sel == "" {
		sel = "all"
	}
	fmt.Fprintf(w, "rollout %s: %s to %d devices (selector %s)\n", s.ID, s.Release, n, sel)
	status := string(st.Status)
	if st.Reverting {
		status += ", reverting to " + s.Revert.String()
	}
	fmt.Fprintf(w, "status:  %s, stage %d of %d", status, st.Stage+1, len(s.Stages))
	if st.Reason != "" {
		fmt.Fprintf(w, " (%s)", st.Reason)
	}
	fmt.Fprintln(w)
	if rep.Unreached > 0 {
		fmt.Fprintf(w, "waiting: %d members whose devices are off (not failures: offered when they come back)\n", rep.Unreached)
	}
	if st.Canary != "" {
		fmt.Fprintf(w, "canary:  %s\n", st.Canary)
	}
	if t := rep.Transfer; t.Delta > 0 {
		fmt.Fprintf(w, "fetched: %s\n", transferLine(t))
	} else if s.Full {
		fmt.Fprintln(w, "fetched: full artifacts only (--full)")
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STAGE\tDEVICES\tPROGRESS\tSTATES")
	for i, sr := range rep.Stages {
		var parts []string
		for k, v := range sr.States {
			parts = append(parts, fmt.Sprintf("%s=%d", k, v))
		}
		sort.Strings(parts)
		mark := " "
		if i == st.Stage {
			mark = ">"
		}
		fmt.Fprintf(tw, "%s%d (%s)\t%d\t%s\t%s\n", mark, i+1, sr.Stage, sr.Devices, bar(sr.States[rollout.MCommitted], sr.Devices, 20), strings.Join(parts, " "))
	}
	tw.Flush()
	if len(rep.Gates) > 0 {
		fmt.Fprintln(w, "gates of the current stage:")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, gr := range rep.Gates {
			fmt.Fprintf(tw, "  %s\t%.3g / %.3g\t%s\t%s\n", gr.Name, gr.Value, gr.Threshold, strings.ToUpper(verdictOf(gr)), gr.Why)
		}
		tw.Flush()
	}
	if len(rep.Strata) > 1 {
		fmt.Fprintf(w, "by %s (judged within each as well):\n", rep.Strata[0].Label)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  VALUE\tMEMBERS\tCANARY\tREACHABLE\tCOMMITTED\tFAILED\tGATES")
		for _, sr := range rep.Strata {
			var gs []string
			for _, gr := range sr.Gates {
				if gr.Judged || len(sr.Gates) == 1 {
					gs = append(gs, gr.Name+" "+verdictOf(gr))
				}
			}
			held := ""
			if sr.Held {
				held = " (held: waiting for a canary device of its kind)"
			}
			fmt.Fprintf(tw, "  %s\t%d\t%d\t%d\t%d\t%d\t%s%s\n", dash(sr.Value), sr.Members, sr.Canary, sr.Reachable, sr.Committed, sr.Failed, strings.Join(gs, ", "), held)
		}
		tw.Flush()
	}
	if len(rep.Excluded) > 0 {
		fmt.Fprintln(w, "left out:")
		for _, r := range slices.Sorted(maps.Keys(rep.Excluded)) {
			fmt.Fprintf(w, "  %d %s\n", rep.Excluded[r], r)
		}
	}
}

func verdictOf(g rollout.GateResult) string {
	if g.Verdict != "" {
		return g.Verdict
	}
	switch {
	case !g.Judged:
		return rollout.VerdictUnknown
	case !g.OK:
		return rollout.VerdictFails
	}
	return rollout.VerdictHolds
}

func rolloutStatus(ctx context.Context, g *globals, args []string, watch bool) error {
	name := "status"
	var every *string
	if watch {
		name = "watch"
	}
	id, err := rolloutID(g, name, args, func(fs fsAdder) { every = fs.String("every", "2s", "refresh interval (watch)") })
	if err != nil {
		return err
	}
	interval, err := time.ParseDuration(*every)
	if err != nil {
		return fmt.Errorf("%w: --every: %v", ErrUsage, err)
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	for {
		var rep rollout.StatusReport
		if err := c.Do(ctx, http.MethodGet, "/api/v1/rollouts/"+url.PathEscape(id), nil, nil, &rep); err != nil {
			return err
		}
		if g.output == "json" {
			if err := printJSON(g.env.Stdout, rep); err != nil {
				return err
			}
		} else {
			if watch {
				// The CLI's own control codes pass; a device's do not.
				raw := g.env.Stdout
				if e, ok := raw.(*Escaper); ok {
					raw = e.W
				}
				if isTerminal(raw) {
					fmt.Fprint(raw, "\033[H\033[2J") // redraw in place
				} else {
					fmt.Fprintln(g.env.Stdout, "---") // a pipe or a file: one report after the other
				}
				fmt.Fprintln(g.env.Stdout, time.Now().Format(time.TimeOnly))
			}
			printStatus(g.env.Stdout, rep)
		}
		final := rep.State.Status == rollout.StatusCompleted || (rep.State.Status == rollout.StatusAborted && !rep.State.Reverting)
		if !watch || final {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}

func rolloutEvents(ctx context.Context, g *globals, args []string) error {
	id, err := rolloutID(g, "events", args, nil)
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var entries []store.Audit
	if err := c.Do(ctx, http.MethodGet, "/api/v1/rollouts/"+url.PathEscape(id)+"/events", nil, nil, &entries); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, entries)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tWHO\tWHAT\tFROM\tTO\tWHY")
	for i := len(entries) - 1; i >= 0; i-- {
		e := entries[i]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", e.Time.Local().Format(time.DateTime), e.Actor, e.Action, e.Attrs["from"], e.Attrs["to"], e.Reason)
	}
	return tw.Flush()
}

func rolloutDevices(ctx context.Context, g *globals, args []string) error {
	var state *string
	id, err := rolloutID(g, "devices", args, func(fs fsAdder) {
		names := make([]string, len(rollout.MemberStates))
		for i, s := range rollout.MemberStates {
			names[i] = string(s)
		}
		state = fs.String("state", "", "only devices in this state: "+strings.Join(names, ", "))
	})
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := url.Values{}
	if *state != "" {
		q.Set("state", *state)
	}
	var ms []rollout.MemberReport
	if err := c.Do(ctx, http.MethodGet, "/api/v1/rollouts/"+url.PathEscape(id)+"/devices", q, nil, &ms); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, ms)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tSTAGE\tSTATE\tVERSION\tONLINE\tREPORT\tVIA\tREASON")
	for _, m := range ms {
		report, reason, how := "", "", "-"
		if m.Update != nil {
			report, reason = string(m.Update.State), m.Update.Reason
			how = via(store.DeviceUpdate{Patch: m.Update.Patch, Fallback: m.Update.Fallback})
		}
		switch {
		case m.ReplacedBy != "":
			reason = strings.TrimSpace(reason + " (canary place given to " + m.ReplacedBy + " while unreachable)")
		case m.Replaces != "":
			reason = strings.TrimSpace(reason + " (in the canary instead of " + m.Replaces + ")")
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%v\t%s\t%s\t%s\n", m.Device, m.Stage, m.State, dash(m.Version), m.Online, dash(report), how, reason)
	}
	return tw.Flush()
}
