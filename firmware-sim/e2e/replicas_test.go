package e2e

import (
	"bytes"

	"github.com/hangarfleet/hangar/controlplane/cli"

	"context"
	"crypto/ed25519"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/firmware-sim/scenario"
	"github.com/hangarfleet/hangar/firmware-sim/sim"
	balancerpkg "github.com/hangarfleet/hangar/internal/balancer"
	"github.com/hangarfleet/hangar/internal/natstest"
	"github.com/hangarfleet/hangar/internal/pgtest"
)

// balancer is the load balancer in front of the replicas, as an
// endpoint of the tests.
type balancer struct {
	*balancerpkg.Balancer
	dataDir string
}

func newBalancer(t *testing.T, dataDir string, backends ...string) *balancer {
	t.Helper()
	b, err := balancerpkg.Start(backends...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return &balancer{Balancer: b, dataDir: dataDir}
}

func (b *balancer) DataDir() string { return b.dataDir }

// cuttable is a TCP proxy between a replica and PostgreSQL whose link can
// be cut (open connections dropped, new ones refused) and restored.
type cuttable struct {
	ln       net.Listener
	upstream string
	mu       sync.Mutex
	cut      bool
	conns    map[net.Conn]bool
}

func newCuttable(t *testing.T, upstream string) *cuttable {
	t.Helper()
	c := &cuttable{ln: listen(t), upstream: upstream, conns: map[net.Conn]bool{}}
	go func() {
		for {
			in, err := c.ln.Accept()
			if err != nil {
				return
			}
			c.mu.Lock()
			if c.cut {
				c.mu.Unlock()
				in.Close()
				continue
			}
			out, err := net.Dial("tcp", upstream)
			if err != nil {
				c.mu.Unlock()
				in.Close()
				continue
			}
			c.conns[in], c.conns[out] = true, true
			c.mu.Unlock()
			go func() { io.Copy(out, in); out.Close(); in.Close() }()
			go func() { io.Copy(in, out); in.Close(); out.Close() }()
		}
	}()
	t.Cleanup(func() { c.ln.Close(); c.setCut(true) })
	return c
}

func (c *cuttable) Addr() string { return c.ln.Addr().String() }

func (c *cuttable) setCut(cut bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cut = cut
	if cut {
		// Open connections are reset, new ones refused.
		for conn := range c.conns {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			conn.Close()
		}
		c.conns = map[net.Conn]bool{}
	}
}

// replicaSet is three `hangar serve` processes on one PostgreSQL
// database (each through its own cuttable link) and one data directory
// (artifacts, token files: shared storage in a deployment), the drones
// on a three-node NATS cluster whose MQTT stream the replicas consume
// together. (Mosquitto's shared subscriptions lose the messages in flight
// to a subscriber that is killed, eclipse-mosquitto/mosquitto#2662: a
// replica killed with reports in flight left a rollout waiting for them.)
type replicaSet struct {
	t        *testing.T
	names    []string
	cps      map[string]*scenario.ControlPlane
	links    map[string]*cuttable
	db       *sql.DB // the test's own view of the database
	lb       *balancer
	kills    int
	failover []time.Duration
}

func startReplicaSet(t *testing.T, kit *releaseKit, ttl time.Duration) *replicaSet {
	t.Helper()
	pgURL := pgtest.URL(t)
	u, _ := url.Parse(pgURL)
	dir := t.TempDir()
	pw := filepath.Join(t.TempDir(), "broker-password")
	c, co := natstest.StartForHangar(t)
	seedFile := filepath.Join(t.TempDir(), "callout.seed")
	if err := os.WriteFile(seedFile, []byte(co.Seed), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pw, []byte(co.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	rs := &replicaSet{t: t, cps: map[string]*scenario.ControlPlane{}, links: map[string]*cuttable{}}
	if rs.db, err = sql.Open("pgx", pgURL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.db.Close() })
	var urls []string
	for i := 1; i <= 3; i++ {
		name := fmt.Sprintf("r%d", i)
		link := newCuttable(t, u.Host)
		lu := *u
		lu.Host = link.Addr()
		cp, err := scenario.NewControlPlane(buildServer(t), dir, "--store", lu.String(), "--replica", name,
			"--lease-ttl", ttl.String(), "--broker", c.URLs(), "--broker-user", co.User, "--broker-password-file", pw,
			"--broker-callout-seed-file", seedFile, "--mqtt-advertise", c.MQTTURLs(), "--root-key", kit.rootPub,
			"--rollout-interval", "250ms", "--log-level", "info")
		if err != nil {
			t.Fatal(err)
		}
		rs.names = append(rs.names, name)
		rs.cps[name], rs.links[name] = cp, link
		// One at a time: the first makes the token files the others use.
		if err := cp.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		urls = append(urls, cp.URL())
	}
	t.Cleanup(func() {
		for _, name := range rs.names {
			rs.cps[name].Stop()
			if t.Failed() {
				t.Logf("replica %s log:\n%s", name, tail(rs.cps[name].Log(), 3000))
			}
		}
	})
	rs.lb = newBalancer(t, dir, urls...)
	return rs
}

// leader is the replica holding the scheduler lease (unexpired), by the
// database.
func (rs *replicaSet) leader() (name string, term int64) {
	var expires, now int64
	err := rs.db.QueryRow(`SELECT holder, token, expires, (extract(epoch from clock_timestamp()) * 1000)::bigint FROM leases WHERE name = 'scheduler'`).
		Scan(&name, &term, &expires, &now)
	if err != nil || expires <= now {
		return "", 0
	}
	return name, term
}

// killLeader kills the leader with SIGKILL, waits for another replica to
// take the lease, and starts the killed one again.
func (rs *replicaSet) killLeader() {
	t := rs.t
	t.Helper()
	var old string
	var term int64
	waitFor(t, 30*time.Second, "a leader", func() (bool, string) {
		old, term = rs.leader()
		return old != "", "none"
	})
	t0 := time.Now()
	rs.cps[old].Kill()
	rs.kills++
	var next string
	waitFor(t, 30*time.Second, "another replica leading", func() (bool, string) {
		n, tm := rs.leader()
		next = n
		return n != "" && n != old && tm > term, fmt.Sprintf("%q term %d", n, tm)
	})
	rs.failover = append(rs.failover, time.Since(t0))
	t.Logf("killed leader %s (term %d): %s leads after %v", old, term, next, time.Since(t0).Round(10*time.Millisecond))
	if err := rs.cps[old].Start(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// transitions are a rollout's transitions as stored, in order, with the
// replica and term that decided each.
type transition struct {
	To, Replica string
	Term        int64
}

func (rs *replicaSet) transitions(id string) []transition {
	rows, err := rs.db.Query(`SELECT attrs FROM audit WHERE target = $1 AND action = 'rollout.transition' ORDER BY id`, id)
	if err != nil {
		rs.t.Fatal(err)
	}
	defer rows.Close()
	var out []transition
	for rows.Next() {
		var attrs string
		rows.Scan(&attrs)
		var a map[string]string
		json.Unmarshal([]byte(attrs), &a)
		term, _ := strconv.ParseInt(a["term"], 10, 64)
		out = append(out, transition{To: a["to"], Replica: a["replica"], Term: term})
	}
	return out
}

// seqHoles counts, for each drone, the sequence numbers missing or
// repeated in what the database holds of its telemetry and events, boot
// by boot.
func seqHoles(t *testing.T, db *sql.DB, ids []string) (holes, repeats int, detail string) {
	for _, id := range ids {
		byBoot := map[int64][]int64{}
		rows, err := db.Query(`SELECT t.boot, t.seq FROM telemetry t JOIN devices d ON d.num = t.dev WHERE d.id = $1
			UNION ALL SELECT e.boot, e.seq FROM events e JOIN devices d ON d.num = e.dev WHERE d.id = $1`, id)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var b, s int64
			rows.Scan(&b, &s)
			byBoot[b] = append(byBoot[b], s)
		}
		rows.Close()
		for boot, ss := range byBoot {
			slices.Sort(ss)
			for i := 1; i < len(ss); i++ {
				switch d := ss[i] - ss[i-1]; {
				case d == 0:
					repeats++
				case d > 1:
					holes += int(d - 1)
					if detail == "" {
						detail = fmt.Sprintf("%s boot %d: %d..%d", id, boot, ss[i-1], ss[i])
					}
				}
			}
			if len(ss) > 0 && ss[0] != 1 {
				holes += int(ss[0] - 1)
				if detail == "" {
					detail = fmt.Sprintf("%s boot %d starts at %d", id, boot, ss[0])
				}
			}
		}
	}
	return holes, repeats, detail
}

// maxSeq is the greatest sequence number of boot stored for a device.
func maxSeq(t *testing.T, db *sql.DB, id string, boot uint64) uint64 {
	var max sql.NullInt64
	err := db.QueryRow(`SELECT max(seq) FROM (SELECT t.seq FROM telemetry t JOIN devices d ON d.num = t.dev WHERE d.id = $1 AND t.boot = $2
		UNION ALL SELECT e.seq FROM events e JOIN devices d ON d.num = e.dev WHERE d.id = $1 AND e.boot = $2) s`, id, int64(boot)).Scan(&max)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(max.Int64)
}

// TestReplicasFailover: three control-plane replicas on PostgreSQL behind
// a load balancer, with the drones on a NATS cluster and the replicas
// sharing its ingest, roll releases out to a simulated fleet. The scheduler leader is
// killed with SIGKILL several times during stage 2, and later cut off
// from the database: each rollout ends as the uninterrupted one did (same
// transitions, once each, same stages, every drone installing once);
// decisions are made by one term at a time, in order (no write of an
// older term after a newer one's); a replica cut off stops leading before
// another starts; and no message a drone had acknowledged is missing from
// the database.
func TestReplicasFailover(t *testing.T) {
	// 500 drones; 200 under the race detector, which slows the drones,
	// the three replicas and the NATS cluster on the same cores several
	// times over (HANGAR_TEST_REPLICA_DRONES sets it).
	n := 500
	if raceEnabled {
		n = 200
	}
	if v := os.Getenv("HANGAR_TEST_REPLICA_DRONES"); v != "" {
		n, _ = strconv.Atoi(v)
	}
	const ttl = 2 * time.Second
	kit := newReleaseKit(t)
	rs := startReplicaSet(t, kit, ttl)
	lb := rs.lb
	fleet := newTestFleet(t, lb, n, func(o *sim.FleetOptions) {
		o.Roots = []ed25519.PublicKey{kit.rootKey(t)}
		o.Grounded = true
		o.TrialSoak = 300 * time.Millisecond
		o.TrialDeadline = 2 * time.Minute
		o.SampleInterval, o.BatchSize = time.Second, 5
		o.HeartbeatInterval = 10 * time.Second
		o.BackoffMax = time.Second
		o.StartRate = 200
	})
	kc := func(args ...string) string { return k(t, kit, lb, args...) }
	// poll is the CLI for the waits: a request a replica fails under the
	// load of a fleet enrolling (a 500, a 503) is asked again, as an
	// operator's script would, instead of ending the test.
	poll := func(args ...string) string {
		var out, errb bytes.Buffer
		env := map[string]string{"HANGAR_SERVER": lb.URL()}
		all := append(args, "--token-file", adminTokenFile(lb))
		if err := cli.Run(context.Background(), all, cli.Env{Stdout: &out, Stderr: &errb, Getenv: func(s string) string { return env[s] }}); err != nil {
			t.Logf("hangar %s: %v (asking again)", strings.Join(args, " "), err)
			return ""
		}
		return out.String()
	}
	waitFor(t, 3*time.Minute, "fleet online", func() (bool, string) {
		var ds []store.Device
		json.Unmarshal([]byte(poll("device", "ls", "--online", "true", "-o", "json", "--limit", "0")), &ds)
		return len(ds) == n, fmt.Sprintf("%d online", len(ds))
	})
	if l, _ := rs.leader(); l == "" {
		t.Fatal("no replica leads")
	}
	kit.simRelease(t, lb, sim.Firmware{Version: "1.1.0", Behaviour: sim.Good}, 110)
	kit.simRelease(t, lb, sim.Firmware{Version: "1.2.0", Behaviour: sim.Good}, 120)
	kit.simRelease(t, lb, sim.Firmware{Version: "1.3.0", Behaviour: sim.Good}, 130)

	gates := []string{"--stages", "5%,30%,100%", "--min-canary", "5", "--soak", "12s", "--max-in-flight", "100",
		"--device-timeout", "5m", "--health-margin", "1", "--start", "-o", "json"}
	create := func(version string) string {
		var r rollout.Rollout
		out := kc(append([]string{"rollout", "create", "--release", version}, gates...)...)
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		return r.Spec.ID
	}
	status := func(id string) rollout.StatusReport {
		var rep rollout.StatusReport
		json.Unmarshal([]byte(poll("rollout", "status", id, "-o", "json")), &rep)
		return rep
	}
	finished := func(id string) func() (bool, string) {
		return func() (bool, string) {
			rep := status(id)
			if rep.State.Status == rollout.StatusPaused || rep.State.Status == rollout.StatusAborted {
				t.Fatalf("rollout %s: %s\nfailed devices:\n%s", rep.State.Status, rep.State.Reason,
					kc("rollout", "devices", id, "--state", string(rollout.MFailed)))
			}
			return rep.State.Status.Final(), fmt.Sprintf("%s stage %d %v", rep.State.Status, rep.State.Stage+1, rep.Counts)
		}
	}
	settled := func(id string) {
		waitFor(t, 2*time.Minute, "every device's report in", func() (bool, string) {
			rep := status(id)
			if len(rep.Stages) == 0 {
				return false, "no status"
			}
			for _, st := range rep.Stages {
				if st.States[rollout.MOffered] > 0 || st.States[rollout.MPending] > 0 {
					return false, fmt.Sprint(st.States)
				}
			}
			return true, ""
		})
	}
	inStage := func(id string, stage int) {
		waitFor(t, 2*time.Minute, fmt.Sprintf("stage %d", stage+1), func() (bool, string) {
			rep := status(id)
			return rep.State.Stage >= stage, fmt.Sprintf("stage %d", rep.State.Stage+1)
		})
	}
	checkTerms := func(id string) []transition {
		tr := rs.transitions(id)
		for i := 1; i < len(tr); i++ {
			if tr[i].Term < tr[i-1].Term {
				t.Errorf("rollout %s: %q decided in term %d after %q in term %d: an older term wrote after a newer one", id, tr[i].To, tr[i].Term, tr[i-1].To, tr[i-1].Term)
			}
		}
		for _, x := range tr {
			if x.Term == 0 || x.Replica == "" {
				t.Errorf("transition %+v carries no term", x)
			}
		}
		return tr
	}
	tos := func(tr []transition) []string {
		var out []string
		for _, x := range tr {
			out = append(out, x.To)
		}
		return out
	}

	var current string // the rollout under way, for the diagnosis of a failure
	t.Cleanup(func() {
		if !t.Failed() || current == "" {
			return
		}
		out := kc("rollout", "devices", current, "--state", string(rollout.MOffered))
		t.Logf("rollout %s devices in progress:\n%s", current, out)
		for _, line := range strings.Split(out, "\n")[1:] {
			if f := strings.Fields(line); len(f) > 0 {
				t.Logf("%s updates:\n%s", f[0], kc("device", "updates", f[0]))
				t.Logf("%s events:\n%s", f[0], kc("device", "events", f[0]))
				var cmds []map[string]any
				rows, _ := rs.db.Query(`SELECT c.id, c.kind, c.created, coalesce(c.sent, 0), c.attempts, coalesce(c.acked, 0), coalesce(c.withdrawn, 0)
					FROM commands c JOIN devices d ON d.num = c.dev WHERE d.id = $1 ORDER BY c.created`, f[0])
				for rows != nil && rows.Next() {
					var id, kind string
					var created, sent, attempts, acked, withdrawn int64
					rows.Scan(&id, &kind, &created, &sent, &attempts, &acked, &withdrawn)
					cmds = append(cmds, map[string]any{"id": id, "kind": kind, "created": created, "sent": sent, "attempts": attempts, "acked": acked, "withdrawn": withdrawn})
				}
				t.Logf("%s commands: %v", f[0], cmds)
				break
			}
		}
	})

	// The uninterrupted run.
	before := boots(fleet)
	id := create("1.1.0")
	current = id
	waitFor(t, 8*time.Minute, "uninterrupted rollout finished", finished(id))
	settled(id)
	want := kit.outcome(t, lb, fleet, id, before)
	if want.Status != rollout.StatusCompleted || want.Versions["1.1.0"] != n {
		t.Fatalf("uninterrupted run: %+v", want)
	}
	checkTerms(id)
	want.Versions = nil

	// The leader killed three times during stage 2.
	before = boots(fleet)
	id = create("1.2.0")
	current = id
	inStage(id, 1)
	for range 3 {
		rs.killLeader()
	}
	waitFor(t, 8*time.Minute, "rollout finished after the kills", finished(id))
	settled(id)
	got := kit.outcome(t, lb, fleet, id, before)
	if got.Versions["1.2.0"] != n {
		t.Errorf("versions after the kills: %v", got.Versions)
	}
	got.Versions = nil
	if g, w := fmt.Sprintf("%+v", got), fmt.Sprintf("%+v", want); g != w {
		t.Errorf("outcome after %d leader kills differs from the uninterrupted run:\n got  %s\n want %s", rs.kills, g, w)
	}
	tr := checkTerms(id)
	if !slices.Equal(tos(tr), []string{"stage 2", "stage 3", "completed"}) {
		t.Errorf("transitions after the kills: %+v", tr)
	}
	t.Logf("failover after SIGKILL of the leader: %v (lease term %v)", rs.failover, ttl)

	// The leader cut off from the database during stage 2: it stops
	// leading (by its own clock) before another replica takes the lease,
	// and nothing it still had under way is written.
	before = boots(fleet)
	id = create("1.3.0")
	current = id
	inStage(id, 1)
	cut, term := rs.leader()
	cutAt := time.Now()
	rs.links[cut].setCut(true)
	var next string
	waitFor(t, 30*time.Second, "another replica leading", func() (bool, string) {
		n, tm := rs.leader()
		next = n
		return n != "" && n != cut && tm > term, n
	})
	took := time.Since(cutAt)
	// Give the cut-off replica time to try writing, then restore it.
	time.Sleep(ttl)
	rs.links[cut].setCut(false)
	waitFor(t, 8*time.Minute, "rollout finished after the cut", finished(id))
	settled(id)
	got = kit.outcome(t, lb, fleet, id, before)
	got.Versions = nil
	if g, w := fmt.Sprintf("%+v", got), fmt.Sprintf("%+v", want); g != w {
		t.Errorf("outcome after cutting the leader off differs from the uninterrupted run:\n got  %s\n want %s", g, w)
	}
	tr = checkTerms(id)
	if !slices.Equal(tos(tr), []string{"stage 2", "stage 3", "completed"}) {
		t.Errorf("transitions after the cut: %+v", tr)
	}
	for _, x := range tr {
		if x.Replica == cut && x.Term == term && x.To != "stage 2" {
			t.Errorf("the replica cut off (%s, term %d) decided %q", cut, term, x.To)
		}
	}
	log := rs.cps[cut].Log()
	stepped := strings.Index(log, "not leading any more")
	if stepped < 0 {
		t.Errorf("%s, cut off, never stopped leading:\n%s", cut, tail(log, 2000))
	}
	t.Logf("%s cut off from PostgreSQL: %s leads after %v", cut, next, took.Round(10*time.Millisecond))

	// Nothing acknowledged is missing: every drone's sequence, boot by
	// boot, is whole in the database once the backlog is in.
	queued := map[string]uint64{}
	for _, d := range fleet.Drones() {
		queued[d.ID] = d.Agent().LastSeq()
	}
	ids := make([]string, 0, n)
	for _, d := range fleet.Drones() {
		ids = append(ids, d.ID)
	}
	waitFor(t, time.Minute, "backlog stored", func() (bool, string) {
		var stored int
		for _, d := range fleet.Drones() {
			if maxSeq(t, rs.db, d.ID, d.Agent().Boot()) >= queued[d.ID] {
				stored++
			}
		}
		return stored == n, fmt.Sprintf("%d of %d drones' backlog stored", stored, n)
	})
	fleet.stop()
	holes, repeats, detail := seqHoles(t, rs.db, ids)
	if holes != 0 || repeats != 0 {
		t.Errorf("sequence holes %d, repeats %d in the database (%s)", holes, repeats, detail)
	}
	for _, name := range rs.names {
		if l := rs.cps[name].Log(); strings.Contains(l, "panic") || strings.Contains(l, "DATA RACE") {
			t.Errorf("replica %s:\n%s", name, tail(l, 4000))
		}
	}
}
