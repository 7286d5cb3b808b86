package scenario

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
)

// Report is what a run measured and whether each expectation held.
type Report struct {
	Scenario Scenario  `json:"scenario"`
	Devices  int       `json:"devices"`
	Started  time.Time `json:"started"`
	Duration float64   `json:"duration_s"`
	TimedOut bool      `json:"timed_out,omitempty"`
	Passed   bool      `json:"passed"`
	Results  []Result  `json:"results"`
	// Events: the timeline as played (operator actions, faults).
	Events   []Event                  `json:"events"`
	Rollouts map[string]RolloutReport `json:"rollouts"`
	// Samples: the fleet's versions (and rollouts' states) over time.
	Samples []Sample `json:"samples"`
	// EverRan: how many drones ever booted each version.
	EverRan     map[string]int `json:"ever_ran"`
	BlastRadius []BlastRadius  `json:"blast_radius"` // for each build that is not good
	Bricked     []string       `json:"bricked,omitempty"`
	Hostile     *HostileReport `json:"hostile,omitempty"`
	Gaps        *GapReport     `json:"gaps,omitempty"`
	Figures     Figures        `json:"figures"`
}

// Result is one expectation's verdict.
type Result struct {
	Expectation string `json:"expectation"`
	OK          bool   `json:"ok"`
	Detail      string `json:"detail"`
}

// Event is a timeline step as it was carried out.
type Event struct {
	At    float64 `json:"at_s"`
	What  string  `json:"what"`
	Error string  `json:"error,omitempty"`
}

// Sample is the fleet at one moment.
type Sample struct {
	At       float64                  `json:"at_s"`
	Versions map[string]int           `json:"versions"`
	Bricked  int                      `json:"bricked,omitempty"`
	Rollouts map[string]RolloutSample `json:"rollouts,omitempty"`
}

// RolloutSample is a rollout at one moment.
type RolloutSample struct {
	Status string `json:"status"`
	Stage  int    `json:"stage"`
}

// RolloutReport is a rollout at the end, with its history.
type RolloutReport struct {
	ID      string                      `json:"id"`
	Release string                      `json:"release"`
	Status  string                      `json:"status"`
	Stage   int                         `json:"stage"`
	Reason  string                      `json:"reason,omitempty"`
	Counts  map[rollout.MemberState]int `json:"counts"`
	Gates   []rollout.GateResult        `json:"gates"`
	Events  []RolloutEvent              `json:"events"`
	Canary  []string                    `json:"canary"`
	// Members counts the members by where they stand at the end (all
	// stages); Fakes are members that are not in the inventory.
	Members map[rollout.MemberState]int `json:"members"`
	Fakes   []string                    `json:"fakes,omitempty"`
	// CompletedAt is when it completed, seconds after the start (0: not).
	CompletedAt float64 `json:"completed_at_s,omitempty"`
	// Transfer is what its members fetched over the air (deltas, full
	// artifacts, fallbacks) and what deltas saved.
	Transfer rollout.Transfer `json:"transfer"`
}

// RolloutEvent is a transition or an operator action, at seconds after
// the start.
type RolloutEvent struct {
	At     float64 `json:"at_s"`
	Actor  string  `json:"actor"`
	Action string  `json:"action"`
	From   string  `json:"from,omitempty"`
	To     string  `json:"to,omitempty"`
	Reason string  `json:"reason,omitempty"`
}

// BlastRadius is how far a bad build got.
type BlastRadius struct {
	Version   string  `json:"version"`
	Behaviour string  `json:"behaviour"`
	Devices   int     `json:"devices"`
	Percent   float64 `json:"percent"`
	// Hardware: the build misbehaves there only; OnHardware of the
	// devices that ran it are of that revision.
	Hardware   string `json:"hardware,omitempty"`
	OnHardware int    `json:"on_hardware,omitempty"`
}

// Figures are the run's measurements.
type Figures struct {
	FleetOnline        float64 `json:"fleet_online_s"`     // from start to every drone online
	SimRSSBytes        int64   `json:"sim_rss_bytes"`      // the simulator process (all drones) at the end of the run
	SimRSSPeakBytes    int64   `json:"sim_rss_peak_bytes"` // its largest RSS sampled during the run (start-up, reconnects)
	RSSPerDroneBytes   int64   `json:"rss_per_drone_bytes"`
	PowerCuts          int     `json:"power_cuts"`
	SwitchedOff        int     `json:"switched_off"` // drones taken offline by offline steps
	ControlPlaneKills  int     `json:"control_plane_kills"`
	ControlPlaneStarts int     `json:"control_plane_starts"`
	// Reconnects: for each restart of the control plane, seconds from its
	// start to every drone connected again.
	Reconnects []float64 `json:"reconnects_s,omitempty"`
	LinkCuts   int       `json:"link_cuts"` // connections cut or refused by the link faults
	// PeakConnectRate: most connections the broker accepted in one second
	// while drones reconnected after a restart.
	PeakConnectRate int `json:"peak_connect_rate,omitempty"`
	// LeaderFailovers: for each kill of the scheduler's leader (several
	// replicas), seconds until another replica led.
	LeaderFailovers []float64 `json:"leader_failovers_s,omitempty"`
	// BrokerNodeReconnects: for each broker node killed, seconds until
	// every drone was connected again.
	BrokerNodeReconnects []float64 `json:"broker_node_reconnects_s,omitempty"`
}

