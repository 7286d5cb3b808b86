package delta_test

import (
	"bytes"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/delta"
	"github.com/hangarfleet/hangar/proto"
)

// Make's patch reads as a delta and is small for a small change; an empty
// base and an empty result work too.
func TestMake(t *testing.T) {
	old := bytes.Repeat([]byte("hangar-agent build 1.0.0 "), 4000)
	new := bytes.Replace(old, []byte("1.0.0"), []byte("1.0.1"), 3)
	p, err := delta.Make(old, new)
	if err != nil {
		t.Fatal(err)
	}
	h, err := proto.ParseDeltaHeader(p, int64(len(p)), int64(len(new)))
	if err != nil || h.NewSize != int64(len(new)) {
		t.Fatalf("header %+v: %v", h, err)
	}
	if len(p) > len(new)/20 {
		t.Errorf("a %d-byte patch for three edits in %d bytes", len(p), len(new))
	}
	for _, c := range [][2][]byte{{nil, new}, {old, nil}} {
		if _, err := delta.Make(c[0], c[1]); err != nil {
			t.Errorf("base %d bytes, result %d bytes: %v", len(c[0]), len(c[1]), err)
		}
	}
}
