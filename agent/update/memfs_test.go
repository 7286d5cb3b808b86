package update

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// memFS is an in-memory FS that models what a POSIX file system keeps when
// the process dies or the power goes at a given step.
//
// Every mutating call (Create, Write, Sync, Rename, Link, Remove, Chmod,
// SyncDir) is a step, counted from 0. At the cut step the call fails, and
// so does every later call:
//
//   - crashProcess: the file system keeps everything done before the cut
//     (the kernel's page cache survives a process crash);
//   - crashPower: only what was made durable survives: a directory is its
//     entries at its last SyncDir, an inode's content (and mode) is what it
//     was at its last File.Sync (empty if never synced);
//   - crashFault: only the call at the cut fails (EIO), the process goes
//     on and later calls succeed.
//
// Reboot returns a fresh, working view of what survived. Directories are
// made by mkdir (durable, not steps); there are no subdirectory entries.
type memFS struct {
	mu    sync.Mutex
	dirs  map[string]*memDir
	mode  crashMode
	cutAt int      // index of the step that fails; -1: none
	steps []string // every step attempted, for messages
	dead  bool
	chunk int // Open's readers return at most chunk bytes per Read
}

// memInode is a file: what the page cache holds, and what is on disk.
type memInode struct {
	data, synced     []byte
	mode, syncedMode fs.FileMode
}

// memDir maps names to inodes (two names on one inode are hard links), now
// and as of the last SyncDir.
type memDir struct {
	entries, durable map[string]*memInode
}

type crashMode int

const (
	crashNone crashMode = iota
	crashProcess
	crashPower
	crashFault
)

func (c crashMode) String() string {
	return [...]string{"none", "process crash", "power loss", "fault"}[c]
}

// errCut is what every call returns once the process is dead.
var errCut = errors.New("memfs: cut, the process is dead")

var _ FS = (*memFS)(nil)

func newMemFS() *memFS {
	return &memFS{dirs: map[string]*memDir{}, cutAt: -1, chunk: 1024}
}

// setCut makes step k fail in the given mode.
func (m *memFS) setCut(k int, mode crashMode) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cutAt, m.mode = k, mode
}

// stepCount is the number of steps attempted so far (the cut one included).
func (m *memFS) stepCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.steps)
}

// stepName describes step k.
func (m *memFS) stepName(k int) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if k < len(m.steps) {
		return m.steps[k]
	}
	return "after the last step"
}

func (m *memFS) trace() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	for i, s := range m.steps {
		fmt.Fprintf(&b, "\n  %2d %s", i, s)
	}
	return b.String()
}

// step counts a mutating call; the caller holds mu.
func (m *memFS) stepLocked(desc string) error {
	if m.dead {
		return errCut
	}
	k := len(m.steps)
	m.steps = append(m.steps, desc)
	if k != m.cutAt {
		return nil
	}
	switch m.mode {
	case crashFault:
		return fmt.Errorf("memfs: step %d (%s): %w", k, desc, syscall.EIO)
	case crashProcess, crashPower:
		m.crashLocked()
		return errCut
	}
	return nil
}

// step counts a mutating call made outside the file system (a Store's Save):
// it fails like a file system call at the cut.
func (m *memFS) step(desc string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stepLocked(desc)
}

// alive reports errCut once the process is dead.
func (m *memFS) alive() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dead {
		return errCut
	}
	return nil
}

// crash kills the process now (if the cut was not reached), dropping what
// is not durable if the mode is crashPower.
func (m *memFS) crash() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.dead {
		m.crashLocked()
	}
}

func (m *memFS) crashLocked() {
	m.dead = true
	if m.mode != crashPower {
		return
	}
	for _, d := range m.dirs {
		d.entries = maps.Clone(d.durable)
		for _, ino := range d.entries {
			ino.data = slices.Clone(ino.synced)
			ino.mode = ino.syncedMode
		}
	}
}

// reboot returns a working file system holding what survived: the state
// after crash (called here if the process is still alive). The crashed
// view is left as it is, so one crash can be rebooted several times.
func (m *memFS) reboot() *memFS {
	m.crash()
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cloneLocked()
}

// powerLoss returns a working file system holding what a power loss now
// would leave, and leaves m running.
func (m *memFS) powerLoss() *memFS {
	m.mu.Lock()
	c := m.cloneLocked()
	m.mu.Unlock()
	c.mode = crashPower
	c.crash()
	return c.reboot()
}

