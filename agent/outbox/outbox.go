package outbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// Lane is a priority class of records. Lower lanes are sent first.
type Lane uint8

const (
	// Events are alerts and update reports: few, small, sent first, dropped
	// last.
	Events Lane = 0
	// Telemetry is bulk sample batches: sent after every pending event,
	// dropped first when the outbox is full.
	Telemetry Lane = 1

	numLanes = 2
)

func (l Lane) String() string {
	switch l {
	case Events:
		return "events"
	case Telemetry:
		return "telemetry"
	}
	return fmt.Sprintf("lane(%d)", uint8(l))
}

// sendOrder lists the lanes in the order Peek returns them; dropOrder in the
// order full outboxes give them up.
var (
	sendOrder = [numLanes]Lane{Events, Telemetry}
	dropOrder = [numLanes]Lane{Telemetry, Events}
)

// ID names a record. Index grows by one per Append in its lane, starts at 1,
// and is never reused, also across restarts; the zero ID names no record.
type ID struct {
	Lane  Lane
	Index uint64
}

// Record is a record returned by Peek. Data belongs to the caller.
type Record struct {
	ID   ID
	Data []byte
}

// Stats is a snapshot of an outbox's counters.
type Stats struct {
	PendingEvents    uint64 // appended, not acknowledged, not dropped
	PendingTelemetry uint64
	// Dropped counts records lost since Open, by drops when full and by
	// corruption found on disk; DroppedEvents and DroppedTelemetry split it.
	Dropped          uint64
	DroppedEvents    uint64
	DroppedTelemetry uint64
	Bytes            int64 // total size of the segment files
	Segments         int
}

var (
	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("outbox closed")
	// ErrTooLarge is returned by Append for a record longer than
	// Options.MaxRecordBytes.
	ErrTooLarge = errors.New("record too large")
	// ErrLane is returned by Append for a lane other than Events and
	// Telemetry.
	ErrLane = errors.New("unknown lane")

	errCorrupt = errors.New("corrupt frame")
)

// segment is the in-memory index entry of a segment file; records stay on
// disk.
type segment struct {
	first uint64
	count uint64
	size  int64
	// hintPos and hintOff are a frame boundary found by an earlier Peek
	// (record hintPos starts at byte hintOff), so that Peek does not re-read
	// the acknowledged start of a segment every time.
	hintPos uint64
	hintOff int64
}

func (s *segment) end() uint64 { return s.first + s.count }

type lane struct {
	id   Lane
	segs []*segment // by first index
	// w is the newest segment, open for appending; nil when the next Append
	// must start a new segment (none yet, or it cannot be trusted).
	w *os.File
	// r is open on rseg, the segment Peek read last: the sender reads the
	// oldest segment over and over until it is all acknowledged.
	r     *os.File
	rseg  *segment
	next  uint64 // index of the next Append
	floor uint64 // every existing record below it is acknowledged or dropped
	done  spans  // acknowledged or lost indexes above floor
	// dropped counts records lost since Open.
	dropped uint64
}

// segFor returns the position of the first segment ending after index i.
func (ls *lane) segFor(i uint64) int {
	return sort.Search(len(ls.segs), func(k int) bool { return ls.segs[k].end() > i })
}

func (ls *lane) closeReader() {
	if ls.r != nil {
		_ = ls.r.Close()
	}
	ls.r, ls.rseg = nil, nil
}

func (ls *lane) newest() *segment {
	if len(ls.segs) == 0 {
		return nil
	}
	return ls.segs[len(ls.segs)-1]
}

// advance moves floor to the first existing record not yet resolved.
func (ls *lane) advance() {
	for {
		k := ls.segFor(ls.floor)
		if k == len(ls.segs) {
			ls.floor = max(ls.floor, ls.next)
			break
		}
		ls.floor = max(ls.floor, ls.segs[k].first)
		sp, ok := ls.done.find(ls.floor)
		if !ok {
			break
		}
		ls.floor = sp.hi
	}
	ls.done.pruneBelow(ls.floor)
}

// lose marks the records in [lo, hi) as resolved and returns how many of them
// were still unresolved.
func (ls *lane) lose(lo, hi uint64) uint64 {
	lo = max(lo, ls.floor)
	if lo >= hi {
		return 0
	}
	n := hi - lo - ls.done.countIn(lo, hi)
	ls.done.add(lo, hi)
	return n
}

