package sqlstore_test

import (
	"bytes"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// What a device says about itself is kept as reported and never becomes a
// grouping label: not at enrollment, not in a hello. Labels come from the
// operators: pre-provisioning, an enrollment profile (first enrollment
// only), or a label change.
func TestReportedLabelsNeverGroup(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "fake", Hardware: "rev-b", Labels: map[string]string{"base": "zurich"},
		CredHash: []byte("x"), Now: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	hello := prototest.State() // claims base=zurich, hw=rev-b
	if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "fake", Kind: store.IngestState, State: &hello, Received: clk.Now()}}); err != nil {
		t.Fatal(err)
	}
	d, _ := db.Device(ctx, "fake")
	if len(d.Labels) != 0 || d.ReportedLabels["base"] != "zurich" || d.Hardware != "rev-b" {
		t.Fatalf("labels %v, reported %v, hardware %q", d.Labels, d.ReportedLabels, d.Hardware)
	}
	for _, brief := range []bool{false, true} {
		if ds, _ := db.Devices(ctx, store.DeviceFilter{Labels: map[string]string{"base": "zurich"}, Brief: brief}); len(ds) != 0 {
			t.Fatalf("a device's own claim selected it (brief %v): %+v", brief, ds)
		}
	}

	// A profile labels a new device; enrolling again does not relabel it.
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "p1", Profile: map[string]string{"base": "bern"}, CredHash: []byte("x"), Now: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	// Enrolling an enrolled id again is refused: the fleet token never
	// re-keys a device ...
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "p1", Profile: map[string]string{"base": "zurich"}, CredHash: []byte("y"), Now: clk.Now()}); !errors.Is(err, store.ErrEnrolled) {
		t.Fatalf("re-enrollment of an enrolled device: %v, want ErrEnrolled", err)
	}
	if c, _ := db.Credential(ctx, "p1"); !bytes.Equal(c, []byte("x")) {
		t.Fatalf("a refused re-enrollment changed the credential: %q", c)
	}
	// ... unless an operator allowed it, once, until a deadline.
	if err := db.AllowRekey(ctx, "p1", clk.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "p1", Profile: map[string]string{"base": "zurich"}, CredHash: []byte("y"), Now: clk.Now()}); err != nil {
		t.Fatalf("re-enrollment an operator allowed: %v", err)
	}
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "p1", CredHash: []byte("z"), Now: clk.Now()}); !errors.Is(err, store.ErrEnrolled) {
		t.Fatalf("a rekey allowance served twice: %v", err)
	}
	if err := db.AllowRekey(ctx, "p1", clk.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "p1", CredHash: []byte("z"), Now: clk.Now().Add(2 * time.Minute)}); !errors.Is(err, store.ErrEnrolled) {
		t.Fatalf("an expired rekey allowance served: %v", err)
	}
	if err := db.AllowRekey(ctx, "nobody", clk.Now()); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("rekey of an unknown device: %v", err)
	}
	if d, _ := db.Device(ctx, "p1"); d.Labels["base"] != "bern" {
		t.Fatalf("re-enrollment with another profile relabelled the device: %v", d.Labels)
	}
	// Pre-provisioned labels win over the profile's, and the record waits
	// for its device.
	created, err := db.Import(ctx, []store.LabelChange{{Device: "pre", Set: map[string]string{"hw": "rev-c", "base": "geneva"}}, {Device: "p1", Set: map[string]string{"hw": "rev-a"}}}, clk.Now())
	if err != nil || created != 1 {
		t.Fatalf("import: created %d, %v", created, err)
	}
	if d, _ := db.Device(ctx, "pre"); !d.AwaitingEnrollment || d.Labels["hw"] != "rev-c" {
		t.Fatalf("pre-provisioned %+v", d)
	}
	if _, err := db.Credential(ctx, "pre"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a pre-provisioned device has a credential: %v", err)
	}
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "pre", Hardware: "rev-b", Profile: map[string]string{"base": "oslo", "fleet": "x"}, CredHash: []byte("x"), Now: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	d, _ = db.Device(ctx, "pre")
	if d.AwaitingEnrollment || d.Labels["base"] != "geneva" || d.Labels["fleet"] != "x" || d.Labels["hw"] != "rev-c" {
		t.Fatalf("enrolled pre-provisioned device %+v", d)
	}
	// It reports rev-b, labelled rev-c: a mismatch, visible.
	if !d.HardwareMismatch {
		t.Error("no mismatch between hw=rev-c and the reported rev-b")
	}
	// Operators relabel; an unknown device changes nothing at all.
	if err := db.SetLabels(ctx, []store.LabelChange{{Device: "pre", Set: map[string]string{"hw": "rev-b"}, Remove: []string{"fleet"}}}); err != nil {
		t.Fatal(err)
	}
	if d, _ := db.Device(ctx, "pre"); d.HardwareMismatch || d.Labels["fleet"] != "" {
		t.Fatalf("after relabelling: %+v", d)
	}
	err = db.SetLabels(ctx, []store.LabelChange{{Device: "pre", Set: map[string]string{"base": "x"}}, {Device: "ghost", Set: map[string]string{"a": "b"}}})
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("labelling an unknown device: %v", err)
	}
	if d, _ := db.Device(ctx, "pre"); d.Labels["base"] != "geneva" {
		t.Fatalf("a failed label change applied in part: %v", d.Labels)
	}
}

