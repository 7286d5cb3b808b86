package e2e

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/hangarfleet/hangar/controlplane/client"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
)

// findBrowser finds Chromium; under CI its absence is a failure.
func findBrowser(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no Chromium found (CI installs Debian's chromium): the console tests cannot run")
	}
	t.Skip("no Chromium found: apt-get install chromium")
	return ""
}

// browser is a headless Chromium page driven over the DevTools protocol.
type browser struct {
	t     *testing.T
	ctx   context.Context
	base  string
	shots string
}

func newBrowser(t *testing.T, base string) *browser {
	bin := findBrowser(t)
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(bin), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 900),
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("no-first-run", true), chromedp.Flag("disable-dev-shm-usage", true))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelA() })
	shots := os.Getenv("HANGAR_TEST_ARTIFACTS")
	if shots == "" {
		shots = filepath.Join(os.TempDir(), "hangar-console-screenshots")
	}
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	b := &browser{t: t, ctx: ctx, base: base, shots: shots}
	// The first Run starts the browser and ties it to the context it is
	// given: b.ctx, not a timeout derived from it.
	if _, err := chromedp.Run(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	return b
}

func (b *browser) run(what string, a chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, a); err != nil {
		b.t.Fatalf("%s: %v\npage text:\n%s", what, err, b.text())
	}
}

// text is the page's text, for failure messages.
func (b *browser) text() string {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	s, _ := chromedp.Run(ctx, chromedp.Evaluate[string]("document.body ? document.body.innerText : ''"))
	return s
}

// evalJS evaluates a JavaScript expression in the page.
func evalJS[T any](b *browser, expr string, opts ...chromedp.EvaluateOption) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr, opts...))
	if err != nil {
		b.t.Fatalf("evaluate %s: %v\npage text:\n%s", expr, err, b.text())
	}
	return v
}

// do runs JavaScript for its effect.
func (b *browser) do(js string) {
	b.t.Helper()
	evalJS[bool](b, "("+js+", true)")
}

