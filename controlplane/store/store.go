// Package store defines the records the control plane keeps: devices and
// their credentials, telemetry, device events and audit entries. The SQLite
// implementation is in store/sqlite; code that needs storage declares the
// small interface it uses next to itself.
package store

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// Sentinel errors callers branch on.
var (
	ErrNotFound = errors.New("not found")
	ErrRevoked  = errors.New("device revoked")
	ErrExists   = errors.New("already exists")
	ErrInvalid  = errors.New("invalid")
	// ErrEnrolled: the device id is enrolled (and not revoked); its own
	// enrollment may not re-key it unless an operator allowed it.
	ErrEnrolled = errors.New("device already enrolled")
	// ErrConflict: the record changed since it was read; read it again.
	ErrConflict = errors.New("changed meanwhile")
	// ErrFenced: the write was made under a lease that is no longer held.
	ErrFenced = errors.New("lease lost: write refused")
)

// Lease is a named lease in the store: the replica holding it runs the
// work it names (the rollout scheduler) until Expires. Token grows with
// every new holder; writes made under the lease carry it (WithFence), and
// the store refuses them once another holder has it or it lapsed.
type Lease struct {
	Name    string    `json:"name"`
	Holder  string    `json:"holder"`
	Token   int64     `json:"token"`
	Expires time.Time `json:"expires"`
}

type fenceKey struct{}

// WithFence marks writes made with ctx as made under lease l: each is
// stored only if l is still held, by the store's clock.
func WithFence(ctx context.Context, l Lease) context.Context {
	return context.WithValue(ctx, fenceKey{}, l)
}

// FenceFrom returns the lease ctx writes under, if any.
func FenceFrom(ctx context.Context) (Lease, bool) {
	l, ok := ctx.Value(fenceKey{}).(Lease)
	return l, ok
}

// Device is one drone as the control plane knows it. Its Labels are the
// operators': selectors, rollout strata and budgets read them and nothing
// the device says changes them. What the device reports about itself
// (Hardware, ReportedLabels, Version, Payloads) is evidence, kept apart.
type Device struct {
	ID       string            `json:"id"`
	Labels   map[string]string `json:"labels"`             // set by operators
	Hardware string            `json:"hardware,omitempty"` // reported by the device
	// ReportedLabels are the labels the device asserts about itself.
	ReportedLabels map[string]string `json:"reported_labels,omitempty"`
	// HardwareMismatch: the operators' hw label and the hardware the
	// device reports differ; rollouts of hardware-specific releases leave
	// it out until someone looks.
	HardwareMismatch bool `json:"hardware_mismatch,omitempty"`
	// AwaitingEnrollment: pre-provisioned by an operator (labels, no
	// credential); the device's first enrollment takes this record.
	AwaitingEnrollment bool              `json:"awaiting_enrollment,omitempty"`
	Arch               string            `json:"arch,omitempty"`
	Version            string            `json:"version"`
	Release            uint64            `json:"release,omitempty"`
	Online             bool              `json:"online"`
	Revoked            bool              `json:"revoked,omitempty"`
	EnrolledAt         *time.Time        `json:"enrolled_at,omitempty"`
	FirstSeen          *time.Time        `json:"first_seen,omitempty"`
	LastSeen           *time.Time        `json:"last_seen"`
	Boot               uint64            `json:"boot_epoch,omitempty"`
	Proto              uint16            `json:"protocol,omitempty"`
	Payloads           map[string]string `json:"payloads,omitempty"`
	// Builds are the SHA-256 digests (hex) of the files in place, by
	// target, as the device last reported them: what a delta patches.
	Builds map[string]string `json:"builds,omitempty"`
	// DeltaMax is the largest build the device's agent makes of a patch
	// (0: full artifacts only).
	DeltaMax uint64         `json:"delta_max,omitempty"`
	Dropped  uint64         `json:"dropped_samples"` // samples the agent's outbox dropped, total reported
	Latest   *proto.Reading `json:"latest,omitempty"`
	// Auth is how the device last authenticated to the broker: AuthCert,
	// AuthPassword, or "" (not yet).
	Auth string `json:"auth,omitempty"`
	// CertNotAfter is when its current certificate expires.
	CertNotAfter *time.Time `json:"cert_not_after,omitempty"`
	// Pending is an enrollment held for an operator's approval.
	Pending *Pending `json:"pending,omitempty"`
}

