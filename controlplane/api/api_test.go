package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/proto"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeBus records what the API asks of the broker.
type fakeBus struct {
	mu          sync.Mutex
	provisioned map[string]string
	revoked     []string
	published   []string
}

var _ broker.Bus = (*fakeBus)(nil)

func (f *fakeBus) Start(context.Context, broker.Handler) error { return nil }
func (f *fakeBus) Publish(_ context.Context, d string, k proto.Kind, _ []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.published = append(f.published, d+"/"+string(k))
	return nil
}
func (f *fakeBus) Provision(_ context.Context, d, p string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.provisioned == nil {
		f.provisioned = map[string]string{}
	}
	f.provisioned[d] = p
	return nil
}
func (f *fakeBus) Revoke(_ context.Context, d string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revoked = append(f.revoked, d)
	return nil
}
func (f *fakeBus) Connected() int { return 0 }
func (f *fakeBus) Close() error   { return nil }

type env struct {
	srv    *httptest.Server
	db     *sqlstore.DB
	bus    *fakeBus
	admin  string
	enroll string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	db := sqlstoretest.Open(t, sqlstore.Options{})
	e := &env{db: db, bus: &fakeBus{}, admin: api.NewSecret("hga_"), enroll: api.NewSecret("hge_")}
	ctx := context.Background()
	db.SetToken(ctx, api.TokenAdmin, broker.HashPassword(e.admin), time.Now())
	db.SetToken(ctx, api.TokenEnroll, broker.HashPassword(e.enroll), time.Now())
	a := api.New(api.Options{Store: db, Bus: e.bus, MQTTURL: func(*http.Request) string { return "tcp://broker:1883" }})
	e.srv = httptest.NewServer(a)
	t.Cleanup(e.srv.Close)
	return e
}

func (e *env) do(t *testing.T, method, path, token, body string, hdr ...string) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, e.srv.URL+path, rd)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestEnrollAndDevices(t *testing.T) {
	e := newEnv(t)
	code, body := e.do(t, "POST", "/api/v1/enroll", "", `{"enroll_token":"`+e.enroll+`","device_id":"d1","hardware":"rev-b","labels":{"base":"zurich"}}`)
	if code != 200 {
		t.Fatalf("enroll: %d %s", code, body)
	}
	var cred api.Credential
	json.Unmarshal([]byte(body), &cred)
	if cred.Username != "d1" || cred.MQTTURL != "tcp://broker:1883" || !strings.HasPrefix(cred.Password, "hgd_") {
		t.Fatalf("credential %+v", cred)
	}
	if e.bus.provisioned["d1"] != cred.Password {
		t.Fatal("broker not given the new password")
	}
	// The stored hash matches the password handed out, and nothing else.
	h, err := e.db.Credential(context.Background(), "d1")
	if err != nil || !broker.CheckPassword(h, cred.Password) || broker.CheckPassword(h, "x") {
		t.Fatalf("stored credential: %v", err)
	}
	// The token may come as a bearer header too.
	if code, body := e.do(t, "POST", "/api/v1/enroll", e.enroll, `{"device_id":"d2"}`); code != 200 {
		t.Fatalf("enroll with bearer: %d %s", code, body)
	}
	// What a device says about itself does not group it: only an
	// operator's label does.
	code, body = e.do(t, "GET", "/api/v1/devices?selector=base=zurich", e.admin, "")
	if code != 200 || strings.TrimSpace(body) != "[]" {
		t.Fatalf("a device's own label selected it: %d %s", code, body)
	}
	if code, body := e.do(t, "PATCH", "/api/v1/devices/d1/labels", e.admin, `{"set":{"base":"zurich","hw":"rev-b"}}`); code != 200 ||
		!strings.Contains(body, `"labels":{"base":"zurich","hw":"rev-b"}`) || !strings.Contains(body, `"reported_labels":{"base":"zurich"}`) {
		t.Fatalf("label: %d %s", code, body)
	}
	code, body = e.do(t, "GET", "/api/v1/devices?selector=base=zurich", e.admin, "")
	if code != 200 || !strings.Contains(body, `"id":"d1"`) || strings.Contains(body, `"id":"d2"`) {
		t.Fatalf("list: %d %s", code, body)
	}
	var list []map[string]any
	json.Unmarshal([]byte(body), &list)
	for _, k := range []string{"id", "online", "version", "labels", "last_seen", "hardware"} {
		if _, ok := list[0][k]; !ok && k != "last_seen" {
			t.Errorf("device JSON lacks %q: %s", k, body)
		}
	}
	if code, _ := e.do(t, "DELETE", "/api/v1/devices/d1?reason=lost", e.admin, ""); code != 204 {
		t.Fatalf("revoke: %d", code)
	}
	if len(e.bus.revoked) != 1 {
		t.Fatal("broker not told to revoke")
	}
	code, body = e.do(t, "POST", "/api/v1/enroll", "", `{"enroll_token":"`+e.enroll+`","device_id":"d1"}`)
	if code != 403 {
		t.Fatalf("enroll of revoked device: %d %s", code, body)
	}
	// An operator can add it back; the new credential works.
	code, body = e.do(t, "POST", "/api/v1/devices", e.admin, `{"id":"d1","labels":{"hw":"rev-c"}}`, "X-Hangar-Actor", "alice")
	if code != 201 {
		t.Fatalf("add: %d %s", code, body)
	}
	code, body = e.do(t, "GET", "/api/v1/audit?target=d1", e.admin, "")
	if code != 200 || !strings.Contains(body, `"action":"device.revoke"`) || !strings.Contains(body, `"reason":"lost"`) ||
		!strings.Contains(body, `"actor":"admin on behalf of \"alice\" (unverified)"`) {
		t.Fatalf("audit: %d %s", code, body)
	}
}

