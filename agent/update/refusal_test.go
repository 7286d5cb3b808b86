package update

// Every offer gets its answer before Offer returns: an outright refusal is
// reported rejected, with its check and a reason that says what is wrong,
// filed under the release offered (target and counter, which is how a
// rollout finds it); a condition of the device that may clear by itself
// (an untrusted clock, another update installing) is reported deferred,
// and the offer is taken up again once it clears.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// reportNow returns the report of cmd in state st that Offer must already
// have sent (no waiting: a refusal is reported at once).
func (r *hostileRig) reportNow(cmd string, st proto.UpdateState) hostileReport {
	r.t.Helper()
	rep, ok := r.rep.find(func(s hostileReport) bool { return s.Cmd == cmd && s.State == st })
	if !ok {
		r.t.Fatalf("%s: no %s report when Offer returned; reports:\n%s", cmd, st, r.rep.dump())
	}
	return rep
}

// Refusals of the offer itself (not of its signed documents), and of
// signed releases whose reason must say what is wrong.
func TestOfferRefusalsReportAtOnceWithReason(t *testing.T) {
	data := hostilePayload(0x13, 16<<10)
	good := func(t *testing.T, mods ...func(*proto.Manifest)) hostileRelease {
		rel := newHostileRelease(t, 13, "1.5.0", data, mods...)
		rel.path = "/artifact/x"
		return rel
	}
	tests := []struct {
		name   string
		opts   func(*Options)
		cmd    func(t *testing.T, r *hostileRig) proto.Command
		check  proto.Check
		reason []string // substrings of the reason
	}{
		{"update command without an offer", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return proto.Command{ID: "c", Kind: proto.CmdUpdate, Rollout: "r-hostile"}
		}, proto.CheckFormat, []string{"without an offer"}},
		{"empty manifest", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return hostileCmd("c", nil, r.keys, "/artifact/x")
		}, proto.CheckFormat, []string{"COSE_Sign1"}},
		{"garbage manifest", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return hostileCmd("c", []byte("not a manifest"), r.keys, "/artifact/x")
		}, proto.CheckFormat, []string{"COSE_Sign1"}},
		{"no artifact URL", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return hostileCmd("c", good(t).signed, r.keys, "")
		}, proto.CheckFormat, []string{"no artifact URL"}},
		{"artifact URL not http", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return hostileCmd("c", good(t).signed, r.keys, "file:///etc/passwd")
		}, proto.CheckFormat, []string{`"file:///etc/passwd"`, "not an http(s) URL"}},
		{"artifact URL unparsable", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return hostileCmd("c", good(t).signed, r.keys, "http://[::1")
		}, proto.CheckFormat, []string{"artifact URL"}},
		{"wrong hardware", nil, func(t *testing.T, r *hostileRig) proto.Command {
			rel := good(t, func(m *proto.Manifest) { m.Hardware = []string{"rev-c"} })
			return hostileCmd("c", rel.signed, r.keys, rel.path)
		}, proto.CheckHardware, []string{`this device is hardware "rev-b"`, "the release is for rev-c"}},
		{"no hardware configured", func(o *Options) { o.Hardware = "" }, func(t *testing.T, r *hostileRig) proto.Command {
			rel := good(t)
			return hostileCmd("c", rel.signed, r.keys, rel.path)
		}, proto.CheckHardware, []string{"no hardware revision configured", "the release is for rev-b"}},
		{"wrong architecture", nil, func(t *testing.T, r *hostileRig) proto.Command {
			rel := good(t, func(m *proto.Manifest) { m.Arch = []string{"riscv64"} })
			return hostileCmd("c", rel.signed, r.keys, rel.path)
		}, proto.CheckHardware, []string{"this device is arm64", "the release is for riscv64"}},
		{"target without installer", nil, func(t *testing.T, r *hostileRig) proto.Command {
			rel := good(t, func(m *proto.Manifest) { m.Target, m.Arch = "fc-firmware", nil })
			return hostileCmd("c", rel.signed, r.keys, rel.path)
		}, proto.CheckTarget, []string{`"fc-firmware"`, "this device installs agent"}},
		{"expired manifest", nil, func(t *testing.T, r *hostileRig) proto.Command {
			base := prototest.Base / 1000
			rel := good(t, func(m *proto.Manifest) { m.Created, m.Expires = base-40*86400, base-10*86400 })
			return hostileCmd("c", rel.signed, r.keys, rel.path)
		}, proto.CheckExpired, []string{"expired at"}},
		{"bad signature", nil, func(t *testing.T, r *hostileRig) proto.Command {
			rel := good(t)
			rel.signed[len(rel.signed)-1] ^= 0x80
			return hostileCmd("c", rel.signed, r.keys, rel.path)
		}, proto.CheckSignature, []string{"signature"}},
		{"key list from another root", nil, func(t *testing.T, r *hostileRig) proto.Command {
			return hostileCmd("c", good(t).signed, hostileSignKeys(t, prototest.OtherKey, prototest.KeyList()), "/artifact/x")
		}, proto.CheckRoot, []string{"not a trusted root"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var mods []func(*Options)
			if tc.opts != nil {
				mods = append(mods, tc.opts)
			}
			r := newHostileRig(t, mods...)
			r.srv.route("/artifact/x", hostileHonest(data))
			before := r.stateFile()
			cmd := tc.cmd(t, r)
			err := r.u.Offer(cmd)
			if proto.CheckOf(err) != tc.check {
				t.Errorf("Offer = %v, want a %q refusal", err, tc.check)
			}
			rep := r.reportNow("c", proto.UpdateRejected)
			if rep.Check != string(tc.check) {
				t.Errorf("rejected with check %q, want %q", rep.Check, tc.check)
			}
			for _, want := range tc.reason {
				if !strings.Contains(rep.Reason, want) {
					t.Errorf("reason %q does not say %q", rep.Reason, want)
				}
			}
			if cmd.Update != nil {
				r.assertAddressed("c", cmd.Update.Manifest)
			} else if rep.Rollout != "r-hostile" {
				t.Errorf("reported for rollout %q, want the offer's", rep.Rollout)
			}
			if n := len(r.rep.forCmd("c")); n != 1 {
				t.Errorf("%d reports, want the one rejection:\n%s", n, r.rep.dump())
			}
			r.assertNotInstalled("c", proto.UpdateOffered, proto.UpdateDownloading, proto.UpdateDeferred)
			if after := r.stateFile(); string(after) != string(before) && !onlyKeyListChanged(t, before, after) {
				t.Errorf("update state written by a refused offer: %s", after)
			}
			if j := r.u.job(); j != nil || r.u.hasWaiting() {
				t.Errorf("refused offer kept: job %+v, waiting %v", j, r.u.hasWaiting())
			}
			if n := r.srv.totalHits(); n != 0 {
				t.Errorf("%d requests to the release server after a refused offer", n)
			}
		})
	}
}

