package mqttlite

import (
	"context"
	"errors"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/transport"
)

// fakeBroker answers CONNECT with the bytes of reply, then with after and
// holds the connection open, reading nothing more, until the test ends (or
// closes it when after is nil).
func fakeBroker(t *testing.T, reply, after []byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	quit := make(chan struct{})
	t.Cleanup(func() { close(quit); ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 512)
		if _, err := c.Read(buf); err != nil {
			return
		}
		c.Write(reply)
		if after != nil {
			c.Write(after)
			<-quit
		}
	}()
	return "tcp://" + ln.Addr().String()
}

var connack = []byte{0x20, 2, 0, 0}

func TestRefusesOversizedPacket(t *testing.T) {
	// A PUBLISH announcing 200 MB: the connection ends, nothing that size
	// is allocated.
	url := fakeBroker(t, connack, []byte{0x30, 0x80, 0x80, 0x80, 0x64})
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	c, err := (&Transport{}).Connect(context.Background(), transport.ConnectParams{URL: url, ClientID: "x"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("an oversized packet did not end the connection")
	}
	runtime.ReadMemStats(&after)
	if err := c.(*conn).err; err == nil || !strings.Contains(err.Error(), "over") {
		t.Fatalf("err %v, want the size refusal", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 16<<20 {
		t.Fatalf("%d bytes allocated while refusing a 200 MB packet", n)
	}
}

func TestHandshakeMistakes(t *testing.T) {
	for name, tc := range map[string]struct {
		reply []byte
		want  string
	}{
		"not a connack":   {[]byte{0xd0, 0}, "before CONNACK"},
		"refused":         {[]byte{0x20, 2, 0, 3}, "refused"},
		"truncated":       {[]byte{0x20, 2, 0}, "EOF"},
		"bad length":      {[]byte{0x20, 0xff, 0xff, 0xff, 0xff, 0x01}, "malformed remaining length"},
		"bad credentials": {[]byte{0x20, 2, 0, 4}, transport.ErrNotAuthorized.Error()},
	} {
		t.Run(name, func(t *testing.T) {
			url := fakeBroker(t, tc.reply, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			c, err := (&Transport{}).Connect(ctx, transport.ConnectParams{URL: url, ClientID: "x"})
			if err == nil {
				c.Close()
				t.Fatal("connected")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := (&Transport{}).Connect(context.Background(), transport.ConnectParams{URL: "ws://x:1"}); err == nil || !strings.Contains(err.Error(), "scheme") {
		t.Fatalf("ws:// scheme: %v", err)
	}
}

// TestCloseDoesNotWaitForAStuckWrite: a peer that stopped reading leaves a
// publish blocked in its write; Close ends it at once instead of waiting
// for the write timeout.
func TestCloseDoesNotWaitForAStuckWrite(t *testing.T) {
	url := fakeBroker(t, connack, []byte{}) // answers CONNECT, then reads nothing
	c, err := (&Transport{ConnectTimeout: 30 * time.Second}).Connect(context.Background(), transport.ConnectParams{URL: url, ClientID: "x"})
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 512<<10)
	stuck := make(chan transport.Token, 1)
	go func() {
		var tok transport.Token
		for range 64 { // far more than the socket buffers hold
			tok = c.Publish("a/b", big)
		}
		stuck <- tok
	}()
	waitStuckWrite(t)
	closed := make(chan struct{})
	go func() { c.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second): // the peer never hangs up; the write timeout is 30 s
		t.Fatal("Close waited for a stuck write")
	}
	select {
	case tok := <-stuck:
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := tok.Wait(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("publish on a closed connection: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stuck publish did not return after Close")
	}
}

// waitStuckWrite waits until a goroutine is parked in a write of the
// connection, waiting for the socket to take more bytes.
func waitStuckWrite(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, "waitWrite") && strings.Contains(g, "mqttlite.(*conn).write") {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no write stuck after 10 s:\n%s", buf[:n])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A SUBACK with a failure code other than 0x80 (mochi answers 0x91 when it
// takes the packet id for one of its own in flight) is no subscription.
func TestSubackFailureCodes(t *testing.T) {
	for _, code := range []byte{0x80, 0x91} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			buf := make([]byte, 512)
			if _, err := c.Read(buf); err != nil { // CONNECT
				return
			}
			c.Write(connack)
			n, err := c.Read(buf) // SUBSCRIBE: 0x82, length, packet id
			if err != nil || n < 4 || buf[0] != 0x82 {
				return
			}
			c.Write([]byte{0x90, 3, buf[2], buf[3], code})
			c.Read(buf) // hold the connection until the client closes it
		}()
		cn, err := (&Transport{}).Connect(context.Background(), transport.ConnectParams{URL: "tcp://" + ln.Addr().String(), ClientID: "x"})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = cn.Subscribe(ctx, "dev/x/cmd")
		cancel()
		cn.Close()
		if err == nil || !strings.Contains(err.Error(), "refused") {
			t.Errorf("SUBACK code %#x: %v, want refused", code, err)
		}
	}
}
