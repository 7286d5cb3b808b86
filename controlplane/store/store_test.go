package store_test

import (
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/store"
)

func TestOfferFor(t *testing.T) {
	base1, base2 := strings.Repeat("a1", 32), strings.Repeat("b2", 32)
	rel := store.Release{Target: "agent", Version: "2.0.0", Size: 1000, Manifest: []byte("full"), Keys: []byte("keys")}
	deltas := []store.ReleaseDelta{
		{Target: "agent", Version: "2.0.0", BaseSHA256: base1, PatchSHA256: strings.Repeat("c3", 32), PatchSize: 100, Manifest: []byte("d1")},
		{Target: "agent", Version: "2.0.0", BaseSHA256: base2, PatchSHA256: strings.Repeat("d4", 32), PatchSize: 120, Manifest: []byte("d2")},
	}
	builds := func(target, sum string, max uint64) store.DeviceBuilds {
		return store.DeviceBuilds{Builds: map[string]string{target: sum}, DeltaMax: max}
	}
	for _, tc := range []struct {
		name   string
		deltas []store.ReleaseDelta
		dev    store.DeviceBuilds
		full   bool
		want   string // manifest offered
	}{
		{"delta for the reported base", deltas, builds("agent", base1, 4096), false, "d1"},
		{"the other base's delta", deltas, builds("agent", base2, 4096), false, "d2"},
		{"digest in capitals", deltas, builds("agent", strings.ToUpper(base2), 4096), false, "d2"},
		{"result exactly the largest it patches", deltas, builds("agent", base1, 1000), false, "d1"},
		{"full asked", deltas, builds("agent", base1, 4096), true, "full"},
		{"older agent: patches nothing", deltas, builds("agent", base1, 0), false, "full"},
		{"result larger than it patches", deltas, builds("agent", base1, 999), false, "full"},
		{"no build reported", deltas, store.DeviceBuilds{DeltaMax: 4096}, false, "full"},
		{"build of another target only", deltas, builds("fc-firmware", base1, 4096), false, "full"},
		{"no delta from its base", deltas, builds("agent", strings.Repeat("ee", 32), 4096), false, "full"},
		{"release without deltas", nil, builds("agent", base1, 4096), false, "full"},
		{"a delta of another release", []store.ReleaseDelta{{Target: "agent", Version: "1.9.0", BaseSHA256: base1, Manifest: []byte("old")}},
			builds("agent", base1, 4096), false, "full"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			offer, d := store.OfferFor(rel, tc.deltas, tc.dev, tc.full)
			if string(offer.Manifest) != tc.want || string(offer.Keys) != "keys" {
				t.Fatalf("offered manifest %q keys %q, want %q", offer.Manifest, offer.Keys, tc.want)
			}
			full := store.ArtifactURL("agent", "2.0.0")
			if tc.want == "full" {
				if d != nil || offer.URL != full || offer.FullURL != "" {
					t.Fatalf("full offer %+v, delta %+v", offer, d)
				}
				return
			}
			if d == nil || string(d.Manifest) != tc.want {
				t.Fatalf("delta chosen %+v", d)
			}
			if offer.URL != store.DeltaURL("agent", "2.0.0", d.PatchSHA256) || offer.FullURL != full {
				t.Fatalf("urls %q, fallback %q", offer.URL, offer.FullURL)
			}
		})
	}
}

func TestDeviceUpdateTransferred(t *testing.T) {
	for _, tc := range []struct {
		u    store.DeviceUpdate
		via  store.Via
		want uint64
	}{
		{store.DeviceUpdate{}, store.ViaFull, 1000},
		{store.DeviceUpdate{Patch: 80}, store.ViaDelta, 80},
		{store.DeviceUpdate{Patch: 80, Fallback: "base differs"}, store.ViaFallback, 1080},
	} {
		if v, n := tc.u.Via(), tc.u.Transferred(1000); v != tc.via || n != tc.want {
			t.Errorf("%+v: via %s, %d bytes; want %s, %d", tc.u, v, n, tc.via, tc.want)
		}
	}
}
