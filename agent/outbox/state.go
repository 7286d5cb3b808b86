package outbox

import (
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
)

const (
	stateHeaderSize = 20
	// maxSavedSpans caps the out-of-order ack ranges saved per lane, so that a
	// sender acking in a pathological order cannot make every Ack write a big
	// state; ranges past it are only kept in memory.
	maxSavedSpans = 1024
	// maxStateBytes bounds what Open reads from a state slot.
	maxStateBytes = stateHeaderSize + 8 + numLanes*(20+maxSavedSpans*16) + 4
)

var (
	stateMagic = [4]byte{'H', 'G', 'O', 'S'}
	stateNames = [2]string{"state-0", "state-1"}
)

type laneSnap struct {
	next, floor uint64
	done        spans
}

// snapshot is what the state slots hold.
type snapshot struct {
	seq        uint64
	unreported uint64 // drops not yet taken by TakeDropped
	lanes      [numLanes]laneSnap
}

// encode lays out: magic, version, 3 zero bytes, seq (uint64), payload length
// (uint32), payload, CRC-32C of everything before it. The payload is the
// unreported drop count (uint64) then, per lane, next and floor (uint64), the
// number of spans (uint32) and the spans as pairs of uint64.
func (s *snapshot) encode(dst []byte) []byte {
	dst = append(dst[:0], stateMagic[:]...)
	dst = append(dst, formatVersion, 0, 0, 0)
	dst = be.AppendUint64(dst, s.seq)
	dst = be.AppendUint32(dst, 0) // payload length, set below
	dst = be.AppendUint64(dst, s.unreported)
	for _, ls := range s.lanes {
		dst = be.AppendUint64(dst, ls.next)
		dst = be.AppendUint64(dst, ls.floor)
		done := ls.done[:min(len(ls.done), maxSavedSpans)]
		dst = be.AppendUint32(dst, uint32(len(done)))
		for _, sp := range done {
			dst = be.AppendUint64(dst, sp.lo)
			dst = be.AppendUint64(dst, sp.hi)
		}
	}
	be.PutUint32(dst[16:], uint32(len(dst)-stateHeaderSize))
	return be.AppendUint32(dst, crc32.Checksum(dst, castagnoli))
}

func decodeSnapshot(b []byte) (snapshot, bool) {
	var s snapshot
	if len(b) < stateHeaderSize+4 || [4]byte(b[:4]) != stateMagic || b[4] != formatVersion {
		return s, false
	}
	n := int64(be.Uint32(b[16:]))
	if n > int64(len(b)-stateHeaderSize-4) {
		return s, false
	}
	body := b[:stateHeaderSize+n]
	if crc32.Checksum(body, castagnoli) != be.Uint32(b[len(body):]) {
		return s, false
	}
	s.seq = be.Uint64(b[8:])
	p := body[stateHeaderSize:]
	take := func(k int) []byte {
		if len(p) < k {
			return nil
		}
		v := p[:k]
		p = p[k:]
		return v
	}
	v := take(8)
	if v == nil {
		return s, false
	}
	s.unreported = be.Uint64(v)
	for l := range s.lanes {
		v := take(20)
		if v == nil {
			return s, false
		}
		s.lanes[l].next = be.Uint64(v)
		s.lanes[l].floor = be.Uint64(v[8:])
		for range be.Uint32(v[16:]) {
			v := take(16)
			if v == nil {
				return s, false
			}
			// add sorts and merges, so a span list that is valid by CRC but
			// odd in shape still ends up a proper set.
			s.lanes[l].done.add(be.Uint64(v), be.Uint64(v[8:]))
		}
	}
	return s, true
}

// stateStore writes snapshots to two slots. Writes without fsync always go to
// the slot that does not hold the last fsynced snapshot, so that a torn write
// can only cost what was written since.
type stateStore struct {
	f       [2]*os.File
	seq     uint64
	durable int // slot holding the last fsynced (or loaded) snapshot
	buf     []byte
}

// openState opens or creates both slots and returns the newest valid
// snapshot, if any.
func openState(dir string) (*stateStore, snapshot, bool, error) {
	st := &stateStore{durable: 1}
	var best snapshot
	found := false
	for i, name := range stateNames {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			st.close()
			return nil, best, false, err
		}
		st.f[i] = f
		b, err := io.ReadAll(io.LimitReader(f, maxStateBytes))
		if err != nil {
			st.close()
			return nil, best, false, err
		}
		if s, ok := decodeSnapshot(b); ok && (!found || s.seq > best.seq) {
			best, found = s, true
			st.durable = i
		}
	}
	st.seq = best.seq
	return st, best, found, nil
}

func (st *stateStore) save(s snapshot, sync bool) error {
	st.seq++
	s.seq = st.seq
	st.buf = s.encode(st.buf)
	slot := 1 - st.durable
	if _, err := st.f[slot].WriteAt(st.buf, 0); err != nil {
		return err
	}
	if sync {
		if err := st.f[slot].Sync(); err != nil {
			return err
		}
		st.durable = slot
	}
	return nil
}

func (st *stateStore) close() error {
	var first error
	for i, f := range st.f {
		if f == nil {
			continue
		}
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
		st.f[i] = nil
	}
	return first
}
