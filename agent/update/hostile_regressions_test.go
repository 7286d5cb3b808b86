package update

// Regressions: defects the hostile server once found, kept as tests. The
// comments tell the scenario as it was found.

import (
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// A download that fails (a link outage past the no-progress limit) or is
// refused (a mix-and-match from a hostile mirror) ends the job, but the
// counter of the release stays "seen": when the control plane offers the
// same signed release again, once the link is back or the server honest,
// the device refuses it as a rollback (counter), for ever, across
// restarts. Nothing of that release was installed; refusing it again is
// not rollback protection, and it lets a transient fault or a one-time
// tampered download deny the device that release until the release
// engineer signs a new one.
func TestHostileRegressionFailedDownloadBurnsTheCounter(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(rel hostileRelease) http.HandlerFunc
		state proto.UpdateState
	}{
		{"after a link outage", func(hostileRelease) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) { http.Error(w, "down", http.StatusServiceUnavailable) }
		}, proto.UpdateFailed},
		{"after a mix-and-match", func(rel hostileRelease) http.HandlerFunc {
			return hostileHonest(hostilePayload(0xB, len(rel.data)))
		}, proto.UpdateRejected},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newHostileRig(t)
			rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
			r.srv.route(rel.path, tc.serve(rel))
			if err := r.offer("c-first", rel, r.keys); err != nil {
				t.Fatal(err)
			}
			r.rep.waitState(t, "c-first", tc.state)
			hostileWaitFor(t, "the job to end", func() bool { return r.u.job() == nil })
			r.assertNotInstalled("c-first", proto.UpdateVerified, proto.UpdateInstalling)

			// The link is back, the server honest: the control plane offers
			// the same signed release again.
			r.srv.route(rel.path, hostileHonest(rel.data))
			if err := r.offer("c-again", rel, r.keys); err != nil {
				t.Errorf("the same signed release (counter %d), re-offered after its download %s, is refused: %v\n"+
					"\twant it accepted and installed: nothing of it was installed, so this is no rollback "+
					"(a counter accepted before the download must not count as spent)",
					rel.m.Counter, tc.state, err)
				return
			}
			r.rep.waitState(t, "c-again", proto.UpdateTrial)
		})
	}
}

// A server that sends exactly the declared bytes (the right ones) and then
// holds the connection open without ending the response: the agent has
// the whole artifact but waits for a byte past the declared size before it
// checks it. With the package's default HTTP client (no timeout) it waits
// for ever: the job never ends, never retries (a slow-retrieval attack).
// The shipped agent passes a client with a 30 s timeout, which bounds the
// wait to 30 s per attempt.
func TestHostileRegressionStallAfterDeclaredSize(t *testing.T) {
	r := newHostileRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	r.srv.route(rel.path, r.srv.serveThenStall(rel.data))
	if err := r.offer("c-stall", rel, r.keys); err != nil {
		t.Fatal(err)
	}
	const patience = 3 * time.Second
	deadline := time.NewTimer(patience)
	defer deadline.Stop()
	for {
		if rep, ok := r.rep.find(func(s hostileReport) bool {
			return s.Cmd == "c-stall" && (s.State == proto.UpdateVerified || s.State == proto.UpdateRejected || s.State == proto.UpdateFailed)
		}); ok {
			t.Logf("ended: %s", rep)
			return
		}
		r.rep.mu.Lock()
		ch := r.rep.changed
		r.rep.mu.Unlock()
		select {
		case <-ch:
			continue
		case <-deadline.C:
		}
		break
	}
	t.Errorf("the server sent all %d declared bytes %v ago and holds the connection: the download neither verified nor ended "+
		"(download.go fetch: io.ReadFull(resp.Body, one[:]) after io.CopyN blocks on the server, and Options.HTTP defaults to a client without timeout); "+
		"want the artifact checked once the declared size is in, without waiting on the server", len(rel.data), patience)
}

// A release accepted and downloaded while valid, whose install waits (a
// maintenance lock) past its manifest's expiry. The control plane re-sends
// the offer: the agent reports it rejected, expired. Then the lock lifts,
// and the agent installs that release anyway: install re-checks the
// staged file's hash only. The design says expired metadata blocks new
// installs; and the device contradicts its own report.
func TestHostileRegressionExpiredWhileDeferredStillInstalls(t *testing.T) {
	r, lock := newLockedRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 64<<10))
	r.srv.route(rel.path, hostileHonest(rel.data))
	if err := r.offer("c-13", rel, r.keys); err != nil {
		t.Fatal(err)
	}
	r.rep.waitState(t, "c-13", proto.UpdateDeferred)

	r.clk.Set(time.Unix(rel.m.Expires, 0).Add(24 * time.Hour))
	if err := r.offer("c-13", rel, r.keys); proto.CheckOf(err) != proto.CheckExpired {
		t.Fatalf("re-sent offer after expiry: %v, want an %q refusal", err, proto.CheckExpired)
	}
	if err := os.Remove(lock); err != nil {
		t.Fatal(err)
	}
	hostileWaitFor(t, "the job to end or an install", func() bool {
		installs, _, _, _, _ := r.inst.calls()
		return r.u.job() == nil || len(installs) > 0
	})
	if installs, _, _, _, _ := r.inst.calls(); len(installs) > 0 {
		t.Errorf("the manifest expired at %s while the install waited; the agent reported the re-sent offer rejected (expired), "+
			"then installed the release anyway (run.go install re-checks the staged hash, not the manifest's expiry); "+
			"want the expired job dropped, nothing installed", time.Unix(rel.m.Expires, 0).UTC().Format(time.RFC3339))
	}
}

// The control plane re-sends an offer until it hears back, so Offer runs
// (on the agent's command goroutine) while Run works on the same job. Run
// writes the job's fields (Phase, Deferred, ...) without the updater's
// lock, while Offer reads them under it (job.state, and json.Marshal of the
// state when it saves): a data race. This test fails under -race.
func TestHostileRegressionReofferDuringDownloadRaces(t *testing.T) {
	r, _ := newLockedRig(t)
	rel := newHostileRelease(t, 13, "1.5.0", hostilePayload(0x13, 4<<20))
	r.srv.route(rel.path, hostileHonest(rel.data))
	cmd := hostileCmd("c-13", rel.signed, r.keys, rel.path)
	if err := r.u.Offer(cmd); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = r.u.Offer(cmd) // the control plane's re-send
		}
	}()
	r.rep.waitState(t, "c-13", proto.UpdateDeferred)
	close(stop)
	wg.Wait()
	r.assertNotInstalled("c-13", proto.UpdateInstalling)
}
