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
// field the corruption hit. A segment is appended to until the next frame
// would take it past Options.SegmentBytes (a bigger record gets a segment of
// its own); then a new one is started. A record may be up to
// Options.MaxRecordBytes, MaxBytes/2 less 32 bytes, so that one record never
// pushes out more than half the outbox.
//
// The state slots "state-0" and "state-1" hold, with a sequence number and a
// CRC-32C, the ack position of each lane (the lowest index not yet
// acknowledged or dropped, plus up to 1024 ranges acknowledged out of order
// above it), the next index of each lane, and the count of drops not yet
// taken by TakeDropped. Open uses the valid slot with the highest sequence
// number. Writes without fsync go to the slot that does not hold the last
// fsynced state, so a write torn by a power cut never destroys that state.
//
// A lane keeps its newest segment file even once every record in it is
// acknowledged or dropped: its name carries the index the next Append will
// use, which keeps indexes from being reused when the state slots lag.
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
// Every Ack writes the state slot, without fsync, before it returns. What
// Peek may return again after a restart although it was acknowledged (the
// receiver drops it by ID) is therefore:
//
//   - after Close or a process crash: nothing, except records acknowledged
//     out of order, above a lane's ack position, beyond its first 1024 such
//     ranges, which are kept in memory only;
//   - after a power cut or kernel crash, also: records acknowledged since the
//     last state write that reached the disk. The state is fsynced by Open,
//     Close and every drop; other writes reach the disk when the kernel
//     flushes them, within about 30 seconds on a default Linux. A segment
//     file deleted because all its records were acknowledged may come back
//     too, with the same effect;
//   - every record still on disk, if both state slots are lost or corrupt.
//
// No record is ever skipped: the state only ever marks indexes that were
// acknowledged, dropped or never used. With Options.NoSync nothing is fsynced: a process
// crash is still safe, a power cut may lose or repeat anything.
//
// # Bound and drops
//
// The segment files never take more than Options.MaxBytes together (except
// for an instant inside an Append that drops a lane's newest segment: its
// empty successor, 20 bytes, is created before it is deleted). When an
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