// Write writes report.json and report.html into dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "report.json"), b, 0o644); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "report.html"))
	if err != nil {
		return err
	}
	defer f.Close()
	if err := r.HTML(f); err != nil {
		return err
	}
	return f.Close()
}

// Summary is the report in a few lines of text.
func (r *Report) Summary(w io.Writer) {
	verdict := "PASSED"
	if !r.Passed {
		verdict = "FAILED"
	}
	fmt.Fprintf(w, "scenario %s: %s (%d drones, %.0f s)\n", r.Scenario.Name, verdict, r.Devices, r.Duration)
	for _, res := range r.Results {
		mark := "ok  "
		if !res.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %s: %s\n", mark, res.Expectation, res.Detail)
	}
	for _, name := range sortedKeys(r.Rollouts) {
		rr := r.Rollouts[name]
		fmt.Fprintf(w, "  rollout %s (%s): %s at stage %d %v\n", name, rr.Release, rr.Status, rr.Stage, rr.Counts)
	}
	for _, b := range r.BlastRadius {
		fmt.Fprintf(w, "  blast radius of %s (%s): %d drones (%.1f%%)\n", b.Version, b.Behaviour, b.Devices, b.Percent)
	}
	fmt.Fprintf(w, "  simulator RSS %.0f MB (%.0f KB per drone; peak %.0f MB)\n", float64(r.Figures.SimRSSBytes)/1e6, float64(r.Figures.RSSPerDroneBytes)/1e3,
		float64(r.Figures.SimRSSPeakBytes)/1e6)
}

// chart draws the versions over time as lines, with the rollouts'
// transitions as vertical marks.
func (r *Report) chart() template.HTML {
	const w, h, left, bottom, top = 900.0, 320.0, 50.0, 30.0, 10.0
	if len(r.Samples) == 0 {
		return ""
	}
	tmax := max(r.Samples[len(r.Samples)-1].At, 1)
	versions := map[string]bool{}
	for _, s := range r.Samples {
		for v := range s.Versions {
			versions[v] = true
		}
	}
	names := sortedKeys(versions)
	x := func(t float64) float64 { return left + (w-left-10)*t/tmax }
	y := func(n int) float64 { return top + (h-top-bottom)*(1-float64(n)/float64(max(r.Devices, 1))) }
	colors := []string{"#1d6fd1", "#d92d20", "#3fb760", "#b54708", "#7a5af8", "#0e9384", "#c11574", "#667085"}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %.0f %.0f" width="%.0f" height="%.0f" font-family="sans-serif" font-size="11">`, w, h+20*float64((len(names)+3)/4), w, h+20*float64((len(names)+3)/4))
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#888"/>`, left, y(0), w-10, y(0))
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#888"/>`, left, y(0), left, y(r.Devices))
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%d</text><text x="%.1f" y="%.1f" text-anchor="end">0</text>`, left-4, y(r.Devices)+4, r.Devices, left-4, y(0)+4)
	for i := 0; i <= 4; i++ {
		t := tmax * float64(i) / 4
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%.0f s</text>`, x(t), h-8, t)
	}
	for _, name := range sortedKeys(r.Rollouts) {
		for _, e := range r.Rollouts[name].Events {
			if e.Action != "rollout.transition" && e.Action != "rollout.start" {
				continue
			}
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#aaa" stroke-dasharray="3,3"/>`, x(e.At), top, x(e.At), y(0))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" transform="rotate(-90 %.1f %.1f)" text-anchor="end" fill="#555">%s: %s</text>`,
				x(e.At)+3, top+2, x(e.At)+3, top+2, template.HTMLEscapeString(name), template.HTMLEscapeString(e.To))
		}
	}
	for i, v := range names {
		var pts []string
		for _, s := range r.Samples {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(s.At), y(s.Versions[v])))
		}
		c := colors[i%len(colors)]
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`, c, strings.Join(pts, " "))
		lx, ly := left+float64(i%4)*200, h+12+20*math.Floor(float64(i)/4)
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="12" height="4" fill="%s"/><text x="%.1f" y="%.1f">%s</text>`, lx, ly-4, c, lx+16, ly, template.HTMLEscapeString(v))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