// A clock that cannot be trusted defers only what could pass with trusted
// time: what is wrong whatever the time (the hardware, a signature, a
// counter, metadata expired even at the earliest the time can be) is
// refused at once, not deferred until a clock that may never come right.
func TestUntrustedClockDoesNotDeferOutrightRefusals(t *testing.T) {
	data := hostilePayload(0x13, 16<<10)
	base := prototest.Base / 1000
	tests := []struct {
		name  string
		check proto.Check
		offer func(t *testing.T, r *hostileRig) (manifest, keys []byte)
	}{
		{"wrong hardware", proto.CheckHardware, func(t *testing.T, r *hostileRig) ([]byte, []byte) {
			return newHostileRelease(t, 13, "1.5.0", data, func(m *proto.Manifest) { m.Hardware = []string{"rev-c"} }).signed, r.keys
		}},
		{"bad signature", proto.CheckSignature, func(t *testing.T, r *hostileRig) ([]byte, []byte) {
			signed := newHostileRelease(t, 13, "1.5.0", data).signed
			signed[len(signed)-1] ^= 0x80
			return signed, r.keys
		}},
		{"key list from another root", proto.CheckRoot, func(t *testing.T, r *hostileRig) ([]byte, []byte) {
			return newHostileRelease(t, 13, "1.5.0", data).signed, hostileSignKeys(t, prototest.OtherKey, prototest.KeyList())
		}},
		{"no installer for the target", proto.CheckTarget, func(t *testing.T, r *hostileRig) ([]byte, []byte) {
			return newHostileRelease(t, 13, "1.5.0", data, func(m *proto.Manifest) { m.Target, m.Arch = "fc-firmware", nil }).signed, r.keys
		}},
		{"manifest expired before the build time", proto.CheckExpired, func(t *testing.T, r *hostileRig) ([]byte, []byte) {
			return newHostileRelease(t, 13, "1.5.0", data, func(m *proto.Manifest) {
				m.Created, m.Expires = hostileBuild.Unix()-10*86400, hostileBuild.Unix()-86400
			}).signed, r.keys
		}},
		{"key list expired before the build time", proto.CheckKeyList, func(t *testing.T, r *hostileRig) ([]byte, []byte) {
			kl := prototest.KeyList()
			kl.Created, kl.Expires = base-400*86400, hostileBuild.Unix()-86400
			return newHostileRelease(t, 13, "1.5.0", data).signed, hostileSignKeys(t, prototest.RootKey, kl)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newHostileRig(t)
			r.clk.Set(time.Unix(0, 0)) // an RTC reset to 1970
			manifest, keys := tc.offer(t, r)
			err := r.u.Offer(hostileCmd("c", manifest, keys, "/artifact/x"))
			if proto.CheckOf(err) != tc.check {
				t.Errorf("Offer = %v, want a %q refusal", err, tc.check)
			}
			rep := r.reportNow("c", proto.UpdateRejected)
			if rep.Check != string(tc.check) || rep.Reason == "" {
				t.Errorf("reported %s, want rejected by %q with a reason", rep, tc.check)
			}
			r.assertAddressed("c", manifest)
			r.assertNotInstalled("c", proto.UpdateOffered, proto.UpdateDeferred)
			if r.u.hasWaiting() {
				t.Errorf("a refused offer waits for the clock")
			}
		})
	}

	// The counter too: with 13 installed, 13's twin and 12 are refused at
	// once, clock or not.
	t.Run("counter at or below the installed", func(t *testing.T) {
		r := newHostileRig(t)
		r.installGood("c-13", newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10)), r.keys)
		r.clk.Set(time.Unix(0, 0))
		for i, rel := range []hostileRelease{
			newHostileRelease(t, 12, "1.4.9", hostilePayload(0x12, 16<<10)),
			newHostileRelease(t, 13, "1.5.0", hostilePayload(0x66, 16<<10)),
		} {
			cmd := fmt.Sprintf("c-%d-%d", rel.m.Counter, i)
			if err := r.offer(cmd, rel, r.keys); proto.CheckOf(err) != proto.CheckCounter {
				t.Errorf("%s: Offer = %v, want a %q refusal", cmd, err, proto.CheckCounter)
			}
			r.reportNow(cmd, proto.UpdateRejected)
			r.assertRejected(cmd, proto.CheckCounter)
			r.assertAddressed(cmd, rel.signed)
			r.assertNotInstalled(cmd, proto.UpdateOffered, proto.UpdateDeferred)
		}
	})
}

