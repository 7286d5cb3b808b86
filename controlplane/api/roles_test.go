package api_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
)

// noRollouts answers every rollout call with "not found": the role test
// only needs the routes to exist.
type noRollouts struct{}

func (noRollouts) Create(context.Context, rollout.Spec, string) (rollout.Rollout, rollout.Preview, error) {
	return rollout.Rollout{}, rollout.Preview{}, store.ErrNotFound
}
func (noRollouts) Act(context.Context, string, rollout.Op, string, string) (rollout.Rollout, error) {
	return rollout.Rollout{}, store.ErrNotFound
}
func (noRollouts) Status(context.Context, string) (rollout.StatusReport, error) {
	return rollout.StatusReport{}, store.ErrNotFound
}
func (noRollouts) List(context.Context) ([]rollout.Rollout, error) { return nil, nil }
func (noRollouts) DryRun(context.Context, rollout.Spec) (rollout.Preview, error) {
	return rollout.Preview{}, store.ErrNotFound
}
func (noRollouts) Devices(context.Context, string, rollout.MemberState) ([]rollout.MemberReport, error) {
	return nil, store.ErrNotFound
}

// routeRoles is the least role of every authenticated route: written out
// here, apart from the code, so that a route whose role changes or a new
// route without one fails this test.
var routeRoles = map[string]string{
	"GET /metrics":                                                   "viewer",
	"GET /api/v1/whoami":                                             "viewer",
	"GET /api/v1/tokens":                                             "admin",
	"POST /api/v1/tokens":                                            "admin",
	"DELETE /api/v1/tokens/:name":                                    "admin",
	"GET /api/v1/devices":                                            "viewer",
	"POST /api/v1/devices":                                           "admin",
	"GET /api/v1/devices/:id":                                        "viewer",
	"PATCH /api/v1/devices/:id/labels":                               "operator",
	"POST /api/v1/devices/labels":                                    "operator",
	"POST /api/v1/devices/import":                                    "admin",
	"DELETE /api/v1/devices/:id":                                     "admin",
	"POST /api/v1/devices/:id/rekey":                                 "admin",
	"POST /api/v1/devices/:id/approve":                               "admin",
	"DELETE /api/v1/devices/:id/pending":                             "admin",
	"GET /api/v1/devices/:id/telemetry":                              "viewer",
	"GET /api/v1/devices/:id/events":                                 "viewer",
	"GET /api/v1/devices/:id/updates":                                "viewer",
	"POST /api/v1/devices/:id/update":                                "operator",
	"GET /api/v1/enroll-profiles":                                    "viewer",
	"POST /api/v1/enroll-profiles":                                   "admin",
	"DELETE /api/v1/enroll-profiles/:name":                           "admin",
	"GET /api/v1/settings/device-passwords":                          "viewer",
	"PUT /api/v1/settings/device-passwords":                          "admin",
	"GET /api/v1/events":                                             "viewer",
	"GET /api/v1/events/stream":                                      "viewer",
	"GET /api/v1/fleet/health":                                       "viewer",
	"GET /api/v1/fleet/history":                                      "viewer",
	"GET /api/v1/audit":                                              "viewer",
	"GET /api/v1/audit/verify":                                       "viewer",
	"GET /api/v1/metrics/delivery":                                   "viewer",
	"POST /api/v1/releases":                                          "operator",
	"GET /api/v1/releases":                                           "viewer",
	"GET /api/v1/releases/:target/:version":                          "viewer",
	"GET /api/v1/releases/:target/:version/artifact":                 "viewer",
	"HEAD /api/v1/releases/:target/:version/artifact":                "viewer",
	"POST /api/v1/releases/:target/:version/deltas":                  "operator",
	"GET /api/v1/releases/:target/:version/deltas/:sha256/artifact":  "viewer",
	"HEAD /api/v1/releases/:target/:version/deltas/:sha256/artifact": "viewer",
	"POST /api/v1/rollouts":                                          "operator",
	"GET /api/v1/rollouts":                                           "viewer",
	"GET /api/v1/rollouts/:id":                                       "viewer",
	"GET /api/v1/rollouts/:id/events":                                "viewer",
	"GET /api/v1/rollouts/:id/devices":                               "viewer",
	"POST /api/v1/rollouts/:id/:action":                              "operator",
}

// open routes need no token.
var openRoutes = map[string]bool{"GET /healthz": true, "POST /api/v1/enroll": true, "GET /*": true}

type roleEnv struct {
	srv    *httptest.Server
	api    *api.API
	db     *sqlstore.DB
	tokens map[string]string // role → secret
	now    time.Time
}

