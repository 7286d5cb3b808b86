package proto

import (
	"errors"
	"fmt"
	"strings"
)

// TopicPrefix is the versioned root of every hangar topic. A device owns the
// subtree TopicPrefix + "/dev/<id>/" and nothing else.
const TopicPrefix = "hangar/v1"

// Kind names the last level of a device topic.
type Kind string

// Device topic kinds. Devices publish State, Telemetry and Event; the control
// plane publishes Cmd.
const (
	KindState     Kind = "state"     // State messages (hello, goodbye, last will); device -> server
	KindTelemetry Kind = "telemetry" // Batch messages; device -> server
	KindEvent     Kind = "event"     // Event messages; device -> server
	KindCmd       Kind = "cmd"       // Command messages; server -> device
	// KindCSR carries CertRequest messages (device -> server): a device
	// asking, over its authenticated connection, for a new certificate.
	KindCSR Kind = "csr"
)

// DeviceKinds lists the kinds a device publishes.
var DeviceKinds = []Kind{KindState, KindTelemetry, KindEvent, KindCSR}

// MaxDeviceIDLen bounds a device id; it keeps topics short and ids usable as
// file names.
const MaxDeviceIDLen = 64

// ErrBadDeviceID is returned for an id that is empty, too long or holds a
// character outside [A-Za-z0-9._-].
var ErrBadDeviceID = errors.New("invalid device id")

// ValidateDeviceID checks that id can be used as an MQTT client id, a single
// topic level and a file name: 1 to 64 characters from [A-Za-z0-9._-], not
// starting with '.' or '-'. MQTT wildcards, '/', '$' and control characters
// are therefore impossible.
func ValidateDeviceID(id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty", ErrBadDeviceID)
	}
	if len(id) > MaxDeviceIDLen {
		return fmt.Errorf("%w: longer than %d characters", ErrBadDeviceID, MaxDeviceIDLen)
	}
	if id[0] == '.' || id[0] == '-' {
		return fmt.Errorf("%w: %q starts with %q", ErrBadDeviceID, id, id[0])
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("%w: %q has %q at %d", ErrBadDeviceID, id, c, i)
		}
	}
	return nil
}

// DeviceTopic returns the topic of kind k for device id.
func DeviceTopic(id string, k Kind) string {
	return TopicPrefix + "/dev/" + id + "/" + string(k)
}

// DeviceSubtree returns the filter that matches every topic of device id.
func DeviceSubtree(id string) string { return TopicPrefix + "/dev/" + id + "/#" }

// AllDevices returns the filter that matches kind k of every device.
func AllDevices(k Kind) string { return TopicPrefix + "/dev/+/" + string(k) }

// ErrBadTopic is returned by ParseTopic for a topic outside the device layout.
var ErrBadTopic = errors.New("not a hangar device topic")

// ParseTopic splits a device topic into device id and kind. It accepts only
// TopicPrefix/dev/<valid id>/<known kind>.
func ParseTopic(topic string) (id string, k Kind, err error) {
	rest, ok := strings.CutPrefix(topic, TopicPrefix+"/dev/")
	if !ok {
		return "", "", fmt.Errorf("%w: %q", ErrBadTopic, topic)
	}
	id, kind, ok := strings.Cut(rest, "/")
	if !ok {
		return "", "", fmt.Errorf("%w: %q", ErrBadTopic, topic)
	}
	if err := ValidateDeviceID(id); err != nil {
		return "", "", fmt.Errorf("%w: %w", ErrBadTopic, err)
	}
	switch k = Kind(kind); k {
	case KindState, KindTelemetry, KindEvent, KindCmd, KindCSR:
		return id, k, nil
	}
	return "", "", fmt.Errorf("%w: unknown kind %q", ErrBadTopic, kind)
}

// Label limits: labels select devices for rollouts and travel in State.
const (
	MaxLabels        = 32
	MaxLabelKeyLen   = 63
	MaxLabelValueLen = 63
)

// ErrBadLabel is returned by ValidateLabels.
var ErrBadLabel = errors.New("invalid label")

func labelChars(s string, extra string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(extra, c) >= 0) {
			return false
		}
	}
	return true
}

// ValidateLabels checks a label set: at most MaxLabels, keys of 1 to 63
// characters from [A-Za-z0-9._/-], values of at most 63 from [A-Za-z0-9._-].
func ValidateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%w: %d labels, at most %d", ErrBadLabel, len(labels), MaxLabels)
	}
	for k, v := range labels {
		if k == "" || len(k) > MaxLabelKeyLen || !labelChars(k, "._/-") {
			return fmt.Errorf("%w: key %q (1-%d characters from A-Z a-z 0-9 . _ / -)", ErrBadLabel, k, MaxLabelKeyLen)
		}
		if len(v) > MaxLabelValueLen || !labelChars(v, "._-") {
			return fmt.Errorf("%w: value %q of %q (at most %d characters from A-Z a-z 0-9 . _ -)", ErrBadLabel, v, k, MaxLabelValueLen)
		}
	}
	return nil
}

// ParseSelector parses "k=v,k2=v2" into labels. An empty string is the
// empty selector, which matches everything.
func ParseSelector(s string) (map[string]string, error) {
	out := map[string]string{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, part := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, fmt.Errorf("%w: %q is not key=value", ErrBadLabel, part)
		}
		if _, dup := out[k]; dup {
			return nil, fmt.Errorf("%w: key %q given twice", ErrBadLabel, k)
		}
		out[k] = v
	}
	if err := ValidateLabels(out); err != nil {
		return nil, err
	}
	return out, nil
}
