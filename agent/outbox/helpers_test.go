package outbox

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// tb is what the helpers need of a test; *rapid.T has it too.
type tb interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

// smallOpts gives many small segments, so that tests cross segment
// boundaries with a few records.
func smallOpts() Options {
	return Options{MaxBytes: 64 << 10, SegmentBytes: 256}
}

// openT opens an outbox that is closed at the end of the test.
func openT(t testing.TB, dir string, opts Options) *Outbox {
	t.Helper()
	o, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := o.Close(); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("Close: %v", err)
		}
	})
	return o
}

// crash abandons o as a killed process would: files are closed, nothing more
// is written.
func crash(o *Outbox) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closed = true
	_ = o.closeFiles()
}

// payload returns a recognisable record of n bytes (at least the label).
func payload(l Lane, i, n int) []byte {
	b := []byte(fmt.Sprintf("%s#%d;", l, i))
	for len(b) < n {
		b = append(b, byte('a'+len(b)%26))
	}
	return b
}

func mustAppend(t testing.TB, o *Outbox, l Lane, data []byte) {
	t.Helper()
	if err := o.Append(l, data); err != nil {
		t.Fatalf("Append(%s, %d bytes): %v", l, len(data), err)
	}
}

func peekAll(t testing.TB, o *Outbox) []Record {
	t.Helper()
	recs, err := o.Peek(1 << 30)
	if err != nil {
		t.Fatalf("Peek: %v", err)
	}
	return recs
}

func ids(recs []Record) []ID {
	out := make([]ID, len(recs))
	for i, r := range recs {
		out[i] = r.ID
	}
	return out
}

func ackAll(t testing.TB, o *Outbox, recs []Record) {
	t.Helper()
	if err := o.Ack(ids(recs)...); err != nil {
		t.Fatalf("Ack: %v", err)
	}
}

// sameRecords fails unless got and want hold the same IDs and data in order.
func sameRecords(t tb, got, want []Record) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d records %v, want %d %v", len(got), ids(got), len(want), ids(want))
	}
	for i := range got {
		if got[i].ID != want[i].ID || !bytes.Equal(got[i].Data, want[i].Data) {
			t.Fatalf("record %d: got %v %q, want %v %q", i, got[i].ID, got[i].Data, want[i].ID, want[i].Data)
		}
	}
}

// segFiles lists the segment files of dir with their sizes, oldest first per
// lane, events first.
func segFiles(t tb, dir string) (names []string, total int64) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if _, _, ok := parseSegName(e.Name()); !ok || !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, e.Name())
		total += fi.Size()
	}
	slices.Sort(names)
	return names, total
}

// lastSeg returns the path of the newest segment file of lane l.
func lastSeg(t testing.TB, dir string, l Lane) string {
	t.Helper()
	names, _ := segFiles(t, dir)
	for i := len(names) - 1; i >= 0; i-- {
		if names[i][0] == laneLetter(l) {
			return filepath.Join(dir, names[i])
		}
	}
	t.Fatalf("no %s segment in %s", l, dir)
	return ""
}

// copyDir copies the regular files of src into a new temporary directory.
func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		in, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		in.Close()
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// checkBytes fails if the segment files of o's directory exceed MaxBytes or
// differ from what Stats reports.
func checkBytes(t tb, o *Outbox) {
	t.Helper()
	_, disk := segFiles(t, o.dir)
	st := o.Stats()
	if disk != st.Bytes {
		t.Fatalf("segment files hold %d bytes, Stats says %d", disk, st.Bytes)
	}
	if disk > o.opts.MaxBytes {
		t.Fatalf("segment files hold %d bytes, more than MaxBytes %d", disk, o.opts.MaxBytes)
	}
}
