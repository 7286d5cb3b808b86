package rollout

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

var (
	base1 = strings.Repeat("1a", 32) // the build the fleet runs (1.0.0)
	base2 = strings.Repeat("2b", 32) // the release's build (2.0.0)
)

// deltaFleet is storeFleet(n) whose devices report base1 and patch up to
// 1 MiB, and a store that holds release 2.0.0 (a delta from base1) and
// revert release 1.0.1 (a delta from base2).
func deltaFleet(n int) *fakeStore {
	devs := storeFleet(n)
	for i := range devs {
		devs[i].Builds, devs[i].DeltaMax = map[string]string{"agent": base1}, 1<<20
	}
	st := newFakeStore(devs)
	st.releases = map[string]store.Release{
		"2.0.0": {Target: "agent", Version: "2.0.0", Counter: 20, Size: 1000, Manifest: []byte("full"), Keys: []byte("k"),
			Deltas: []store.ReleaseDelta{{Target: "agent", Version: "2.0.0", BaseSHA256: base1, PatchSHA256: strings.Repeat("3c", 32),
				PatchSize: 100, Manifest: []byte("delta")}}},
		"1.0.1": {Target: "agent", Version: "1.0.1", Counter: 21, Size: 900, Manifest: []byte("revert-full"), Keys: []byte("k"),
			Deltas: []store.ReleaseDelta{{Target: "agent", Version: "1.0.1", BaseSHA256: base2, PatchSHA256: strings.Repeat("4d", 32),
				PatchSize: 90, Manifest: []byte("revert-delta")}}},
	}
	return st
}

// Offers and revert offers carry the delta from the build each device
// reports, when it patches builds that large; the others, and every
// device of a --full rollout, get the full artifact.
func TestOffersChooseDeltas(t *testing.T) {
	st := deltaFleet(5)
	st.devices[1].DeltaMax = 0                               // an older agent
	st.devices[2].Builds = map[string]string{"agent": base2} // runs another build
	st.devices[3].DeltaMax = 999                             // patches smaller builds only
	st.devices[4].Builds = map[string]string{"agent": base2} // took 2.0.0: reverts by a delta
	a := New(Options{Store: st, Publish: &fakePublisher{st: st, t: t}, Now: func() time.Time { return t0 }})
	s := spec20()
	s.ID, s.Revert = "r", &ReleaseRef{Target: "agent", Version: "1.0.1", Counter: 21}
	acts := []Action{{ActOffer, "d000"}, {ActOffer, "d001"}, {ActOffer, "d002"}, {ActOffer, "d003"}, {ActRevert, "d004"}, {ActRevert, "d000"}}
	offered := func(full bool) map[string]string {
		t.Helper()
		s.Full = full
		cmds, _, err := a.commands(t.Context(), s, State{}, acts, t0)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, c := range cmds {
			var cmd proto.Command
			if err := proto.Unmarshal(c.Body, &cmd); err != nil {
				t.Fatal(err)
			}
			u := cmd.Update
			kind := string(u.Manifest)
			switch {
			case strings.Contains(kind, "delta") && (u.FullURL == "" || !strings.Contains(u.URL, "/deltas/")):
				t.Errorf("%s: delta offer %+v without its urls", c.Device, u)
			case !strings.Contains(kind, "delta") && (u.FullURL != "" || strings.Contains(u.URL, "/deltas/")):
				t.Errorf("%s: full offer %+v names a delta", c.Device, u)
			}
			out[c.Device+":"+cmd.ID[strings.LastIndex(cmd.ID, ":")+1:]] = kind
		}
		return out
	}
	got := offered(false)
	want := map[string]string{"d000:offer": "delta", "d001:offer": "full", "d002:offer": "full", "d003:offer": "full",
		"d004:revert": "revert-delta", "d000:revert": "revert-full"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s offered %q, want %q", k, got[k], v)
		}
	}
	for k, v := range offered(true) {
		if strings.Contains(v, "delta") {
			t.Errorf("--full rollout: %s offered %q", k, v)
		}
	}
}

