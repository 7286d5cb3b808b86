package bspatch_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/gabstv/go-bsdiff/pkg/bsdiff"
	"github.com/minio/selfupdate"

	"github.com/hangarfleet/hangar/internal/bspatch"
	"github.com/hangarfleet/hangar/proto"
)

// builds returns a pseudo-binary, mostly repetitive "code" with some
// noise, and a variant with a few scattered edits, as a patch release has.
func builds(size int) (old, new []byte) {
	r := rand.New(rand.NewPCG(1, 2))
	old = make([]byte, size)
	for i := range old {
		if i%97 < 60 {
			old[i] = byte(i % 251)
		} else {
			old[i] = byte(r.IntN(256))
		}
	}
	new = append([]byte(nil), old...)
	for range 40 {
		at := r.IntN(size - 64)
		copy(new[at:], []byte("hangar 1.0.1 patch release"))
	}
	new = append(new, []byte("appended tail of the new build")...)
	return old, new
}

// apply runs Apply on byte slices.
func apply(base, patch []byte, maxResult int64, dst io.Writer) error {
	return bspatch.Apply(bytes.NewReader(base), int64(len(base)), bytes.NewReader(patch), int64(len(patch)), maxResult, 0, dst)
}

// reference is selfupdate's bsdiff patcher (which holds base and result in
// memory), the patcher Apply must agree with; its panics on a
// hostile control block are errors here.
func reference(base, patch []byte) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	var b bytes.Buffer
	err = selfupdate.NewBSDiffPatcher().Patch(bytes.NewReader(base), &b, bytes.NewReader(patch))
	return b.Bytes(), err
}

func TestDeltaRoundTrip(t *testing.T) {
	old, new := builds(256 << 10)
	patch, err := bsdiff.Bytes(old, new) // what hangar release sign --delta-from writes (controlplane/delta)
	if err != nil {
		t.Fatal(err)
	}
	if len(patch) > len(new)/4 {
		t.Errorf("patch of %d bytes for a %d-byte build with a few edits", len(patch), len(new))
	}
	var out bytes.Buffer
	if err := apply(old, patch, int64(len(new)), &out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), new) {
		t.Fatal("the result differs from the new build")
	}
	if ref, err := reference(old, patch); err != nil || !bytes.Equal(ref, new) {
		t.Fatalf("selfupdate's patcher disagrees: %v", err)
	}
	// A base shorter or longer than the new build, and an empty result.
	for _, c := range []struct{ old, new []byte }{{old[:1000], new}, {new, old[:5000]}, {old, nil}} {
		p, err := bsdiff.Bytes(c.old, c.new)
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if err := apply(c.old, p, int64(len(c.new)), &out); err != nil || !bytes.Equal(out.Bytes(), c.new) {
			t.Errorf("%d-byte base to %d-byte build: %v", len(c.old), len(c.new), err)
		}
	}
}

// TestDeltaControlCap: a control block that decodes to more than allowed
// is refused, not held.
func TestDeltaControlCap(t *testing.T) {
	old, new := builds(256 << 10)
	patch, err := bsdiff.Bytes(old, new)
	if err != nil {
		t.Fatal(err)
	}
	err = bspatch.Apply(bytes.NewReader(old), int64(len(old)), bytes.NewReader(patch), int64(len(patch)), int64(len(new)), 23, io.Discard)
	if !errors.Is(err, proto.ErrDelta) || !strings.Contains(err.Error(), "control block over") {
		t.Fatalf("a control block over a 23-byte cap (under one triple): %v", err)
	}
}

// A hostile or broken patch is refused with an error and no panic: a
// result over the cap (refused from the header, before allocating), blocks
// that do not fit, a truncated patch, flipped bytes; the wrong base gives
// a wrong result, which the caller's digest check catches.
func TestDeltaRefusals(t *testing.T) {
	old, new := builds(64 << 10)
	patch, err := bsdiff.Bytes(old, new) // what hangar release sign --delta-from writes (controlplane/delta)
	if err != nil {
		t.Fatal(err)
	}
	errWrong := errors.New("a wrong result without an error")
	try := func(base, p []byte, max int64) error {
		var out bytes.Buffer
		err := apply(base, p, max, &out)
		if err == nil && !bytes.Equal(out.Bytes(), new) {
			return errWrong
		}
		return err
	}
	if err := try(old, patch, int64(len(new))-1); !errors.Is(err, proto.ErrDelta) {
		t.Errorf("a result over the cap: %v", err)
	}
	huge := append([]byte(nil), patch...)
	huge[30] = 0x7f // NewSize of petabytes: refused before any allocation
	if err := try(old, huge, 1<<30); !errors.Is(err, proto.ErrDelta) {
		t.Errorf("an announced size of petabytes: %v", err)
	}
	blocks := append([]byte(nil), patch...)
	blocks[14] = 0x10 // CtrlLen larger than the patch
	if err := try(old, blocks, int64(len(new))); !errors.Is(err, proto.ErrDelta) {
		t.Errorf("blocks larger than the patch: %v", err)
	}
	if err := try(old, patch[:len(patch)/2], int64(len(new))); err == nil {
		t.Error("a truncated patch applied")
	}
	if err := try(old, patch[:10], int64(len(new))); !errors.Is(err, proto.ErrDelta) {
		t.Errorf("a patch shorter than its header: %v", err)
	}
	// A flipped byte is an error, or (in a part the patcher does not
	// need, such as the extra block's final checksum) changes nothing; a
	// wrong result is left to the manifest's digest, checked after.
	refused := 0
	for at := proto.DeltaHeaderSize; at < len(patch); at += len(patch) / 50 {
		bad := append([]byte(nil), patch...)
		bad[at] ^= 0xff
		switch err := try(old, bad, int64(len(new))); {
		case err == nil:
		case errors.Is(err, errWrong):
			t.Logf("byte %d flipped: a wrong result, for the digest check to refuse", at)
		default:
			refused++
		}
	}
	if refused < 25 {
		t.Errorf("only %d of 50 corrupted patches refused", refused)
	}
	other := append([]byte(nil), old...)
	other[100] ^= 1
	var out bytes.Buffer
	if err := apply(other, patch, int64(len(new)), &out); err == nil && bytes.Equal(out.Bytes(), new) {
		t.Error("a different base gave the new build")
	}
}

// FuzzApply: whatever the patch, Apply does not panic, stays
// under the cap, and never makes something else than selfupdate's patcher
// does of the same patch: where both succeed, the results are the same
// bytes. (Apply is stricter: it refuses negative lengths, on which
// the reference panics, a control block that does not decode to its end,
// and seeks far outside both files.)
func FuzzApply(f *testing.F) {
	old, new := builds(4 << 10)
	patch, err := bsdiff.Bytes(old, new) // what hangar release sign --delta-from writes (controlplane/delta)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(patch)
	f.Add([]byte(proto.DeltaMagic))
	f.Fuzz(func(t *testing.T, p []byte) {
		var out bytes.Buffer
		err := apply(old, p, 64<<10, &out)
		if err == nil && int64(out.Len()) > 64<<10 {
			t.Fatalf("a result of %d bytes over the cap", out.Len())
		}
		if err != nil {
			return
		}
		ref, rerr := reference(old, p)
		if rerr != nil {
			t.Fatalf("Apply made %d bytes of a patch the reference refuses: %v", out.Len(), rerr)
		}
		if !bytes.Equal(ref, out.Bytes()) {
			t.Fatalf("Apply and the reference disagree (%d and %d bytes)", out.Len(), len(ref))
		}
	})
}
