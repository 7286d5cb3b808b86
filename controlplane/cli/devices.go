package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/hangarfleet/hangar/controlplane/client"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// unknownSub is the end of a command group's dispatch, after its usage
// went to stderr: -h, --help and help asked for that usage (not an
// error); anything else is a usage error.
func unknownSub(group, sub string) error {
	switch sub {
	case "-h", "--help", "help":
		return nil
	case "":
		return fmt.Errorf("%w: hangar %s needs a command", ErrUsage, group)
	}
	return fmt.Errorf("%w: unknown %s command %q", ErrUsage, group, sub)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func labelString(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return oneLine(strings.Join(parts, ","))
}

func onlineString(d store.Device) string {
	switch {
	case d.Revoked:
		return "revoked"
	case d.AwaitingEnrollment:
		return "not enrolled"
	case d.Online:
		return "online"
	}
	return "offline"
}

func deviceList(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device ls")
	g.register(fs)
	selector := fs.String("selector", "", "only devices with these labels, e.g. hw=rev-b,base=zurich")
	online := fs.String("online", "", "only online (true) or offline (false) devices")
	version := fs.String("version", "", "only devices running this agent version")
	pending := fs.Bool("pending", false, "only enrollments waiting for approval (hangar device approve)")
	auth := fs.String("auth", "", "only devices that last authenticated with a password or a certificate")
	search := fs.String("search", "", "only devices whose id contains this text")
	sortBy := fs.String("sort", "", "order by "+strings.Join(store.DeviceSorts, ", ")+" (-last_seen: newest first; default id)")
	limit := fs.Int("limit", 0, "at most this many devices (0: all)")
	offset := fs.Int("offset", 0, "skip this many first (with --limit: paging)")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	dq := client.DeviceQuery{Selector: *selector, Version: *version, Pending: *pending, Auth: *auth, Search: *search, Sort: *sortBy,
		Limit: *limit, Offset: *offset}
	if *online != "" {
		on, err := strconv.ParseBool(*online)
		if err != nil {
			return fmt.Errorf("%w: --online must be true or false, not %q", ErrUsage, *online)
		}
		dq.Online = &on
	}
	ds, total, err := c.Devices(ctx, dq)
	if err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, ds)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	if *pending {
		fmt.Fprintln(tw, "ID	KNOWN	SINCE	FROM	KEY	APPROVED")
		for _, d := range ds {
			if d.Pending == nil {
				continue
			}
			known := "new"
			if !d.AwaitingEnrollment {
				known = "KNOWN: asks for a new key"
			}
			fmt.Fprintf(tw, "%s	%s	%s	%s	%s	%v\n", d.ID, known, ago(&d.Pending.Since), dash(d.Pending.Remote), d.Pending.Key, d.Pending.Approved)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintf(g.env.Stderr, "%d enrollment%s waiting; compare the key with the one the device logs, then: hangar device approve ID --key KEY\n", len(ds), plural(len(ds)))
		return nil
	}
	fmt.Fprintln(tw, "ID\tSTATUS\tVERSION\tHARDWARE\tBATTERY\tFLIGHT\tLAST SEEN\tLABELS")
	for _, d := range ds {
		batt, flight := "-", "-"
		if d.Latest != nil {
			if d.Latest.BatteryPct != nil {
				batt = fmt.Sprintf("%.0f%%", *d.Latest.BatteryPct)
			}
			flight = d.Latest.Flight
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, onlineString(d), dash(d.Version), dash(d.Hardware),
			batt, flight, ago(d.LastSeen), labelString(d.Labels))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	switch {
	case total > len(ds) && len(ds) > 0 && *offset+len(ds) < total:
		fmt.Fprintf(g.env.Stderr, "%d–%d of %d devices (--offset %d for the next)\n", *offset+1, *offset+len(ds), total, *offset+len(ds))
	case total > len(ds) && len(ds) > 0:
		fmt.Fprintf(g.env.Stderr, "%d–%d of %d devices\n", *offset+1, *offset+len(ds), total)
	case total > len(ds):
		fmt.Fprintf(g.env.Stderr, "no devices past %d (%d in all)\n", *offset, total)
	default:
		fmt.Fprintf(g.env.Stderr, "%d device%s\n", len(ds), plural(len(ds)))
	}
	return nil
}

// dash shows a value (often one a device reported) in a table cell.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return oneLine(s)
}

func oneID(fs *flag.FlagSet, args []string, what string) (string, error) {
	pos, err := parse(fs, args)
	if err != nil {
		return "", err
	}
	if len(pos) != 1 {
		return "", fmt.Errorf("%w: %s takes exactly one device id", ErrUsage, what)
	}
	if err := proto.ValidateDeviceID(pos[0]); err != nil {
		return "", fmt.Errorf("%w: %v", ErrUsage, err)
	}
	return pos[0], nil
}

func deviceShow(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device show")
	g.register(fs)
	id, err := oneID(fs, args, "device show")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var d store.Device
	if err := c.Do(ctx, http.MethodGet, "/api/v1/devices/"+id, nil, nil, &d); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, d)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("id", d.ID)
	row("status", onlineString(d))
	row("version", dash(d.Version))
	row("hardware", dash(d.Hardware)+"  (reported)")
	row("labels", labelString(d.Labels))
	if len(d.Payloads) > 0 {
		row("payloads", labelString(d.Payloads)+"  (reported)")
	}
	if len(d.ReportedLabels) > 0 {
		row("reported labels", labelString(d.ReportedLabels)+"  (what the device says; not used for grouping)")
	}
	if d.HardwareMismatch {
		row("hardware check", fmt.Sprintf("MISMATCH: labelled %s=%s, the device reports %s; left out of rollouts of hardware-specific releases",
			store.HardwareLabel, d.Labels[store.HardwareLabel], d.Hardware))
	}
	if d.AwaitingEnrollment && d.Pending == nil {
		row("enrollment", "pre-provisioned, not enrolled yet")
	}
	if p := d.Pending; p != nil {
		row("enrollment", fmt.Sprintf("waiting for approval since %s from %s, key %s (approved: %v)",
			p.Since.Local().Format(time.DateTime), dash(p.Remote), p.Key, p.Approved))
	}
	if d.Auth != "" {
		row("authenticates with", d.Auth)
	}
	if d.CertNotAfter != nil {
		row("certificate expires", d.CertNotAfter.Local().Format(time.DateTime))
	}
	row("last seen", ago(d.LastSeen))
	row("boot epoch", fmt.Sprint(d.Boot))
	row("dropped samples", fmt.Sprint(d.Dropped))
	if l := d.Latest; l != nil {
		if l.BatteryPct != nil {
			row("battery", fmt.Sprintf("%.0f%%", *l.BatteryPct))
		}
		row("flight", l.Flight)
		if l.Lat != nil {
			row("position", fmt.Sprintf("%.6f, %.6f, %.1f m", *l.Lat, *l.Lon, *l.AltM))
		}
		row("errors", fmt.Sprint(l.Errors))
		row("reboots", fmt.Sprint(l.Reboots))
	}
	return tw.Flush()
}

