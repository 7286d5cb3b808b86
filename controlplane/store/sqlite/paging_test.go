package sqlite_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/store"
)

// TestDevicePaging: search, sort and pages over a fleet agree with the
// count, and a page is what the whole ordered list has at that place.
func TestDevicePaging(t *testing.T) {
	db, _ := open(t)
	ctx := t.Context()
	for i := range 45 {
		hw := "rev-a"
		if i%3 == 0 {
			hw = "rev-b"
		}
		enroll(t, db, fmt.Sprintf("drone-%03d", i), map[string]string{"hw": hw})
	}
	enroll(t, db, "Scout_1", nil)
	enroll(t, db, "scoutx1", nil)
	all, err := db.Devices(ctx, store.DeviceFilter{Sort: "-id"})
	if err != nil || len(all) != 47 {
		t.Fatalf("all: %d %v", len(all), err)
	}
	if all[0].ID != "scoutx1" || all[len(all)-1].ID != "Scout_1" {
		t.Errorf("descending: first %s, last %s", all[0].ID, all[len(all)-1].ID)
	}
	var paged []store.Device
	for off := 0; off < len(all); off += 10 {
		page, err := db.Devices(ctx, store.DeviceFilter{Sort: "-id", Limit: 10, Offset: off})
		if err != nil {
			t.Fatal(err)
		}
		paged = append(paged, page...)
	}
	if len(paged) != len(all) {
		t.Fatalf("pages hold %d devices, the list %d", len(paged), len(all))
	}
	for i := range all {
		if paged[i].ID != all[i].ID {
			t.Fatalf("page position %d: %s, list: %s", i, paged[i].ID, all[i].ID)
		}
	}
	// Search is a case-insensitive substring; _ and % are literal.
	for q, want := range map[string]int{"DRONE-01": 10, "scout_": 1, "%": 0, "-04": 5} {
		n, err := db.CountDevices(ctx, store.DeviceFilter{Search: q})
		ds, _ := db.Devices(ctx, store.DeviceFilter{Search: q})
		if err != nil || n != want || len(ds) != want {
			t.Errorf("search %q: count %d, list %d, want %d (%v)", q, n, len(ds), want, err)
		}
	}
	n, err := db.CountDevices(ctx, store.DeviceFilter{Labels: map[string]string{"hw": "rev-b"}, Limit: 2})
	if err != nil || n != 15 {
		t.Errorf("count with a label: %d %v (a limit does not bound the count)", n, err)
	}
	if _, err := db.Devices(ctx, store.DeviceFilter{Sort: "labels; DROP TABLE devices"}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("unknown sort: %v", err)
	}
}
