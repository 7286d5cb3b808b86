package proto_test

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// TestSampleSize holds the wire size of a typical sample to its budget and
// records how it compares with the JSON the API serves for it.
func TestSampleSize(t *testing.T) {
	s := prototest.Sample()
	s.Ext = nil
	c, err := proto.Marshal(&s)
	if err != nil {
		t.Fatal(err)
	}
	j, err := json.Marshal(s.Reading(prototest.Base))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("sample: CBOR %d bytes, JSON %d bytes (%.1fx)", len(c), len(j), float64(len(j))/float64(len(c)))
	if len(c) > 96 {
		t.Errorf("sample encodes to %d bytes, budget is 96", len(c))
	}
	// A batch adds only a few bytes of header per message.
	b := prototest.Batch(1, 10)
	bc, err := proto.Marshal(&b)
	if err != nil {
		t.Fatal(err)
	}
	if per := len(bc) / 10; per > 96 {
		t.Errorf("batch of 10 costs %d bytes per sample", per)
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestStrictDecoding(t *testing.T) {
	good := prototest.Batch(1, 1)
	goodBytes, err := proto.Marshal(&good)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"not cbor", []byte("hello world")},
		{"truncated", goodBytes[:len(goodBytes)-3]},
		{"trailing bytes", append(bytes.Clone(goodBytes), 0x00)},
		// {0: 1, 0: 2, 1: 1, 3: [{}]}: key 0 twice.
		{"duplicate key", mustHex(t, "a4 00 01 00 02 01 01 03 81 a0")},
		// indefinite-length map {_ 0: 1, 1: 1, 3: [{}]}
		{"indefinite map", mustHex(t, "bf 00 01 01 01 03 81 a0 ff")},
		// indefinite-length array of samples
		{"indefinite array", mustHex(t, "a3 00 01 01 01 03 9f a0 ff")},
		// tag 1 (epoch time) around the base time
		{"tag", mustHex(t, "a4 00 01 01 01 02 c1 01 03 81 a0")},
		{"nan ext", mustHex(t, "a3 00 01 01 01 03 81 a1 0f a1 61 78 f9 7e 00")},
		{"deep nesting", append(mustHex(t, "a3 00 01 01 01 03"), bytes.Repeat([]byte{0x81}, 20)...)},
		{"wrong type", mustHex(t, "a3 00 61 78 01 01 03 81 a0")},
		{"zero seq", mustHex(t, "a3 00 01 01 00 03 81 a0")},
		{"no samples", mustHex(t, "a3 00 01 01 01 03 80")},
		{"battery over 100", mustHex(t, "a3 00 01 01 01 03 81 a1 01 18 c8")},
		{"too large", bytes.Repeat([]byte{0}, proto.MaxMessageSize+1)},
		// an array header claiming 2^32 samples
		{"huge array header", mustHex(t, "a3 00 01 01 01 03 9a ff ff ff ff")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := proto.DecodeBatch(c.in)
			if err == nil {
				t.Fatalf("decoded %x without error", c.in)
			}
			if !errors.Is(err, proto.ErrMalformed) {
				t.Errorf("error %v does not wrap ErrMalformed", err)
			}
		})
	}
	if _, err := proto.DecodeBatch(goodBytes); err != nil {
		t.Fatalf("good batch: %v", err)
	}
}

// TestUnknownFieldsTolerated: a newer agent may add keys; an older control
// plane must still accept the message and keep the fields it knows.
func TestUnknownFieldsTolerated(t *testing.T) {
	// {0: 1, 1: 2, 3: [{0: 5, 99: "new"}], 77: h'00'}
	in := mustHex(t, "a4 00 01 01 02 03 81 a2 00 05 18 63 63 6e 65 77 18 4d 41 00")
	b, err := proto.DecodeBatch(in)
	if err != nil {
		t.Fatal(err)
	}
	if b.Seq != 2 || len(b.Samples) != 1 || b.Samples[0].T != 5 {
		t.Errorf("decoded %+v", b)
	}
}

func TestMarshalDeterministic(t *testing.T) {
	s := prototest.State()
	s.Labels = map[string]string{"z": "1", "a": "2", "m": "3", "b": "4"}
	first, err := proto.Marshal(&s)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		again, _ := proto.Marshal(&s)
		if !bytes.Equal(first, again) {
			t.Fatal("encoding is not deterministic")
		}
	}
}

func TestTopics(t *testing.T) {
	topic := proto.DeviceTopic("drone-7", proto.KindTelemetry)
	if topic != "hangar/v1/dev/drone-7/telemetry" {
		t.Fatalf("topic %q", topic)
	}
	id, k, err := proto.ParseTopic(topic)
	if err != nil || id != "drone-7" || k != proto.KindTelemetry {
		t.Fatalf("ParseTopic = %q %q %v", id, k, err)
	}
	for _, bad := range []string{
		"", "hangar/v1/dev/", "hangar/v1/dev/x", "hangar/v1/dev/x/unknown", "hangar/v1/dev/+/state",
		"hangar/v1/dev/#/state", "hangar/v2/dev/x/state", "hangar/v1/dev/a/b/state", "hangar/v1/dev/x/state/extra",
		"hangar/v1/dev/" + strings.Repeat("a", 65) + "/state",
	} {
		if _, _, err := proto.ParseTopic(bad); err == nil {
			t.Errorf("ParseTopic(%q) accepted", bad)
		}
	}
	for _, bad := range []string{"", "#", "+", "a/b", "$SYS", ".hidden", "-x", "a b", "é", strings.Repeat("x", 65), "a\x00b"} {
		if err := proto.ValidateDeviceID(bad); err == nil {
			t.Errorf("ValidateDeviceID(%q) accepted", bad)
		}
	}
	for _, good := range []string{"a", "drone-7", "DR_01.rev-b", strings.Repeat("x", 64)} {
		if err := proto.ValidateDeviceID(good); err != nil {
			t.Errorf("ValidateDeviceID(%q): %v", good, err)
		}
	}
}

func BenchmarkSampleEncode(b *testing.B) {
	batch := prototest.Batch(1, 1)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := proto.Marshal(&batch); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSampleDecode(b *testing.B) {
	batch := prototest.Batch(1, 1)
	enc, _ := proto.Marshal(&batch)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := proto.DecodeBatch(enc); err != nil {
			b.Fatal(err)
		}
	}
}

// The JSON baselines run in the same invocation so that figures can be
// read as ratios.
func BenchmarkSampleEncodeJSON(b *testing.B) {
	s := prototest.Sample()
	r := s.Reading(prototest.Base)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(&r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSampleDecodeJSON(b *testing.B) {
	s := prototest.Sample()
	enc, _ := json.Marshal(s.Reading(prototest.Base))
	b.ReportAllocs()
	for b.Loop() {
		var r proto.Reading
		if err := json.Unmarshal(enc, &r); err != nil {
			b.Fatal(err)
		}
	}
}
