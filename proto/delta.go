package proto

import (
	"errors"
	"fmt"
)

// Delta artifacts are BSDIFF40 patches (bsdiff 4.x, bzip2-compressed
// blocks): a 32-byte header, then the control, diff and extra blocks. The
// header announces the blocks' and the result's sizes, which a patcher
// allocates; DeltaHeader checks them against what the device allows
// before anything is allocated.

// DeltaMagic starts every delta artifact.
const DeltaMagic = "BSDIFF40"

// DeltaHeaderSize is the size of a delta's header.
const DeltaHeaderSize = 32

// ErrDelta marks a delta that is malformed or larger than allowed.
var ErrDelta = errors.New("bad delta")

// DeltaHeader is a delta's header.
type DeltaHeader struct {
	CtrlLen, DiffLen, NewSize int64
}

// DeltaInt reads bsdiff's sign-magnitude little-endian 64-bit integer.
func DeltaInt(b []byte) int64 {
	var y uint64
	for i := 7; i >= 0; i-- {
		y = y<<8 | uint64(b[i])
	}
	v := int64(y &^ (1 << 63))
	if y&(1<<63) != 0 {
		v = -v
	}
	return v
}

// ParseDeltaHeader reads and checks a delta's header: the magic, block
// sizes that fit in a patch of patchSize bytes, and a result of at most
// maxResult bytes.
func ParseDeltaHeader(b []byte, patchSize, maxResult int64) (DeltaHeader, error) {
	var h DeltaHeader
	if len(b) < DeltaHeaderSize || patchSize < DeltaHeaderSize {
		return h, fmt.Errorf("%w: shorter than its header", ErrDelta)
	}
	if string(b[:8]) != DeltaMagic {
		return h, fmt.Errorf("%w: not a %s patch", ErrDelta, DeltaMagic)
	}
	h.CtrlLen, h.DiffLen, h.NewSize = DeltaInt(b[8:16]), DeltaInt(b[16:24]), DeltaInt(b[24:32])
	body := patchSize - DeltaHeaderSize
	switch {
	case h.CtrlLen < 0 || h.DiffLen < 0 || h.NewSize < 0:
		return h, fmt.Errorf("%w: negative size in the header", ErrDelta)
	case h.CtrlLen > body || h.DiffLen > body-h.CtrlLen:
		return h, fmt.Errorf("%w: blocks of %d and %d bytes announced in a patch of %d", ErrDelta, h.CtrlLen, h.DiffLen, patchSize)
	case h.NewSize > maxResult:
		return h, fmt.Errorf("%w: a result of %d bytes, over the %d allowed", ErrDelta, h.NewSize, maxResult)
	}
	return h, nil
}
