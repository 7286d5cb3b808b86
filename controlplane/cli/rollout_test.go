package cli_test

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

// startReleaseServer starts a control plane that accepts releases signed
// under a root made here, and pushes release 2.0.0 for rev-a, rev-b and
// rev-c.
func startReleaseServer(t *testing.T) cp {
	t.Helper()
	keys := t.TempDir()
	must := func(args ...string) {
		t.Helper()
		if err := cli.Run(context.Background(), args, cli.Env{Stdout: &strings.Builder{}, Stderr: &strings.Builder{}, Getenv: func(string) string { return "" }}); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
	}
	must("release", "keygen", "--out", filepath.Join(keys, "root"))
	must("release", "keygen", "--out", filepath.Join(keys, "rel"))
	must("release", "keys", "--root-key", filepath.Join(keys, "root.key"), "--add", filepath.Join(keys, "rel.pub"), "--out", filepath.Join(keys, "keys.cose"))
	pemBytes, err := os.ReadFile(filepath.Join(keys, "root.pub"))
	if err != nil {
		t.Fatal(err)
	}
	root, err := proto.ParsePublicKey(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	c := startServerWith(t, server.Options{RootKeys: []ed25519.PublicKey{root}})
	art := filepath.Join(keys, "agent-2.0.0")
	os.WriteFile(art, []byte("build 2.0.0"), 0o644)
	must("release", "sign", "--key", filepath.Join(keys, "rel.key"), "--artifact", art, "--version", "2.0.0",
		"--hardware", "rev-a,rev-b,rev-c", "--arch", "arm64", "--counter", "200")
	if _, _, err := run(t, c, "release", "push", "--keys", filepath.Join(keys, "keys.cose"), "--artifact", art); err != nil {
		t.Fatal(err)
	}
	return c
}

// A dry run shows which devices each stage takes and which are left out
// and why; create with the same flags takes exactly those. A selector that
// matches nothing is refused with a clear error.
func TestRolloutDryRunIsTheRun(t *testing.T) {
	c := startReleaseServer(t)
	// 60 devices: rev-a common, rev-c rare, two bases; one without an hw
	// label, one labelled rev-b that reports nothing yet.
	var inv strings.Builder
	for i := range 60 {
		hw := "rev-a"
		switch {
		case i%20 == 0:
			hw = "rev-c"
		case i%3 == 0:
			hw = "rev-b"
		}
		fmt.Fprintf(&inv, "drone-%02d hw=%s base=%s\n", i, hw, []string{"zurich", "bern"}[i%2])
	}
	invFile := filepath.Join(t.TempDir(), "inventory")
	os.WriteFile(invFile, []byte(inv.String()), 0o644)
	for i := range 60 {
		if _, _, err := run(t, c, "device", "add", fmt.Sprintf("drone-%02d", i)); err != nil {
			t.Fatal(err)
		}
	}
	out, _, err := run(t, c, "device", "label", "--file", invFile)
	if err != nil || !strings.Contains(out, "labelled 60 devices") {
		t.Fatalf("label --file: %v %s", err, out)
	}
	if _, _, err := run(t, c, "device", "add", "drone-nolabel"); err != nil {
		t.Fatal(err)
	}

	flags := []string{"rollout", "create", "--release", "2.0.0", "--stages", "1%,25%,100%", "--min-canary", "1", "-o", "json"}
	out, _, err = run(t, c, append(flags, "--dry-run")...)
	if err != nil {
		t.Fatal(err)
	}
	var dry api.CreateResult
	if err := json.Unmarshal([]byte(out), &dry); err != nil || dry.Rollout != nil {
		t.Fatalf("dry run: %v %s", err, out)
	}
	if dry.Targeted != 60 || len(dry.Excluded) != 1 || dry.Excluded[0].Device != "drone-nolabel" || !strings.Contains(dry.Excluded[0].Reason, "no hw label") {
		t.Fatalf("dry run targeted %d, excluded %+v", dry.Targeted, dry.Excluded)
	}
	hw := map[string]bool{}
	for _, id := range dry.Stages[0].Devices {
		n := 0
		fmt.Sscanf(id, "drone-%d", &n)
		switch {
		case n%20 == 0:
			hw["rev-c"] = true
		case n%3 == 0:
			hw["rev-b"] = true
		default:
			hw["rev-a"] = true
		}
	}
	if len(hw) != 3 || !strings.Contains(dry.Canary, "3 values of hw") {
		t.Fatalf("canary %v covers %v; note %q", dry.Stages[0].Devices, hw, dry.Canary)
	}
	// The table output says the same, for people.
	out, _, err = run(t, c, "rollout", "create", "--release", "2.0.0", "--stages", "1%,25%,100%", "--min-canary", "1", "--selector", "base=bern", "--dry-run")
	if err != nil || !strings.Contains(out, "stage 1 (1%)") || !strings.Contains(out, "canary: the first stage holds") {
		t.Fatalf("dry run table: %v\n%s", err, out)
	}
	out, _, err = run(t, c, flags...)
	if err != nil {
		t.Fatal(err)
	}
	var made api.CreateResult
	if err := json.Unmarshal([]byte(out), &made); err != nil || made.Rollout == nil {
		t.Fatalf("create: %v %s", err, out)
	}
	for i := range dry.Stages {
		if !slices.Equal(dry.Stages[i].Devices, made.Stages[i].Devices) {
			t.Fatalf("stage %d: dry run %v, create %v", i+1, dry.Stages[i].Devices, made.Stages[i].Devices)
		}
	}
	// And the stored members are those.
	out, _, err = run(t, c, "rollout", "devices", made.Rollout.Spec.ID, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var ms []rollout.MemberReport
	json.Unmarshal([]byte(out), &ms)
	byStage := map[int][]string{}
	for _, m := range ms {
		byStage[m.Stage-1] = append(byStage[m.Stage-1], m.Device)
	}
	for i := range dry.Stages {
		slices.Sort(byStage[i])
		if !slices.Equal(byStage[i], dry.Stages[i].Devices) {
			t.Fatalf("stored stage %d: %v, dry run %v", i+1, byStage[i], dry.Stages[i].Devices)
		}
	}

	// A selector that matches nothing, and one whose every device is left out.
	_, _, err = run(t, c, "rollout", "create", "--release", "2.0.0", "--selector", "base=zurch")
	var apiErr *cli.APIError
	if !errors.As(err, &apiErr) || apiErr.Status != 422 || !strings.Contains(err.Error(), "selector base=zurch matches no device") {
		t.Fatalf("empty selector: %v", err)
	}
	// A created rollout holds its members (started or not).
	_, _, err = run(t, c, "rollout", "create", "--release", "2.0.0", "--selector", "hw=rev-a", "--dry-run")
	if !errors.As(err, &apiErr) || !strings.Contains(err.Error(), "in rollout "+made.Rollout.Spec.ID) {
		t.Fatalf("every device busy: %v", err)
	}
	if out, _, _ := run(t, c, "rollout", "ls"); strings.Count(out, "r-") != 1 {
		t.Fatalf("a refused rollout was stored:\n%s", out)
	}

	// revert without a revert release says what it needs.
	run(t, c, "rollout", "abort", made.Rollout.Spec.ID)
	_, _, err = run(t, c, "rollout", "revert", made.Rollout.Spec.ID)
	if !errors.As(err, &apiErr) || apiErr.Status != 409 || !strings.Contains(err.Error(), "revert needs a revert release") {
		t.Fatalf("revert: %v", err)
	}
}

// Operators own the labels: device label sets and removes them, import
// pre-provisions, an enrollment profile labels what enrolls with it.
func TestLabelCommands(t *testing.T) {
	c := startServer(t)
	if _, _, err := run(t, c, "device", "add", "d1", "--hardware", "rev-b"); err != nil {
		t.Fatal(err)
	}
	out, _, err := run(t, c, "device", "label", "d1", "base=zurich", "team=ops")
	if err != nil || !strings.Contains(out, "base=zurich,hw=rev-b,team=ops") {
		t.Fatalf("label: %v %s", err, out)
	}
	if out, _, err = run(t, c, "device", "label", "d1", "team-"); err != nil || strings.Contains(out, "team") {
		t.Fatalf("remove a label: %v %s", err, out)
	}
	for _, bad := range [][]string{{"device", "label", "d1"}, {"device", "label", "d1", "no_equals_sign"}, {"device", "label", "d1", "k=v", "--file", "x"}} {
		if _, _, err := run(t, c, bad...); !errors.Is(err, cli.ErrUsage) {
			t.Errorf("%v: %v", bad, err)
		}
	}
	var apiErr *cli.APIError
	if _, _, err := run(t, c, "device", "label", "ghost", "a=b"); !errors.As(err, &apiErr) || apiErr.Status != 404 {
		t.Errorf("label an unknown device: %v", err)
	}
	inv := filepath.Join(t.TempDir(), "inv")
	os.WriteFile(inv, []byte("# factory batch 7\nn1 hw=rev-c base=geneva\nn2,hw=rev-c,base=bern\nd1 base=oslo\n"), 0o644)
	if out, _, err = run(t, c, "device", "import", inv); err != nil || !strings.Contains(out, "2 devices pre-provisioned") || !strings.Contains(out, "1 already known") {
		t.Fatalf("import: %v %s", err, out)
	}
	os.WriteFile(inv, []byte("n3 hw=rev-c\n,\nn3 base=x\n"), 0o644)
	if _, _, err := run(t, c, "device", "import", inv); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("an id twice: %v", err)
	}
	// A label change of many devices is one change: an unknown id on the
	// last line changes nothing at all.
	os.WriteFile(inv, []byte("n1 base=far\nn2 base=far\nghost base=far\n"), 0o644)
	if _, _, err := run(t, c, "device", "label", "--file", inv); !errors.As(err, &apiErr) || apiErr.Status != 404 {
		t.Errorf("label --file with an unknown id: %v", err)
	}
	if out, _, _ := run(t, c, "device", "show", "n1"); strings.Contains(out, "base=far") {
		t.Errorf("a refused label change applied in part:\n%s", out)
	}
	out, _, _ = run(t, c, "device", "show", "n1", "-o", "json")
	var d store.Device
	json.Unmarshal([]byte(out), &d)
	if !d.AwaitingEnrollment || d.Labels["base"] != "geneva" {
		t.Fatalf("pre-provisioned: %+v", d)
	}
	// A profile: its token enrolls devices with its labels.
	out, _, err = run(t, c, "enroll-profile", "create", "zurich-factory", "--label", "base=zurich", "--label", "fleet=survey", "-o", "json")
	var pt api.ProfileToken
	if err != nil || json.Unmarshal([]byte(out), &pt) != nil || !strings.HasPrefix(pt.Token, "hge_") {
		t.Fatalf("profile: %v %s", err, out)
	}
	if out, _, _ := run(t, c, "enroll-profile", "ls"); !strings.Contains(out, "base=zurich,fleet=survey") || strings.Contains(out, pt.Token) {
		t.Fatalf("profile ls:\n%s", out)
	}
	// The same name again would silently kill the token in use: refused
	// unless --replace.
	if _, _, err := run(t, c, "enroll-profile", "create", "zurich-factory", "--label", "base=bern"); !errors.As(err, &apiErr) || apiErr.Status != 409 {
		t.Errorf("a profile created twice: %v", err)
	}
	for _, bad := range []string{"a/b", ""} {
		if _, _, err := run(t, c, "enroll-profile", "create", bad, "--label", "base=x"); err == nil {
			t.Errorf("profile name %q accepted", bad)
		}
	}
	if _, _, err := run(t, c, "enroll-profile", "create", "empty"); !errors.Is(err, cli.ErrUsage) {
		t.Errorf("a profile without labels: %v", err)
	}
	enroll := func(tok, id, body string) int {
		resp, err := http.Post(c.url+"/api/v1/enroll", "application/json",
			strings.NewReader(`{"enroll_token":"`+tok+`","device_id":"`+id+`","hardware":"rev-b"`+body+`}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// The device claims base=bern; the profile says zurich, and wins. A
	// pre-provisioned device keeps what the operator set.
	if code := enroll(pt.Token, "z1", `,"labels":{"base":"bern"}`); code != 200 {
		t.Fatalf("enroll with the profile token: %d", code)
	}
	if code := enroll(pt.Token, "n1", ""); code != 200 {
		t.Fatalf("enroll a pre-provisioned device: %d", code)
	}
	for id, want := range map[string]string{"z1": "base=zurich,fleet=survey", "n1": "base=geneva,fleet=survey,hw=rev-c"} {
		out, _, _ := run(t, c, "device", "show", id)
		if !strings.Contains(out, want) {
			t.Errorf("%s: want labels %s:\n%s", id, want, out)
		}
	}
	if out, _, _ := run(t, c, "device", "show", "n1"); !strings.Contains(out, "MISMATCH") {
		t.Errorf("labelled rev-c, enrolled as rev-b: no mismatch shown:\n%s", out)
	}
	if _, _, err := run(t, c, "enroll-profile", "rm", "zurich-factory"); err != nil {
		t.Fatal(err)
	}
	if code := enroll(pt.Token, "z2", ""); code != 401 {
		t.Errorf("a removed profile's token enrolled a device: %d", code)
	}
}