func (ls *lane) pending() uint64 {
	var n uint64
	for _, s := range ls.segs {
		if lo := max(s.first, ls.floor); lo < s.end() {
			n += s.end() - lo - ls.done.countIn(lo, s.end())
		}
	}
	return n
}

// maxScratch is the capacity of Append's scratch buffer that is kept between
// calls: enough for any usual record.
const maxScratch = 16 << 10

// Outbox is an on-disk, bounded, two-lane queue of records. It is safe for
// concurrent use.
type Outbox struct {
	dir       string
	opts      Options
	maxRecord int
	log       *slog.Logger
	notify    chan struct{}

	mu         sync.Mutex
	closed     bool
	lanes      [numLanes]*lane
	total      int64  // bytes of the segment files
	unreported uint64 // drops not yet taken by TakeDropped
	dirf       *os.File
	st         *stateStore
	frame      []byte        // Append's scratch: room for a segment header, then the frame
	rd         *bufio.Reader // Peek's scratch
}

// Open opens the outbox in dir, creating dir if needed, and recovers what a
// previous run left: torn tails are cut, records after corruption dropped and
// counted, and the budget enforced if Options shrank.
func Open(dir string, opts Options) (*Outbox, error) {
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("open outbox: %w", err)
	}
	opts = opts.withDefaults()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open outbox: %w", err)
	}
	dirf, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open outbox: %w", err)
	}
	o := &Outbox{
		dir:       dir,
		opts:      opts,
		maxRecord: opts.MaxRecordBytes(),
		log:       opts.Logger.With("component", "outbox"),
		notify:    make(chan struct{}, 1),
		dirf:      dirf,
		frame:     make([]byte, segHeaderSize, maxScratch),
		rd:        bufio.NewReaderSize(nil, 32<<10),
	}
	if err := o.load(); err != nil {
		_ = o.closeFiles()
		return nil, fmt.Errorf("open outbox %s: %w", dir, err)
	}
	return o, nil
}

// MaxRecord returns the largest record Append accepts.
func (o *Outbox) MaxRecord() int { return o.maxRecord }

// Notify returns a channel that receives a value after Appends, so that the
// sender can wait for work instead of polling. Several Appends may be merged
// into one value. The channel is closed by Close.
func (o *Outbox) Notify() <-chan struct{} { return o.notify }

// Append adds rec to lane l. It returns once rec is on disk (unless
// Options.NoSync), after dropping old records if the outbox is full.
func (o *Outbox) Append(l Lane, rec []byte) error {
	if l >= numLanes {
		return fmt.Errorf("append: %w %d", ErrLane, l)
	}
	if len(rec) > o.maxRecord {
		return fmt.Errorf("append %d bytes: %w (max %d)", len(rec), ErrTooLarge, o.maxRecord)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return ErrClosed
	}
	if cap(o.frame) > maxScratch {
		// A rare big record must not pin its size in memory.
		defer func() { o.frame = make([]byte, segHeaderSize, maxScratch) }()
	}
	ls := o.lanes[l]
	f := int64(frameHeaderSize + len(rec))
	if err := o.makeRoom(ls, f); err != nil {
		return fmt.Errorf("append: %w", err)
	}
	if o.appendable(ls, f) {
		s := ls.newest()
		o.frame = appendFrame(o.frame[:segHeaderSize], l, s.first, s.count, rec)
		_, err := ls.w.WriteAt(o.frame[segHeaderSize:], s.size)
		if err == nil {
			err = o.sync(ls.w)
		}
		if err != nil {
			if terr := ls.w.Truncate(s.size); terr != nil {
				// The frame may be on disk and may be read back after a
				// restart, so its index must not be given to another record.
				o.log.Error("cannot undo failed append; starting a new segment", "lane", l, "err", terr)
				_ = ls.w.Close()
				ls.w = nil
				ls.done.add(ls.next, ls.next+1)
				ls.next++
			}
			return fmt.Errorf("append: write segment: %w", err)
		}
		s.count++
		s.size += f
		o.total += f
	} else {
		o.frame = appendFrame(o.frame[:segHeaderSize], l, ls.next, 0, rec)
		if err := o.newSegment(ls, o.frame); err != nil {
			return fmt.Errorf("append: %w", err)
		}
		// The previous newest segment may be all acknowledged and was only
		// kept for its name.
		if err := o.removeResolved(ls); err != nil {
			o.log.Warn("cannot remove acknowledged segment", "err", err)
		}
	}
	ls.next++
	select {
	case o.notify <- struct{}{}:
	default:
	}
	return nil
}