// TestBadInput: every bad request gets a JSON error with the right status
// and changes nothing.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	enroll := func(body string) string { return body }
	cases := []struct {
		name, method, path, token, body string
		code                            int
		msg                             string
	}{
		{"no token", "GET", "/api/v1/devices", "", "", 401, "missing bearer token"},
		{"wrong token", "GET", "/api/v1/devices", "hga_wrong", "", 401, "invalid token"},
		{"enroll token is not admin", "GET", "/api/v1/devices", e.enroll, "", 401, "invalid token"},
		{"metrics need the token", "GET", "/metrics", "", "", 401, "missing bearer token"},
		{"enroll bad token", "POST", "/api/v1/enroll", "", `{"enroll_token":"x","device_id":"d1"}`, 401, "invalid enrollment token"},
		{"enroll admin token", "POST", "/api/v1/enroll", e.admin, `{"device_id":"d1"}`, 401, "invalid enrollment token"},
		{"enroll malformed JSON", "POST", "/api/v1/enroll", e.enroll, `{"device_id":`, 400, "invalid JSON body"},
		{"enroll unknown field", "POST", "/api/v1/enroll", e.enroll, `{"device_id":"d1","hardwear":"x"}`, 400, "unknown field"},
		{"enroll wrong type", "POST", "/api/v1/enroll", e.enroll, `{"device_id":7}`, 400, "invalid JSON body"},
		{"enroll trailing data", "POST", "/api/v1/enroll", e.enroll, `{"device_id":"d1"} {}`, 400, "data after"},
		{"enroll bad id", "POST", "/api/v1/enroll", e.enroll, enroll(`{"device_id":"a/b"}`), 400, "invalid device id"},
		{"enroll wildcard id", "POST", "/api/v1/enroll", e.enroll, enroll(`{"device_id":"#"}`), 400, "invalid device id"},
		{"enroll bad label", "POST", "/api/v1/enroll", e.enroll, enroll(`{"device_id":"d1","labels":{"a b":"c"}}`), 400, "invalid label"},
		{"enroll empty body", "POST", "/api/v1/enroll", e.enroll, "", 400, "empty body"},
		{"enroll huge body", "POST", "/api/v1/enroll", e.enroll, `{"device_id":"` + strings.Repeat("x", 100<<10) + `"}`, 413, "larger than"},
		{"device bad id", "GET", "/api/v1/devices/a..b%2Fc", e.admin, "", 400, "invalid device id"},
		{"device unknown", "GET", "/api/v1/devices/nope", e.admin, "", 404, "not found"},
		{"revoke unknown", "DELETE", "/api/v1/devices/nope", e.admin, "", 404, "not found"},
		{"telemetry unknown", "GET", "/api/v1/devices/nope/telemetry", e.admin, "", 404, "not found"},
		{"telemetry bad from", "GET", "/api/v1/devices/nope/telemetry?from=yesterday", e.admin, "", 400, "RFC 3339"},
		{"telemetry bad limit", "GET", "/api/v1/devices/nope/telemetry?limit=-1", e.admin, "", 400, "limit must be"},
		{"list bad online", "GET", "/api/v1/devices?online=maybe", e.admin, "", 400, "online must be"},
		{"list bad selector", "GET", "/api/v1/devices?selector=hw", e.admin, "", 400, "not key=value"},
		{"add bad JSON", "POST", "/api/v1/devices", e.admin, `[]`, 400, "invalid JSON body"},
		{"add no id", "POST", "/api/v1/devices", e.admin, `{}`, 400, "invalid device id"},
		{"unknown route", "GET", "/api/v1/nothing", e.admin, "", 404, "Not Found"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, body := e.do(t, c.method, c.path, c.token, c.body)
			if code != c.code {
				t.Fatalf("status %d, want %d: %s", code, c.code, body)
			}
			var eb api.Error
			if err := json.Unmarshal([]byte(body), &eb); err != nil || !strings.Contains(eb.Error, c.msg) {
				t.Fatalf("error body %q, want a JSON error containing %q", body, c.msg)
			}
		})
	}
	if ds, _ := e.db.Devices(context.Background(), store.DeviceFilter{}); len(ds) != 0 {
		t.Fatalf("bad requests created %d devices", len(ds))
	}
	// A wrong content type is refused.
	req, _ := http.NewRequest("POST", e.srv.URL+"/api/v1/enroll", strings.NewReader("device_id=d1"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Bearer "+e.enroll)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 415 {
		t.Fatalf("form body: %d", resp.StatusCode)
	}
}

