// Package safefs is the file-system seam of the device's power-safe writes:
// the agent's install sequence and the trial guard's restore go through
// it, so that a test can cut either at any step (and drop what was not
// synced) and check that the device still holds a complete binary.
//
// It imports only the standard library: the trial guard links it.
package safefs

import (
	"crypto/sha256"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// FS is what a power-safe write sequence needs from the file system.
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

// OS is the real file system.
type OS struct{}

var _ FS = OS{}

func (OS) Create(name string, perm fs.FileMode) (File, error) {
	return os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
}
func (OS) Open(name string) (io.ReadCloser, error)   { return os.Open(name) }
func (OS) Rename(a, b string) error                  { return os.Rename(a, b) }
func (OS) Link(a, b string) error                    { return os.Link(a, b) }
func (OS) Remove(name string) error                  { return os.Remove(name) }
func (OS) Chmod(name string, perm fs.FileMode) error { return os.Chmod(name, perm) }
func (OS) Stat(name string) (fs.FileInfo, error)     { return os.Stat(name) }
func (OS) SyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// CopyFile writes src to dst through fsys and fsyncs it.
func CopyFile(fsys FS, src, dst string, perm fs.FileMode) error {
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

// WriteFile replaces name with data atomically and durably: a temporary
// file beside it, fsynced, renamed over it, and the directory fsynced. A
// cut at any step leaves the old content or the new, never a mix.
func WriteFile(fsys FS, name string, data []byte, perm fs.FileMode) error {
	tmp := name + ".tmp"
	f, err := fsys.Create(tmp, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := fsys.Rename(tmp, name); err != nil {
		return err
	}
	return fsys.SyncDir(Dir(name))
}

// Digest is the SHA-256 of a file.
func Digest(fsys FS, name string) ([]byte, error) {
	f, err := fsys.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// Dir is the directory of name ("." for a bare name).
func Dir(name string) string {
	dir, _ := filepath.Split(name)
	if dir == "" {
		return "."
	}
	return dir
}