var page = template.Must(template.New("report").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{.R.Scenario.Name}}: {{if .R.Passed}}passed{{else}}FAILED{{end}}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d232a; }
table { border-collapse: collapse; margin: .5rem 0 1.2rem; font-size: .9rem; }
th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #e4e7ec; vertical-align: top; }
.ok { color: #138a36; font-weight: 600; } .fail { color: #b42318; font-weight: 600; }
</style></head><body>
<h1>{{.R.Scenario.Name}}: {{if .R.Passed}}<span class="ok">passed</span>{{else}}<span class="fail">FAILED</span>{{end}}</h1>
<p>{{.R.Scenario.Description}}</p>
<p>{{.R.Devices}} drones, {{printf "%.0f" .R.Duration}} s, started {{.R.Started.Format "2006-01-02 15:04:05 MST"}}{{if .R.TimedOut}}, <b>ended by its timeout</b>{{end}}.</p>
<h2>Expectations</h2>
<table><tr><th></th><th>expectation</th><th>measured</th></tr>
{{range .R.Results}}<tr><td>{{if .OK}}<span class="ok">ok</span>{{else}}<span class="fail">FAIL</span>{{end}}</td><td>{{.Expectation}}</td><td>{{.Detail}}</td></tr>
{{end}}</table>
<h2>Versions across the fleet</h2>
{{.Chart}}
<h2>Rollouts</h2>
{{range $name, $r := .R.Rollouts}}<h3>{{$name}} ({{$r.Release}}, {{$r.ID}}): {{$r.Status}} at stage {{$r.Stage}}</h3>
<p>{{$r.Reason}} — canary of {{len $r.Canary}}; devices {{$r.Counts}}</p>
<table><tr><th>at</th><th>who</th><th>what</th><th>to</th><th>why</th></tr>
{{range $r.Events}}<tr><td>{{printf "%.1f" .At}} s</td><td>{{.Actor}}</td><td>{{.Action}}</td><td>{{.To}}</td><td>{{.Reason}}</td></tr>
{{end}}</table>
{{end}}
<h2>Timeline as played</h2>
<table><tr><th>at</th><th>what</th></tr>
{{range .R.Events}}<tr><td>{{printf "%.1f" .At}} s</td><td>{{.What}}{{if .Error}} <span class="fail">{{.Error}}</span>{{end}}</td></tr>
{{end}}</table>
<h2>Figures</h2>
<table>
{{range .R.BlastRadius}}<tr><td>blast radius of {{.Version}} ({{.Behaviour}})</td><td>{{.Devices}} drones ({{printf "%.1f" .Percent}} %)</td></tr>{{end}}
<tr><td>drones that ever ran each version</td><td>{{.R.EverRan}}</td></tr>
<tr><td>bricked</td><td>{{len .R.Bricked}}</td></tr>
<tr><td>fleet online after</td><td>{{printf "%.1f" .R.Figures.FleetOnline}} s</td></tr>
<tr><td>simulator RSS</td><td>{{.RSS}} ({{.PerDrone}} per drone; peak {{.Peak}})</td></tr>
<tr><td>power cuts</td><td>{{.R.Figures.PowerCuts}}</td></tr>
<tr><td>control plane killed</td><td>{{.R.Figures.ControlPlaneKills}} times</td></tr>
{{if .R.Figures.LeaderFailovers}}<tr><td>leader failovers</td><td>{{range .R.Figures.LeaderFailovers}}{{printf "%.2f" .}} s {{end}}</td></tr>{{end}}
{{if .R.Figures.BrokerNodeReconnects}}<tr><td>every drone back after a broker node died</td><td>{{range .R.Figures.BrokerNodeReconnects}}{{printf "%.2f" .}} s {{end}}</td></tr>{{end}}
<tr><td>reconnect after each restart</td><td>{{.R.Figures.Reconnects}} s (at most {{.R.Figures.PeakConnectRate}} connections in a second)</td></tr>
<tr><td>connections cut or refused</td><td>{{.R.Figures.LinkCuts}}</td></tr>
{{with .R.Gaps}}<tr><td>messages stored</td><td>{{.Messages}} from {{.Devices}} devices; missing {{.Missing}} ({{.DevicesMissing}} devices); samples dropped by full outboxes {{.Dropped}}</td></tr>{{end}}
{{with .R.Hostile}}<tr><td>hostile device</td><td>{{range .Attempts}}{{.}}<br>{{end}}recorded: {{.DecodeErrors}} decode errors, {{.ACLDenials}} ACL denials, {{.AuthFailures}} auth failures; healthy: {{.Healthy}} {{.Detail}}</td></tr>{{end}}
</table>
</body></html>
`))

// HTML writes the human report.
func (r *Report) HTML(w io.Writer) error {
	return page.Execute(w, struct {
		R                   *Report
		Chart               template.HTML
		RSS, PerDrone, Peak string
	}{r, r.chart(), fmt.Sprintf("%.0f MB", float64(r.Figures.SimRSSBytes)/1e6), fmt.Sprintf("%.0f KB", float64(r.Figures.RSSPerDroneBytes)/1e3),
		fmt.Sprintf("%.0f MB", float64(r.Figures.SimRSSPeakBytes)/1e6)})
}