func deviceAdd(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device add")
	g.register(fs)
	var labels labelFlag
	fs.Var(&labels, "label", "label k=v (repeat, or k=v,k2=v2)")
	hardware := fs.String("hardware", "", "hardware revision")
	id, err := oneID(fs, args, "device add")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var cred api.Credential
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices", nil, api.AddDeviceRequest{ID: id, Hardware: *hardware, Labels: labels.m}, &cred); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, cred)
	}
	if cred.Password == "" {
		fmt.Fprintf(g.env.Stdout, "device %s added, waiting for enrollment: this control plane gives devices certificates, so the drone enrolls itself (hangar-agent --enroll-token-file ...) and gets its labels from here\n", id)
		return nil
	}
	fmt.Fprintf(g.env.Stdout, "device %s added. Its MQTT credential (shown once):\n  broker:   %s\n  username: %s\n  password: %s\n",
		id, cred.MQTTURL, cred.Username, cred.Password)
	return nil
}

func deviceRemove(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device rm")
	g.register(fs)
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	id, err := oneID(fs, args, "device rm")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := reasonQuery(*reason)
	var res struct {
		Already bool `json:"already_revoked"`
	}
	if err := c.Do(ctx, http.MethodDelete, "/api/v1/devices/"+id, q, nil, &res); err != nil {
		return err
	}
	if res.Already {
		fmt.Fprintf(g.env.Stdout, "device %s was already revoked\n", id)
		return nil
	}
	fmt.Fprintf(g.env.Stdout, "device %s revoked and disconnected\n", id)
	return nil
}

