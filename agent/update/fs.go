package update

import (
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// FS is the file system seam of the install sequence: every write, fsync,
// link and rename of an install goes through it, so that a test can cut the
// sequence at any step (and drop what was not synced) and check that the
// device still holds a complete binary.
type FS interface {
	Create(name string, perm fs.FileMode) (File, error)
	Open(name string) (io.ReadCloser, error)
	Rename(oldname, newname string) error
	Link(oldname, newname string) error
	Remove(name string) error
	Chmod(name string, perm fs.FileMode) error
	SyncDir(dir string) error
	Stat(name string) (fs.FileInfo, error)
}

// File is a file being written.
type File interface {
	io.Writer
	Sync() error
	Close() error
}

// OSFS is the real file system.
type OSFS struct{}

var _ FS = OSFS{}

func (OSFS) Create(name string, perm fs.FileMode) (File, error) {
	return os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
}
func (OSFS) Open(name string) (io.ReadCloser, error)   { return os.Open(name) }
func (OSFS) Rename(a, b string) error                  { return os.Rename(a, b) }
func (OSFS) Link(a, b string) error                    { return os.Link(a, b) }
func (OSFS) Remove(name string) error                  { return os.Remove(name) }
func (OSFS) Chmod(name string, perm fs.FileMode) error { return os.Chmod(name, perm) }
func (OSFS) Stat(name string) (fs.FileInfo, error)     { return os.Stat(name) }
func (OSFS) SyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// copyFile writes src to dst through fsys and fsyncs it.
func copyFile(fsys FS, src, dst string, perm fs.FileMode) error {
	in, err := fsys.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := fsys.Create(dst, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func siblings(path string) (dir, next, prev string) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	return dir, filepath.Join(dir, "."+base+".new"), filepath.Join(dir, "."+base+".prev")
}