func TestHealthzAndMetrics(t *testing.T) {
	e := newEnv(t)
	if code, body := e.do(t, "GET", "/healthz", "", ""); code != 200 || !strings.Contains(body, "ok") {
		t.Fatalf("healthz %d %s", code, body)
	}
	e.do(t, "POST", "/api/v1/enroll", "", `{"enroll_token":"bad","device_id":"d1"}`)
	code, body := e.do(t, "GET", "/metrics", e.admin, "")
	if code != 200 || !strings.Contains(body, `hangar_enrollments_total{result="bad_token"} 1`) {
		t.Fatalf("metrics %d:\n%s", code, body)
	}
}

// TestEnrollNoTakeover: the fleet token does not re-key an enrolled
// device; the attempt is refused, logged and audited, and the real
// device's credential keeps working. An operator's rekey lets the device
// enroll again, once.
func TestEnrollNoTakeover(t *testing.T) {
	e := newEnv(t)
	enroll := func() (int, string) {
		return e.do(t, "POST", "/api/v1/enroll", "", `{"enroll_token":"`+e.enroll+`","device_id":"d1","hardware":"rev-b"}`)
	}
	code, body := enroll()
	if code != 200 {
		t.Fatalf("enroll: %d %s", code, body)
	}
	var cred api.Credential
	json.Unmarshal([]byte(body), &cred)

	code, body = enroll()
	if code != http.StatusConflict || !strings.Contains(body, "hangar device rekey d1") {
		t.Fatalf("takeover attempt: %d %s", code, body)
	}
	h, _ := e.db.Credential(context.Background(), "d1")
	if !broker.CheckPassword(h, cred.Password) || e.bus.provisioned["d1"] != cred.Password {
		t.Fatal("the refused enrollment changed the device's credential")
	}
	code, body = e.do(t, "GET", "/api/v1/audit?target=d1", e.admin, "")
	if code != 200 || !strings.Contains(body, `"action":"device.enroll-refused"`) || !strings.Contains(body, `"remote":"127.0.0.1"`) {
		t.Fatalf("audit: %d %s", code, body)
	}

	for _, bad := range []string{`{"within":"-1h"}`, `{"within":"10000h"}`, `{"within":"soon"}`} {
		if code, body := e.do(t, "POST", "/api/v1/devices/d1/rekey", e.admin, bad); code != 400 {
			t.Errorf("rekey %s: %d %s", bad, code, body)
		}
	}
	if code, _ := e.do(t, "POST", "/api/v1/devices/d1/rekey", "", ""); code != 401 {
		t.Errorf("rekey without a token: %d", code)
	}
	if code, body := e.do(t, "POST", "/api/v1/devices/nobody/rekey", e.admin, ""); code != 404 {
		t.Errorf("rekey of an unknown device: %d %s", code, body)
	}
	if code, body := e.do(t, "POST", "/api/v1/devices/d1/rekey", e.admin, `{"within":"1h"}`); code != 200 {
		t.Fatalf("rekey: %d %s", code, body)
	}
	code, body = enroll()
	if code != 200 {
		t.Fatalf("enroll after the operator's rekey: %d %s", code, body)
	}
	var again api.Credential
	json.Unmarshal([]byte(body), &again)
	h, _ = e.db.Credential(context.Background(), "d1")
	if again.Password == cred.Password || !broker.CheckPassword(h, again.Password) || broker.CheckPassword(h, cred.Password) {
		t.Fatal("the rekey did not replace the credential")
	}
	if code, _ := enroll(); code != http.StatusConflict {
		t.Fatalf("the rekey allowance served twice: %d", code)
	}
	code, body = e.do(t, "GET", "/api/v1/audit?target=d1", e.admin, "")
	if !strings.Contains(body, `"action":"device.rekey"`) || !strings.Contains(body, `"action":"device.rekeyed"`) {
		t.Fatalf("audit: %d %s", code, body)
	}
}