func updateEvent(boot, seq uint64, state proto.UpdateState) proto.Event {
	e := prototest.UpdateEvent()
	e.Boot, e.Seq, e.Update.State = boot, seq, state
	return e
}

func updateState(t *testing.T, db *sqlstore.DB, id string) string {
	t.Helper()
	us, err := db.DeviceUpdates(t.Context(), id, "agent", 13)
	if err != nil || len(us) != 1 {
		t.Fatalf("updates of %s: %v %v", id, us, err)
	}
	return us[0].State
}

// A report with a boot epoch far in the future pins nothing: refused when
// the device's connection does not claim that epoch; beaten by the next
// genuine report when it did (the device's next hello); and forgotten when
// an operator reinstates the device.
func TestBootEpochCannotPin(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", nil)
	now := clk.Now()
	genuine := uint64(now.Unix())
	hello := prototest.State()
	hello.Boot = genuine
	write := func(items ...store.IngestItem) store.IngestResult {
		t.Helper()
		res, err := db.WriteIngest(ctx, items)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &hello, Received: now})
	ev := updateEvent(genuine, 10, proto.UpdateDownloading)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &ev, Received: now})

	// 2^62, without a hello claiming it: refused (but kept as an event).
	rigged := updateEvent(1<<62, 1, proto.UpdateCommitted)
	if res := write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &rigged, Received: now}); res.Refused != 1 {
		t.Fatalf("a report from 2^62 was not refused: %+v", res)
	}
	if got := updateState(t, db, "d1"); got != string(proto.UpdateDownloading) {
		t.Fatalf("state %s after the rigged report", got)
	}
	// Within the clock allowance, a device clock a little ahead is believed.
	ahead := updateEvent(genuine+600, 1, proto.UpdateVerified)
	if res := write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &ahead, Received: now}); res.Refused != 0 {
		t.Fatalf("a clock 10 minutes ahead was refused: %+v", res)
	}

	// 2^62 with a hello claiming it: accepted while that connection is
	// the current one...
	riggedHello := hello
	riggedHello.Boot, riggedHello.Conn = 1<<62, 1
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &riggedHello, Received: now})
	rigged.Seq = 2
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &rigged, Received: now})
	if got := updateState(t, db, "d1"); got != string(proto.UpdateCommitted) {
		t.Fatalf("state %s", got)
	}
	// ... and beaten by the first genuine report once the device connects
	// again with its real epoch.
	later := hello
	later.Boot, later.Conn = genuine+60, 1
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &later, Received: now.Add(time.Minute)})
	if d, _ := db.Device(ctx, "d1"); d.Boot != genuine+60 {
		t.Fatalf("the latest hello is not the current connection: boot %d", d.Boot)
	}
	real := updateEvent(genuine+60, 3, proto.UpdateRolledBack)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &real, Received: now.Add(time.Minute)})
	if got := updateState(t, db, "d1"); got != string(proto.UpdateRolledBack) {
		t.Fatalf("a genuine report lost to the rigged one: %s", got)
	}
	// An older report arriving late still changes nothing.
	old := updateEvent(genuine, 11, proto.UpdateDownloading)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &old, Received: now.Add(time.Minute)})
	if got := updateState(t, db, "d1"); got != string(proto.UpdateRolledBack) {
		t.Fatalf("an older report won: %s", got)
	}

	// An operator's add of the live device (a new credential, labels)
	// keeps its connection and the order of its reports.
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "d1", Operator: true, Labels: map[string]string{"team": "a"}, CredHash: []byte("k2"), Now: now.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	late := updateEvent(genuine+60, 2, proto.UpdateDownloading)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &late, Received: now.Add(time.Minute)})
	if got := updateState(t, db, "d1"); got != string(proto.UpdateRolledBack) {
		t.Fatalf("after an operator's add of the live device, a late report rewound it: %s", got)
	}
	if d, _ := db.Device(ctx, "d1"); d.Boot != genuine+60 {
		t.Fatalf("an operator's add reset the live connection: boot %d", d.Boot)
	}

	// Revoke and re-add: nothing reported before outranks what comes next.
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &riggedHello, Received: now.Add(2 * time.Minute)})
	rigged.Seq = 3
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &rigged, Received: now.Add(2 * time.Minute)})
	if err := db.Revoke(ctx, "d1"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "d1", Operator: true, CredHash: []byte("new"), Now: now.Add(3 * time.Minute)}); err != nil {
		t.Fatal(err)
	}
	fresh := updateEvent(genuine+120, 1, proto.UpdateOffered)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &fresh, Received: now.Add(3 * time.Minute)})
	if got := updateState(t, db, "d1"); got != string(proto.UpdateOffered) {
		t.Fatalf("after re-adding the device, a new report lost to the old rigged one: %s", got)
	}
}

