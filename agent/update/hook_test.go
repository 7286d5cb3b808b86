package update

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/proto"
	"github.com/hangarfleet/hangar/proto/prototest"
)

// TestHookContract drives a payload install hook through each verb.
func TestHookContract(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "hook.sh")
	os.WriteFile(script, []byte(`#!/bin/sh
d=$(dirname "$0")
echo "$@" >> "$d/calls"
case "$1" in
install) cp "$2" "$d/fw.bin" && echo "$3" > "$d/current" ;;
check) [ -f "$d/healthy" ] || { echo "not healthy" >&2; exit 1; } ;;
commit) ;;
rollback) echo "1.0.0" > "$d/current" ;;
current) cat "$d/current" ;;
*) exit 2 ;;
esac
`), 0o755)
	os.WriteFile(filepath.Join(dir, "current"), []byte("1.0.0\n"), 0o644)
	art := filepath.Join(dir, "artifact")
	os.WriteFile(art, []byte("firmware 2"), 0o644)
	h := &Hook{Path: script}
	m := prototest.Manifest([]byte("firmware 2"))
	m.Target, m.Version = "fc-firmware", "2.0.0"
	ctx := context.Background()
	if h.Running(m) {
		t.Fatal("new version running before install")
	}
	if err := h.Install(ctx, m, art); err != nil {
		t.Fatal(err)
	}
	if !h.Running(m) || !h.Installed(m) {
		t.Fatal("hook install did not switch the version")
	}
	if err := h.Check(ctx, m); err == nil || !strings.Contains(err.Error(), "not healthy") {
		t.Fatalf("check of an unhealthy build: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "healthy"), nil, 0o644)
	if err := h.Check(ctx, m); err != nil {
		t.Fatalf("check: %v", err)
	}
	if err := h.Rollback(ctx, m); err != nil {
		t.Fatal(err)
	}
	if h.Running(m) {
		t.Fatal("still on the new version after rollback")
	}
	calls, _ := os.ReadFile(filepath.Join(dir, "calls"))
	for _, want := range []string{"install " + art + " 2.0.0", "check 2.0.0", "rollback 2.0.0", "current"} {
		if !strings.Contains(string(calls), want) {
			t.Errorf("hook not called with %q; calls:\n%s", want, calls)
		}
	}
	bad := &Hook{Path: filepath.Join(dir, "missing")}
	if err := bad.Install(ctx, m, art); err == nil {
		t.Fatal("a missing hook installed")
	}
	_ = proto.TargetAgent
}
