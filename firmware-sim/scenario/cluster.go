package scenario

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/hangarfleet/hangar/internal/balancer"
	"github.com/hangarfleet/hangar/internal/natscluster"
	"github.com/hangarfleet/hangar/internal/pgserver"
)

// cluster is what a clustered rehearsal runs beside the control planes.
type cluster struct {
	pg      *pgserver.Server
	pgURL   string
	nats    *natscluster.Cluster
	lb      *balancer.Balancer
	nextBad int // the next NATS node kill_broker_node kills
}

func (c *cluster) stop() {
	if c == nil {
		return
	}
	if c.lb != nil {
		c.lb.Close()
	}
	if c.nats != nil {
		c.nats.Stop()
	}
	c.pg.Stop()
}

// clustered says whether the scenario runs the control plane beyond one
// process (PostgreSQL, NATS, replicas).
func (s *Scenario) clustered() bool {
	cp := s.ControlPlane
	return cp.Replicas > 1 || cp.Store == "postgres" || cp.Broker == "nats"
}

func (s *Scenario) checkControlPlane() error {
	cp := s.ControlPlane
	switch {
	case cp.Store != "" && cp.Store != "sqlite" && cp.Store != "postgres":
		return fmt.Errorf("control_plane.store %q: sqlite or postgres", cp.Store)
	case cp.Broker != "" && cp.Broker != "embedded" && cp.Broker != "nats":
		return fmt.Errorf("control_plane.broker %q: embedded or nats", cp.Broker)
	case cp.Replicas > 1 && (cp.Store != "postgres" || cp.Broker != "nats"):
		return errors.New("control_plane.replicas above 1 needs store: postgres and broker: nats")
	case cp.Replicas < 0 || cp.Replicas > 9:
		return fmt.Errorf("control_plane.replicas %d: 1 to 9", cp.Replicas)
	}
	return nil
}

// natsServer finds the nats-server binary.
func (r *runner) natsServer(hangar string) (string, error) {
	if r.o.NATSServer != "" {
		return r.o.NATSServer, nil
	}
	if p := filepath.Join(filepath.Dir(hangar), "nats-server"); fileExists(p) {
		return p, nil
	}
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p, nil
	}
	return "", errors.New("broker nats: no nats-server next to hangar or in PATH (go install github.com/nats-io/nats-server/v2@v2.15.2, or --nats-server)")
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// setUpCluster starts PostgreSQL, the NATS cluster and the replicas (one
// data directory, each its own name), with a balancer in front for the
// drones and the operator's actions, and returns the enrollment token.
func (r *runner) setUpCluster(ctx context.Context, bin string, args []string) (string, error) {
	spec := r.s.ControlPlane
	c := &cluster{}
	r.cluster = c
	if spec.Store == "postgres" {
		var err error
		if c.pg, err = pgserver.Start(); err != nil {
			return "", fmt.Errorf("postgres: %w", err)
		}
		if c.pgURL, err = c.pg.CreateDatabase("hangar_scenario"); err != nil {
			return "", err
		}
		args = append(args, "--store", c.pgURL)
		r.progress("PostgreSQL started")
	}
	if spec.Broker == "nats" {
		nb, err := r.natsServer(bin)
		if err != nil {
			return "", err
		}
		akp, err := nkeys.CreateAccount()
		if err != nil {
			return "", err
		}
		seed, _ := akp.Seed()
		pub, _ := akp.PublicKey()
		dir := filepath.Join(r.o.WorkDir, "nats")
		pass := fmt.Sprintf("cp-%d", time.Now().UnixNano())
		seedFile, passFile := filepath.Join(r.o.WorkDir, "callout.seed"), filepath.Join(r.o.WorkDir, "nats.password")
		if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
			return "", err
		}
		if err := os.WriteFile(passFile, []byte(pass), 0o600); err != nil {
			return "", err
		}
		if c.nats, err = natscluster.Start(dir, nb, natscluster.Options{User: "hangar", Password: pass, CalloutIssuer: pub}); err != nil {
			return "", err
		}
		args = append(args, "--broker", c.nats.URLs(), "--broker-user", "hangar", "--broker-password-file", passFile,
			"--broker-callout-seed-file", seedFile, "--mqtt-advertise", c.nats.MQTTURLs())
		r.progress("NATS cluster of %d nodes started", len(c.nats.Nodes))
	}
	n := max(1, spec.Replicas)
	dir := filepath.Join(r.o.WorkDir, "controlplane")
	var urls []string
	for i := range n {
		name := fmt.Sprintf("r%d", i+1)
		cp, err := NewControlPlane(bin, dir, append(append([]string{}, args...), "--replica", name, "--lease-ttl", "2s")...)
		if err != nil {
			return "", err
		}
		cp.name = name
		r.cps = append(r.cps, cp)
		// One at a time: the first makes the token files the others use.
		if err := cp.Start(ctx); err != nil {
			return "", err
		}
		urls = append(urls, cp.URL())
	}
	r.cp = r.cps[0]
	var err error
	if c.lb, err = balancer.Start(urls...); err != nil {
		return "", err
	}
	r.url, r.droneURL, r.tok = c.lb.URL(), c.lb.URL(), filepath.Join(dir, "admin.token")
	b, err := os.ReadFile(filepath.Join(dir, "enroll.token"))
	if err != nil {
		return "", err
	}
	r.progress("%d control planes behind %s (data %s)", n, r.url, dir)
	return strings.TrimSpace(string(b)), nil
}

