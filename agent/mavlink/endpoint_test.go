package mavlink

import "testing"

func TestEndpointURLs(t *testing.T) {
	for _, good := range []string{"udp-client://127.0.0.1:14550", "tcp://127.0.0.1:5760", "serial:///dev/ttyS1:921600"} {
		if _, err := parseLink(good); err != nil {
			t.Errorf("%s: %v", good, err)
		}
	}
	for _, bad := range []string{"", "udp://", "http://x:1", "tcp://host", "serial:///dev/ttyS1", "serial:///dev/ttyS1:fast", "udp-client://h:1/path"} {
		if _, err := parseLink(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
