// Package bspatch applies BSDIFF40 patches (bsdiff 4.x, bzip2 blocks), the
// format of hangar's delta updates, streaming: the device applies a
// patch to its build with it, and the control plane checks each patch it
// makes with it (the same code on both sides).
package bspatch

import (
	"compress/bzip2"
	"errors"
	"fmt"
	"io"

	"github.com/hangarfleet/hangar/proto"
)

// DefaultMaxControl bounds a patch's decoded control block: 24 bytes per
// (add, copy, seek) triple, about 175,000 of them. A patch between two
// builds of one program has a few thousand; one over the bound is refused
// (and the full artifact fetched) rather than held in memory.
const DefaultMaxControl = 4 << 20

// Apply writes to dst the build a BSDIFF40 patch makes of base (of
// baseSize bytes). It streams: the base is read where the patch points
// (base is read at offsets, never held whole), the result goes to dst as
// it is made, and what it holds is the patch's decoded control block
// (bounded by maxControl) and two bzip2 decoders (under 4 MB each). Its
// memory does not grow with the build's size. (selfupdate's patcher, the
// reference it is tested against, holds the base and the result whole.)
//
// The header is checked before anything is allocated: its blocks must fit
// in the patch's patchSize bytes and the result must be at most maxResult
// bytes; the result made must be exactly the size the header announced.
// Apply does not fsync or install anything: dst is a staging file,
// checked against the manifest's digest before the usual power-safe swap.
func Apply(base io.ReaderAt, baseSize int64, patch io.ReaderAt, patchSize, maxResult, maxControl int64, dst io.Writer) error {
	hdr := make([]byte, proto.DeltaHeaderSize)
	if patchSize >= proto.DeltaHeaderSize {
		if _, err := patch.ReadAt(hdr, 0); err != nil {
			return fmt.Errorf("delta: read its header: %w", err)
		}
	}
	h, err := proto.ParseDeltaHeader(hdr, patchSize, maxResult)
	if err != nil {
		return err
	}
	if maxControl <= 0 {
		maxControl = DefaultMaxControl
	}
	ctrl, err := readControl(io.NewSectionReader(patch, proto.DeltaHeaderSize, h.CtrlLen), maxControl)
	if err != nil {
		return err
	}
	diffAt := proto.DeltaHeaderSize + h.CtrlLen
	diff := bzip2.NewReader(io.NewSectionReader(patch, diffAt, h.DiffLen))
	extra := bzip2.NewReader(io.NewSectionReader(patch, diffAt+h.DiffLen, patchSize-diffAt-h.DiffLen))
	buf := make([]byte, 32<<10)
	old := make([]byte, len(buf))
	var newPos, oldPos int64
	for i := 0; newPos < h.NewSize; i++ {
		if i == len(ctrl) {
			return fmt.Errorf("%w: the control block ends at byte %d of %d", proto.ErrDelta, newPos, h.NewSize)
		}
		c := ctrl[i]
		if c.add < 0 || c.copy < 0 || c.add > h.NewSize-newPos || c.copy > h.NewSize-newPos-c.add {
			return fmt.Errorf("%w: control triple %d (%d, %d) does not fit a result of %d bytes at %d", proto.ErrDelta, i, c.add, c.copy, h.NewSize, newPos)
		}
		// The diff block, added byte by byte to the base where it is.
		for left := c.add; left > 0; {
			n := min(left, int64(len(buf)))
			if _, err := io.ReadFull(diff, buf[:n]); err != nil {
				return fmt.Errorf("%w: diff block: %v", proto.ErrDelta, err)
			}
			if err := readBase(base, baseSize, oldPos, old[:n]); err != nil {
				return err
			}
			for k := range n {
				buf[k] += old[k]
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return err
			}
			left -= n
			oldPos += n
			newPos += n
		}
		// The extra block, as it is.
		for left := c.copy; left > 0; {
			n := min(left, int64(len(buf)))
			if _, err := io.ReadFull(extra, buf[:n]); err != nil {
				return fmt.Errorf("%w: extra block: %v", proto.ErrDelta, err)
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return err
			}
			left -= n
			newPos += n
		}
		oldPos += c.seek
		if oldPos < -h.NewSize-baseSize || oldPos > baseSize+h.NewSize {
			// bspatch lets the base position wander (what falls outside the
			// base adds zero); far beyond both files it is only overflow bait.
			return fmt.Errorf("%w: control triple %d seeks the base to %d", proto.ErrDelta, i, oldPos)
		}
	}
	return nil
}

type triple struct{ add, copy, seek int64 }

// readControl decodes a patch's whole control block, at most max bytes of
// it: one bzip2 decoder, released before the diff and extra blocks' two.
func readControl(r io.Reader, max int64) ([]triple, error) {
	z := io.LimitReader(bzip2.NewReader(r), max+1)
	var out []triple
	var b [24]byte
	var read int64
	for {
		_, err := io.ReadFull(z, b[:])
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			if read+int64(len(b)) > max {
				return nil, fmt.Errorf("%w: a control block over the %d bytes allowed", proto.ErrDelta, max)
			}
			return nil, fmt.Errorf("%w: control block: %v", proto.ErrDelta, err)
		}
		read += int64(len(b))
		if read > max {
			return nil, fmt.Errorf("%w: a control block over the %d bytes allowed", proto.ErrDelta, max)
		}
		out = append(out, triple{proto.DeltaInt(b[0:8]), proto.DeltaInt(b[8:16]), proto.DeltaInt(b[16:24])})
	}
}

// readBase fills p with the base's bytes from off; bytes outside the base
// are zero (bspatch adds nothing there).
func readBase(base io.ReaderAt, size, off int64, p []byte) error {
	clear(p)
	lo, hi := max(off, 0), min(off+int64(len(p)), size)
	if lo >= hi {
		return nil
	}
	if _, err := base.ReadAt(p[lo-off:hi-off], lo); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("delta: read the base: %w", err)
	}
	return nil
}
