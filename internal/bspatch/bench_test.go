package bspatch_test

import (
	"bytes"
	"io"
	"testing"

	"github.com/gabstv/go-bsdiff/pkg/bsdiff"
	"github.com/minio/selfupdate"
)

// benchBuilds are a 4 MiB build and a patch release of it.
func benchBuilds(b *testing.B) (old, new, patch []byte) {
	b.Helper()
	old, new = builds(4 << 20)
	patch, err := bsdiff.Bytes(old, new)
	if err != nil {
		b.Fatal(err)
	}
	return old, new, patch
}

// BenchmarkApply is hangar's streaming patcher; its baseline is
// BenchmarkApplySelfupdate, the reference that holds base and result
// in memory (compare B/op).
func BenchmarkApply(b *testing.B) {
	old, new, patch := benchBuilds(b)
	b.SetBytes(int64(len(new)))
	b.ReportAllocs()
	for b.Loop() {
		if err := apply(old, patch, int64(len(new)), io.Discard); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkApplySelfupdate(b *testing.B) {
	old, new, patch := benchBuilds(b)
	b.SetBytes(int64(len(new)))
	b.ReportAllocs()
	for b.Loop() {
		if err := selfupdate.NewBSDiffPatcher().Patch(bytes.NewReader(old), io.Discard, bytes.NewReader(patch)); err != nil {
			b.Fatal(err)
		}
	}
}
