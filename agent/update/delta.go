package update

import (
	"fmt"
	"io"

	"github.com/minio/selfupdate"

	"github.com/hangarfleet/hangar/proto"
)

// ApplyDelta writes to dst the build a delta patch makes of base. The
// patch's header is checked before anything is allocated: its blocks must
// fit in the patch's patchSize bytes and its result may be at most
// maxResult bytes (selfupdate's patcher allocates what the header
// announces, and holds base and the result in memory: both are bounded by
// the caller). The result must be exactly the size the header announced.
// ApplyDelta does not fsync or install anything: dst is a staging file,
// checked against the manifest's digest before the usual power-safe swap.
func ApplyDelta(base io.Reader, patch io.ReaderAt, patchSize, maxResult int64, dst io.Writer) (err error) {
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
	cw := &sizeWriter{w: dst}
	// selfupdate's patcher trusts the control block: a negative length in
	// it is a slice out of bounds (a panic), found by FuzzApplyDelta. The
	// patcher touches only its own buffers, so a panic there is a bad
	// patch, not a broken agent.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: the patcher failed on it: %v", proto.ErrDelta, r)
		}
	}()
	if err := selfupdate.NewBSDiffPatcher().Patch(base, cw, io.NewSectionReader(patch, 0, patchSize)); err != nil {
		return fmt.Errorf("%w: %v", proto.ErrDelta, err)
	}
	if cw.n != h.NewSize {
		return fmt.Errorf("%w: %d bytes made, the header announced %d", proto.ErrDelta, cw.n, h.NewSize)
	}
	return nil
}

type sizeWriter struct {
	w io.Writer
	n int64
}

func (c *sizeWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