// A client that sends its enrollment body a byte at a time is cut off at
// the body deadline instead of holding the connection.
func TestSlowBodyCutOff(t *testing.T) {
	db := sqlstoretest.Open(t, sqlstore.Options{})
	srv := httptest.NewServer(api.New(api.Options{Store: db, Bus: &fakeBus{}, BodyTimeout: 300 * time.Millisecond,
		MQTTURL: func(*http.Request) string { return "tcp://broker:1883" }}))
	defer srv.Close()
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := io.ReadAll(c)
	if time.Since(start) > 5*time.Second {
		t.Fatalf("the slow body was still being read after %v (%v)", time.Since(start), err)
	}
	t.Logf("slow body ended after %v: %q", time.Since(start).Round(time.Millisecond), firstLine(string(resp)))
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// Enrollment attempts are limited per source address and per device id,
// before anything is checked; other sources and ids are not affected.
func TestEnrollThrottled(t *testing.T) {
	db := sqlstoretest.Open(t, sqlstore.Options{})
	m := metrics.New(nil)
	srv := httptest.NewServer(api.New(api.Options{Store: db, Bus: &fakeBus{}, Metrics: m,
		EnrollSource: throttle.New(0.001, 20, 100), EnrollDevice: throttle.New(0.001, 3, 100),
		MQTTURL: func(*http.Request) string { return "tcp://broker:1883" }}))
	defer srv.Close()
	post := func(id string) int {
		resp, err := http.Post(srv.URL+"/api/v1/enroll", "application/json", strings.NewReader(`{"enroll_token":"wrong","device_id":"`+id+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	codes := map[int]int{}
	for range 5 {
		codes[post("target")]++
	}
	if codes[http.StatusUnauthorized] != 3 || codes[http.StatusTooManyRequests] != 2 {
		t.Errorf("5 attempts for one id: %v, want 3 checked, 2 throttled", codes)
	}
	codes = map[int]int{}
	for i := range 20 {
		codes[post(fmt.Sprintf("d%d", i))]++
	}
	if codes[http.StatusUnauthorized] != 15 || codes[http.StatusTooManyRequests] != 5 {
		t.Errorf("20 more from one address: %v, want 15 checked (a burst of 20 in all), 5 throttled", codes)
	}
	if got := testutil.ToFloat64(m.AuthThrottled.WithLabelValues("enroll_source")) + testutil.ToFloat64(m.AuthThrottled.WithLabelValues("enroll_device")); got != 7 {
		t.Errorf("hangar_auth_throttled_total %v, want 7", got)
	}
}
