package proto_test

import (
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// fuzzRoundTrip checks that decode never panics, and that whatever decodes
// re-encodes and decodes to the same value.
func fuzzRoundTrip[T any](f *testing.F, seeds []T, decode func([]byte) (T, error)) {
	for _, s := range seeds {
		b, err := proto.Marshal(&s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		v, err := decode(data)
		if err != nil {
			return
		}
		enc, err := proto.Marshal(&v)
		if err != nil {
			t.Fatalf("decoded value does not encode: %v", err)
		}
		again, err := decode(enc)
		if err != nil {
			t.Fatalf("re-encoded value does not decode: %v", err)
		}
		if !reflect.DeepEqual(v, again) {
			t.Fatalf("round trip changed the value:\n%+v\n%+v", v, again)
		}
	})
}

func FuzzDecodeBatch(f *testing.F) {
	b := prototest.Batch(9, 3)
	b.Samples[0].Ext = map[string]float64{"x": 1.5}
	fuzzRoundTrip(f, []proto.Batch{prototest.Batch(1, 1), b}, proto.DecodeBatch)
}

func FuzzDecodeState(f *testing.F) {
	fuzzRoundTrip(f, []proto.State{prototest.State(), prototest.Will()}, proto.DecodeState)
}

func FuzzDecodeEvent(f *testing.F) {
	fuzzRoundTrip(f, []proto.Event{prototest.AlertEvent(), prototest.UpdateEvent()}, proto.DecodeEvent)
}

func FuzzDecodeCommand(f *testing.F) {
	fuzzRoundTrip(f, []proto.Command{prototest.PingCommand(), prototest.UpdateCommand(), prototest.CertCommand()}, proto.DecodeCommand)
}

func FuzzDecodeCertRequest(f *testing.F) {
	fuzzRoundTrip(f, []proto.CertRequest{prototest.CertRequest()}, proto.DecodeCertRequest)
}

func FuzzDecodeFlightInput(f *testing.F) {
	fuzzRoundTrip(f, []proto.FlightInput{prototest.FlightInput()}, proto.DecodeFlightInput)
}

// An offer whose key list is present but empty decodes as an offer
// without one: the two mean the same on the wire and in the agent.
func TestDecodeCommandEmptyKeyList(t *testing.T) {
	c, err := proto.DecodeCommand([]byte("\xa3\x00ac\x01fupdate\x03\xa3\x00@\x01@\x02`"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Update == nil || c.Update.Keys != nil {
		t.Fatalf("offer %+v: want Keys nil", c.Update)
	}
}

// FuzzParseSelector: what the selector parser accepts is valid labels,
// and written back as k=v,... it parses to the same selector.
func FuzzParseSelector(f *testing.F) {
	for _, s := range []string{"", "hw=rev-b", "hw=rev-b,base=zurich", " a=b , c=d ", "a=b,a=c", "=x", "a", "k=v=w"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sel, err := proto.ParseSelector(s)
		if err != nil {
			return
		}
		if err := proto.ValidateLabels(sel); err != nil {
			t.Fatalf("accepted %q with invalid labels: %v", s, err)
		}
		var parts []string
		for k, v := range sel {
			parts = append(parts, k+"="+v)
		}
		again, err := proto.ParseSelector(strings.Join(parts, ","))
		if err != nil || !reflect.DeepEqual(sel, again) {
			t.Fatalf("%q: %v, written back: %v (%v)", s, sel, again, err)
		}
	})
}

// semverRE is the expression ValidVersion implements by hand.
var semverRE = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)

// FuzzValidVersion: ValidVersion says what the semantic-version
// expression says, for any string.
func FuzzValidVersion(f *testing.F) {
	for _, s := range []string{"1.0.0", "0.0.0", "01.0.0", "1.2.3-rc.1", "1.2.3+build.5", "1.2.3-rc.1+b", "1.2", "1.2.3-", "1.2.3+", "1.2.3-a+b+c",
		"1.0.0+revert.1", "v1.0.0", "1.0.0 ", "1.0.0-é", "10.20.30-a-b.c--d+x-y", "1..0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want := len(s) <= 64 && semverRE.MatchString(s)
		if got := proto.ValidVersion(s); got != want {
			t.Fatalf("ValidVersion(%q) = %v, the expression says %v", s, got, want)
		}
	})
}