// The counter refusals say which counter they are below: installed,
// rolled back, accepted, pending.
func TestCounterRefusalReasons(t *testing.T) {
	t.Run("older than installed, another artifact of the installed", func(t *testing.T) {
		r := newHostileRig(t)
		r.installGood("c-13", newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10)), r.keys)
		for _, tc := range []struct {
			cmd  string
			rel  hostileRelease
			want string
		}{
			{"c-12", newHostileRelease(t, 12, "1.4.9", hostilePayload(0x12, 16<<10)), "counter 12 is older than the installed agent 1.5.0 (counter 13)"},
			{"c-13-twin", newHostileRelease(t, 13, "1.5.0", hostilePayload(0x66, 16<<10)), "another artifact under that counter"},
		} {
			r.offer(tc.cmd, tc.rel, r.keys)
			if rep := r.reportNow(tc.cmd, proto.UpdateRejected); !strings.Contains(rep.Reason, tc.want) {
				t.Errorf("%s: reason %q, want %q", tc.cmd, rep.Reason, tc.want)
			}
		}
		// The installed release itself, offered again: committed, not a
		// refusal.
		r.offer("c-13-again", newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10)), r.keys)
		if rep := r.reportNow("c-13-again", proto.UpdateCommitted); rep.Reason != "already installed" {
			t.Errorf("re-offer of the installed release: %s", rep)
		}
	})
	t.Run("a release that rolled back", func(t *testing.T) {
		r := newHostileRig(t)
		rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10))
		r.srv.route(rel.path, hostileHonest(rel.data))
		if err := r.offer("c-13", rel, r.keys); err != nil {
			t.Fatal(err)
		}
		r.rep.waitState(t, "c-13", proto.UpdateTrial)
		// No confirmation: past the trial's deadline it rolls back.
		r.clk.Advance(DefaultTrialDeadline + time.Second)
		r.rep.waitState(t, "c-13", proto.UpdateRolledBack)
		hostileWaitFor(t, "the job to end", func() bool { return r.u.job() == nil })
		err := r.offer("c-13-again", rel, r.keys)
		if proto.CheckOf(err) != proto.CheckCounter {
			t.Fatalf("Offer of the rolled-back release = %v, want a %q refusal", err, proto.CheckCounter)
		}
		rep := r.reportNow("c-13-again", proto.UpdateRejected)
		if !strings.Contains(rep.Reason, "rolled back") || !strings.Contains(rep.Reason, "new release") {
			t.Errorf("reason %q does not say the release rolled back and needs a new release", rep.Reason)
		}
		r.assertAddressed("c-13-again", rel.signed)
	})
	t.Run("below the pending release", func(t *testing.T) {
		r, _ := newLockedRig(t)
		high := newHostileRelease(t, 20, "2.0.0", hostilePayload(0x20, 16<<10))
		r.srv.route(high.path, hostileHonest(high.data))
		if err := r.offer("c-20", high, r.keys); err != nil {
			t.Fatal(err)
		}
		r.offer("c-15", newHostileRelease(t, 15, "1.9.0", hostilePayload(0x15, 16<<10)), r.keys)
		if rep := r.reportNow("c-15", proto.UpdateRejected); !strings.Contains(rep.Reason, "below the pending agent 2.0.0 (counter 20)") {
			t.Errorf("reason %q", rep.Reason)
		}
	})
}