// cloneLocked copies the directories and inodes (keeping hard links) into
// a fresh, working memFS.
func (m *memFS) cloneLocked() *memFS {
	n := newMemFS()
	n.chunk = m.chunk
	inodes := map[*memInode]*memInode{}
	cp := func(ino *memInode) *memInode {
		if c, ok := inodes[ino]; ok {
			return c
		}
		c := &memInode{data: slices.Clone(ino.data), synced: slices.Clone(ino.synced), mode: ino.mode, syncedMode: ino.syncedMode}
		inodes[ino] = c
		return c
	}
	for name, d := range m.dirs {
		nd := &memDir{entries: map[string]*memInode{}, durable: map[string]*memInode{}}
		for k, ino := range d.entries {
			nd.entries[k] = cp(ino)
		}
		for k, ino := range d.durable {
			nd.durable[k] = cp(ino)
		}
		n.dirs[name] = nd
	}
	return n
}

// mkdir makes a durable, empty directory (and not a step).
func (m *memFS) mkdir(dir string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	dir = filepath.Clean(dir)
	if m.dirs[dir] == nil {
		m.dirs[dir] = &memDir{entries: map[string]*memInode{}, durable: map[string]*memInode{}}
	}
}

// put makes a durable file (and not a step).
func (m *memFS) put(name string, data []byte, perm fs.FileMode) {
	m.mu.Lock()
	defer m.mu.Unlock()
	dir, base := memSplit(name)
	d := m.dirs[dir]
	if d == nil {
		panic("memfs: put in missing directory " + dir)
	}
	ino := &memInode{data: slices.Clone(data), synced: slices.Clone(data), mode: perm, syncedMode: perm}
	d.entries[base] = ino
	d.durable[base] = ino
}

// read returns a file's content as the process sees it (not a step; works
// on a dead view too).
func (m *memFS) read(name string) ([]byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ino := m.lookupLocked(name)
	if ino == nil {
		return nil, false
	}
	return slices.Clone(ino.data), true
}

// perm returns a file's mode (not a step).
func (m *memFS) perm(name string) fs.FileMode {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ino := m.lookupLocked(name); ino != nil {
		return ino.mode
	}
	return 0
}

// sameFile reports whether two names are hard links of one inode.
func (m *memFS) sameFile(a, b string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	x, y := m.lookupLocked(a), m.lookupLocked(b)
	return x != nil && x == y
}

// names lists a directory's entries.
func (m *memFS) names(dir string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.dirs[filepath.Clean(dir)]
	if d == nil {
		return nil
	}
	return slices.Sorted(maps.Keys(d.entries))
}

func memSplit(name string) (dir, base string) {
	name = filepath.Clean(name)
	return filepath.Dir(name), filepath.Base(name)
}

func (m *memFS) lookupLocked(name string) *memInode {
	dir, base := memSplit(name)
	if d := m.dirs[dir]; d != nil {
		return d.entries[base]
	}
	return nil
}

func memErr(op, name string, err error) error { return &fs.PathError{Op: op, Path: name, Err: err} }

func (m *memFS) Create(name string, perm fs.FileMode) (File, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stepLocked("create " + name); err != nil {
		return nil, err
	}
	dir, base := memSplit(name)
	d := m.dirs[dir]
	if d == nil {
		return nil, memErr("open", name, fs.ErrNotExist)
	}
	ino := d.entries[base]
	if ino != nil {
		// O_TRUNC: the same inode, emptied (not durably until a Sync).
		ino.data = nil
	} else {
		perm &= fs.ModePerm
		ino = &memInode{mode: perm, syncedMode: perm}
		d.entries[base] = ino
	}
	return &memFile{fs: m, ino: ino, name: name}, nil
}

func (m *memFS) Open(name string) (io.ReadCloser, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dead {
		return nil, errCut
	}
	ino := m.lookupLocked(name)
	if ino == nil {
		return nil, memErr("open", name, fs.ErrNotExist)
	}
	return &memReader{fs: m, data: slices.Clone(ino.data), chunk: m.chunk}, nil
}