// waitJS waits until a JavaScript expression is true.
func (b *browser) waitJS(what, expr string, timeout time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if evalJS[bool](b, "!!("+expr+")") {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("timed out waiting for %s (%s)\npage text:\n%s", what, expr, b.text())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// click clicks the element a selector finds, as a user would.
func (b *browser) click(sel string) {
	b.t.Helper()
	b.waitJS("element "+sel, fmt.Sprintf("document.querySelector(%q)", sel), 20*time.Second)
	b.do(fmt.Sprintf("document.querySelector(%q).click()", sel))
}

// fill types a value into an input.
func (b *browser) fill(sel, value string) {
	b.t.Helper()
	b.waitJS("input "+sel, fmt.Sprintf("document.querySelector(%q)", sel), 20*time.Second)
	b.do(fmt.Sprintf("(e => { e.focus(); e.value = %q; e.dispatchEvent(new Event('input', {bubbles: true})); })(document.querySelector(%q))", value, sel))
}

func (b *browser) submit(sel string) {
	b.t.Helper()
	b.do(fmt.Sprintf("document.querySelector(%q).requestSubmit()", sel))
}

// open goes to a console view and waits for it to be drawn; it returns
// how long that took.
func (b *browser) open(hash string) time.Duration {
	b.t.Helper()
	start := time.Now()
	b.do(fmt.Sprintf("(document.querySelector('#view').dataset.ready = '', location.hash = %q)", hash))
	b.waitJS("view "+hash, "document.querySelector('#view').dataset.ready", 30*time.Second)
	if r := evalJS[string](b, "document.querySelector('#view').dataset.ready"); r != "true" {
		b.t.Fatalf("view %s: %s", hash, b.text())
	}
	return time.Since(start)
}

func (b *browser) screenshot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100: PNG
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	p := filepath.Join(b.shots, name+".png")
	if err := os.WriteFile(p, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot %s", p)
}

func (b *browser) signIn(token string) {
	b.t.Helper()
	b.run("open the console", chromedp.Navigate(b.base+"/"))
	b.waitJS("the sign-in form", "!document.querySelector('#login').hidden", 30*time.Second)
	b.fill("#token", token)
	b.submit("#login-form")
	b.waitJS("signed in", "document.querySelector('#view').dataset.ready === 'true'", 30*time.Second)
}

func (b *browser) signOut() {
	b.t.Helper()
	b.click("#signout")
	b.waitJS("the sign-in form", "!document.querySelector('#login').hidden", 10*time.Second)
}

// TestConsole drives the console in headless Chromium against a control
// plane with a simulated fleet of 30 drones and 10,000 pre-provisioned
// devices: sign-in, the overview, a device's charts, paging through the
// devices, a rollout started from the CLI moving on the page without a
// reload, pausing it with the button, and a viewer who sees no actions
// and whose calls to act are refused.
func TestConsole(t *testing.T) {
	findBrowser(t)
	kit := newReleaseKit(t)
	cp := startControlPlane(t, server.Options{RootKeys: []ed25519.PublicKey{kit.rootKey(t)}, RolloutInterval: 300 * time.Millisecond,
		HistoryInterval: time.Second})
	const n = 30
	fleet := newTestFleet(t, cp, n, func(o *sim.FleetOptions) {
		o.Roots = []ed25519.PublicKey{kit.rootKey(t)}
		o.Grounded = true
		o.TrialSoak = 300 * time.Millisecond
		o.TrialDeadline = 30 * time.Second
		o.SampleInterval, o.BatchSize = 200*time.Millisecond, 2
	})
	ctx := context.Background()
	waitFor(t, 60*time.Second, "fleet online", func() (bool, string) {
		on := true
		ds, _ := cp.Store().Devices(ctx, store.DeviceFilter{Online: &on})
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	})
	// 10,000 more devices, pre-provisioned (awaiting enrollment).
	inv := filepath.Join(t.TempDir(), "inventory")
	var sb strings.Builder
	for i := range 10000 {
		fmt.Fprintf(&sb, "spare-%05d hw=rev-%c base=depot\n", i, 'a'+rune(i%3))
	}
	os.WriteFile(inv, []byte(sb.String()), 0o644)
	kit.cli(t, cp.URL(), "device", "import", inv, "--token-file", adminTokenFile(cp))
	// Both releases ship with a delta: 1.1.0 from the build the drones left
	// the factory with, 1.2.0 from 1.1.0.
	v110 := sim.Firmware{Version: "1.1.0", Behaviour: sim.Good, Size: 16 << 10}
	kit.simReleaseDelta(t, cp, v110, 110, sim.FactoryFirmware("1.0.0", 0).Artifact())
	kit.simReleaseDelta(t, cp, sim.Firmware{Version: "1.2.0", Behaviour: sim.Good}, 120, v110.Artifact())
	// The tokens come from the typed client, as automation would make them.
	api := client.New(cp.URL(), cp.adminToken(t))
	mint := func(name, role string) string {
		tok, err := api.CreateToken(ctx, wire.CreateToken{Name: name, Role: role, ExpiresIn: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		return tok.Token
	}
	viewer, operator := mint("vera", store.RoleViewer), mint("otto", store.RoleOperator)

	b := newBrowser(t, cp.URL())
	timings := map[string]time.Duration{}

	// Sign in as an operator: the overview shows the simulated fleet.
	start := time.Now()
	b.signIn(operator)
	timings["overview (sign-in)"] = time.Since(start)
	b.waitJS("30 online on the overview", "document.querySelector('#c-online .big')?.textContent === '30'", 30*time.Second)
	b.waitJS("positions on the map", "document.querySelectorAll('#map svg circle').length >= 30", 30*time.Second)
	who := evalJS[string](b, "document.querySelector('#me').textContent")
	if who != "otto (operator)" {
		t.Errorf("signed in as %q", who)
	}
	b.waitJS("the online chart has points", "document.querySelector('#chart-online canvas') !== null", 30*time.Second)
	b.screenshot("overview")

	// A device's charts render with data.
	drones := fleet.Drones()
	timings["device page"] = b.open("#device/" + drones[0].ID)
	b.waitJS("battery chart with samples", "Number(document.querySelector('#chart-battery')?.dataset.points || 0) > 3 && document.querySelector('#chart-battery canvas')", 30*time.Second)
	b.screenshot("device")

	// The devices page pages through 10,030 devices.
	timings["devices page"] = b.open("#devices")
	b.waitJS("the total", "document.querySelector('#device-list').dataset.total === '10030'", 10*time.Second)
	first := evalJS[string](b, "document.querySelector('#devices-table tbody tr td').textContent")
	b.click("#pager-next")
	b.waitJS("page two", "document.querySelector('#device-list').dataset.offset === '50'", 10*time.Second)
	second := evalJS[string](b, "document.querySelector('#devices-table tbody tr td').textContent")
	prefix := strings.TrimRight(drones[0].ID, "0123456789")
	if first == second || first != drones[0].ID {
		t.Errorf("page one starts at %s, page two at %s", first, second)
	}
	info := evalJS[string](b, "document.querySelector('#page-info').textContent")
	if info != "51–100 of 10030" {
		t.Errorf("page info %q", info)
	}
	b.click("button[data-sort=id]")
	b.waitJS("descending", "document.querySelector('#devices-table tbody tr td')?.textContent === 'spare-09999'", 10*time.Second)
	b.fill("#f-q", prefix+"0001") // ten of the thirty drones
	b.submit("#device-filters")
	b.waitJS("search result", "document.querySelector('#device-list').dataset.total === '10'", 10*time.Second)
	b.screenshot("devices")
	start = time.Now()
	for off := 0; off < 10030; off += 2500 {
		b.open(fmt.Sprintf("#devices?offset=%d", off))
	}
	timings["devices page, 5 pages across the fleet (each)"] = time.Since(start) / 5

	// A rollout started from the CLI moves on the page without a reload.
	id := kit.rollout(t, cp, "--release", "1.1.0", "--start", "--stages", "10%,100%", "--min-canary", "3", "--soak", "2s", "--device-timeout", "2m")
	timings["rollout page"] = b.open("#rollout/" + id)
	b.do("window.__noReload = true")
	b.waitJS("the rollout completed on the page", "document.querySelector('#rollout-status')?.textContent === 'completed'", 3*time.Minute)
	if !evalJS[bool](b, "window.__noReload === true && Number(document.querySelector('#view').dataset.refreshed || 0) > 0") {
		t.Error("the rollout page reloaded or was not refreshed by the live stream")
	}
	// Every drone took the delta: the page says what came over the air,
	// and the members' Via.
	b.waitJS("the transfer on the rollout page", "(document.querySelector('#rollout-transfer')?.textContent || '').includes('delta to 30')", 20*time.Second)
	if txt := evalJS[string](b, "document.querySelector('#view').innerText"); !strings.Contains(txt, "Via") || !strings.Contains(txt, "saved") {
		t.Errorf("rollout page without the members' Via or the bytes saved:\n%.2000s", txt)
	}
	b.screenshot("rollout-completed")

	// A dry run from the create form: who each stage takes, who is left
	// out and why (the pre-provisioned devices), and nothing created.
	b.open("#rollouts")
	b.do(`(s => { s.value = "agent@1.2.0"; })(document.querySelector("#c-release"))`)
	b.fill("#c-soak", "30s")
	b.click("#c-dry-run")
	b.waitJS("the dry run", "document.querySelector('#preview-excluded') || document.querySelector('#preview-stages')", 20*time.Second)
	if txt := evalJS[string](b, "document.querySelector('#preview').innerText"); !strings.Contains(txt, "devices targeted") || !strings.Contains(txt, "Excluded, and why") {
		t.Errorf("dry run preview: %s", txt)
	}
	// The drones run 1.1.0 now, the base of 1.2.0's delta.
	if txt := evalJS[string](b, "document.querySelector('#preview-transfer')?.textContent || ''"); !strings.Contains(txt, "delta to 30") {
		t.Errorf("dry run transfer: %q", txt)
	}
	b.screenshot("rollout-dry-run")
	if rs, _ := api.Rollouts(ctx); len(rs) != 1 {
		t.Errorf("a dry run created a rollout: %d rollouts", len(rs))
	}

	// Pausing with the button shows in the API.
	id2 := kit.rollout(t, cp, "--release", "1.2.0", "--start", "--stages", "10%,100%", "--min-canary", "3", "--soak", "1h", "--device-timeout", "2m")
	b.open("#rollout/" + id2)
	b.waitJS("a pause button", "document.querySelector('button[data-action=pause]')", 20*time.Second)
	b.click("button[data-action=pause]")
	b.waitJS("the confirmation", "document.querySelector('#confirm').open", 10*time.Second)
	b.fill("#confirm-reason", "checking the canary by hand")
	b.click("#confirm-ok")
	waitFor(t, 10*time.Second, "paused in the API", func() (bool, string) {
		rep, err := api.Rollout(ctx, id2)
		return err == nil && rep.State.Status == rollout.StatusPaused, fmt.Sprintf("%v %v", rep.State.Status, err)
	})
	evs, _ := api.RolloutEvents(ctx, id2)
	found := false
	for _, e := range evs {
		if e.Action == "rollout.pause" && e.Actor == "otto" && e.Reason == "checking the canary by hand" {
			found = true
		}
	}
	if !found {
		t.Errorf("the pause is not audited as otto's with the reason: %+v", evs)
	}
	b.waitJS("paused on the page", "document.querySelector('#rollout-status')?.textContent === 'paused'", 10*time.Second)
	b.screenshot("rollout-paused")
	for _, v := range []string{"releases", "rollouts", "events", "delivery", "audit", "tokens"} {
		timings[v+" page"] = b.open("#" + v)
		b.screenshot(v)
	}
	// Every control has a label, on every view an operator opens.
	for _, v := range []string{"#overview", "#devices", "#device/" + drones[0].ID, "#rollouts", "#rollout/" + id2, "#events", "#delivery", "#audit"} {
		b.open(v)
		if unlabelled := evalJS[string](b, `[...document.querySelectorAll("input:not([type=hidden]), select, textarea")].filter(e => !(e.labels && e.labels.length) && !e.getAttribute("aria-label")).map(e => e.id || e.outerHTML.slice(0, 60)).join(", ")`); unlabelled != "" {
			t.Errorf("%s: controls without a label: %s", v, unlabelled)
		}
	}
	// Usable at 800 px: nothing but wide tables scrolls sideways.
	b.run("800 px", chromedp.EmulateViewport(800, 900))
	for _, v := range []string{"#overview", "#rollout/" + id2} {
		b.open(v)
		if w := evalJS[int](b, "document.documentElement.scrollWidth"); w > 820 {
			t.Errorf("%s at 800 px is %d px wide", v, w)
		}
		b.screenshot("800px-" + strings.NewReplacer("#", "", "/", "-").Replace(v))
	}
	b.run("back to 1280 px", chromedp.EmulateViewport(1280, 900))

	// A viewer sees no action buttons, and the API refuses its actions.
	b.signOut()
	b.signIn(viewer)
	b.open("#rollout/" + id2)
	buttons := evalJS[int](b, "document.querySelectorAll('button[data-action]').length")
	if buttons != 0 {
		t.Errorf("a viewer sees %d action buttons", buttons)
	}
	b.open("#rollouts")
	forms := evalJS[int](b, "document.querySelectorAll('#create-form, #rollout-create').length")
	b.open("#device/" + drones[1].ID)
	forms += evalJS[int](b, "document.querySelectorAll('#label-form, #update-form, #revoke').length")
	if forms != 0 {
		t.Errorf("a viewer sees %d forms to act", forms)
	}
	if !evalJS[bool](b, "document.querySelector('nav a[data-view=tokens]').hidden") {
		t.Error("a viewer sees the tokens page link")
	}
	status := evalJS[int](b, fmt.Sprintf(`fetch("/api/v1/rollouts/%s/resume", {method: "POST", headers: {Authorization: "Bearer " + (sessionStorage.getItem("hangar-token") || localStorage.getItem("hangar-token")), "Content-Type": "application/json"}, body: "{}"}).then(r => r.status)`, id2),
		chromedp.EvalAwaitPromise)
	if status != 403 {
		t.Errorf("a viewer's resume: HTTP %d, want 403", status)
	}
	if rep, _ := api.Rollout(ctx, id2); rep.State.Status != rollout.StatusPaused {
		t.Errorf("after the viewer's attempt the rollout is %s", rep.State.Status)
	}
	b.screenshot("viewer-rollout")
	if _, err := api.Act(ctx, id2, rollout.OpAbort, "test over"); err != nil {
		t.Error(err)
	}
	for k, v := range timings {
		t.Logf("load time %-48s %v", k, v.Round(time.Millisecond))
	}
}
