// Package statedir is the agent's default Store: small state files in a
// directory on the device, written atomically (temporary file, fsync,
// rename, fsync of the directory) so that a power cut leaves either the old
// or the new content, never a torn file.
package statedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Dir is a state directory.
type Dir struct {
	path   string
	noSync bool
}

// Open creates the directory (0700) if needed. noSync skips fsync, for
// simulators running many agents on one disk.
func Open(path string, noSync bool) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	// Leftovers of writes interrupted by a power cut.
	if tmps, _ := filepath.Glob(filepath.Join(path, ".*.tmp")); len(tmps) > 0 {
		for _, t := range tmps {
			os.Remove(t)
		}
	}
	return &Dir{path: path, noSync: noSync}, nil
}

// Path is the directory.
func (d *Dir) Path() string { return d.path }

func (d *Dir) file(name string) (string, error) {
	if name == "" || strings.ContainsAny(name, `/\`) || name[0] == '.' {
		return "", fmt.Errorf("state dir: bad name %q", name)
	}
	return filepath.Join(d.path, name), nil
}

// Load returns the content of name, or an error wrapping fs.ErrNotExist.
func (d *Dir) Load(name string) ([]byte, error) {
	p, err := d.file(name)
	if err != nil {
		return nil, err
	}
	return os.ReadFile(p)
}

// Save replaces name with data atomically and durably, readable only by
// the agent's user (it holds credentials).
func (d *Dir) Save(name string, data []byte) error {
	p, err := d.file(name)
	if err != nil {
		return err
	}
	tmp := filepath.Join(d.path, "."+name+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("save %s: %w", name, err)
	}
	_, err = f.Write(data)
	if err == nil && !d.noSync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save %s: %w", name, err)
	}
	if !d.noSync {
		return SyncDir(d.path)
	}
	return nil
}

// Remove deletes name; a missing file is not an error.
func (d *Dir) Remove(name string) error {
	p, err := d.file(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	if !d.noSync {
		return SyncDir(d.path)
	}
	return nil
}

// SyncDir fsyncs a directory, making renames and creations in it durable.
func SyncDir(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", path, err)
	}
	return nil
}