// The dry run counts, per stage and in all, the devices that would get a
// delta or the full artifact, and the bytes saved.
func TestDryRunTransfer(t *testing.T) {
	st := deltaFleet(90)
	for i := range st.devices {
		if i%3 == 0 {
			st.devices[i].DeltaMax = 0 // 30 take full artifacts only
		}
	}
	a := New(Options{Store: st, Publish: &fakePublisher{st: st, t: t}, Now: func() time.Time { return t0 }})
	p, err := a.DryRun(t.Context(), spec20())
	if err != nil {
		t.Fatal(err)
	}
	want := Transfer{Delta: 60, Full: 30, DeltaBytes: 60 * 100, FullBytes: 30 * 1000, Saved: 60 * 900}
	if p.Transfer != want {
		t.Fatalf("transfer %+v, want %+v", p.Transfer, want)
	}
	var sum Transfer
	for _, ps := range p.Stages {
		if ps.Transfer.Delta+ps.Transfer.Full != len(ps.Devices) {
			t.Errorf("stage %s: %+v for %d devices", ps.Stage, ps.Transfer, len(ps.Devices))
		}
		sum.Sum(ps.Transfer)
	}
	if sum != want {
		t.Fatalf("stages sum to %+v", sum)
	}
	s := spec20()
	s.Full = true
	if p, _ := a.DryRun(t.Context(), s); p.Transfer.Delta != 0 || p.Transfer.Full != 90 || p.Transfer.Saved != 0 {
		t.Fatalf("--full dry run: %+v", p.Transfer)
	}
}

// The status counts what the members fetched, from their reports: the
// patch of a delta, the full artifact, both for a fallback.
func TestStatusTransfer(t *testing.T) {
	st := deltaFleet(9)
	a := New(Options{Store: st, Publish: &fakePublisher{st: st, t: t}, Now: func() time.Time { return t0 }})
	s := spec20()
	s.Stages = []Stage{{Percent: 100}}
	r, _, err := a.Create(t.Context(), s, "alice")
	if err != nil {
		t.Fatal(err)
	}
	reports := []store.DeviceUpdate{
		{Device: "d000", State: "committed", Patch: 100},
		{Device: "d001", State: "downloading", Patch: 100},
		{Device: "d002", State: "committed", Patch: 100, Fallback: "base differs"},
		{Device: "d003", State: "committed"},
		// Claims that are no fetch: an offer not yet taken, a refusal, and
		// a patch size no delta of the release has (a hostile device).
		{Device: "d004", State: "offered", Patch: 100},
		{Device: "d005", State: "rejected", Patch: 100},
		{Device: "d006", State: "committed", Patch: 1 << 62},
	}
	for i := range reports {
		reports[i].Target, reports[i].Counter, reports[i].Updated = "agent", 20, t0
	}
	st.updates["agent@20"] = reports
	rep, err := a.Status(t.Context(), r.Spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := Transfer{Delta: 3, Full: 3, Fallback: 1, DeltaBytes: 300, FullBytes: 3000, Saved: 5*1000 - 3300}
	if rep.Transfer != want || rep.Stages[0].Transfer != want {
		t.Fatalf("transfer %+v (stage %+v), want %+v", rep.Transfer, rep.Stages[0].Transfer, want)
	}
	ms, err := a.Devices(t.Context(), r.Spec.ID, "")
	if err != nil {
		t.Fatal(err)
	}
	seen := false
	for _, m := range ms {
		if m.Device == "d002" {
			seen = true
			if m.Update == nil || m.Update.Patch != 100 || m.Update.Fallback != "base differs" {
				t.Fatalf("member report %+v", m.Update)
			}
		}
	}
	if !seen {
		t.Fatal("no member d002")
	}
}

// A spec stored before deltas existed offers deltas; one created with
// --full keeps it.
func TestSpecFullStored(t *testing.T) {
	var old Spec
	if err := json.Unmarshal([]byte(`{"id":"r-old","release":{"target":"agent","version":"2.0.0","counter":20},"selector":{}}`), &old); err != nil || old.Full {
		t.Fatalf("old spec: full %v, %v", old.Full, err)
	}
	a, st, _, _ := newTestApplier(t, 9)
	s := spec20()
	s.Full = true
	r, _, err := a.Create(t.Context(), s, "alice")
	if err != nil {
		t.Fatal(err)
	}
	var stored Spec
	if err := json.Unmarshal(st.rollouts[r.Spec.ID].Spec, &stored); err != nil || !stored.Full {
		t.Fatalf("stored spec: full %v, %v", stored.Full, err)
	}
}