// A latest sample dated far ahead does not pin the device's reading.
func TestFutureSampleDoesNotPinLatest(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", nil)
	now := clk.Now()
	future := prototest.Batch(1, 1)
	future.Base = now.Add(100 * 365 * 24 * time.Hour).UnixMilli()
	b := prototest.Batch(2, 1)
	b.Base = now.UnixMilli()
	b.Samples[0].Errors = 77
	for _, batch := range []*proto.Batch{&future, &b} {
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestBatch, Batch: batch, Received: now}}); err != nil {
			t.Fatal(err)
		}
		if err := db.FlushSeen(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if d, _ := db.Device(ctx, "d1"); d.Latest == nil || d.Latest.Errors != 77 {
		t.Fatalf("latest reading %+v: the sample from a century ahead pinned it", d.Latest)
	}
}

// openAtSchema makes a database with the first schema migrations and
// the rows an older release wrote, then opens it with this release's
// store: an upgrade in place.
func openAtSchema(t *testing.T, schema int, rows ...string) *sqlstore.DB {
	t.Helper()
	path := filepath.Join(t.TempDir(), "old.db")
	raw, err := sql.Open("sqlite3", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range sqlstore.Migrations()[:schema] {
		if _, err := raw.Exec(m); err != nil {
			t.Fatalf("migration %d: %v", i+1, err)
		}
	}
	for _, q := range append([]string{fmt.Sprintf("PRAGMA user_version = %d", schema)}, rows...) {
		if _, err := raw.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	raw.Close()
	db, err := sqlstore.Open(path, sqlstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// A database made by the previous release (schema 3) opens with its
// devices, credentials and rollouts; the labels that were in effect
// become operator labels, what the devices reported is kept as reported.
func TestMigrationFromPreviousRelease(t *testing.T) {
	db := openAtSchema(t, 3,
		`INSERT INTO devices (id, hardware, labels, op_labels, cred_hash, enrolled_at) VALUES
			('d1', 'rev-b', '{"base":"zurich","hw":"rev-b"}', '{}', x'0102', 1),
			('d2', 'rev-c', '{"base":"zurich","hw":"rev-c"}', '{"base":"bern"}', x'0304', 1),
			('d3', 'rev-a', '[1]', 'null', x'0506', 1),
			('d4', 'rev-a', '{"base":"oslo"}', '"x"', x'0708', 1)`,
		`INSERT INTO rollouts (id, spec, state, status, created, created_by, updated) VALUES ('r-old', '{"id":"r-old"}', '{"status":"running"}', 'running', 1, 'admin', 1)`,
		`INSERT INTO rollout_members (rollout, device, stage, offered) VALUES ('r-old', 'd1', 0, 5)`,
		`INSERT INTO commands (id, dev, kind, body, rollout, created) VALUES ('r-old:d1:offer', 1, 'update', x'00', 'r-old', 5)`,
	)
	ctx := t.Context()
	d1, _ := db.Device(ctx, "d1")
	d2, _ := db.Device(ctx, "d2")
	if d1.Labels["base"] != "zurich" || d1.Labels["hw"] != "rev-b" || d1.ReportedLabels["base"] != "zurich" {
		t.Fatalf("d1 %+v", d1)
	}
	if d2.Labels["base"] != "bern" || d2.Labels["hw"] != "rev-c" || d2.ReportedLabels["base"] != "zurich" {
		t.Fatalf("d2: operator label lost or reported label taken: %+v", d2)
	}
	d3, _ := db.Device(ctx, "d3")
	d4, _ := db.Device(ctx, "d4")
	if len(d3.Labels) != 0 || d4.Labels["base"] != "oslo" {
		t.Fatalf("odd stored labels: d3 %v, d4 %v (reported labels kept, a malformed operator set dropped)", d3.Labels, d4.Labels)
	}
	if h, err := db.Credential(ctx, "d1"); err != nil || len(h) != 2 {
		t.Fatalf("credential kept: %x %v", h, err)
	}
	ms, err := db.Members(ctx, "r-old")
	if err != nil || len(ms) != 1 || ms[0].Offered != 5 || ms[0].Offers != 0 {
		t.Fatalf("members %+v %v", ms, err)
	}
	if pend, _ := db.PendingCommands(ctx, "d1", time.Now()); len(pend) != 1 {
		t.Fatalf("pending commands %+v", pend)
	}
}

// Withdrawn offers are not sent again and their acknowledgement is not
// believed; one acknowledged before the withdrawal stays acknowledged.
func TestWithdrawnCommands(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", nil)
	enroll(t, db, "d2", nil)
	now := clk.Now()
	if err := db.CreateRollout(ctx, store.RolloutRow{ID: "r", Spec: []byte(`{}`), State: []byte(`{}`), Status: "running", Created: now, Updated: now},
		[]store.MemberRow{{Device: "d1"}, {Device: "d2"}}, store.Audit{Time: now, Actor: "t", Action: "rollout.create"}); err != nil {
		t.Fatal(err)
	}
	cmds := []store.Command{{ID: "r:d1:offer", Device: "d1", Kind: "update", Body: []byte{1}, Rollout: "r", Created: now},
		{ID: "r:d2:offer", Device: "d2", Kind: "update", Body: []byte{1}, Rollout: "r", Created: now}}
	if err := db.ApplyRollout(ctx, store.RolloutChange{ID: "r", State: []byte(`{}`), Status: "running", Commands: cmds, Now: now,
		Members: []store.MemberRow{{Device: "d1", Offered: now.UnixMilli(), Offers: 1}}}); err != nil {
		t.Fatal(err)
	}
	if err := db.AckCommand(ctx, "d2", "r:d2:offer", now); err != nil {
		t.Fatal(err)
	}
	if err := db.ApplyRollout(ctx, store.RolloutChange{ID: "r", Withdraw: []string{"r:d1:offer", "r:d2:offer"}, Now: now}); err != nil {
		t.Fatal(err)
	}
	if pend, _ := db.PendingCommands(ctx, "", now.Add(time.Hour)); len(pend) != 0 {
		t.Fatalf("withdrawn commands still pending: %+v", pend)
	}
	db.AckCommand(ctx, "d1", "r:d1:offer", now) // arrives after the withdrawal
	acks, err := db.RolloutAcks(ctx, "r")
	if err != nil || len(acks) != 1 || acks["r:d2:offer"] == 0 {
		t.Fatalf("acks %v %v", acks, err)
	}
	if ms, _ := db.Members(ctx, "r"); len(ms) != 2 {
		t.Fatalf("members %+v", ms)
	}
}

// Replicas ingest a device's messages in any order (a shared subscription
// deals them out; one held by a replica that died arrives late). The
// device's latest boot and its latest report still win: a new boot's
// report stored before its hello keeps its place against the old boot's
// reports, and the old boot's hello arriving late does not take the
// device back.
func TestIngestOutOfOrder(t *testing.T) {
	db, clk := open(t)
	ctx := t.Context()
	enroll(t, db, "d1", nil)
	now := clk.Now()
	b1, b2 := uint64(now.Unix())-100, uint64(now.Unix())
	write := func(items ...store.IngestItem) {
		t.Helper()
		if _, err := db.WriteIngest(ctx, items); err != nil {
			t.Fatal(err)
		}
	}
	h1 := prototest.State()
	h1.Boot, h1.Conn = b1, 1
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &h1, Received: now})
	// The new build's commit, from its new boot, before that boot's hello.
	committed := updateEvent(b2, 4, proto.UpdateCommitted)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &committed, Received: now})
	// The old boot's "installing", delivered late.
	installing := updateEvent(b1, 22, proto.UpdateInstalling)
	write(store.IngestItem{Device: "d1", Kind: store.IngestEvent, Event: &installing, Received: now.Add(time.Second)})
	if got := updateState(t, db, "d1"); got != string(proto.UpdateCommitted) {
		t.Fatalf("state %s: a late report of the old boot beat the new boot's", got)
	}
	h2 := h1
	h2.Boot, h2.Conn = b2, 1
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &h2, Received: now.Add(2 * time.Second)})
	// The old boot's hello, late: the device stays on its new boot.
	write(store.IngestItem{Device: "d1", Kind: store.IngestState, State: &h1, Received: now.Add(3 * time.Second)})
	if d, _ := db.Device(ctx, "d1"); d.Boot != b2 {
		t.Fatalf("boot %d after the old boot's hello came late, want %d", d.Boot, b2)
	}
}