// How a device authenticates.
const (
	AuthCert     = "certificate"
	AuthPassword = "password"
)

// Pending is an enrollment waiting for an operator (hangar device approve):
// a new device, or a known one asking for a new key. It is bound to the
// key that asked: only that key's enrollment completes once approved.
type Pending struct {
	Key      string    `json:"key"` // fingerprint of the requesting key (devcert.Fingerprint)
	Since    time.Time `json:"since"`
	Remote   string    `json:"remote,omitempty"`
	Approved bool      `json:"approved,omitempty"`
	// New: this call made the request (Pend), rather than finding it.
	New bool `json:"-"`
}

// DeviceAuth is what the broker needs to decide a device's CONNECT.
type DeviceAuth struct {
	PasswordHash []byte   // nil: no password credential
	Serials      []string // certificate serials it may present (current, then the one before a renewal)
	Revoked      bool
	Auth         string // how it last authenticated
	// Passwords says whether password authentication is on for the fleet.
	Passwords bool
}

// Renewal records a certificate issued to an enrolled device over its
// authenticated connection.
type Renewal struct {
	Device   string
	From     string // serial of the certificate the request came with ("" for a password connection)
	Serial   string
	Key      string // fingerprint of the new certificate's key
	NotAfter time.Time
	Now      time.Time
}

// HardwareLabel is the operators' label naming a device's hardware
// revision; a release's hardware list is matched against it.
const HardwareLabel = "hw"

// Mismatch says whether the operators' hardware label and what the device
// reports disagree (both known, different).
func Mismatch(labels map[string]string, reported string) bool {
	hw := labels[HardwareLabel]
	return hw != "" && reported != "" && hw != reported
}

// DeviceFilter selects devices. Zero values match everything.
type DeviceFilter struct {
	Labels  map[string]string // all must match the effective labels
	Online  *bool
	Version string
	IDs     []string // only these devices (none: any)
	// Search: only ids containing this text (case-insensitive).
	Search string
	// Sort is one of DeviceSorts, "-" before it for descending order
	// (default: id).
	Sort   string
	Limit  int
	Offset int
	// Pending: only enrollments awaiting approval.
	Pending bool
	// Auth: only devices that last authenticated this way.
	Auth string
	// Brief fills only id, version, labels, revoked and online: what a
	// rollout plan reads, at a fraction of the cost for a whole fleet.
	Brief bool
}

// DeviceSorts are the orders a device list can take.
var DeviceSorts = []string{"id", "last_seen", "version", "hardware", "enrolled_at"}

// Enrollment creates or re-keys a device.
type Enrollment struct {
	ID       string
	Hardware string            // reported by the device (enroll); for an operator's add, the hw label
	Labels   map[string]string // reported by the device (enroll) or set by an operator (add)
	// Profile holds the labels of the enrollment profile whose token the
	// device used: operator labels given to a device enrolling for the
	// first time (labels pre-provisioned for it win).
	Profile  map[string]string
	Operator bool   // an operator's add: Labels are operator labels, and a revoked device is reinstated
	CredHash []byte // SHA-256 of the MQTT password; nil with Operator: pre-provision, awaiting enrollment
	// CertSerial and CertNotAfter: a certificate issued for the device
	// (instead of a password; CredHash is then nil).
	CertSerial   string
	CertNotAfter time.Time
	// Key is the fingerprint of the key the device enrolls with: an
	// enrollment an operator approved for that key may re-key an enrolled
	// device.
	Key string
	Now time.Time
}

// LabelChange sets and removes operator labels of a device.
type LabelChange struct {
	Device string            `json:"id"`
	Set    map[string]string `json:"set,omitempty"`
	Remove []string          `json:"remove,omitempty"`
}