func deviceRekey(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device rekey")
	g.register(fs)
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	within := fs.Duration("within", api.DefaultRekeyWithin, "how long the device's next enrollment may re-key it")
	id, err := oneID(fs, args, "device rekey")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := reasonQuery(*reason)
	var out struct {
		Until time.Time `json:"until"`
	}
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices/"+id+"/rekey", q, api.RekeyRequest{Within: within.String()}, &out); err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "device %s may enroll again, once, until %s (its current credential works until it does)\n", id, out.Until.Local().Format(time.DateTime))
	return nil
}

func deviceApprove(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device approve")
	g.register(fs)
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	key := fs.String("key", "", "the fingerprint of the waiting key (at least its first 16 characters), as the device logs it: approve only that key")
	id, err := oneID(fs, args, "device approve")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := reasonQuery(*reason)
	var out struct {
		Key string `json:"key"`
	}
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices/"+id+"/approve", q, api.ApproveRequest{Key: *key}, &out); err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "enrollment of %s approved for key %s: it completes at the device's next attempt\n", id, out.Key)
	return nil
}

func deviceDeny(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device deny")
	g.register(fs)
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	id, err := oneID(fs, args, "device deny")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := reasonQuery(*reason)
	var out struct {
		Key string `json:"key"`
	}
	if err := c.Do(ctx, http.MethodDelete, "/api/v1/devices/"+id+"/pending", q, nil, &out); err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "enrollment of %s with key %s denied\n", id, out.Key)
	return nil
}

func devicePasswords(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device passwords")
	g.register(fs)
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var p api.Passwords
	switch {
	case len(pos) == 0:
		err = c.Do(ctx, http.MethodGet, "/api/v1/settings/device-passwords", nil, nil, &p)
	case len(pos) == 1 && (pos[0] == "on" || pos[0] == "off"):
		q := reasonQuery(*reason)
		err = c.Do(ctx, http.MethodPut, "/api/v1/settings/device-passwords", q, map[string]bool{"enabled": pos[0] == "on"}, &p)
	default:
		return fmt.Errorf("%w: hangar device passwords [on|off]", ErrUsage)
	}
	if err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, p)
	}
	state := "off: devices authenticate with certificates only"
	if p.Enabled {
		state = "on"
	}
	if !p.Available {
		state += " (this control plane has no device CA: passwords are the only way)"
	}
	fmt.Fprintf(g.env.Stdout, "password authentication: %s\n%d device%s last authenticated with a password", state, len(p.Using), plural(len(p.Using)))
	if len(p.Using) > 0 {
		shown := p.Using
		if len(shown) > 20 {
			shown = shown[:20]
		}
		fmt.Fprintf(g.env.Stdout, ": %s", strings.Join(shown, " "))
		if len(p.Using) > len(shown) {
			fmt.Fprintf(g.env.Stdout, " ... (hangar device ls --auth password)")
		}
	}
	fmt.Fprintln(g.env.Stdout)
	return nil
}

// labelFlag collects k=v labels from repeated flags.
type labelFlag struct{ m map[string]string }

func (l *labelFlag) String() string { return labelString(l.m) }

func (l *labelFlag) Set(s string) error {
	parsed, err := proto.ParseSelector(s)
	if err != nil {
		return err
	}
	if l.m == nil {
		l.m = map[string]string{}
	}
	for k, v := range parsed {
		l.m[k] = v
	}
	return proto.ValidateLabels(l.m)
}

