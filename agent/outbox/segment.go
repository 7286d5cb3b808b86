package outbox

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"strconv"
	"strings"
)

const (
	formatVersion   = 1
	segHeaderSize   = 20
	frameHeaderSize = 12
	segSuffix       = ".seg"
	segNameLen      = 2 + 20 + len(segSuffix)
)

var (
	segMagic   = [4]byte{'H', 'G', 'O', 'B'}
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
	be         = binary.BigEndian
)

func laneLetter(l Lane) byte {
	if l == Events {
		return 'e'
	}
	return 't'
}

func segName(l Lane, first uint64) string {
	return fmt.Sprintf("%c-%020d%s", laneLetter(l), first, segSuffix)
}

// parseSegName accepts exactly the names segName produces, so that files
// left by anyone else are ignored.
func parseSegName(name string) (Lane, uint64, bool) {
	if len(name) != segNameLen || name[1] != '-' || !strings.HasSuffix(name, segSuffix) {
		return 0, 0, false
	}
	var l Lane
	switch name[0] {
	case 'e':
		l = Events
	case 't':
		l = Telemetry
	default:
		return 0, 0, false
	}
	digits := name[2 : 2+20]
	for i := range len(digits) {
		if digits[i] < '0' || digits[i] > '9' {
			return 0, 0, false
		}
	}
	first, err := strconv.ParseUint(digits, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	return l, first, true
}

func putSegHeader(b []byte, l Lane, first uint64) {
	copy(b, segMagic[:])
	b[4] = formatVersion
	b[5] = byte(l)
	b[6], b[7] = 0, 0
	be.PutUint64(b[8:], first)
	be.PutUint32(b[16:], crc32.Checksum(b[:16], castagnoli))
}

func segHeaderOK(b []byte, l Lane, first uint64) bool {
	var want [segHeaderSize]byte
	putSegHeader(want[:], l, first)
	return string(b) == string(want[:])
}

// frameCRCStart is the CRC of what precedes the data in the checksum.
func frameCRCStart(l Lane, index uint64, n uint32) uint32 {
	var h [13]byte
	h[0] = byte(l)
	be.PutUint64(h[1:], index)
	be.PutUint32(h[9:], n)
	return crc32.Update(0, castagnoli, h[:])
}

func frameCRC(l Lane, index uint64, data []byte) uint32 {
	return crc32.Update(frameCRCStart(l, index, uint32(len(data))), castagnoli, data)
}

// appendFrame appends the frame of the record at position pos of the segment
// starting at first.
func appendFrame(dst []byte, l Lane, first, pos uint64, data []byte) []byte {
	dst = be.AppendUint32(dst, uint32(len(data)))
	dst = be.AppendUint32(dst, uint32(pos))
	dst = be.AppendUint32(dst, frameCRC(l, first+pos, data))
	return append(dst, data...)
}

// scanResult describes what a segment file holds.
type scanResult struct {
	valid uint64 // intact records at the start of the file
	end   int64  // offset just past them; 0 if the header is bad
	size  int64  // file size
	// damaged reports bytes after end that are not intact records, or a bad
	// header.
	damaged bool
	// later counts, when damaged, the records from the damage up to and
	// including the last intact frame found after it. Zero means nothing
	// intact follows: a torn tail.
	later uint64
	// tailHeader reports a torn tail that starts with the header of the next
	// record: a torn append, or a record damaged after it was written.
	tailHeader bool
}

// maxResyncBytes bounds the damaged region searched for intact frames, and
// with it the time Open spends on a big garbage file. Real segments are far
// smaller.
const maxResyncBytes = 16 << 20

// scanSegment checks every frame of a segment file. limit is the number of
// records the file should hold at most (known when a later segment of the
// lane exists); anything after that many records counts as damage.
func scanSegment(path string, l Lane, first, limit uint64) (scanResult, error) {
	f, err := os.Open(path)
	if err != nil {
		return scanResult{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return scanResult{}, err
	}
	res := scanResult{size: fi.Size()}
	r := bufio.NewReaderSize(f, 64<<10)

	var hdr [segHeaderSize]byte
	if res.size >= segHeaderSize {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return scanResult{}, err
		}
	}
	if res.size < segHeaderSize || !segHeaderOK(hdr[:], l, first) {
		// The frames carry their own checksums, so intact ones after a bad
		// header are still found and counted.
		res.damaged = true
		res.later, err = resync(f, 0, res.size, l, first, 0)
		return res, err
	}
	res.end = segHeaderSize
	for {
		rem := res.size - res.end
		if rem == 0 {
			return res, nil
		}
		res.tailHeader = false
		ok := res.valid < limit && rem >= frameHeaderSize
		var fh [frameHeaderSize]byte
		var n uint32
		if ok {
			if _, err := io.ReadFull(r, fh[:]); err != nil {
				return scanResult{}, err
			}
			n = be.Uint32(fh[0:])
			res.tailHeader = uint64(be.Uint32(fh[4:])) == res.valid
			ok = int64(n) <= rem-frameHeaderSize && res.tailHeader
		}
		if ok {
			ok, err = checkFrame(r, l, first+res.valid, n, be.Uint32(fh[8:]))
			if err != nil {
				return scanResult{}, err
			}
		}
		if !ok {
			res.damaged = true
			if found, err := resync(f, res.end+1, res.size, l, first, res.valid+1); err != nil {
				return scanResult{}, err
			} else if found > 0 {
				res.later = found - res.valid
				res.tailHeader = false
			}
			return res, nil
		}
		res.valid++
		res.end += frameHeaderSize + int64(n)
	}
}

// checkFrame reads n bytes of data from r and reports whether their CRC
// matches, without holding them in memory.
func checkFrame(r *bufio.Reader, l Lane, index uint64, n, want uint32) (bool, error) {
	c := frameCRCStart(l, index, n)
	for left := int(n); left > 0; {
		b, err := r.Peek(min(left, r.Size()))
		if err != nil {
			return false, err
		}
		c = crc32.Update(c, castagnoli, b)
		_, _ = r.Discard(len(b))
		left -= len(b)
	}
	return c == want, nil
}

// resync searches the bytes of f from off to size, at every offset, for
// intact frames at position minPos or later: the position field and the CRC
// make a false match practically impossible. It returns one past the highest
// position found, 0 if none. This is how records after a corrupt frame are
// counted, whatever field the corruption hit.
func resync(f io.ReaderAt, off, size int64, l Lane, first, minPos uint64) (uint64, error) {
	rem := size - off
	if rem < frameHeaderSize || rem > maxResyncBytes {
		return 0, nil
	}
	buf := make([]byte, rem)
	if _, err := f.ReadAt(buf, off); err != nil {
		return 0, err
	}
	// No frame is shorter than its header, which bounds the positions the
	// region can hold.
	maxPos := minPos + uint64(rem)/frameHeaderSize
	var found uint64
	for p := 0; p+frameHeaderSize <= len(buf); p++ {
		n := be.Uint32(buf[p:])
		pos := uint64(be.Uint32(buf[p+4:]))
		if pos < minPos || pos > maxPos || int64(n) > int64(len(buf)-p-frameHeaderSize) {
			continue
		}
		data := buf[p+frameHeaderSize : p+frameHeaderSize+int(n)]
		if frameCRC(l, first+pos, data) != be.Uint32(buf[p+8:]) {
			continue
		}
		found = max(found, pos+1)
		p += frameHeaderSize + int(n) - 1 // the next frame, if intact, starts right after
	}
	return found, nil
}
