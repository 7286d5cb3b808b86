package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestPortIsBindableAndBelowEphemeral(t *testing.T) {
	low := ephemeralLow()
	for range 20 {
		p, err := Port()
		if err != nil {
			t.Fatal(err)
		}
		if low-lowest >= 1000 && (p < lowest || p >= low) {
			t.Fatalf("port %d outside [%d, %d)", p, lowest, low)
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			t.Fatalf("port %d not bindable: %v", p, err)
		}
		ln.Close()
	}
}