func runEvents(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("events")
	g.register(fs)
	device := fs.String("device", "", "only this device")
	limit := fs.Int("limit", 50, "how many (the newest)")
	since := fs.String("since", "", "only events since then: a duration back from now (1h) or an RFC 3339 time")
	severity := fs.String("severity", "", "only events at least this severe: info, warning or critical")
	kind := fs.String("kind", "", "only events of this kind: alert, update, ack or message")
	follow := fs.Bool("follow", false, "then keep printing new events as they arrive, oldest first (Ctrl-C ends)")
	every := fs.Duration("interval", 2*time.Second, "with --follow: how often to ask for new events")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	path := "/api/v1/events"
	if *device != "" {
		path = "/api/v1/devices/" + url.PathEscape(*device) + "/events"
	}
	q := url.Values{"limit": {fmt.Sprint(*limit)}}
	for k, v := range map[string]string{"since": *since, "severity": *severity, "kind": *kind} {
		if v != "" {
			q.Set(k, v)
		}
	}
	var evs []store.Event // newest first
	if err := c.Do(ctx, http.MethodGet, path, q, nil, &evs); err != nil {
		return err
	}
	var enc *json.Encoder
	var tw *tabwriter.Writer
	if g.output == "json" {
		if !*follow {
			return printJSON(g.env.Stdout, evs)
		}
		enc = json.NewEncoder(g.env.Stdout) // one event a line
	} else {
		tw = tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TIME\tDEVICE\tKIND\tSEVERITY\tWHAT")
	}
	print := func(e store.Event) {
		if enc != nil {
			_ = enc.Encode(e)
			return
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.Time.Local().Format(time.DateTime), e.Device, e.Kind, e.Severity, oneLine(eventWhat(e)))
	}
	var last int64
	if *follow {
		// Oldest first, so that new ones follow below.
		for i := len(evs) - 1; i >= 0; i-- {
			print(evs[i])
		}
	} else {
		for _, e := range evs {
			print(e)
		}
	}
	for _, e := range evs {
		last = max(last, e.ID)
	}
	if tw != nil {
		tw.Flush()
	}
	if !*follow {
		return nil
	}
	t := time.NewTicker(*every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		q.Set("after", strconv.FormatInt(last, 10))
		q.Set("limit", "1000")
		q.Del("since")
		var more []store.Event // oldest first, after the cursor
		if err := c.Do(ctx, http.MethodGet, path, q, nil, &more); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		for _, e := range more {
			print(e)
			last = max(last, e.ID)
		}
		if tw != nil {
			tw.Flush()
		}
	}
}

// eventWhat is an event in a few words.
func eventWhat(e store.Event) string {
	what := e.Message
	if what == "" {
		what = e.Code
	}
	if u := e.Update; u != nil {
		what = fmt.Sprintf("%s %s: %s", u.Target, u.Version, u.State)
		if u.Reason != "" {
			what += " (" + u.Reason + ")"
		}
	}
	return what
}

func runHealth(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("health")
	g.register(fs)
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var h store.FleetHealth
	if err := c.Do(ctx, http.MethodGet, "/api/v1/fleet/health", nil, nil, &h); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, h)
	}
	w := g.env.Stdout
	fmt.Fprintf(w, "devices: %d  online: %d  flying: %d  low battery: %d  revoked: %d\n", h.Devices, h.Online, h.Flying, h.LowBatt, h.Revoked)
	vs := make([]string, 0, len(h.Versions))
	for v, n := range h.Versions {
		vs = append(vs, fmt.Sprintf("%s=%d", v, n))
	}
	sort.Strings(vs)
	fmt.Fprintf(w, "versions: %s\n", strings.Join(vs, " "))
	for _, hist := range []struct {
		name string
		h    store.Histogram
	}{{"battery %", h.Battery}, {"errors", h.Errors}} {
		parts := make([]string, len(hist.h))
		for i, b := range hist.h {
			parts[i] = fmt.Sprintf("%s:%d", b.Label, b.Count)
		}
		fmt.Fprintf(w, "%s: %s\n", hist.name, strings.Join(parts, " "))
	}
	return nil
}

// ErrAuditBroken: audit verify found the chain broken, or not holding a
// head recorded earlier.
var ErrAuditBroken = errors.New("audit log tampered with")

func runAudit(ctx context.Context, g *globals, args []string) error {
	if len(args) > 0 && args[0] == "verify" {
		return auditVerify(ctx, g, args[1:])
	}
	fs := g.newFlags("audit")
	g.register(fs)
	target := fs.String("target", "", "only entries about this device or rollout")
	limit := fs.Int("limit", 50, "how many")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := url.Values{"limit": {fmt.Sprint(*limit)}}
	if *target != "" {
		q.Set("target", *target)
	}
	var entries []store.Audit
	if err := c.Do(ctx, http.MethodGet, "/api/v1/audit", q, nil, &entries); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, entries)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tACTOR\tACTION\tTARGET\tREASON")
	for _, a := range entries {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", a.Time.Local().Format(time.DateTime), a.Actor, a.Action, a.Target, a.Reason)
	}
	return tw.Flush()
}

