package cli_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/internal/syncbuf"
	"github.com/hangarfleet/hangar/proto"
)

// events: newest first, filtered by severity and device; --follow prints
// what arrives after, oldest first, until stopped.
func TestEventsNewestFirstAndFollow(t *testing.T) {
	c := startServer(t)
	ctx := context.Background()
	db := c.srv.Store()
	if _, err := db.Enroll(ctx, store.Enrollment{ID: "d1", CredHash: []byte("x"), Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
	seq := uint64(0)
	emit := func(msg string, sev proto.Severity) {
		t.Helper()
		seq++
		ev := proto.Event{Boot: 1, Seq: seq, Time: time.Now().UnixMilli(), Kind: proto.EventAlert, Severity: sev, Message: msg}
		if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestEvent, Event: &ev, Received: time.Now()}}); err != nil {
			t.Fatal(err)
		}
	}
	emit("first", proto.SevInfo)
	emit("second", proto.SevWarning)
	emit("third", proto.SevInfo)
	out, _, err := run(t, c, "events", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var evs []store.Event
	if err := json.Unmarshal([]byte(out), &evs); err != nil || len(evs) != 3 || evs[0].Message != "third" || evs[2].Message != "first" {
		t.Fatalf("newest first: %v %s", err, out)
	}
	out, _, err = run(t, c, "events", "--severity", "warning", "--since", "1h", "--device", "d1")
	if err != nil || !strings.Contains(out, "second") || strings.Contains(out, "first") || strings.Contains(out, "third") {
		t.Fatalf("warnings only: %v\n%s", err, out)
	}
	if _, _, err := run(t, c, "events", "--severity", "loud"); err == nil || !strings.Contains(err.Error(), "severity") {
		t.Errorf("a bad severity: %v", err)
	}
	// --follow
	fctx, cancel := context.WithCancel(ctx)
	var buf syncbuf.Buffer
	done := make(chan error, 1)
	go func() {
		env := map[string]string{"HANGAR_SERVER": c.url}
		done <- cli.Run(fctx, []string{"events", "--follow", "--interval", "20ms", "--limit", "2",
			"--token-file", filepath.Join(c.dataDir, server.AdminTokenFile)},
			cli.Env{Stdout: &buf, Stderr: &buf, Getenv: func(k string) string { return env[k] }})
	}()
	waitOut := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(buf.String(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("--follow did not print %q:\n%s", what, buf.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitOut("third")
	emit("fourth", proto.SevCritical)
	emit("fifth", proto.SevInfo)
	waitOut("fifth")
	cancel()
	if err := <-done; err != nil {
		t.Errorf("follow ended with %v", err)
	}
	got := buf.String()
	if strings.Contains(got, "first") || strings.Index(got, "second") > strings.Index(got, "third") ||
		strings.Index(got, "third") > strings.Index(got, "fourth") || strings.Index(got, "fourth") > strings.Index(got, "fifth") {
		t.Errorf("follow: the last 2, then the new ones, oldest first:\n%s", got)
	}
}

// device ls pages and says where it is in the list.
func TestDeviceListPaging(t *testing.T) {
	c := startServer(t)
	for _, id := range []string{"drone-a", "drone-b", "drone-c"} {
		if _, _, err := run(t, c, "device", "add", id); err != nil {
			t.Fatal(err)
		}
	}
	out, errOut, err := run(t, c, "device", "ls", "--sort", "-id", "--limit", "2")
	if err != nil || !strings.Contains(errOut, "1–2 of 3 devices") || strings.Index(out, "drone-c") > strings.Index(out, "drone-b") || strings.Contains(out, "drone-a") {
		t.Errorf("first page: %v\n%s%s", err, out, errOut)
	}
	out, _, err = run(t, c, "device", "ls", "--sort", "-id", "--limit", "2", "--offset", "2")
	if err != nil || !strings.Contains(out, "drone-a") || strings.Contains(out, "drone-b") {
		t.Errorf("second page: %v\n%s", err, out)
	}
	if _, _, err := run(t, c, "device", "ls", "--sort", "battery"); err == nil || !strings.Contains(err.Error(), "sort") {
		t.Errorf("an unknown sort: %v", err)
	}
}
