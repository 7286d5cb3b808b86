package mqtt

import (
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/agent/transport"
)

// A broker (or whoever sits in its place) that announces a 200 MiB packet
// after CONNACK: the agent ends the connection at the header, without
// allocating what was announced.
func TestBrokerOversizedPacketRefused(t *testing.T) {
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
		var hdr [2]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		io.CopyN(io.Discard, c, int64(hdr[1]))                    // the CONNECT (short)
		c.Write([]byte{0x20, 0x02, 0x00, 0x00})                   // CONNACK, accepted
		c.Write([]byte{0x30, 0x80, 0x80, 0x80, 0x64, 0x00, 0x01}) // PUBLISH of 200 MiB, announced
		time.Sleep(10 * time.Second)
	}()
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	conn, err := (&Transport{ConnectTimeout: 5 * time.Second}).Connect(t.Context(), transport.ConnectParams{
		URL: "tcp://" + ln.Addr().String(), ClientID: "d1", Username: "d1", Password: "pw"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	select {
	case <-conn.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection survived a 200 MiB packet announcement")
	}
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Fatalf("%d MB allocated for an announced packet", grew>>20)
	}
}

// FuzzBoundedScan: the framing scanner never panics, and its verdict on a
// stream does not depend on how the reads split it.
func FuzzBoundedScan(f *testing.F) {
	f.Add([]byte{0x20, 0x02, 0x00, 0x00, 0x30, 0x03, 0, 1, 'x'}, uint8(3))
	f.Add([]byte{0x30, 0x80, 0x80, 0x80, 0x64}, uint8(1))
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}, uint8(2))
	f.Fuzz(func(t *testing.T, stream []byte, split uint8) {
		whole := &boundedConn{max: 1 << 10}
		errWhole := whole.scan(stream)
		parts := &boundedConn{max: 1 << 10}
		var errParts error
		step := int(split)%7 + 1
		for i := 0; i < len(stream) && errParts == nil; i += step {
			errParts = parts.scan(stream[i:min(i+step, len(stream))])
		}
		if (errWhole == nil) != (errParts == nil) {
			t.Fatalf("whole: %v, in parts of %d: %v", errWhole, step, errParts)
		}
	})
}
