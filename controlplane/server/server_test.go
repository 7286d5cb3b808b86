package server_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/server"
)

// The broker URL handed to an enrolling device comes from the operator's
// configuration, whatever Host the request names; a broker on every
// address needs --mqtt-advertise.
func TestEnrollmentBrokerURLNotFromHost(t *testing.T) {
	hl, _ := net.Listen("tcp", "127.0.0.1:0")
	ml, _ := net.Listen("tcp", "127.0.0.1:0")
	dir := t.TempDir()
	srv, err := server.New(server.Options{DataDir: dir, HTTPListener: hl, MQTTListener: ml})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	tok, _ := os.ReadFile(filepath.Join(dir, server.EnrollTokenFile))
	req, _ := http.NewRequest("POST", srv.URL()+"/api/v1/enroll",
		strings.NewReader(`{"enroll_token":"`+strings.TrimSpace(string(tok))+`","device_id":"d1"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Host = "evil.example.com"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var cred struct {
		MQTTURL string `json:"mqtt_url"`
	}
	json.NewDecoder(resp.Body).Decode(&cred)
	if want := "tcp://" + ml.Addr().String(); cred.MQTTURL != want {
		t.Fatalf("broker URL %q (HTTP %d), want %q", cred.MQTTURL, resp.StatusCode, want)
	}

	wild, _ := net.Listen("tcp", "0.0.0.0:0")
	defer wild.Close()
	hl2, _ := net.Listen("tcp", "127.0.0.1:0")
	defer hl2.Close()
	if _, err := server.New(server.Options{DataDir: t.TempDir(), HTTPListener: hl2, MQTTListener: wild}); err == nil || !strings.Contains(err.Error(), "--mqtt-advertise") {
		t.Fatalf("a broker on every address without --mqtt-advertise: %v", err)
	}
}

// --new-admin-token replaces the bootstrap admin token: the old one is
// refused, the new one (in the file) works, the enrollment token stays.
func TestNewAdminToken(t *testing.T) {
	dir := t.TempDir()
	start := func(rotate bool) (*server.Server, func()) {
		return runServer(t, server.Options{DataDir: dir, NewAdminToken: rotate})
	}
	read := func(f string) string {
		b, _ := os.ReadFile(filepath.Join(dir, f))
		return strings.TrimSpace(string(b))
	}
	status := func(srv *server.Server, tok string) int {
		req, _ := http.NewRequest("GET", srv.URL()+"/api/v1/whoami", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	srv, stop := start(false)
	old, enroll := read(server.AdminTokenFile), read(server.EnrollTokenFile)
	if status(srv, old) != http.StatusOK {
		t.Fatal("the first admin token does not work")
	}
	stop()
	srv, stop = start(false)
	if read(server.AdminTokenFile) != old || status(srv, old) != http.StatusOK {
		t.Fatal("a restart changed the admin token")
	}
	stop()
	srv, stop = start(true)
	defer stop()
	if now := read(server.AdminTokenFile); now == old || status(srv, now) != http.StatusOK {
		t.Fatalf("--new-admin-token: new token %q, works: %d", now, status(srv, now))
	}
	if status(srv, old) != http.StatusUnauthorized {
		t.Error("the replaced admin token still works")
	}
	if read(server.EnrollTokenFile) != enroll {
		t.Error("--new-admin-token changed the enrollment token")
	}
}

// The delivery metrics: the API answers with the four keys by name, and
// Prometheus has the gauges.
func TestDeliveryEndpointsAndGauges(t *testing.T) {
	dir := t.TempDir()
	srv, stop := runServer(t, server.Options{DataDir: dir})
	defer stop()
	tok, _ := os.ReadFile(filepath.Join(dir, server.AdminTokenFile))
	get := func(path string) (int, string) {
		req, _ := http.NewRequest("GET", srv.URL()+path, nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		buf := make([]byte, 32<<10)
		for {
			n, err := resp.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return resp.StatusCode, b.String()
	}
	code, body := get("/api/v1/metrics/delivery?from=-168h")
	var rep map[string]any
	if err := json.Unmarshal([]byte(body), &rep); err != nil || code != 200 {
		t.Fatalf("delivery: %d %v %s", code, err, body)
	}
	overall, _ := rep["overall"].(map[string]any)
	for _, k := range []string{"deployment_frequency", "lead_time", "change_failure_rate", "time_to_restore"} {
		if _, ok := overall[k]; !ok {
			t.Errorf("overall has no %s: %s", k, body)
		}
	}
	if _, ok := rep["by_hardware"]; !ok {
		t.Errorf("no by_hardware: %s", body)
	}
	if code, _ := get("/api/v1/metrics/delivery?from=-1h&to=-2h"); code != http.StatusBadRequest {
		t.Errorf("a window that ends before it starts: %d", code)
	}
	// The gauges are computed at start.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, m := get("/metrics")
		if strings.Contains(m, `hangar_delivery{hardware="all",key="deployments_per_week"} 0`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no delivery gauge in /metrics")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runServer starts a control plane on free loopback ports; the function
// returned stops it.
func runServer(t *testing.T, opts server.Options) (*server.Server, func()) {
	t.Helper()
	hl, _ := net.Listen("tcp", "127.0.0.1:0")
	ml, _ := net.Listen("tcp", "127.0.0.1:0")
	opts.HTTPListener, opts.MQTTListener = hl, ml
	srv, err := server.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Run(ctx); close(done) }()
	return srv, func() { cancel(); <-done }
}
