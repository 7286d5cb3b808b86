package cli_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/server"
	_ "github.com/mattn/go-sqlite3"
)

type cp struct {
	url, dataDir string
	srv          *server.Server
}

func startServer(t *testing.T) cp { return startServerWith(t, server.Options{}) }

// startServerWith runs a control plane with opts on free ports and a
// fresh data directory.
func startServerWith(t *testing.T, opts server.Options) cp {
	t.Helper()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	mq, _ := net.Listen("tcp", "127.0.0.1:0")
	dir := t.TempDir()
	opts.DataDir, opts.HTTPListener, opts.MQTTListener = dir, ln, mq
	srv, err := server.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return cp{url: srv.URL(), dataDir: dir, srv: srv}
}

// run runs the hangar command as a user would, with HANGAR_SERVER and the
// token file of the server's data directory.
func run(t *testing.T, c cp, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	env := map[string]string{"HANGAR_SERVER": c.url}
	args = append(args, "--token-file", filepath.Join(c.dataDir, server.AdminTokenFile))
	err := cli.Run(context.Background(), args, cli.Env{Stdout: &out, Stderr: &errb, Getenv: func(k string) string { return env[k] }})
	return out.String(), errb.String(), err
}

func TestDeviceCommands(t *testing.T) {
	c := startServer(t)
	out, _, err := run(t, c, "device", "add", "drone-1", "--label", "hw=rev-b", "--label", "base=zurich")
	if err != nil || !strings.Contains(out, "password: hgd_") {
		t.Fatalf("add: %v\n%s", err, out)
	}
	// Adding an enrolled device again would end its credential: refused,
	// with what to do instead.
	if _, _, err := run(t, c, "device", "add", "drone-1"); err == nil || !strings.Contains(err.Error(), "device rekey") {
		t.Fatalf("add of an existing device: %v", err)
	}
	if _, _, err := run(t, c, "device", "add", "drone-2", "--label", "hw=rev-a,base=bern", "-o", "json"); err != nil {
		t.Fatal(err)
	}
	out, _, err = run(t, c, "device", "ls", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("ls -o json is not JSON: %v\n%s", err, out)
	}
	if len(list) != 2 {
		t.Fatalf("ls: %d devices", len(list))
	}
	for _, k := range []string{"id", "online", "version", "labels", "last_seen"} {
		if _, ok := list[0][k]; !ok {
			t.Errorf("ls -o json lacks %q: %v", k, list[0])
		}
	}
	out, _, err = run(t, c, "device", "ls", "--selector", "base=zurich")
	if err != nil || !strings.Contains(out, "drone-1") || strings.Contains(out, "drone-2") || !strings.Contains(out, "STATUS") {
		t.Fatalf("ls --selector: %v\n%s", err, out)
	}
	out, _, err = run(t, c, "device", "show", "drone-1")
	if err != nil || !strings.Contains(out, "base=zurich,hw=rev-b") {
		t.Fatalf("show: %v\n%s", err, out)
	}
	if out, _, err = run(t, c, "device", "rekey", "drone-1", "--within", "2h", "--reason", "state lost"); err != nil || !strings.Contains(out, "may enroll again, once") {
		t.Fatalf("rekey: %v %s", err, out)
	}
	if _, _, err = run(t, c, "device", "rekey", "nobody"); err == nil {
		t.Fatal("rekey of an unknown device succeeded")
	}
	if out, _, err = run(t, c, "device", "rm", "drone-1", "--reason", "crashed"); err != nil || !strings.Contains(out, "revoked") {
		t.Fatalf("rm: %v %s", err, out)
	}
	// Twice: it says so, and the audit has one revocation.
	if out, _, err = run(t, c, "device", "rm", "drone-1"); err != nil || !strings.Contains(out, "already revoked") {
		t.Fatalf("second rm: %v\n%s", err, out)
	}
	out, _, err = run(t, c, "device", "show", "drone-1", "-o", "json")
	if err != nil || !strings.Contains(out, `"revoked": true`) {
		t.Fatalf("show after rm: %v\n%s", err, out)
	}
	out, _, err = run(t, c, "audit")
	if err != nil || !strings.Contains(out, "device.revoke") || !strings.Contains(out, "crashed") {
		t.Fatalf("audit: %v\n%s", err, out)
	}
	if out, _, err = run(t, c, "health"); err != nil || !strings.Contains(out, "devices: 2") {
		t.Fatalf("health: %v\n%s", err, out)
	}
}

func TestErrors(t *testing.T) {
	c := startServer(t)
	_, _, err := run(t, c, "device", "show", "nope")
	var apiErr *cli.APIError
	if !errors.As(err, &apiErr) || apiErr.Status != 404 {
		t.Fatalf("unknown device: %v", err)
	}
	if _, _, err := run(t, c, "device", "show"); !errors.Is(err, cli.ErrUsage) {
		t.Fatalf("missing id: %v", err)
	}
	if _, _, err := run(t, c, "device", "add", "a/b"); !errors.Is(err, cli.ErrUsage) {
		t.Fatalf("bad id: %v", err)
	}
	if _, _, err := run(t, c, "frobnicate"); !errors.Is(err, cli.ErrUsage) {
		t.Fatalf("unknown command: %v", err)
	}
	if _, _, err := run(t, c, "device", "ls", "-o", "yaml"); !errors.Is(err, cli.ErrUsage) {
		t.Fatalf("bad output format: %v", err)
	}
	// A wrong token is refused by the server.
	var out bytes.Buffer
	err = cli.Run(context.Background(), []string{"device", "ls", "--server", c.url, "--token", "hga_nope"},
		cli.Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }})
	if !errors.As(err, &apiErr) || apiErr.Status != 401 {
		t.Fatalf("wrong token: %v", err)
	}
	// No token at all: a clear message.
	err = cli.Run(context.Background(), []string{"device", "ls", "--server", c.url, "--token-file", filepath.Join(t.TempDir(), "none")},
		cli.Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }})
	if err == nil || !strings.Contains(err.Error(), "no admin token") {
		t.Fatalf("no token: %v", err)
	}
}

