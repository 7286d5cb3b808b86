package outbox

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
)

// fix is a repair of a damaged segment file: cut it to size, or remove it if
// size is negative.
type fix struct {
	path string
	size int64
}

// load rebuilds the in-memory index from the directory. Damage never makes it
// fail; only I/O errors do.
func (o *Outbox) load() error {
	st, snap, found, err := openState(o.dir)
	if err != nil {
		return fmt.Errorf("open state: %w", err)
	}
	o.st = st
	o.unreported = snap.unreported
	for l := range o.lanes {
		ls := snap.lanes[l]
		o.lanes[l] = &lane{id: Lane(l), next: max(1, ls.next), floor: ls.floor, done: ls.done}
	}

	entries, err := os.ReadDir(o.dir)
	if err != nil {
		return err
	}
	var firsts [numLanes][]uint64
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		if l, first, ok := parseSegName(e.Name()); ok {
			firsts[l] = append(firsts[l], first)
		}
	}
	var segs int
	var fixes []fix
	for l, ls := range o.lanes {
		slices.Sort(firsts[l])
		f, err := o.scanLane(ls, firsts[l])
		if err != nil {
			return err
		}
		fixes = append(fixes, f...)
		segs += len(ls.segs)
	}
	if !found && segs > 0 {
		o.log.Warn("no outbox state found; every record on disk will be sent again")
	}
	// Saved before the repairs, which erase what the losses and the indexes
	// not to reuse were found from. This also makes the state the previous
	// run wrote without fsync durable before this run overwrites the other
	// slot.
	if err := o.saveState(true); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	for _, f := range fixes {
		var err error
		if f.size < 0 {
			err = os.Remove(f.path)
		} else {
			err = o.truncate(f.path, f.size)
		}
		if err != nil {
			return fmt.Errorf("repair segment: %w", err)
		}
	}
	for _, ls := range o.lanes {
		if s := ls.newest(); s != nil && s.end() == ls.next {
			w, err := os.OpenFile(filepath.Join(o.dir, segName(ls.id, s.first)), os.O_RDWR, 0)
			if err != nil {
				return err
			}
			ls.w = w
		} else if ls.next > 1 {
			// Pin the next index with a file named after it (see the
			// package doc): the newest file does not carry it, or there is
			// none.
			if err := o.newSegment(ls, nil); err != nil {
				return err
			}
		}
	}
	for _, ls := range o.lanes {
		if err := o.removeResolved(ls); err != nil {
			o.log.Warn("cannot remove acknowledged segment", "err", err)
		}
	}
	// MaxBytes may have shrunk since the files were written.
	if err := o.makeRoom(nil, 0); err != nil {
		return err
	}
	return nil
}

// scanLane indexes the segment files of one lane, oldest first, counts what
// damage cost and returns the repairs to make.
func (o *Outbox) scanLane(ls *lane, firsts []uint64) ([]fix, error) {
	var lost uint64
	var fixes []fix
	for i, first := range firsts {
		newest := i == len(firsts)-1
		limit := uint64(math.MaxUint64)
		if !newest {
			limit = firsts[i+1] - first
		}
		name := segName(ls.id, first)
		path := filepath.Join(o.dir, name)
		r, err := scanSegment(path, ls.id, first, limit)
		if err != nil {
			return nil, fmt.Errorf("scan segment %s: %w", name, err)
		}
		ls.next = max(ls.next, first)
		switch {
		case !newest && r.valid < limit:
			// The next segment's name says how many records this one had.
			n := ls.lose(first+r.valid, first+limit)
			lost += n
			o.log.Error("segment damaged; dropped the rest of it", "segment", name, "kept", r.valid, "dropped", n)
		case newest && r.damaged && r.later > 0:
			end := first + r.valid + r.later
			n := ls.lose(first+r.valid, end)
			lost += n
			// Those indexes may have been sent: never reuse them.
			ls.next = max(ls.next, end)
			o.log.Error("segment damaged; dropped the rest of it", "segment", name, "kept", r.valid, "dropped", n)
		case r.damaged:
			o.log.Warn("cut torn bytes at the end of segment", "segment", name, "kept", r.valid, "bytes", r.size-r.end)
			if newest && r.tailHeader {
				// Most likely an append cut by a power cut, never
				// returned nor peeked; but it may also be a record
				// damaged after it was sent, so its index is not reused.
				// Marked resolved, so that the gap it leaves is not
				// taken for a loss once a later segment exists.
				ls.next = max(ls.next, first+r.valid+1)
				ls.done.add(first+r.valid, first+r.valid+1)
			}
		}
		if r.valid == 0 && (r.damaged || !newest) {
			fixes = append(fixes, fix{path, -1})
			continue
		}
		if r.end < r.size {
			fixes = append(fixes, fix{path, r.end})
		}
		s := &segment{first: first, count: r.valid, size: r.end}
		ls.segs = append(ls.segs, s)
		o.total += s.size
		ls.next = max(ls.next, s.end())
	}
	ls.dropped += lost
	o.unreported += lost
	ls.advance()
	return fixes, nil
}

func (o *Outbox) truncate(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if err == nil {
		err = o.sync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