// An offer that arrives while another update is past the point of no
// return (installing, on trial) is deferred with the reason, kept, and
// taken up by itself once that update ends: it is not dropped (the
// control plane does not offer it again).
func TestOfferWhileAnotherUpdateInProgress(t *testing.T) {
	r := newHostileRig(t)
	first := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10))
	r.srv.route(first.path, hostileHonest(first.data))
	if err := r.offer("c-13", first, r.keys); err != nil {
		t.Fatal(err)
	}
	r.rep.waitState(t, "c-13", proto.UpdateTrial)

	next := newHostileRelease(t, 14, "1.6.0", hostilePayload(0x14, 16<<10))
	r.srv.route(next.path, hostileHonest(next.data))
	if err := r.offer("c-14", next, r.keys); err == nil {
		t.Fatal("Offer during a trial accepted")
	}
	rep := r.reportNow("c-14", proto.UpdateDeferred)
	if !strings.Contains(rep.Reason, "another update is in progress: agent 1.5.0 is on trial") {
		t.Errorf("deferred with reason %q", rep.Reason)
	}
	r.assertAddressed("c-14", next.signed)
	if _, ok := r.rep.find(func(s hostileReport) bool { return s.Cmd == "c-14" && s.State == proto.UpdateRejected }); ok {
		t.Errorf("a busy device rejected the offer:\n%s", r.rep.dump())
	}

	// The first update commits; the waiting one starts by itself.
	r.clk.Advance(DefaultTrialSoak)
	r.u.Confirm(first.m.Counter)
	r.rep.waitState(t, "c-13", proto.UpdateCommitted)
	r.rep.waitState(t, "c-14", proto.UpdateOffered)
	r.rep.waitState(t, "c-14", proto.UpdateTrial)
}

// Cancel withdraws an offer that waits, as it does a job not yet
// installing.
func TestCancelWithdrawsWaitingOffer(t *testing.T) {
	r := newHostileRig(t)
	now := r.clk.Now()
	r.clk.Set(time.Unix(0, 0))
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10))
	r.srv.route(rel.path, hostileHonest(rel.data))
	r.offer("c-13", rel, r.keys)
	r.reportNow("c-13", proto.UpdateDeferred)
	r.u.Cancel()
	if rep := r.reportNow("c-13", proto.UpdateFailed); !strings.Contains(rep.Reason, "cancelled") {
		t.Errorf("cancelled waiting offer reported %s", rep)
	}
	r.clk.Set(now)
	time.Sleep(50 * time.Millisecond) // five ticks of the updater
	if n := r.srv.totalHits(); n != 0 || r.u.job() != nil {
		t.Errorf("a cancelled offer went ahead once the clock came right (%d downloads)", n)
	}
}

