package outbox

import (
	"fmt"
	"log/slog"
)

const (
	// DefaultMaxBytes is the disk budget of an outbox: at a typical 1 KiB per
	// telemetry batch every 10 s this is about a day of link loss.
	DefaultMaxBytes int64 = 8 << 20
	// MinMaxBytes is the smallest budget Validate accepts.
	MinMaxBytes int64 = 1 << 10
	// MinSegmentBytes is the smallest segment size Validate accepts.
	MinSegmentBytes int64 = 128

	// Bounds of the default segment size. Small segments make drops fine
	// grained; big ones cost fewer files and fsyncs of the directory.
	minDefaultSegmentBytes int64 = 4 << 10
	maxDefaultSegmentBytes int64 = 1 << 20
)

// Options tunes an Outbox. The zero value is usable.
type Options struct {
	// MaxBytes bounds the total size of the segment files. Zero means
	// DefaultMaxBytes.
	MaxBytes int64
	// SegmentBytes is the size at which a new segment file is started; it is
	// also the unit of drops. Zero means MaxBytes/32 clamped to [4 KiB, 1 MiB],
	// and at most MaxBytes/2. It must be at most MaxBytes/2 so that a drop
	// never costs more than half the outbox.
	SegmentBytes int64
	// NoSync skips every fsync. Data is still written, so a process crash
	// loses nothing, but a power cut may. Meant for the simulator, which runs
	// thousands of agents on one disk.
	NoSync bool
	// Logger receives recovery and drop reports. Nil means discard.
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.MaxBytes == 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.SegmentBytes == 0 {
		o.SegmentBytes = min(max(o.MaxBytes/32, minDefaultSegmentBytes), maxDefaultSegmentBytes, o.MaxBytes/2)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Validate reports whether the options, with defaults filled in, are usable.
func (o Options) Validate() error {
	if o.MaxBytes < 0 {
		return fmt.Errorf("max bytes %d is negative", o.MaxBytes)
	}
	if o.SegmentBytes < 0 {
		return fmt.Errorf("segment bytes %d is negative", o.SegmentBytes)
	}
	o = o.withDefaults()
	if o.MaxBytes < MinMaxBytes {
		return fmt.Errorf("max bytes %d is below the minimum %d", o.MaxBytes, MinMaxBytes)
	}
	if o.SegmentBytes < MinSegmentBytes || o.SegmentBytes > o.MaxBytes/2 {
		return fmt.Errorf("segment bytes %d is outside [%d, max bytes/2 = %d]", o.SegmentBytes, MinSegmentBytes, o.MaxBytes/2)
	}
	return nil
}

// MaxRecordBytes is the largest record Append accepts with these options:
// what fits in half of MaxBytes with its segment header and framing. The half
// keeps one record from wiping out everything else, and guarantees that
// dropping enough old segments always makes room for it.
func (o Options) MaxRecordBytes() int {
	o = o.withDefaults()
	return int(o.MaxBytes/2 - segHeaderSize - frameHeaderSize)
}
