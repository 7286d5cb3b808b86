package mqtt

import (
	"slices"
	"testing"
)

// A list of a cluster's nodes is tried from a random one on, all of them
// once.
func TestBrokerOrder(t *testing.T) {
	list := "tcp://a:1883, tcp://b:1883,tcp://c:1883,"
	for start, want := range [][]string{
		{"tcp://a:1883", "tcp://b:1883", "tcp://c:1883"},
		{"tcp://b:1883", "tcp://c:1883", "tcp://a:1883"},
		{"tcp://c:1883", "tcp://a:1883", "tcp://b:1883"},
	} {
		got := brokerOrder(list, func(n int) int {
			if n != 3 {
				t.Fatalf("picked among %d", n)
			}
			return start
		})
		if !slices.Equal(got, want) {
			t.Errorf("start %d: %v, want %v", start, got, want)
		}
	}
	if got := brokerOrder("tls://one:8883", nil); !slices.Equal(got, []string{"tls://one:8883"}) {
		t.Errorf("one broker: %v", got)
	}
}
