package statedir

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestSaveLoad(t *testing.T) {
	d, err := Open(filepath.Join(t.TempDir(), "state"), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Load("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
	if err := d.Save("cred", []byte("secret")); err != nil {
		t.Fatal(err)
	}
	if err := d.Save("cred", []byte("secret2")); err != nil {
		t.Fatal(err)
	}
	b, err := d.Load("cred")
	if err != nil || string(b) != "secret2" {
		t.Fatalf("load = %q, %v", b, err)
	}
	st, _ := os.Stat(filepath.Join(d.Path(), "cred"))
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	for _, bad := range []string{"", "../x", "a/b", ".hidden"} {
		if err := d.Save(bad, nil); err == nil {
			t.Errorf("Save(%q) accepted", bad)
		}
	}
	if err := d.Remove("cred"); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove("cred"); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}

func TestOpenRemovesInterruptedWrites(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, ".cred.tmp"), []byte("torn"), 0o600)
	if _, err := Open(dir, true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ".cred.tmp")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("leftover temporary file kept")
	}
}
