package proto_test

import (
	"encoding/hex"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata/golden")

// goldens lists one fixture per message shape. Each is checked both ways:
// encoding the fixture gives the committed bytes, and decoding the committed
// bytes gives the fixture.
func goldens() []struct {
	name string
	msg  any
	new  func() any
} {
	batch := prototest.Batch(5, 2)
	batch.Samples[1].Ext = map[string]float64{"rssi_dbm": -71.5, "motor_temp_c": 48}
	batch.Dropped = 3
	state, will, alert, upd := prototest.State(), prototest.Will(), prototest.AlertEvent(), prototest.UpdateEvent()
	ping, cmd, fi := prototest.PingCommand(), prototest.UpdateCommand(), prototest.FlightInput()
	csr, certCmd := prototest.CertRequest(), prototest.CertCommand()
	dstate, dupd, dcmd := prototest.DeltaState(), prototest.DeltaUpdateEvent(), prototest.DeltaUpdateCommand()
	return []struct {
		name string
		msg  any
		new  func() any
	}{
		{"state_hello", &state, func() any { return new(proto.State) }},
		{"state_will", &will, func() any { return new(proto.State) }},
		{"batch", &batch, func() any { return new(proto.Batch) }},
		{"event_alert", &alert, func() any { return new(proto.Event) }},
		{"event_update", &upd, func() any { return new(proto.Event) }},
		{"command_ping", &ping, func() any { return new(proto.Command) }},
		{"command_update", &cmd, func() any { return new(proto.Command) }},
		{"flight_input", &fi, func() any { return new(proto.FlightInput) }},
		{"cert_request", &csr, func() any { return new(proto.CertRequest) }},
		{"command_certificate", &certCmd, func() any { return new(proto.Command) }},
		{"state_hello_delta", &dstate, func() any { return new(proto.State) }},
		{"event_update_delta", &dupd, func() any { return new(proto.Event) }},
		{"command_update_delta", &dcmd, func() any { return new(proto.Command) }},
	}
}

// TestGoldenV1 decodes what agents and control planes of protocol version
// 1 sent (testdata/golden-v1, frozen): a fleet mid-upgrade speaks both.
// Their messages decode to the same fixtures with version 1, and nothing
// of version 2 (no builds, no deltas: never offered one).
func TestGoldenV1(t *testing.T) {
	for _, g := range goldens() {
		path := filepath.Join("testdata", "golden-v1", g.name+".hex")
		raw, err := os.ReadFile(path)
		if os.IsNotExist(err) {
			continue // a shape version 1 did not have
		}
		t.Run(g.name, func(t *testing.T) {
			if err != nil {
				t.Fatal(err)
			}
			b, err := hex.DecodeString(strings.TrimSpace(string(raw)))
			if err != nil {
				t.Fatal(err)
			}
			dec := g.new()
			if err := proto.Unmarshal(b, dec); err != nil {
				t.Fatalf("a version 1 message no longer decodes: %v", err)
			}
			if st, ok := g.msg.(*proto.State); ok {
				want := *st
				want.Proto = 1
				if !reflect.DeepEqual(dec, &want) {
					t.Errorf("decoded %+v, want %+v", dec, &want)
				}
				return
			}
			if !reflect.DeepEqual(dec, g.msg) {
				t.Errorf("decoded %+v, want %+v", dec, g.msg)
			}
		})
	}
}

func TestGolden(t *testing.T) {
	for _, g := range goldens() {
		t.Run(g.name, func(t *testing.T) {
			path := filepath.Join("testdata", "golden", g.name+".hex")
			got, err := proto.Marshal(g.msg)
			if err != nil {
				t.Fatal(err)
			}
			if *update {
				if err := os.WriteFile(path, []byte(hex.EncodeToString(got)+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./proto -run TestGolden -update to create it)", err)
			}
			want, err := hex.DecodeString(strings.TrimSpace(string(raw)))
			if err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("encoding changed:\n got %x\nwant %x", got, want)
			}
			dec := g.new()
			if err := proto.Unmarshal(want, dec); err != nil {
				t.Fatalf("decode golden: %v", err)
			}
			if !reflect.DeepEqual(dec, g.msg) {
				t.Errorf("decoded golden differs:\n got %+v\nwant %+v", dec, g.msg)
			}
		})
	}
}