// Profile is a named enrollment token: a device that enrolls with it gets
// the profile's labels.
type Profile struct {
	Name    string            `json:"name"`
	Labels  map[string]string `json:"labels"`
	Created time.Time         `json:"created"`
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
	// Refused counts update reports whose boot epoch is ahead of both the
	// device's current connection and the control plane's clock (plus the
	// allowance): stored as events, not believed.
	Refused int
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

// EventFilter selects device events.
type EventFilter struct {
	Device        string // one device (empty: all)
	After, Before int64  // ids strictly between (0: no bound)
	Since, Until  time.Time
	Kind          string // proto.EventKind name (empty: any)
	MinSeverity   string // info, warning or critical (empty: any)
	Newest        bool   // newest first (default oldest first, for a cursor)
	Limit         int
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

// AuditVerification is the result of walking the audit log's hash chain.
type AuditVerification struct {
	Entries int64       `json:"entries"`
	HeadID  int64       `json:"head_id"`
	Head    []byte      `json:"head"`             // the last entry's hash: keep it elsewhere to check later
	Broken  *AuditBreak `json:"broken,omitempty"` // the first entry where the chain breaks
	At      []byte      `json:"at,omitempty"`     // the hash of the entry asked about
}

// AuditBreak is where the audit chain first breaks, and why.
type AuditBreak struct {
	ID  int64  `json:"id"`
	Why string `json:"why"`
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
	// Deltas are the patches pushed for the release, one per base build.
	Deltas []ReleaseDelta `json:"deltas,omitempty"`
}

// ReleaseDelta is a pushed, verified delta of a release: a BSDIFF40 patch
// from a base build to the release's, with its own signed manifest (the
// release's, with proto.Delta set).
type ReleaseDelta struct {
	Target      string    `json:"target"`
	Version     string    `json:"version"`
	BaseSHA256  string    `json:"base_sha256"` // hex
	BaseSize    uint64    `json:"base_size"`
	BaseVersion string    `json:"base_version,omitempty"`
	PatchSHA256 string    `json:"patch_sha256"` // hex
	PatchSize   uint64    `json:"patch_size"`
	PushedAt    time.Time `json:"pushed_at"`
	PushedBy    string    `json:"pushed_by"`
	Manifest    []byte    `json:"-"` // signed
}

// RolloutRow is a rollout as stored: spec and state as JSON (the rollout
// package owns their shape), members apart.
type RolloutRow struct {
	ID        string
	Spec      []byte
	State     []byte
	Status    string
	Created   time.Time
	CreatedBy string
	Updated   time.Time
	// Rev counts the rollout's stored changes: a change planned from
	// revision Rev is stored only if nothing was stored since.
	Rev int64
}

// MemberRow is one device's place in a rollout (rollout.Member, as stored).
type MemberRow struct {
	Device     string
	Stage      int
	Offered    int64 // unix ms of the latest offer; 0: never offered
	Offers     int   // offers made (a withdrawn or cancelled offer is made again on resume)
	Withdrawn  int64 // unix ms the unacknowledged offer was withdrawn
	Reverted   int64
	Canceled   int64
	ReplacedBy string // a canary member that stayed unreachable: who took its place
	Replaces   string // the canary member this one replaced
}

// RolloutChange is one decision of the rollout engine, stored in one
// transaction before anything of it is sent.
type RolloutChange struct {
	ID       string
	State    []byte
	Status   string
	Members  []MemberRow // changed members only
	Commands []Command   // to send once stored
	// Withdraw lists commands that must not be sent any more: offers the
	// device never acknowledged, withdrawn when the rollout paused or
	// aborted. A command acknowledged meanwhile is left as it is.
	Withdraw []string
	Audits   []Audit
	Now      time.Time
	// Rev is the revision the change was planned from (RolloutRow.Rev):
	// if another change was stored since (an operator on another replica,
	// a scheduler that lost its lease), this one is refused with
	// ErrConflict and nothing of it is written.
	Rev int64
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
	// Committed is when the device first reported it committed.
	Committed *time.Time `json:"committed,omitempty"`
	// Patch is the size of the delta the device fetched instead of the
	// full artifact (0: the full artifact).
	Patch uint64 `json:"patch,omitempty"`
	// Fallback says why the device gave the delta up for the full
	// artifact.
	Fallback string `json:"fallback,omitempty"`
}

// Via says how the device fetched the release.
type Via string

// How a release is fetched.
const (
	ViaFull     Via = "full"     // the full artifact
	ViaDelta    Via = "delta"    // a delta
	ViaFallback Via = "fallback" // a delta, given up for the full artifact
)

// Via is how the device fetched the release, from its reports.
func (u DeviceUpdate) Via() Via {
	switch {
	case u.Fallback != "":
		return ViaFallback
	case u.Patch > 0:
		return ViaDelta
	}
	return ViaFull
}

// Transferred is the bytes the device fetches over the air for a release
// of size bytes: the patch of a delta, the full artifact, or both when it
// fell back.
func (u DeviceUpdate) Transferred(size uint64) uint64 {
	switch u.Via() {
	case ViaFallback:
		return u.Patch + size
	case ViaDelta:
		return u.Patch
	}
	return size
}

// ArtifactURL is the path devices download a release's artifact from.
func ArtifactURL(target, version string) string {
	return "/api/v1/releases/" + target + "/" + version + "/artifact"
}

// DeltaURL is the path devices download a delta of a release from,
// named by the patch's digest (hex).
func DeltaURL(target, version, patchSHA256 string) string {
	return "/api/v1/releases/" + target + "/" + version + "/deltas/" + patchSHA256 + "/artifact"
}

// Offer is the update offer of a release: its full artifact.
func (r Release) Offer() *proto.UpdateOffer {
	return &proto.UpdateOffer{Manifest: r.Manifest, Keys: r.Keys, URL: ArtifactURL(r.Target, r.Version)}
}

// DeviceBuilds is what a device reports that decides whether it can take
// a delta: the digests of its builds in place and the largest result its
// agent patches.
type DeviceBuilds struct {
	Builds   map[string]string // target → hex SHA-256
	DeltaMax uint64
}

// DeviceBuilds is what d reported of its builds.
func (d Device) DeviceBuilds() DeviceBuilds {
	return DeviceBuilds{Builds: d.Builds, DeltaMax: d.DeltaMax}
}

// OfferFor chooses what to offer a device for a release: the delta whose
// base is the build the device reports for the release's target, when the
// device patches builds of the release's size and full is not asked;
// otherwise the full artifact. It returns the offer and the delta chosen
// (nil: the full artifact). A delta offer names the full artifact as its
// fallback. The device's claim is only a hint: the agent checks the base
// itself, and falls back to the full artifact when it differs.
func OfferFor(rel Release, deltas []ReleaseDelta, dev DeviceBuilds, full bool) (*proto.UpdateOffer, *ReleaseDelta) {
	base := dev.Builds[rel.Target]
	if full || base == "" || dev.DeltaMax == 0 || dev.DeltaMax < rel.Size {
		return rel.Offer(), nil
	}
	for i := range deltas {
		d := &deltas[i]
		if strings.EqualFold(d.BaseSHA256, base) && d.Target == rel.Target && d.Version == rel.Version && len(d.Manifest) > 0 {
			return &proto.UpdateOffer{Manifest: d.Manifest, Keys: rel.Keys, URL: DeltaURL(rel.Target, rel.Version, d.PatchSHA256),
				FullURL: ArtifactURL(rel.Target, rel.Version)}, d
		}
	}
	return rel.Offer(), nil
}

// Roles of API tokens, from least to most allowed: a viewer reads; an
// operator also runs rollouts, updates devices, pushes releases and
// labels devices; an admin also manages tokens, enrollment, approvals,
// revocation and the release key list.
const (
	RoleViewer   = "viewer"
	RoleOperator = "operator"
	RoleAdmin    = "admin"
)

// RoleRank orders roles (0: not a role).
func RoleRank(role string) int {
	switch role {
	case RoleViewer:
		return 1
	case RoleOperator:
		return 2
	case RoleAdmin:
		return 3
	}
	return 0
}

// APIToken is a named operator token. Only the SHA-256 of its secret is
// stored.
type APIToken struct {
	Name      string     `json:"name"`
	Role      string     `json:"role"`
	Hash      []byte     `json:"-"`
	Created   time.Time  `json:"created"`
	CreatedBy string     `json:"created_by"`
	Expires   *time.Time `json:"expires,omitempty"`
	Revoked   *time.Time `json:"revoked,omitempty"`
	LastUsed  *time.Time `json:"last_used,omitempty"`
}

// Valid reports whether the token may be used at now.
func (t APIToken) Valid(now time.Time) bool {
	return t.Revoked == nil && (t.Expires == nil || now.Before(*t.Expires))
}

// LiveMarks are watermarks of what changes in the store: the console's
// live stream compares them from one second to the next and tells its
// clients which views to refresh.
type LiveMarks struct {
	Event    int64  // highest event id
	Audit    int64  // highest audit entry id
	Rollouts int64  // latest rollout update (unix ms)
	Releases int64  // releases and deltas pushed
	Fleet    string // devices, online, revoked and versions, summarised
	LastSeen int64  // latest device contact (unix ms): telemetry arrived
}
