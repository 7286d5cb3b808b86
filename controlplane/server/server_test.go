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