func TestServeWritesTokens(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var out bytes.Buffer
	done := make(chan error)
	go func() {
		done <- cli.Run(ctx, []string{"serve", "--data", dir, "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--log-level", "error"},
			cli.Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }})
	}()
	var st os.FileInfo
	for range 200 {
		var err error
		if st, err = os.Stat(filepath.Join(dir, server.EnrollTokenFile)); err == nil && st.Size() > 0 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("serve exited: %v\n%s", err, out.String())
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
	for _, f := range []string{server.AdminTokenFile, server.EnrollTokenFile, server.DBFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, st.Mode().Perm())
		}
	}
	if !strings.Contains(out.String(), "admin token:") || !strings.Contains(out.String(), "dashboard and API: https://127.0.0.1:") {
		t.Fatalf("serve output:\n%s", out.String())
	}
}

// audit verify: intact, then holding the head it printed, then broken by
// an edit made behind the control plane's back.
func TestAuditVerify(t *testing.T) {
	c := startServer(t)
	for _, id := range []string{"drone-1", "drone-2", "drone-3"} {
		if _, _, err := run(t, c, "device", "add", id); err != nil {
			t.Fatal(err)
		}
	}
	out, _, err := run(t, c, "audit", "verify")
	if err != nil || !strings.Contains(out, "audit log intact: 4 entries") { // the bootstrap token, three adds
		t.Fatalf("verify: %v %s", err, out)
	}
	head := strings.Fields(out[strings.Index(out, "head ")+5:])[0]
	run(t, c, "device", "add", "drone-4")
	if out, _, err := run(t, c, "audit", "verify", "--head", head); err != nil {
		t.Fatalf("verify --head %s after one more entry: %v %s", head, err, out)
	}
	if _, _, err := run(t, c, "audit", "verify", "--head", "2:"+strings.Repeat("00", 32)); !errors.Is(err, cli.ErrAuditBroken) {
		t.Fatalf("verify against a head the log never had: %v", err)
	}
	raw, err := sql.Open("sqlite3", filepath.Join(c.dataDir, server.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Exec(`UPDATE audit SET actor = 'someone else' WHERE id = 2`); err != nil {
		t.Fatal(err)
	}
	_, _, err = run(t, c, "audit", "verify")
	if !errors.Is(err, cli.ErrAuditBroken) || !strings.Contains(err.Error(), "entry 2") {
		t.Fatalf("verify after an edit: %v", err)
	}
}

// TestServerHostPort: --server host:port, as an operator types it, means
// https (the control plane's default).
func TestServerHostPort(t *testing.T) {
	caDir := filepath.Join(t.TempDir(), "tls")
	cfg, err := devca.Ensure(caDir, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c := startServerWith(t, server.Options{TLS: cfg})
	hostPort := strings.TrimPrefix(c.url, "https://")
	var out, errb bytes.Buffer
	err = cli.Run(context.Background(), []string{"device", "ls", "--server", hostPort, "--ca-file", filepath.Join(caDir, devca.CAFile),
		"--token-file", filepath.Join(c.dataDir, server.AdminTokenFile)},
		cli.Env{Stdout: &out, Stderr: &errb, Getenv: func(string) string { return "" }})
	if err != nil {
		t.Fatalf("--server %s: %v\n%s", hostPort, err, errb.String())
	}
}

// TestGroupHelp: -h and --help on a command group print its usage and
// succeed; an unknown command is still a usage error.
func TestGroupHelp(t *testing.T) {
	for _, group := range []string{"device", "release", "rollout", "enroll-profile"} {
		for _, h := range []string{"-h", "--help", "help"} {
			var out, errb bytes.Buffer
			if err := cli.Run(context.Background(), []string{group, h}, cli.Env{Stdout: &out, Stderr: &errb, Getenv: func(string) string { return "" }}); err != nil {
				t.Errorf("hangar %s %s: %v", group, h, err)
			}
			if !strings.Contains(errb.String()+out.String(), "Usage: hangar "+group) {
				t.Errorf("hangar %s %s printed no usage:\n%s", group, h, errb.String())
			}
		}
		var out bytes.Buffer
		if err := cli.Run(context.Background(), []string{group, "frobnicate"}, cli.Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }}); !errors.Is(err, cli.ErrUsage) {
			t.Errorf("hangar %s frobnicate: %v", group, err)
		}
	}
}

// TestUpdatesOfUnknownDevice: asking for an unknown device's updates is an
// error (404), not an empty table.
func TestUpdatesOfUnknownDevice(t *testing.T) {
	c := startServerWith(t, server.Options{})
	_, _, err := run(t, c, "device", "updates", "nobody")
	var apiErr *cli.APIError
	if !errors.As(err, &apiErr) || apiErr.Status != 404 {
		t.Fatalf("updates of an unknown device: %v", err)
	}
}
