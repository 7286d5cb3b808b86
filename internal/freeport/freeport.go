// Package freeport finds a loopback TCP port for a child process to bind
// (a control plane, a broker) in tests, demos and benchmarks.
//
// A port found with Listen(":0") comes from the kernel's ephemeral range,
// the same range outgoing connections take their local ports from: with a
// simulated fleet dialling out in parallel, the port is often gone again by
// the time the child binds it. Ports here come from below that range, so
// only another listener can take one; callers still retry a failed bind.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
)

const lowest = 10000

// ephemeralLow is the first port of the kernel's ephemeral range.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		return 32768
	}
	return n
}

// Addr returns "127.0.0.1:PORT" for a port free at the time of the call.
func Addr() (string, error) {
	p, err := Port()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)), nil
}

// Port returns a loopback port free at the time of the call, below the
// ephemeral range where there is room for one.
func Port() (int, error) {
	ln, err := Listen()
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Listen listens on a loopback port below the ephemeral range where there
// is room for one: a listener that is closed and opened again on the same
// address (a restart) then does not find its port taken by an outgoing
// connection meanwhile.
func Listen() (net.Listener, error) {
	if hi := ephemeralLow(); hi-lowest >= 1000 {
		for range 64 {
			p := lowest + rand.IntN(hi-lowest)
			if ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p))); err == nil {
				return ln, nil
			}
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("find a free port: %w", err)
	}
	return ln, nil
}