// appendable reports whether a frame of f bytes goes into the newest segment
// of ls rather than a new one.
func (o *Outbox) appendable(ls *lane, f int64) bool {
	s := ls.newest()
	return ls.w != nil && s != nil && (s.count == 0 || s.size+f <= o.opts.SegmentBytes)
}

// newSegment creates the segment file for index ls.next holding frame (which
// starts with segHeaderSize bytes of room for the header), or only a header if
// frame is nil, and makes it the newest segment of ls.
func (o *Outbox) newSegment(ls *lane, frame []byte) error {
	if frame == nil {
		frame = make([]byte, segHeaderSize)
	}
	putSegHeader(frame, ls.id, ls.next)
	name := segName(ls.id, ls.next)
	path := filepath.Join(o.dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create segment: %w", err)
	}
	_, err = f.Write(frame)
	if err == nil {
		err = o.sync(f)
	}
	if err == nil {
		// Without this the file, and with it the index in its name, may
		// vanish in a power cut although Append returned.
		err = o.sync(o.dirf)
	}
	if err != nil {
		_ = f.Close()
		_ = os.Remove(path)
		return fmt.Errorf("create segment %s: %w", name, err)
	}
	if ls.w != nil {
		_ = ls.w.Close()
	}
	ls.w = f
	s := &segment{first: ls.next, size: int64(len(frame))}
	if len(frame) > segHeaderSize {
		s.count = 1
	}
	ls.segs = append(ls.segs, s)
	o.total += s.size
	return nil
}

func (o *Outbox) sync(f *os.File) error {
	if o.opts.NoSync {
		return nil
	}
	return f.Sync()
}

type victim struct {
	ls     *lane
	s      *segment
	newest bool
}

// makeRoom drops whole segments, oldest telemetry first, until a frame of f
// bytes can be appended to target without exceeding MaxBytes. A nil target
// only brings the outbox back within MaxBytes.
func (o *Outbox) makeRoom(target *lane, f int64) error {
	// need is what the append adds: the frame, plus a header if it starts a
	// new segment.
	need := func(replaced bool) int64 {
		switch {
		case target == nil:
			return 0
		case replaced || o.appendable(target, f):
			return f
		default:
			return segHeaderSize + f
		}
	}
	limit := o.opts.MaxBytes
	total, replaced := o.total, false
	if total+need(false) <= limit {
		return nil
	}
	var victims []victim
plan:
	for _, l := range dropOrder {
		ls := o.lanes[l]
		for i, s := range ls.segs {
			if total+need(replaced) <= limit {
				break plan
			}
			newest := i == len(ls.segs)-1
			if newest && s.count == 0 {
				continue // an empty newest segment would only be replaced by another
			}
			victims = append(victims, victim{ls, s, newest})
			total -= s.size
			if newest {
				total += segHeaderSize
				replaced = replaced || ls == target
			}
		}
	}
	if total+need(replaced) > limit {
		// Unreachable while records are at most MaxRecordBytes.
		return fmt.Errorf("no room for %d bytes in %d: %w", f, limit, ErrTooLarge)
	}

	// A lane must keep a segment file named after its next index (see the
	// package doc), so a newest segment is first superseded by an empty one.
	for _, v := range victims {
		if v.newest {
			if err := o.newSegment(v.ls, nil); err != nil {
				return fmt.Errorf("drop: %w", err)
			}
		}
	}
	var lost [numLanes]uint64
	for _, v := range victims {
		lost[v.ls.id] += v.ls.lose(v.s.first, v.s.end())
	}
	for _, l := range dropOrder {
		if lost[l] == 0 {
			continue
		}
		o.lanes[l].dropped += lost[l]
		o.unreported += lost[l]
		level := slog.LevelInfo
		if l == Events {
			level = slog.LevelWarn
		}
		o.log.Log(context.Background(), level, "outbox full; dropped oldest records", "lane", l, "records", lost[l], "max_bytes", limit)
	}
	for _, ls := range o.lanes {
		ls.advance()
	}
	// The drop count must survive a restart; save it before the records go.
	if err := o.saveState(true); err != nil {
		o.log.Error("cannot save outbox state; drop count may be lost", "err", err)
	}
	for _, ls := range o.lanes {
		if err := o.removeResolved(ls); err != nil {
			return fmt.Errorf("drop: %w", err)
		}
	}
	return nil
}

