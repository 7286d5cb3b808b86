// Package delta makes delta artifacts: BSDIFF40 patches (bzip2 blocks) that
// turn one build into the next, which devices apply with internal/bspatch
// (and any standard bspatch, such as minio/selfupdate's, reads). The patch is made with github.com/gabstv/go-bsdiff
// (pure Go, bzip2 written with dsnet/compress): no external bsdiff
// binary is needed where releases are signed, and Go's standard library
// reads bzip2 but cannot write it.
package delta

import (
	"bytes"
	"fmt"

	"github.com/gabstv/go-bsdiff/pkg/bsdiff"
	"github.com/minio/selfupdate"

	"github.com/hangarfleet/hangar/internal/bspatch"
	"github.com/hangarfleet/hangar/proto"
)

// Make returns the patch from old to new, checked by applying it with the
// device's patcher (internal/bspatch) and with selfupdate's, the reference
// implementation of the format: a patch that would not give new byte for
// byte on either is never published.
func Make(old, new []byte) ([]byte, error) {
	patch, err := bsdiff.Bytes(old, new)
	if err != nil {
		return nil, fmt.Errorf("delta: %w", err)
	}
	if _, err := proto.ParseDeltaHeader(patch, int64(len(patch)), int64(len(new))); err != nil {
		return nil, fmt.Errorf("delta: the patch made is unreadable: %w", err)
	}
	var got bytes.Buffer
	if err := bspatch.Apply(bytes.NewReader(old), int64(len(old)), bytes.NewReader(patch), int64(len(patch)), int64(len(new)), 0, &got); err != nil {
		return nil, fmt.Errorf("delta: the patch made does not apply on a device: %w", err)
	}
	if !bytes.Equal(got.Bytes(), new) {
		return nil, fmt.Errorf("delta: the patch made gives another result on a device")
	}
	got.Reset()
	if err := selfupdate.NewBSDiffPatcher().Patch(bytes.NewReader(old), &got, bytes.NewReader(patch)); err != nil {
		return nil, fmt.Errorf("delta: the patch made does not apply with the reference patcher: %w", err)
	}
	if !bytes.Equal(got.Bytes(), new) {
		return nil, fmt.Errorf("delta: the patch made gives another result with the reference patcher")
	}
	return patch, nil
}