// A newer offer that waits too replaces the one waiting, which is
// reported failed (superseded) rather than left deferred for ever.
func TestWaitingOfferSuperseded(t *testing.T) {
	r := newHostileRig(t)
	r.clk.Set(time.Unix(0, 0))
	a := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10))
	b := newHostileRelease(t, 14, "1.6.0", hostilePayload(0x14, 16<<10))
	r.offer("c-13", a, r.keys)
	r.offer("c-13", a, r.keys) // re-sent: still the one waiting
	if _, ok := r.rep.find(func(s hostileReport) bool { return s.State == proto.UpdateFailed }); ok {
		t.Fatalf("a re-sent waiting offer superseded itself:\n%s", r.rep.dump())
	}
	r.offer("c-14", b, r.keys)
	if rep := r.reportNow("c-13", proto.UpdateFailed); rep.Reason != "superseded by 1.6.0" || rep.Counter != 13 {
		t.Errorf("superseded waiting offer reported %s", rep)
	}
	r.reportNow("c-14", proto.UpdateDeferred)
}

// failingStore refuses to save while fail is set.
type failingStore struct {
	Store
	fail atomic.Bool
}

func (f *failingStore) Save(name string, data []byte) error {
	if f.fail.Load() {
		return errors.New("disk full")
	}
	return f.Store.Save(name, data)
}

// A device that cannot record an offer it accepted says so (failed, with
// the reason) instead of saying nothing, and is left as before the offer.
func TestOfferNotRecordedReportsFailed(t *testing.T) {
	fs := &failingStore{}
	r := newHostileRig(t, func(o *Options) { fs.Store = o.Store; o.Store = fs })
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10))
	r.srv.route(rel.path, hostileHonest(rel.data))
	fs.fail.Store(true)
	if err := r.offer("c-13", rel, r.keys); err == nil {
		t.Fatal("Offer succeeded without recording the job")
	}
	rep := r.reportNow("c-13", proto.UpdateFailed)
	if !strings.Contains(rep.Reason, "disk full") {
		t.Errorf("failed with reason %q", rep.Reason)
	}
	r.assertAddressed("c-13", rel.signed)
	if r.u.job() != nil {
		t.Errorf("a job is running that was never recorded")
	}
	// Once the disk takes writes again, the same release is accepted.
	fs.fail.Store(false)
	if err := r.offer("c-13-again", rel, r.keys); err != nil {
		t.Fatalf("the same release after the disk recovered: %v", err)
	}
	r.rep.waitState(t, "c-13-again", proto.UpdateTrial)
}

// A copy of a release the device holds (installed, or its job) that fails
// verification is refused, but not filed under that release: its claims
// are unverified, and the release's own state (committed, downloading)
// must not be overwritten with a rejection.
func TestRefusedCopyOfHeldReleaseNotFiledUnderIt(t *testing.T) {
	lock := filepath.Join(t.TempDir(), "maintenance.lock")
	r := newHostileRig(t, func(o *Options) { o.Policy.LockFile = lock })
	installed := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 16<<10))
	r.installGood("c-13", installed, r.keys)
	// The next release waits for the lock, downloaded.
	if err := os.WriteFile(lock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	pending := newHostileRelease(t, 14, "1.6.0", hostilePayload(0x14, 16<<10))
	r.srv.route(pending.path, hostileHonest(pending.data))
	if err := r.offer("c-14", pending, r.keys); err != nil {
		t.Fatal(err)
	}
	r.rep.waitState(t, "c-14", proto.UpdateDeferred)
	for _, rel := range []hostileRelease{installed, pending} {
		tampered := rel
		tampered.signed = bytes.Clone(rel.signed)
		tampered.signed[len(tampered.signed)-1] ^= 0x80
		cmd := fmt.Sprintf("c-%d-tampered", rel.m.Counter)
		if err := r.offer(cmd, tampered, r.keys); proto.CheckOf(err) != proto.CheckSignature {
			t.Fatalf("%s: Offer = %v, want a signature refusal", cmd, err)
		}
		if rep := r.reportNow(cmd, proto.UpdateRejected); rep.Counter != 0 || rep.Target != "" || rep.Reason == "" {
			t.Errorf("%s: reported %s under %q #%d, want no release (it names one the device holds)", cmd, rep, rep.Target, rep.Counter)
		}
	}
	if j := r.u.job(); j == nil || j.m.Counter != 14 {
		t.Errorf("the pending job is gone: %+v", j)
	}
}
