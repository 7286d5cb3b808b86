package daemon

import (
	"context"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

func TestWatchdogPingsOnlyWhileAlive(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "20000")
	sdNotify("READY=1")
	buf := make([]byte, 64)
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := conn.Read(buf); err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("got %q, %v", buf[:n], err)
	}
	var alive atomic.Bool
	var asked atomic.Int64 // ticks at which the watchdog asked alive
	alive.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go watchdog(ctx, func() bool { asked.Add(1); return alive.Load() })
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := conn.Read(buf); err != nil || string(buf[:n]) != "WATCHDOG=1" {
		t.Fatalf("got %q, %v", buf[:n], err)
	}
	// waitTicks waits until the watchdog asked alive n times in all. The
	// loop sends a tick's ping before it waits for the next tick, and a
	// unixgram send is in the receiver's buffer when it returns: once a
	// tick has asked, every earlier tick's ping can be read.
	waitTicks := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for asked.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("the watchdog asked %d times in 5 s, want %d", asked.Load(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	drain := func() (pings int) {
		for {
			conn.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			if _, err := conn.Read(buf); err != nil {
				return pings
			}
			pings++
		}
	}
	alive.Store(false)
	// Ticks that asked before the switch may have pinged: drain them.
	waitTicks(asked.Load() + 1)
	drain()
	// Five ticks that saw a stuck agent: no ping.
	waitTicks(asked.Load() + 6)
	if n := drain(); n != 0 {
		t.Fatalf("a stuck agent pinged the watchdog %d times", n)
	}
}