func (m *memFS) Rename(oldname, newname string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stepLocked("rename " + oldname + " -> " + newname); err != nil {
		return err
	}
	od, ob := memSplit(oldname)
	nd, nb := memSplit(newname)
	ino := m.lookupLocked(oldname)
	if ino == nil {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if m.dirs[nd] == nil {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if m.dirs[nd].entries[nb] == ino {
		// POSIX: renaming a name onto another link of the same file does
		// nothing and succeeds.
		return nil
	}
	delete(m.dirs[od].entries, ob)
	m.dirs[nd].entries[nb] = ino
	return nil
}

func (m *memFS) Link(oldname, newname string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stepLocked("link " + oldname + " -> " + newname); err != nil {
		return err
	}
	nd, nb := memSplit(newname)
	ino := m.lookupLocked(oldname)
	if ino == nil || m.dirs[nd] == nil {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if m.dirs[nd].entries[nb] != nil {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: fs.ErrExist}
	}
	m.dirs[nd].entries[nb] = ino
	return nil
}

func (m *memFS) Remove(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stepLocked("remove " + name); err != nil {
		return err
	}
	dir, base := memSplit(name)
	if m.lookupLocked(name) == nil {
		return memErr("remove", name, fs.ErrNotExist)
	}
	delete(m.dirs[dir].entries, base)
	return nil
}

func (m *memFS) Chmod(name string, perm fs.FileMode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stepLocked("chmod " + name); err != nil {
		return err
	}
	ino := m.lookupLocked(name)
	if ino == nil {
		return memErr("chmod", name, fs.ErrNotExist)
	}
	// The mode is inode metadata: durable with the content, at File.Sync.
	ino.mode = perm & fs.ModePerm
	return nil
}

func (m *memFS) SyncDir(dir string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.stepLocked("syncdir " + dir); err != nil {
		return err
	}
	d := m.dirs[filepath.Clean(dir)]
	if d == nil {
		return memErr("open", dir, fs.ErrNotExist)
	}
	d.durable = maps.Clone(d.entries)
	return nil
}

func (m *memFS) Stat(name string) (fs.FileInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dead {
		return nil, errCut
	}
	ino := m.lookupLocked(name)
	if ino == nil {
		return nil, memErr("stat", name, fs.ErrNotExist)
	}
	return memInfo{name: filepath.Base(name), size: int64(len(ino.data)), mode: ino.mode}, nil
}

// memFile writes to an inode from offset 0 (files are only ever created
// and written through).
type memFile struct {
	fs     *memFS
	ino    *memInode
	name   string
	off    int
	closed bool
}

func (f *memFile) Write(p []byte) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return 0, os.ErrClosed
	}
	if err := f.fs.stepLocked(fmt.Sprintf("write %s [%d,%d)", f.name, f.off, f.off+len(p))); err != nil {
		return 0, err
	}
	if end := f.off + len(p); end > len(f.ino.data) {
		f.ino.data = append(f.ino.data, make([]byte, end-len(f.ino.data))...)
	}
	copy(f.ino.data[f.off:], p)
	f.off += len(p)
	return len(p), nil
}

func (f *memFile) Sync() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return os.ErrClosed
	}
	if err := f.fs.stepLocked("sync " + f.name); err != nil {
		return err
	}
	f.ino.synced = slices.Clone(f.ino.data)
	f.ino.syncedMode = f.ino.mode
	return nil
}

// Close is not a step: it makes nothing durable.
func (f *memFile) Close() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return os.ErrClosed
	}
	f.closed = true
	if f.fs.dead {
		return errCut
	}
	return nil
}

// memReader reads a snapshot in small chunks, so that io.Copy writes a
// file in several steps. It has no WriteTo on purpose.
type memReader struct {
	fs    *memFS
	data  []byte
	chunk int
}

func (r *memReader) Read(p []byte) (int, error) {
	if err := r.fs.alive(); err != nil {
		return 0, err
	}
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.chunk)], r.data)
	r.data = r.data[n:]
	return n, nil
}

func (r *memReader) Close() error { return nil }

type memInfo struct {
	name string
	size int64
	mode fs.FileMode
}

func (i memInfo) Name() string       { return i.name }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() fs.FileMode  { return i.mode }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }

