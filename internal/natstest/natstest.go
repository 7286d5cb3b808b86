// Package natstest runs a three-node NATS cluster (internal/natscluster)
// for a test, from the nats-server go.mod pins as a tool, built once per
// test process.
//
// Without a Go toolchain able to build it, tests skip; under CI
// (CI=true) they fail.
package natstest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/hangarfleet/hangar/internal/natscluster"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Options and Cluster are natscluster's.
type (
	Options = natscluster.Options
	Cluster = natscluster.Cluster
)

// Binary builds nats-server once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hangar-nats-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "nats-server")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/nats-io/nats-server/v2").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("build nats-server: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("nats-server needed under CI: %v", buildErr)
		}
		t.Skip(buildErr)
	}
	return binPath
}

// Start runs a cluster until the end of the test.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	c, err := natscluster.Start(t.TempDir(), Binary(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Stop()
		if t.Failed() {
			for _, n := range c.Nodes {
				t.Logf("nats %s log:\n%s", n.Name, n.Log(3000))
			}
		}
	})
	return c
}

// Callout is what the control plane needs to run on a cluster from
// StartForHangar: its account and the auth callout's account seed.
type Callout struct {
	User, Password, Seed string
}

// StartForHangar runs a cluster whose device logins go to hangar's auth
// callout, signed with a fresh account key, until the end of the test.
func StartForHangar(t testing.TB) (*Cluster, Callout) {
	t.Helper()
	akp, err := nkeys.CreateAccount()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := akp.Seed()
	pub, _ := akp.PublicKey()
	co := Callout{User: "hangar", Password: "cp-secret", Seed: string(seed)}
	return Start(t, Options{User: co.User, Password: co.Password, CalloutIssuer: pub}), co
}