func newRoleEnv(t *testing.T) *roleEnv {
	t.Helper()
	dir := t.TempDir()
	db := sqlstoretest.Open(t, sqlstore.Options{})
	e := &roleEnv{db: db, tokens: map[string]string{}, now: time.Now()}
	ctx := context.Background()
	admin := api.NewSecret("hga_")
	db.SetToken(ctx, api.TokenAdmin, broker.HashPassword(admin), e.now)
	e.tokens["bootstrap"] = admin
	for _, role := range []string{store.RoleViewer, store.RoleOperator, store.RoleAdmin} {
		e.tokens[role] = e.addToken(t, role+"-1", role, nil)
	}
	e.api = api.New(api.Options{Store: db, Bus: &fakeBus{}, MQTTURL: func(*http.Request) string { return "tcp://broker:1883" },
		Static:   http.NotFoundHandler(),
		Releases: &api.ReleaseOptions{Store: db, Dir: dir}, Rollouts: noRollouts{}})
	e.srv = httptest.NewServer(e.api)
	t.Cleanup(e.srv.Close)
	t.Cleanup(e.api.CloseLive) // runs first: httptest's Close waits for open streams
	return e
}

func (e *roleEnv) addToken(t *testing.T, name, role string, expires *time.Time) string {
	t.Helper()
	secret := api.NewSecret(api.TokenPrefix)
	sum := sha256.Sum256([]byte(secret))
	if err := e.db.CreateAPIToken(context.Background(), store.APIToken{Name: name, Role: role, Hash: sum[:], Created: e.now, Expires: expires}); err != nil {
		t.Fatal(err)
	}
	return secret
}