// memWrite creates name with data through the FS, syncing it if sync.
func memWrite(fsys FS, name string, data []byte, sync bool) error {
	f, err := fsys.Create(name, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if sync {
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

func memMustRead(t *testing.T, m *memFS, name string) []byte {
	t.Helper()
	b, ok := m.read(name)
	if !ok {
		t.Fatalf("%s is missing; entries of its directory: %v", name, m.names(filepath.Dir(name)))
	}
	return b
}

func TestMemFSRenameIsAtomic(t *testing.T) {
	// Write a new file, sync it and its directory, rename it over an old
	// one and sync again: at every cut, in both modes, the name holds the
	// old content or the new one, whole.
	old, nu := bytes.Repeat([]byte("o"), 3000), bytes.Repeat([]byte("n"), 2500)
	run := func(m *memFS) error {
		if err := memWrite(m, "/d/f.tmp", nu, true); err != nil {
			return err
		}
		if err := m.SyncDir("/d"); err != nil {
			return err
		}
		if err := m.Rename("/d/f.tmp", "/d/f"); err != nil {
			return err
		}
		return m.SyncDir("/d")
	}
	fresh := func() *memFS {
		m := newMemFS()
		m.mkdir("/d")
		m.put("/d/f", old, 0o644)
		return m
	}
	m := fresh()
	if err := run(m); err != nil {
		t.Fatal(err)
	}
	n := m.stepCount()
	for _, mode := range []crashMode{crashProcess, crashPower} {
		for k := 0; k <= n; k++ {
			m := fresh()
			m.setCut(k, mode)
			err := run(m)
			if k < n && !errors.Is(err, errCut) {
				t.Errorf("%v at step %d: got %v, want errCut", mode, k, err)
			}
			r := m.reboot()
			got := memMustRead(t, r, "/d/f")
			if !bytes.Equal(got, old) && !bytes.Equal(got, nu) {
				t.Errorf("%v at step %d (%s): /d/f holds %d bytes, neither the old nor the new content", mode, k, m.stepName(k), len(got))
			}
			if k == n && !bytes.Equal(got, nu) {
				t.Errorf("%v after the last step: /d/f is not the new content", mode)
			}
		}
	}
}

func TestMemFSUnsyncedWriteLostOnPowerLoss(t *testing.T) {
	for _, mode := range []crashMode{crashProcess, crashPower} {
		m := newMemFS()
		m.mkdir("/d")
		m.put("/d/synced", []byte("v1"), 0o644)
		if err := memWrite(m, "/d/synced", []byte("v2 longer"), false); err != nil {
			t.Fatal(err)
		}
		if err := memWrite(m, "/d/partial", []byte("kept"), true); err != nil {
			t.Fatal(err)
		}
		if err := m.SyncDir("/d"); err != nil {
			t.Fatal(err)
		}
		f, err := m.Create("/d/partial", 0o644) // truncates the same inode
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write([]byte("not synced")); err != nil {
			t.Fatal(err)
		}
		m.setCut(m.stepCount(), mode)
		if err := f.Sync(); !errors.Is(err, errCut) {
			t.Fatalf("%v: Sync at the cut: %v", mode, err)
		}
		if _, err := f.Write([]byte("x")); !errors.Is(err, errCut) {
			t.Fatalf("%v: Write after the cut: %v", mode, err)
		}
		r := m.reboot()
		want1, want2 := "v2 longer", "not synced"
		if mode == crashPower {
			want1, want2 = "v1", "kept"
		}
		if got := string(memMustRead(t, r, "/d/synced")); got != want1 {
			t.Errorf("%v: /d/synced = %q, want %q", mode, got, want1)
		}
		if got := string(memMustRead(t, r, "/d/partial")); got != want2 {
			t.Errorf("%v: /d/partial = %q, want %q", mode, got, want2)
		}
		// The rebooted view works normally.
		if err := memWrite(r, "/d/after", []byte("ok"), true); err != nil {
			t.Errorf("%v: write after reboot: %v", mode, err)
		}
	}
}

func TestMemFSNeverSyncedFileIsEmptyAfterPowerLoss(t *testing.T) {
	m := newMemFS()
	m.mkdir("/d")
	if err := memWrite(m, "/d/f", []byte("data"), false); err != nil {
		t.Fatal(err)
	}
	if err := m.SyncDir("/d"); err != nil {
		t.Fatal(err)
	}
	m.setCut(m.stepCount(), crashPower)
	m.crash()
	if got := memMustRead(t, m.reboot(), "/d/f"); len(got) != 0 {
		t.Errorf("a file whose entry is durable but whose content was never synced holds %q after power loss, want empty", got)
	}
}

func TestMemFSUnsyncedRenameLostOnPowerLoss(t *testing.T) {
	for _, mode := range []crashMode{crashProcess, crashPower} {
		m := newMemFS()
		m.mkdir("/d")
		m.put("/d/a", []byte("A"), 0o644)
		m.put("/d/b", []byte("B"), 0o644)
		m.put("/d/gone", []byte("G"), 0o644)
		if err := m.Rename("/d/a", "/d/b"); err != nil {
			t.Fatal(err)
		}
		if err := m.Remove("/d/gone"); err != nil {
			t.Fatal(err)
		}
		if err := m.Link("/d/b", "/d/c"); err != nil {
			t.Fatal(err)
		}
		m.setCut(m.stepCount(), mode)
		m.crash()
		r := m.reboot()
		want := []string{"b", "c"}
		wantB := "A"
		if mode == crashPower {
			want, wantB = []string{"a", "b", "gone"}, "B"
		}
		if got := r.names("/d"); !slices.Equal(got, want) {
			t.Errorf("%v: entries %v, want %v", mode, got, want)
		}
		if got := string(memMustRead(t, r, "/d/b")); got != wantB {
			t.Errorf("%v: /d/b = %q, want %q", mode, got, wantB)
		}
	}
}

func TestMemFSPowerLossLeavesTheRunningView(t *testing.T) {
	m := newMemFS()
	m.mkdir("/d")
	if err := memWrite(m, "/d/f", []byte("data"), true); err != nil {
		t.Fatal(err)
	}
	lost := m.powerLoss()
	if _, ok := lost.read("/d/f"); ok {
		t.Error("a file whose directory was never synced survives a power loss")
	}
	if err := m.SyncDir("/d"); err != nil {
		t.Fatalf("the running view died with the power-loss copy: %v", err)
	}
	if got := string(memMustRead(t, m.powerLoss(), "/d/f")); got != "data" {
		t.Errorf("after Sync and SyncDir, a power loss leaves %q, want %q", got, "data")
	}
}

func TestMemFSLinkSharesContent(t *testing.T) {
	m := newMemFS()
	m.mkdir("/d")
	m.put("/d/a", []byte("one"), 0o755)
	if err := m.Link("/d/a", "/d/b"); err != nil {
		t.Fatal(err)
	}
	if err := m.Link("/d/a", "/d/b"); !errors.Is(err, fs.ErrExist) {
		t.Errorf("link onto an existing name: %v, want ErrExist", err)
	}
	if !m.sameFile("/d/a", "/d/b") {
		t.Fatal("a and b are not one inode")
	}
	// Writing through one name shows through the other (Create truncates
	// the inode, it does not replace it).
	if err := memWrite(m, "/d/a", []byte("two"), true); err != nil {
		t.Fatal(err)
	}
	if got := string(memMustRead(t, m, "/d/b")); got != "two" {
		t.Errorf("b = %q after writing a, want %q", got, "two")
	}
	// Renaming a link onto another link of the same file does nothing.
	if err := m.Rename("/d/b", "/d/a"); err != nil {
		t.Fatal(err)
	}
	if got := m.names("/d"); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("after renaming b onto its own link a: entries %v, want [a b]", got)
	}
	// Removing one name keeps the other, and hard links survive a reboot.
	if err := m.SyncDir("/d"); err != nil {
		t.Fatal(err)
	}
	r := m.reboot()
	if !r.sameFile("/d/a", "/d/b") {
		t.Error("the hard link did not survive the reboot")
	}
	if err := r.Remove("/d/a"); err != nil {
		t.Fatal(err)
	}
	if got := string(memMustRead(t, r, "/d/b")); got != "two" {
		t.Errorf("b = %q after removing a, want %q", got, "two")
	}
	if st, err := r.Stat("/d/b"); err != nil || st.Mode() != 0o755 || st.Size() != 3 {
		t.Errorf("Stat(b) = %v, %v; want mode 0755, size 3", st, err)
	}
}

func TestMemFSFault(t *testing.T) {
	m := newMemFS()
	m.mkdir("/d")
	m.setCut(1, crashFault)
	if err := m.SyncDir("/d"); err != nil {
		t.Fatal(err)
	}
	if err := m.SyncDir("/d"); !errors.Is(err, syscall.EIO) {
		t.Fatalf("step 1: %v, want EIO", err)
	}
	if err := m.SyncDir("/d"); err != nil {
		t.Fatalf("after a fault the process goes on: %v", err)
	}
}
