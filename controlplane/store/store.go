// Package store defines the records the control plane keeps: devices and
// their credentials, telemetry, device events and audit entries. The SQLite
// implementation is in store/sqlite; code that needs storage declares the
// small interface it uses next to itself.
package store

import (
	"errors"
	"maps"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Sentinel errors callers branch on.
var (
	ErrNotFound = errors.New("not found")
	ErrRevoked  = errors.New("device revoked")
	ErrExists   = errors.New("already exists")
)

// Device is one drone as the control plane knows it.
type Device struct {
	ID         string            `json:"id"`
	Hardware   string            `json:"hardware"`
	Arch       string            `json:"arch,omitempty"`
	Version    string            `json:"version"`
	Release    uint64            `json:"release,omitempty"`
	Labels     map[string]string `json:"labels"` // effective labels: reported, overridden by operator labels
	Online     bool              `json:"online"`
	Revoked    bool              `json:"revoked,omitempty"`
	EnrolledAt *time.Time        `json:"enrolled_at,omitempty"`
	FirstSeen  *time.Time        `json:"first_seen,omitempty"`
	LastSeen   *time.Time        `json:"last_seen"`
	Boot       uint64            `json:"boot_epoch,omitempty"`
	Proto      uint16            `json:"protocol,omitempty"`
	Payloads   map[string]string `json:"payloads,omitempty"`
	Dropped    uint64            `json:"dropped_samples"` // samples the agent's outbox dropped, total reported
	Latest     *proto.Reading    `json:"latest,omitempty"`
	// OperatorLabels are the labels set by operators; they win over what the
	// device reports about itself.
	OperatorLabels map[string]string `json:"-"`
	ReportedLabels map[string]string `json:"-"`
}

// MergeLabels returns reported overridden by operator.
func MergeLabels(reported, operator map[string]string) map[string]string {
	out := make(map[string]string, len(reported)+len(operator))
	maps.Copy(out, reported)
	maps.Copy(out, operator)
	return out
}

// DeviceFilter selects devices. Zero values match everything.
type DeviceFilter struct {
	Labels  map[string]string // all must match the effective labels
	Online  *bool
	Version string
	Limit   int
	// Brief fills only id, version, labels, revoked and online: what a
	// rollout plan reads, at a fraction of the cost for a whole fleet.
	Brief bool
}

// Enrollment creates or re-keys a device.
type Enrollment struct {
	ID       string
	Hardware string
	Labels   map[string]string // reported by the device (enroll) or set by an operator (add)
	Operator bool              // Labels are operator labels, and a revoked device is reinstated
	CredHash []byte            // SHA-256 of the MQTT password
	Now      time.Time
}

// TelemetryRow is one stored sample.
type TelemetryRow struct {
	Boot    uint64
	Seq     uint64
	Sample  proto.Sample
	Base    int64 // unix ms; Sample.T is relative to it
	Receive time.Time
}

// IngestKind says what an IngestItem carries.
type IngestKind uint8

// Kinds of ingested messages.
const (
	IngestState IngestKind = iota + 1
	IngestBatch
	IngestEvent
)

// IngestItem is one decoded device message on its way to storage.
type IngestItem struct {
	Device   string
	Kind     IngestKind
	State    *proto.State
	Batch    *proto.Batch
	Event    *proto.Event
	Received time.Time
	Raw      []byte // the message as received (telemetry is stored as sent)
}

// IngestResult reports what a group write did.
type IngestResult struct {
	Samples    int // samples stored
	Duplicates int // messages already stored (QoS1 redeliveries)
	Unknown    int // messages from devices the store does not know
	Events     int
	States     int
}

// Event is a stored device event.
type Event struct {
	ID       int64               `json:"id"`
	Device   string              `json:"device"`
	Time     time.Time           `json:"time"`
	Received time.Time           `json:"received"`
	Kind     string              `json:"kind"`
	Severity string              `json:"severity"`
	Code     string              `json:"code,omitempty"`
	Message  string              `json:"message,omitempty"`
	Cmd      string              `json:"command,omitempty"`
	Update   *proto.UpdateReport `json:"update,omitempty"`
	Attrs    map[string]string   `json:"attrs,omitempty"`
	Boot     uint64              `json:"boot_epoch"`
	Seq      uint64              `json:"seq"`
}

// Audit is something the control plane did or an operator asked for: who,
// when, what and why.
type Audit struct {
	ID     int64             `json:"id"`
	Time   time.Time         `json:"time"`
	Actor  string            `json:"actor"`
	Action string            `json:"action"`
	Target string            `json:"target,omitempty"`
	Reason string            `json:"reason,omitempty"`
	Attrs  map[string]string `json:"attrs,omitempty"`
}

// Histogram is a count per labelled bucket, in bucket order.
type Histogram []Bucket

// Bucket of a Histogram.
type Bucket struct {
	Label string `json:"label"`
	Count int    `json:"count"`
}

// FleetHealth summarises the fleet for operators.
type FleetHealth struct {
	Devices  int            `json:"devices"`
	Online   int            `json:"online"`
	Revoked  int            `json:"revoked"`
	Flying   int            `json:"flying"`
	Versions map[string]int `json:"versions"`
	Battery  Histogram      `json:"battery"`     // latest battery percentage of online devices
	Errors   Histogram      `json:"errors"`      // latest error counter of online devices
	LowBatt  int            `json:"low_battery"` // online devices under 20%
	Time     time.Time      `json:"time"`
}

// Release is a pushed, verified release.
type Release struct {
	Target   string    `json:"target"`
	Version  string    `json:"version"`
	Counter  uint64    `json:"counter"`
	Size     uint64    `json:"size"`
	SHA256   string    `json:"sha256"`
	Hardware []string  `json:"hardware"`
	Arch     []string  `json:"arch,omitempty"`
	Created  time.Time `json:"created"`
	Expires  time.Time `json:"expires"`
	KeyID    string    `json:"key_id"`
	Notes    string    `json:"notes,omitempty"`
	PushedAt time.Time `json:"pushed_at"`
	PushedBy string    `json:"pushed_by"`
	Manifest []byte    `json:"-"` // signed
	Keys     []byte    `json:"-"` // signed key list
}

// Command is a command to a device, kept until the device acknowledges it.
type Command struct {
	ID       string     `json:"id"`
	Device   string     `json:"device"`
	Kind     string     `json:"kind"`
	Body     []byte     `json:"-"` // encoded proto.Command
	Rollout  string     `json:"rollout,omitempty"`
	Created  time.Time  `json:"created"`
	Sent     *time.Time `json:"sent,omitempty"`
	Attempts int        `json:"attempts"`
	Acked    *time.Time `json:"acked,omitempty"`
}

// DeviceUpdate is where a device stands with one release, from its latest
// update report.
type DeviceUpdate struct {
	Device   string    `json:"device"`
	Target   string    `json:"target"`
	Version  string    `json:"version"`
	Counter  uint64    `json:"counter"`
	State    string    `json:"state"`
	Reason   string    `json:"reason,omitempty"`
	Check    string    `json:"check,omitempty"`
	Progress uint64    `json:"progress,omitempty"`
	Rollout  string    `json:"rollout,omitempty"`
	Boot     uint64    `json:"boot,omitempty"` // agent boot epoch of the report (filled by Trials)
	Updated  time.Time `json:"updated"`
}

// ArtifactURL is the path devices download a release's artifact from.
func ArtifactURL(target, version string) string {
	return "/api/v1/releases/" + target + "/" + version + "/artifact"
}

// Offer is the update offer of a release.
func (r Release) Offer() *proto.UpdateOffer {
	return &proto.UpdateOffer{Manifest: r.Manifest, Keys: r.Keys, URL: ArtifactURL(r.Target, r.Version)}
}