// auditVerify walks the audit log's hash chain on the server and, given a
// head printed by an earlier verify (ID:HASH), checks the log still holds
// it: a log cut short, or rewritten with its hashes recomputed, does not.
func auditVerify(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("audit verify")
	g.register(fs)
	head := fs.String("head", "", "a head printed by an earlier verify (ID:HASH), kept outside the control plane")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	var at int64
	var want []byte
	if *head != "" {
		id, h, ok := strings.Cut(*head, ":")
		n, err := strconv.ParseInt(id, 10, 64)
		sum, herr := hex.DecodeString(h)
		if !ok || err != nil || n < 1 || herr != nil || len(sum) != 32 {
			return fmt.Errorf("%w: --head must be ID:HASH as audit verify prints it, not %q", ErrUsage, *head)
		}
		at, want = n, sum
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := url.Values{}
	if at > 0 {
		q.Set("at", fmt.Sprint(at))
	}
	var v store.AuditVerification
	if err := c.Do(ctx, http.MethodGet, "/api/v1/audit/verify", q, nil, &v); err != nil {
		return err
	}
	if g.output == "json" {
		if err := printJSON(g.env.Stdout, v); err != nil {
			return err
		}
	}
	switch {
	case v.Broken != nil:
		return fmt.Errorf("%w: the chain breaks at entry %d: %s", ErrAuditBroken, v.Broken.ID, v.Broken.Why)
	case at > 0 && !bytes.Equal(v.At, want):
		return fmt.Errorf("%w: entry %d no longer has the hash recorded (the log was cut short or rewritten from there on)", ErrAuditBroken, at)
	}
	if g.output != "json" {
		fmt.Fprintf(g.env.Stdout, "audit log intact: %d entries; head %d:%x (keep it outside the control plane: audit verify --head checks it later)\n", v.Entries, v.HeadID, v.Head)
	}
	return nil
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

// parseLabelArgs reads "k=v" (set) and "k-" (remove) arguments.
func parseLabelArgs(args []string) (store.LabelChange, error) {
	var ch store.LabelChange
	for _, a := range args {
		if k, ok := strings.CutSuffix(a, "-"); ok && !strings.Contains(a, "=") {
			ch.Remove = append(ch.Remove, k)
			continue
		}
		kv, err := proto.ParseSelector(a)
		if err != nil || len(kv) == 0 {
			return ch, fmt.Errorf("%q: want key=value or key- (remove)", a)
		}
		if ch.Set == nil {
			ch.Set = map[string]string{}
		}
		maps.Copy(ch.Set, kv)
	}
	if err := proto.ValidateLabels(ch.Set); err != nil {
		return ch, err
	}
	return ch, nil
}

// readInventory reads lines "ID k=v k2=v2 k3-" (or comma separated);
// blank lines and lines starting with # are skipped.
func readInventory(path string, env Env) ([]store.LabelChange, error) {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	var out []store.LabelChange
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.FieldsFunc(line, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
		if len(fields) == 0 {
			continue
		}
		if seen[fields[0]] {
			return nil, fmt.Errorf("%s:%d: device %s appears twice", path, n, fields[0])
		}
		seen[fields[0]] = true
		if err := proto.ValidateDeviceID(fields[0]); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, n, err)
		}
		ch, err := parseLabelArgs(fields[1:])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, n, err)
		}
		ch.Device = fields[0]
		out = append(out, ch)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no devices", path)
	}
	return out, nil
}

