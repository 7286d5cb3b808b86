package cli_test

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// An enrolled device that reports an update with a boot epoch of 2^62
// pins nothing: its later genuine reports win (seen through the API and
// the CLI), and the refusal is counted. And what it claims about itself
// never groups it.
func TestRiggedBootEpoch(t *testing.T) {
	c := startServer(t)
	tok, err := os.ReadFile(filepath.Join(c.dataDir, server.EnrollTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(c.url+"/api/v1/enroll", "application/json", strings.NewReader(
		`{"enroll_token":"`+strings.TrimSpace(string(tok))+`","device_id":"liar","hardware":"rev-b","labels":{"base":"zurich"}}`))
	if err != nil {
		t.Fatal(err)
	}
	var cred api.Credential
	json.NewDecoder(resp.Body).Decode(&cred)
	resp.Body.Close()
	if cred.Password == "" {
		t.Fatalf("enroll: %s", resp.Status)
	}
	o := paho.NewClientOptions().AddBroker(cred.MQTTURL).SetClientID("liar").SetUsername("liar").SetPassword(cred.Password).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	cl := paho.NewClient(o)
	if tk := cl.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	defer cl.Disconnect(0)
	publish := func(kind proto.Kind, v any) {
		t.Helper()
		b, err := proto.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		// QoS 1: acknowledged once stored, so the order holds.
		if tk := cl.Publish(proto.DeviceTopic("liar", kind), 1, false, b); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("publish: %v", tk.Error())
		}
	}
	boot := uint64(time.Now().Unix())
	hello := prototest.State()
	hello.Boot, hello.Conn = boot, 1
	publish(proto.KindState, &hello)
	ev := func(b, seq uint64, st proto.UpdateState) *proto.Event {
		e := prototest.UpdateEvent()
		e.Boot, e.Seq, e.Time, e.Update.State = b, seq, time.Now().UnixMilli(), st
		return &e
	}
	publish(proto.KindEvent, ev(boot, 1, proto.UpdateDownloading))
	publish(proto.KindEvent, ev(1<<62, 1, proto.UpdateCommitted))
	publish(proto.KindEvent, ev(boot, 2, proto.UpdateRolledBack))

	out, _, err := run(t, c, "device", "updates", "liar", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var us []store.DeviceUpdate
	if err := json.Unmarshal([]byte(out), &us); err != nil || len(us) != 1 || us[0].State != string(proto.UpdateRolledBack) {
		t.Fatalf("updates after the rigged report: %v %s", err, out)
	}
	req, _ := http.NewRequest(http.MethodGet, c.url+"/metrics", nil)
	admin, _ := os.ReadFile(filepath.Join(c.dataDir, server.AdminTokenFile))
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(admin)))
	mr, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(mr.Body)
	mr.Body.Close()
	if !strings.Contains(string(m), "hangar_ingest_refused_reports_total 1") {
		t.Errorf("refusal not counted")
	}
	// Its claim of base=zurich (at enrollment and in its hello) selects nothing.
	if out, _, err := run(t, c, "device", "ls", "--selector", "base=zurich"); err != nil || strings.Contains(out, "liar") {
		t.Fatalf("a device's own claim grouped it: %v\n%s", err, out)
	}
	if out, _, _ := run(t, c, "device", "show", "liar"); !regexp.MustCompile(`reported labels:\s+base=zurich`).MatchString(out) {
		t.Errorf("what it reported is not shown:\n%s", out)
	}
}