// removeResolved deletes the segment files whose records are all
// acknowledged or dropped, except the newest of the lane.
func (o *Outbox) removeResolved(ls *lane) error {
	var first error
	keep := ls.segs[:0]
	for i, s := range ls.segs {
		if i < len(ls.segs)-1 && s.end() <= ls.floor {
			if s == ls.rseg {
				ls.closeReader()
			}
			err := os.Remove(filepath.Join(o.dir, segName(ls.id, s.first)))
			if err == nil || errors.Is(err, fs.ErrNotExist) {
				o.total -= s.size
				continue
			}
			if first == nil {
				first = fmt.Errorf("remove segment: %w", err)
			}
		}
		keep = append(keep, s)
	}
	clear(ls.segs[len(keep):])
	ls.segs = keep
	return first
}

func (o *Outbox) saveState(sync bool) error {
	var s snapshot
	s.unreported = o.unreported
	for l, ls := range o.lanes {
		s.lanes[l] = laneSnap{next: ls.next, floor: ls.floor, done: ls.done}
	}
	return o.st.save(s, sync && !o.opts.NoSync)
}

// Peek returns up to max records not yet acknowledged, in send order: every
// pending event, oldest first, then telemetry, oldest first. It removes
// nothing: until they are acknowledged, the same records come back.
func (o *Outbox) Peek(max int) ([]Record, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil, ErrClosed
	}
	var out []Record
	for _, l := range sendOrder {
		ls := o.lanes[l]
		for k := ls.segFor(ls.floor); k < len(ls.segs) && len(out) < max; k++ {
			var err error
			if out, err = o.readSegment(ls, k, out, max); err != nil {
				return nil, fmt.Errorf("peek: %w", err)
			}
		}
	}
	return out, nil
}

// readSegment appends the unresolved records of ls.segs[k] to out, up to max.
func (o *Outbox) readSegment(ls *lane, k int, out []Record, max int) ([]Record, error) {
	s := ls.segs[k]
	name := segName(ls.id, s.first)
	var r io.ReaderAt
	switch {
	case k == len(ls.segs)-1 && ls.w != nil:
		r = ls.w
	case ls.rseg == s:
		r = ls.r
	default:
		f, err := os.Open(filepath.Join(o.dir, name))
		if err != nil {
			return out, err
		}
		ls.closeReader()
		ls.r, ls.rseg, r = f, s, f
	}
	pos, off := uint64(0), int64(segHeaderSize)
	if s.hintOff > 0 && s.hintPos < s.count && s.first+s.hintPos <= ls.floor {
		pos, off = s.hintPos, s.hintOff
	}
	o.rd.Reset(io.NewSectionReader(r, off, s.size-off))
	defer o.rd.Reset(nil)
	hinted := false
	for ; pos < s.count && len(out) < max; pos++ {
		index := s.first + pos
		if !hinted && index >= ls.floor {
			s.hintPos, s.hintOff, hinted = pos, off, true
		}
		var fh [frameHeaderSize]byte
		if _, err := io.ReadFull(o.rd, fh[:]); err != nil {
			return out, o.readFailed(ls, s, pos, off, err)
		}
		n := be.Uint32(fh[:4])
		if int64(n) > s.size-off-frameHeaderSize || uint64(be.Uint32(fh[4:])) != pos {
			return out, o.readFailed(ls, s, pos, off, fmt.Errorf("%w: bad frame header", errCorrupt))
		}
		if index < ls.floor || ls.done.contains(index) {
			if _, err := o.rd.Discard(int(n)); err != nil {
				return out, o.readFailed(ls, s, pos, off, err)
			}
			off += frameHeaderSize + int64(n)
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(o.rd, data); err != nil {
			return out, o.readFailed(ls, s, pos, off, err)
		}
		if frameCRC(ls.id, index, data) != be.Uint32(fh[8:]) {
			return out, o.readFailed(ls, s, pos, off, fmt.Errorf("%w: bad checksum", errCorrupt))
		}
		out = append(out, Record{ID: ID{Lane: ls.id, Index: index}, Data: data})
		off += frameHeaderSize + int64(n)
	}
	return out, nil
}

// readFailed handles a segment that no longer reads as it did at Open: if it
// is damaged, its records from pos on are dropped, as Open would have done;
// any other read error is returned.
func (o *Outbox) readFailed(ls *lane, s *segment, pos uint64, off int64, cause error) error {
	name := segName(ls.id, s.first)
	if !errors.Is(cause, io.EOF) && !errors.Is(cause, io.ErrUnexpectedEOF) && !errors.Is(cause, errCorrupt) {
		return fmt.Errorf("read segment %s: %w", name, cause)
	}
	n := ls.lose(s.first+pos, s.end())
	ls.dropped += n
	o.unreported += n
	o.log.Error("segment damaged; dropped the rest of it", "segment", name, "records", n, "err", cause)
	if err := os.Truncate(filepath.Join(o.dir, name), off); err != nil {
		o.log.Error("cannot truncate damaged segment", "segment", name, "err", err)
	} else {
		o.total -= s.size - off
		s.size = off
	}
	s.count = pos
	if s == ls.newest() && ls.w != nil {
		// Its records from pos on keep their indexes: never append there.
		_ = ls.w.Close()
		ls.w = nil
	}
	ls.advance()
	if err := o.saveState(true); err != nil {
		o.log.Error("cannot save outbox state; drop count may be lost", "err", err)
	}
	return nil
}

// Ack marks records as delivered. Unknown, already acknowledged and dropped
// IDs are ignored. Segments left with nothing to send are deleted. The ack
// progress is written (without fsync) before Ack returns; an error means the
// acks took effect but may not survive a restart.
func (o *Outbox) Ack(ids ...ID) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return ErrClosed
	}
	var changed [numLanes]bool
	for _, id := range ids {
		if id.Lane >= numLanes {
			continue
		}
		ls := o.lanes[id.Lane]
		i := id.Index
		if i < ls.floor || i >= ls.next || ls.done.contains(i) {
			continue
		}
		if k := ls.segFor(i); k == len(ls.segs) || ls.segs[k].first > i {
			continue // lost to corruption
		}
		ls.done.add(i, i+1)
		changed[id.Lane] = true
	}
	if changed == [numLanes]bool{} {
		return nil
	}
	for l, ls := range o.lanes {
		if changed[l] {
			ls.advance()
		}
	}
	err := o.saveState(false)
	if err != nil {
		err = fmt.Errorf("ack: save state: %w", err)
	}
	for l, ls := range o.lanes {
		if changed[l] {
			if rerr := o.removeResolved(ls); rerr != nil && err == nil {
				err = fmt.Errorf("ack: %w", rerr)
			}
		}
	}
	return err
}

