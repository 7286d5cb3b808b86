package cli

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/delivery"
)

const reportUsage = `Usage: hangar report delivery [--since 672h | --from TIME --to TIME] [-o json]

The four keys of software delivery, from hangar's own records, overall and
per hardware revision: deployment frequency (rollouts completed a week),
lead time (release pushed, or built, to 95% of its devices committed),
change failure rate (rollouts paused by a failing gate, aborted or
reverted, over all finished) and time to restore (the failure to every
affected device on a good build again).`

func runReport(ctx context.Context, g *globals, args []string) error {
	sub := ""
	if len(args) > 0 {
		sub, args = args[0], args[1:]
	}
	fs := g.newFlags("report " + sub)
	g.register(fs)
	fs.Usage = func() { fmt.Fprintln(g.env.Stderr, reportUsage); fs.PrintDefaults() }
	if sub != "delivery" {
		fmt.Fprintln(g.env.Stderr, reportUsage)
		return unknownSub("report", sub)
	}
	since := fs.Duration("since", api.DefaultDeliveryWindow, "the window: this long back from now")
	from := fs.String("from", "", "the window's start (RFC 3339; instead of --since)")
	to := fs.String("to", "", "the window's end (RFC 3339; default now)")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := url.Values{}
	if *from != "" {
		q.Set("from", *from)
	} else {
		q.Set("from", since.String())
	}
	if *to != "" {
		q.Set("to", *to)
	}
	var rep api.DeliveryReport
	if err := c.Do(ctx, http.MethodGet, "/api/v1/metrics/delivery", q, nil, &rep); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, rep)
	}
	w := g.env.Stdout
	fmt.Fprintf(w, "delivery from %s to %s\n\n", rep.From.Local().Format(time.DateTime), rep.To.Local().Format(time.DateTime))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HARDWARE\tDEPLOYS/WEEK\tLEAD TIME (P50/P90)\tBUILD TO FLEET\tCHANGE FAILURE\tTIME TO RESTORE")
	row := func(name string, m delivery.Metrics) {
		lead := fmt.Sprintf("%s / %s", secs(m.LeadTime.MedianSeconds), secs(m.LeadTime.P90Seconds))
		if m.LeadTime.Pending > 0 {
			lead += fmt.Sprintf(" (%d pending)", m.LeadTime.Pending)
		}
		cfr := "-"
		if r := m.ChangeFailureRate.Rate; r != nil {
			cfr = fmt.Sprintf("%.0f%% (%d of %d)", *r*100, m.ChangeFailureRate.Failed, m.ChangeFailureRate.Finished)
		}
		ttr := secs(m.TimeToRestore.MedianSeconds)
		if m.TimeToRestore.Unrestored > 0 {
			ttr += fmt.Sprintf(" (%d not restored)", m.TimeToRestore.Unrestored)
		}
		fmt.Fprintf(tw, "%s\t%.2f\t%s\t%s\t%s\t%s\n", name, m.DeploymentFrequency.PerWeek, lead, secs(m.LeadTime.BuildToFleetMedianSeconds), cfr, ttr)
	}
	row("all", rep.Overall)
	hws := make([]string, 0, len(rep.ByHardware))
	for hw := range rep.ByHardware {
		hws = append(hws, hw)
	}
	sort.Strings(hws)
	for _, hw := range hws {
		row(hw, rep.ByHardware[hw])
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if n := len(rep.Health); n > 0 {
		first, last := rep.Health[0], rep.Health[n-1]
		fmt.Fprintf(w, "\nfleet health: online %s -> %s, low battery %d -> %d, versions in the field %d -> %d\n",
			ratio(first.Online, first.Devices), ratio(last.Online, last.Devices), first.LowBattery, last.LowBattery, first.Versions, last.Versions)
	}
	return nil
}

func secs(v *float64) string {
	if v == nil {
		return "-"
	}
	return humanDuration(time.Duration(*v * float64(time.Second)))
}

func ratio(n, of int) string {
	if of == 0 {
		return "-"
	}
	return fmt.Sprintf("%d/%d (%.0f%%)", n, of, 100*float64(n)/float64(of))
}
