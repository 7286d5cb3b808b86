// Package outbox is the agent's on-disk queue of encoded messages waiting to
// be published: events first, telemetry after, in order, across restarts,
// power cuts and long link loss, within a fixed disk budget.
//
// The appender calls Append; the sender loops on Peek, publishes, and calls
// Ack for what the broker acknowledged, waiting on Notify when Peek is empty.
// A record is opaque bytes; its ID (lane and per-lane index) is what the
// receiver uses to drop duplicates. Indexes start at 1, grow by one per
// Append and are never reused, also across restarts.
//
// # On disk
//
// The directory holds segment files and two state slots; other files are
// ignored.
//
// A segment file is named "<e|t>-<first index, 20 digits>.seg" and holds
// records of one lane with consecutive indexes starting at the one in its
// name. It starts with a 20-byte header (magic "HGOB", format version 1, the
// lane, 2 zero bytes, the first index as big-endian uint64, and the CRC-32C of
// those 16 bytes), followed by frames:
//
//	length  uint32 big-endian, length of data
//	pos     uint32 big-endian, position of the record in the segment
//	        (index - first index)
//	crc     uint32 big-endian, CRC-32C of lane (1 byte), index (uint64),
//	        length (uint32) and data
//	data    length bytes
//
// Because the CRC covers the record's index, a frame copied to the wrong
// place, a stale block or a run of zeros never passes as a record; the
// position lets Open find the intact frames after a corrupt one, whichever
// field the corruption hit. A segment
// is appended to until the next frame would take it past Options.SegmentBytes
// (a record bigger than that gets a segment of its own); then a new one is
// created.
//
// The state slots "state-0" and "state-1" hold the ack position of each lane
// (the lowest index not yet acknowledged or dropped, plus up to 1024 ranges
// acknowledged out of order above it), the next index of each lane and the
// count of drops not yet taken by TakeDropped, with a sequence number and a
// CRC-32C. Open uses the valid slot with the highest sequence number. Ack
// progress is written without fsync to the slot that does not hold the last
// fsynced state, so a write torn by a power cut never destroys that state.
//
// A lane always keeps its newest segment file, even once every record in it
// is acknowledged or dropped, because its name carries the index the next
// Append will use; this is what keeps indexes from being reused when the
// state slots lag.
//
// # Durability and repeats
//
// Append returns after the frame is written and fsynced (and the directory
// fsynced when it created a segment file), so a returned Append survives a
// power cut. A frame torn by a power cut at the tail of the newest segment
// never returned from Append and was never peeked, so Open cuts it without
// counting a loss. If the torn frame's header reached the disk, its index is
// skipped all the same, because a record damaged after it was written (and
// maybe sent) looks the same.
//
// Acks are never lost to a process crash: every Ack writes the state slot
// before returning, and the kernel keeps that write even if the process dies.
// After a clean Close nothing acknowledged is returned again. What Peek can
// return again after a restart, although it was acknowledged, is:
//
//   - after a power cut or kernel crash: records acknowledged since the last
//     state write the kernel flushed to disk (the state is fsynced only on
//     Close, on Open and when records are dropped; Linux flushes dirty pages
//     within about 30 seconds by default). A segment file deleted because all
//     its records were acknowledged may also come back, with the same effect;
//   - records acknowledged out of order, above the ack position, beyond the
//     first 1024 acknowledged ranges of a lane (not persisted);
//   - every record still on disk, if both state slots are lost or corrupt.
//
// No record is ever skipped: the state only ever records indexes that were
// acknowledged or dropped. With Options.NoSync nothing is fsynced: a process
// crash is still safe, a power cut may lose or repeat anything.
//
// # Bound and drops
//
// The segment files never take more than Options.MaxBytes together. When an
// Append would go past it, whole segments are dropped, oldest first, all
// telemetry before any event: the newest telemetry segment, even the one being
// written, goes before the oldest event segment. Dropping is the only way the
// outbox loses a record it accepted, apart from corruption: Open keeps the
// records of a segment before a corrupt frame, drops the rest of that segment
// and carries on with the next segments. Every unacknowledged record lost
// either way is counted in Stats and in TakeDropped; the TakeDropped count is
// fsynced with each drop and survives restarts. In the newest segment, which
// has no successor to say how many records it held, the records lost after a
// corrupt frame are the ones up to the last intact frame found after it; a
// damaged tail with no intact frame after it is a torn append, not a loss.
//
// One process at a time may open a directory.
package outbox