func deviceLabel(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device label")
	g.register(fs)
	file := fs.String("file", "", `label many devices: lines "ID k=v k2=v2 k3-" (- for standard input)`)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	var changes []store.LabelChange
	switch {
	case *file != "" && len(pos) > 0:
		return fmt.Errorf("%w: device label takes --file or ID LABELS, not both", ErrUsage)
	case *file != "":
		if changes, err = readInventory(*file, g.env); err != nil {
			return err
		}
	case len(pos) < 2:
		return fmt.Errorf("%w: device label ID key=value... (key- removes a label)", ErrUsage)
	default:
		if err := proto.ValidateDeviceID(pos[0]); err != nil {
			return fmt.Errorf("%w: %v", ErrUsage, err)
		}
		ch, err := parseLabelArgs(pos[1:])
		if err != nil {
			return fmt.Errorf("%w: %v", ErrUsage, err)
		}
		ch.Device = pos[0]
		changes = []store.LabelChange{ch}
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	if len(changes) == 1 {
		var d store.Device
		ch := changes[0]
		if err := c.Do(ctx, http.MethodPatch, "/api/v1/devices/"+url.PathEscape(ch.Device)+"/labels", nil,
			api.LabelRequest{Set: ch.Set, Remove: ch.Remove}, &d); err != nil {
			return err
		}
		if g.output == "json" {
			return printJSON(g.env.Stdout, d)
		}
		fmt.Fprintf(g.env.Stdout, "device %s: labels %s\n", d.ID, labelString(d.Labels))
		return nil
	}
	// One change, all or nothing.
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices/labels", nil, api.LabelsRequest{Devices: changes}, nil); err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "labelled %d devices\n", len(changes))
	return nil
}

func deviceImport(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device import")
	g.register(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf(`%w: device import FILE (lines "ID k=v k2=v2"; - for standard input)`, ErrUsage)
	}
	changes, err := readInventory(pos[0], g.env)
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var total api.ImportResult // one request: all or nothing
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices/import", nil, api.LabelsRequest{Devices: changes}, &total); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, total)
	}
	fmt.Fprintf(g.env.Stdout, "%d devices pre-provisioned (they take their labels when they enroll), %d already known relabelled\n",
		total.Created, total.Labelled)
	return nil
}

const profileAbout = `A profile is a named enrollment token: a device that enrolls with it gets
the profile's labels (labels an operator pre-provisioned for it win).`

func runProfile(ctx context.Context, g *globals, args []string) error {
	sub := ""
	if len(args) > 0 {
		sub, args = args[0], args[1:]
	}
	fs := g.newFlags("enroll-profile " + sub)
	g.register(fs)
	var labels labelFlag
	if sub == "create" {
		fs.Var(&labels, "label", "label k=v given to devices that enroll with the profile's token (repeat)")
	}
	out := fs.String("out", "", "create: write the token to this file (mode 0600) instead of printing it")
	replace := fs.Bool("replace", false, "create: replace an existing profile of that name (its old token stops working)")
	switch sub {
	case "create", "ls", "list", "rm", "delete":
	default:
		return unknownSub("enroll-profile", sub)
	}
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	switch sub {
	case "ls", "list":
		var ps []store.Profile
		if err := c.Do(ctx, http.MethodGet, "/api/v1/enroll-profiles", nil, nil, &ps); err != nil {
			return err
		}
		if g.output == "json" {
			return printJSON(g.env.Stdout, ps)
		}
		tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tLABELS\tCREATED")
		for _, p := range ps {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", p.Name, labelString(p.Labels), p.Created.Local().Format(time.DateTime))
		}
		return tw.Flush()
	case "rm", "delete":
		if len(pos) != 1 {
			return fmt.Errorf("%w: enroll-profile rm NAME", ErrUsage)
		}
		if err := c.Do(ctx, http.MethodDelete, "/api/v1/enroll-profiles/"+url.PathEscape(pos[0]), nil, nil, nil); err != nil {
			return err
		}
		fmt.Fprintf(g.env.Stdout, "enrollment profile %s removed: its token no longer enrolls devices\n", pos[0])
		return nil
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: enroll-profile create NAME --label k=v", ErrUsage)
	}
	if len(labels.m) == 0 {
		return fmt.Errorf("%w: enroll-profile create needs --label k=v (the labels its devices get)", ErrUsage)
	}
	var pt api.ProfileToken
	if err := c.Do(ctx, http.MethodPost, "/api/v1/enroll-profiles", nil, api.ProfileRequest{Name: pos[0], Labels: labels.m, Replace: *replace}, &pt); err != nil {
		return err
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(pt.Token+"\n"), 0o600); err != nil {
			return err
		}
		fmt.Fprintf(g.env.Stdout, "enrollment profile %s (%s): token written to %s\n", pt.Name, labelString(pt.Labels), *out)
		return nil
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, pt)
	}
	fmt.Fprintf(g.env.Stdout, "enrollment profile %s (%s). Its token (shown once):\n  %s\n", pt.Name, labelString(pt.Labels), pt.Token)
	return nil
}