// leader is the replica that runs the scheduler now, by its /healthz.
func (r *runner) leader() *ControlPlane {
	for _, cp := range r.cps {
		resp, err := http.Get(cp.URL() + "/healthz")
		if err != nil {
			continue
		}
		var h struct {
			Leading bool `json:"leading"`
		}
		err = json.NewDecoder(resp.Body).Decode(&h)
		resp.Body.Close()
		if err == nil && h.Leading {
			return cp
		}
	}
	return nil
}

// target is the control plane a kill or restart acts on: the only one,
// or the replicas' leader (waiting for one to lead).
func (r *runner) target(ctx context.Context) (*ControlPlane, error) {
	if len(r.cps) <= 1 {
		return r.cp, nil
	}
	deadline := time.Now().Add(time.Minute)
	for {
		if l := r.leader(); l != nil {
			return l, nil
		}
		if time.Now().After(deadline) {
			return nil, errors.New("no replica leads")
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return nil, ctx.Err()
		}
	}
}

// awaitSuccessor waits for a replica other than old to lead, and says
// how long it took from since.
func (r *runner) awaitSuccessor(ctx context.Context, old *ControlPlane, since time.Time) (time.Duration, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		if l := r.leader(); l != nil && l != old {
			return time.Since(since), nil
		}
		if time.Now().After(deadline) {
			return 0, errors.New("no other replica took over within a minute")
		}
		if !sleepCtx(ctx, 50*time.Millisecond) {
			return 0, ctx.Err()
		}
	}
}

type brokerNodeAction struct {
	*Kill
}

func (a brokerNodeAction) check(c *checkCtx) error {
	if a.Down < 0 {
		return errors.New("negative time")
	}
	return nil
}

func (a brokerNodeAction) setDefaults() {
	if a.Down == 0 {
		a.Down = Duration(5 * time.Second)
	}
}

func (brokerNodeAction) breaksLinks() bool { return false }

func (a brokerNodeAction) run(ctx context.Context, r *runner, rng *rand.Rand) (string, error) {
	what := fmt.Sprintf("kill -9 a broker node, start it again after %v", time.Duration(a.Kill.Down))
	if r.cluster == nil || r.cluster.nats == nil {
		return what, errors.New("kill_broker_node needs control_plane.broker: nats")
	}
	nodes := r.cluster.nats.Nodes
	n := nodes[r.cluster.nextBad%len(nodes)]
	r.cluster.nextBad++
	what = fmt.Sprintf("kill -9 broker node %s, start it again after %v", n.Name, time.Duration(a.Kill.Down))
	before := map[string]uint64{}
	for _, d := range r.fleet.Drones() {
		before[d.ID] = d.Agent().Connections()
	}
	killed := time.Now()
	n.Kill()
	// The drones that were on it lose their connection and make another
	// through the other nodes (the control plane cannot tell: a dead
	// node sends no last will).
	deadline := killed.Add(5 * time.Minute)
	for {
		moved, down := 0, 0
		for _, d := range r.fleet.Drones() {
			switch {
			case d.Off():
			case !d.Agent().Connected():
				down++
			case d.Agent().Connections() > before[d.ID]:
				moved++
			}
		}
		if down == 0 && moved > 0 {
			break
		}
		if time.Now().After(deadline) {
			return what, fmt.Errorf("%d drones still disconnected after 5 minutes", down)
		}
		if !sleepCtx(ctx, 50*time.Millisecond) {
			return what, ctx.Err()
		}
	}
	took := time.Since(killed)
	r.mu.Lock()
	r.rep.Figures.BrokerNodeReconnects = append(r.rep.Figures.BrokerNodeReconnects, took.Seconds())
	r.mu.Unlock()
	if !sleepCtx(ctx, time.Duration(a.Kill.Down)-time.Since(killed)) {
		return what, ctx.Err()
	}
	if err := n.Start(); err != nil {
		return what, err
	}
	if err := n.WaitHealthy(time.Minute); err != nil {
		return what, err
	}
	return what + fmt.Sprintf(" (every drone connected again %d ms after the kill)", took.Milliseconds()), nil
}