func (e *roleEnv) call(t *testing.T, method, path, token string) (int, string) {
	t.Helper()
	var body *strings.Reader
	if method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch {
		body = strings.NewReader("{}")
	} else {
		body = strings.NewReader("")
	}
	req, _ := http.NewRequest(method, e.srv.URL+path, body)
	if body.Len() > 0 {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Error string `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out.Error
}

var pathParams = strings.NewReplacer(":id", "sim-00001", ":name", "nobody", ":target", "agent", ":version", "9.9.9", ":action", "pause")

// TestRolesPerRoute calls every route the API has with no token, a token
// of each role and the bootstrap admin token: a role below the route's is
// refused with 403 and says what it needs, the route's role and above get
// past authentication.
func TestRolesPerRoute(t *testing.T) {
	e := newRoleEnv(t)
	seen := map[string]bool{}
	for _, r := range e.api.Echo().Routes() {
		if !strings.HasPrefix(r.Method, "echo_") && r.Method != "" {
			key := r.Method + " " + r.Path
			if seen[key] || openRoutes[key] {
				continue
			}
			seen[key] = true
			need, ok := routeRoles[key]
			if !ok {
				t.Errorf("route %s has no role in routeRoles", key)
				continue
			}
			path := pathParams.Replace(r.Path)
			if code, _ := e.call(t, r.Method, path, ""); code != http.StatusUnauthorized {
				t.Errorf("%s without a token: %d, want 401", key, code)
			}
			for _, role := range []string{store.RoleViewer, store.RoleOperator, store.RoleAdmin, "bootstrap"} {
				code, msg := e.call(t, r.Method, path, e.tokens[role])
				rank := store.RoleRank(role)
				if role == "bootstrap" {
					rank = store.RoleRank(store.RoleAdmin)
				}
				allowed := rank >= store.RoleRank(need)
				switch {
				case allowed && (code == http.StatusUnauthorized || code == http.StatusForbidden):
					t.Errorf("%s as %s: %d %q, want it allowed (needs %s)", key, role, code, msg, need)
				case !allowed && code != http.StatusForbidden:
					t.Errorf("%s as %s: %d %q, want 403 (needs %s)", key, role, code, msg, need)
				case !allowed && !strings.Contains(msg, "needs "+need):
					t.Errorf("%s as %s: refusal %q does not say it needs %s", key, role, msg, need)
				}
			}
		}
	}
	for key := range routeRoles {
		if !seen[key] {
			t.Errorf("routeRoles names %s, which the API does not serve", key)
		}
	}
}

// TestTokenLifecycle: an admin creates named tokens, their use is
// recorded under their name, an expired or revoked token is refused with
// the reason, names are not reused, and revoking twice says so.
func TestTokenLifecycle(t *testing.T) {
	e := newRoleEnv(t)
	adm := e.tokens[store.RoleAdmin]
	do := func(method, path, token, body string) (int, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(method, e.srv.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out
	}
	code, out := do("POST", "/api/v1/tokens", adm, `{"name":"alice","role":"operator","expires_in":"1h"}`)
	if code != http.StatusCreated || !strings.HasPrefix(out["token"].(string), api.TokenPrefix) || out["role"] != "operator" {
		t.Fatalf("create: %d %v", code, out)
	}
	alice := out["token"].(string)
	if code, out := do("GET", "/api/v1/whoami", alice, ""); code != 200 || out["name"] != "alice" || out["role"] != "operator" || out["expires"] == nil {
		t.Fatalf("whoami: %d %v", code, out)
	}
	// Her label change is recorded under her name, not as "admin".
	if code, _ := do("POST", "/api/v1/devices", adm, `{"id":"sim-00001"}`); code != http.StatusCreated {
		t.Fatalf("add device: %d", code)
	}
	if code, out := do("PATCH", "/api/v1/devices/sim-00001/labels", alice, `{"set":{"site":"north"}}`); code != 200 {
		t.Fatalf("label: %d %v", code, out)
	}
	entries, err := e.db.AuditLog(context.Background(), "sim-00001", 10)
	if err != nil {
		t.Fatal(err)
	}
	var actors []string
	for _, a := range entries {
		actors = append(actors, a.Action+" by "+a.Actor)
	}
	if !strings.Contains(strings.Join(actors, ","), "device.label by alice") || !strings.Contains(strings.Join(actors, ","), "device.add by admin-1") {
		t.Errorf("audit actors: %v", actors)
	}
	// Token creation is audited with its creator and shows in the list
	// without a secret.
	code, _ = do("GET", "/api/v1/tokens", adm, "")
	if code != 200 {
		t.Fatal(code)
	}
	ts, _ := e.db.APITokens(context.Background())
	for _, tk := range ts {
		if tk.Name == "alice" && tk.CreatedBy != "admin-1" {
			t.Errorf("alice created by %q", tk.CreatedBy)
		}
	}
	if code, out := do("POST", "/api/v1/tokens", adm, `{"name":"alice","role":"viewer"}`); code != http.StatusConflict {
		t.Errorf("second alice: %d %v", code, out)
	}
	for _, bad := range []string{`{"name":"Bob!","role":"viewer"}`, `{"name":"bob","role":"root"}`, `{"name":"bob","role":"viewer","expires_in":"-1h"}`, `{"name":"admin","role":"viewer"}`} {
		if code, _ := do("POST", "/api/v1/tokens", adm, bad); code != http.StatusBadRequest && code != http.StatusConflict {
			t.Errorf("%s: %d, want 400 or 409", bad, code)
		}
	}
	// An operator cannot mint tokens, not even a viewer's.
	if code, _ := do("POST", "/api/v1/tokens", alice, `{"name":"mallory","role":"viewer"}`); code != http.StatusForbidden {
		t.Errorf("operator creating a token: %d", code)
	}
	// Revocation takes effect at once; twice says so.
	if code, out := do("DELETE", "/api/v1/tokens/alice", adm, ""); code != 200 || out["already_revoked"] != nil {
		t.Fatalf("revoke: %d %v", code, out)
	}
	if code, out := do("GET", "/api/v1/devices", alice, ""); code != http.StatusUnauthorized || !strings.Contains(out["error"].(string), "revoked") {
		t.Errorf("revoked token: %d %v", code, out)
	}
	if code, out := do("DELETE", "/api/v1/tokens/alice", adm, ""); code != 200 || out["already_revoked"] != true {
		t.Errorf("revoke again: %d %v", code, out)
	}
	if code, _ := do("DELETE", "/api/v1/tokens/nobody", adm, ""); code != http.StatusNotFound {
		t.Errorf("revoke unknown: %d", code)
	}
	if code, _ := do("DELETE", "/api/v1/tokens/admin", adm, ""); code != http.StatusConflict {
		t.Errorf("revoke the bootstrap token: %d", code)
	}
	// Expiry.
	past := e.now.Add(-time.Minute)
	old := e.addToken(t, "old", store.RoleViewer, &past)
	if code, out := do("GET", "/api/v1/devices", old, ""); code != http.StatusUnauthorized || !strings.Contains(out["error"].(string), "expired") {
		t.Errorf("expired token: %d %v", code, out)
	}
	// The client's word about its user is kept apart from the token's name.
	req, _ := http.NewRequest("PATCH", e.srv.URL+"/api/v1/devices/sim-00001/labels", strings.NewReader(`{"set":{"site":"south"}}`))
	req.Header.Set("Authorization", "Bearer "+e.tokens[store.RoleOperator])
	req.Header.Set("X-Hangar-Actor", "admin")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	entries, _ = e.db.AuditLog(context.Background(), "sim-00001", 1)
	if len(entries) == 0 || !strings.HasPrefix(entries[0].Actor, "operator-1 on behalf of") {
		t.Errorf("actor with X-Hangar-Actor: %+v", entries)
	}
}