// TakeDropped returns the number of records dropped since the previous call,
// also across restarts, and resets it. After a power cut it may count again
// drops it already returned just before. It returns 0 after Close.
func (o *Outbox) TakeDropped() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed || o.unreported == 0 {
		return 0
	}
	n := o.unreported
	o.unreported = 0
	if err := o.saveState(false); err != nil {
		o.log.Warn("cannot save outbox state; drops may be reported twice", "err", err)
	}
	return n
}

// Stats returns the outbox's counters.
func (o *Outbox) Stats() Stats {
	o.mu.Lock()
	defer o.mu.Unlock()
	ev, tm := o.lanes[Events], o.lanes[Telemetry]
	return Stats{
		PendingEvents:    ev.pending(),
		PendingTelemetry: tm.pending(),
		Dropped:          ev.dropped + tm.dropped,
		DroppedEvents:    ev.dropped,
		DroppedTelemetry: tm.dropped,
		Bytes:            o.total,
		Segments:         len(ev.segs) + len(tm.segs),
	}
}

// Close saves the ack progress and releases the files. Pending records stay
// on disk for the next Open.
func (o *Outbox) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return ErrClosed
	}
	o.closed = true
	close(o.notify)
	err := o.saveState(true)
	if err != nil {
		err = fmt.Errorf("close outbox: save state: %w", err)
	}
	if cerr := o.closeFiles(); cerr != nil && err == nil {
		err = fmt.Errorf("close outbox: %w", cerr)
	}
	return err
}

func (o *Outbox) closeFiles() error {
	var errs []error
	for _, ls := range o.lanes {
		if ls == nil {
			continue
		}
		if ls.w != nil {
			errs = append(errs, ls.w.Close())
			ls.w = nil
		}
		ls.closeReader()
	}
	if o.st != nil {
		errs = append(errs, o.st.close())
	}
	errs = append(errs, o.dirf.Close())
	return errors.Join(errs...)
}
