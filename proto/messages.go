package proto

// All messages are CBOR maps with small integer keys (`keyasint`): compact on
// the wire and stable when fields are renamed. Keys are never reused. Unknown
// keys are ignored on decode so that an older control plane accepts a newer
// agent; see Decode for the limits that apply.

// FlightState is what the flight stack says the airframe is doing.
type FlightState uint8

// Flight states. Updates are installed only when Landed.
const (
	FlightUnknown FlightState = 0
	FlightLanded  FlightState = 1 // on the ground, disarmed
	FlightArmed   FlightState = 2 // on the ground, motors armed
	FlightFlying  FlightState = 3 // airborne
)

func (f FlightState) String() string {
	switch f {
	case FlightLanded:
		return "landed"
	case FlightArmed:
		return "armed"
	case FlightFlying:
		return "flying"
	}
	return "unknown"
}

// ParseFlightState is the inverse of FlightState.String.
func ParseFlightState(s string) (FlightState, bool) {
	for f := FlightUnknown; f <= FlightFlying; f++ {
		if f.String() == s {
			return f, true
		}
	}
	return FlightUnknown, false
}

// State is published on the device's state topic: with Online set when the
// agent connects (the hello), and with Online cleared as the MQTT last will
// and on a clean shutdown. Conn identifies one connection so that the last
// will of a connection that was taken over by a newer one can be ignored.
type State struct {
	Proto    uint16            `cbor:"0,keyasint"`            // ProtocolVersion of the sender
	Online   bool              `cbor:"1,keyasint"`            // false in the last will and goodbye
	Boot     uint64            `cbor:"2,keyasint"`            // boot epoch of the agent process
	Conn     uint64            `cbor:"3,keyasint"`            // connection nonce, new for every MQTT connection
	Time     int64             `cbor:"4,keyasint,omitempty"`  // unix milliseconds, device clock
	Hardware string            `cbor:"5,keyasint,omitempty"`  // hardware revision, e.g. "rev-b"
	Arch     string            `cbor:"6,keyasint,omitempty"`  // GOARCH of the agent binary
	Version  string            `cbor:"7,keyasint,omitempty"`  // agent version (semver)
	Labels   map[string]string `cbor:"8,keyasint,omitempty"`  // labels the device reports for itself
	Release  uint64            `cbor:"9,keyasint,omitempty"`  // counter of the installed agent release
	Payloads map[string]string `cbor:"10,keyasint,omitempty"` // installed versions of non-agent payloads
	// Builds are the SHA-256 digests of the files in place, by target
	// (the agent's own binary; payloads whose installed file the agent
	// knows): what a delta would patch. Claims, like everything here: the
	// device checks the base itself before it patches anything.
	Builds map[string][]byte `cbor:"11,keyasint,omitempty"`
	// Deltas is the largest build this agent makes of a patch (it holds
	// the result in memory); 0: it takes full artifacts only (an older
	// agent, or one told --no-delta).
	Deltas uint64 `cbor:"12,keyasint,omitempty"`
}

// Batch is a group of telemetry samples, published on the telemetry topic.
// (Boot, Seq) is unique per device and is how the control plane drops QoS1
// redeliveries: the agent numbers every message it queues, and Boot grows at
// every agent start.
type Batch struct {
	Boot    uint64   `cbor:"0,keyasint"`
	Seq     uint64   `cbor:"1,keyasint"`
	Base    int64    `cbor:"2,keyasint"`           // unix milliseconds of the first sample
	Samples []Sample `cbor:"3,keyasint"`           // at most MaxSamples
	Dropped uint64   `cbor:"4,keyasint,omitempty"` // samples the outbox dropped since the previous batch
}

// Sample is one telemetry reading. Units are chosen so that every field is a
// small integer on the wire: a typical sample encodes to about 60 bytes.
type Sample struct {
	T       uint32             `cbor:"0,keyasint"`           // milliseconds after Batch.Base
	Battery *uint8             `cbor:"1,keyasint,omitempty"` // percent; nil when unknown
	Voltage uint16             `cbor:"2,keyasint,omitempty"` // battery millivolts; 0 when unknown
	Temp    *int16             `cbor:"3,keyasint,omitempty"` // tenths of a degree Celsius; nil when unknown
	CPU     uint16             `cbor:"4,keyasint,omitempty"` // CPU busy, per mille
	Mem     uint16             `cbor:"5,keyasint,omitempty"` // memory used, per mille
	Lat     int32              `cbor:"6,keyasint,omitempty"` // degrees * 1e7, valid when Fix > 0
	Lon     int32              `cbor:"7,keyasint,omitempty"` // degrees * 1e7, valid when Fix > 0
	Alt     int32              `cbor:"8,keyasint,omitempty"` // centimetres above home, valid when Fix > 0
	Fix     uint8              `cbor:"9,keyasint,omitempty"` // 0 no fix, 2 2D, 3 3D
	Flight  FlightState        `cbor:"10,keyasint,omitempty"`
	Link    uint8              `cbor:"11,keyasint,omitempty"` // link quality percent
	Errors  uint32             `cbor:"12,keyasint,omitempty"` // errors since the agent started
	Reboots uint32             `cbor:"13,keyasint,omitempty"` // unplanned agent restarts (not a clean stop or an update restart) since enrollment
	Uptime  uint32             `cbor:"14,keyasint,omitempty"` // seconds since the OS booted
	Ext     map[string]float64 `cbor:"15,keyasint,omitempty"` // extension metrics, at most MaxMapPairs
}

// EventKind classifies an Event.
type EventKind uint8

// Event kinds.
const (
	EventAlert   EventKind = 1 // something an operator should see (low battery, sensor fault)
	EventUpdate  EventKind = 2 // progress of an update; Update is set
	EventAck     EventKind = 3 // a command was received; Cmd is set
	EventMessage EventKind = 4 // informational (agent start, re-enrollment)
)

func (k EventKind) String() string {
	switch k {
	case EventAlert:
		return "alert"
	case EventUpdate:
		return "update"
	case EventAck:
		return "ack"
	case EventMessage:
		return "message"
	}
	return "unknown"
}

// Severity of an Event.
type Severity uint8

// Severities.
const (
	SevInfo     Severity = 0
	SevWarning  Severity = 1
	SevCritical Severity = 2
)

func (s Severity) String() string {
	switch s {
	case SevWarning:
		return "warning"
	case SevCritical:
		return "critical"
	}
	return "info"
}

// Event is published on the event topic. Events share the (Boot, Seq)
// numbering of batches and are deduplicated the same way.
type Event struct {
	Boot     uint64            `cbor:"0,keyasint"`
	Seq      uint64            `cbor:"1,keyasint"`
	Time     int64             `cbor:"2,keyasint"` // unix milliseconds, device clock
	Kind     EventKind         `cbor:"3,keyasint"`
	Severity Severity          `cbor:"4,keyasint,omitempty"`
	Code     string            `cbor:"5,keyasint,omitempty"` // machine-readable, e.g. "battery_low"
	Message  string            `cbor:"6,keyasint,omitempty"` // for people
	Cmd      string            `cbor:"7,keyasint,omitempty"` // id of the command this event answers
	Update   *UpdateReport     `cbor:"8,keyasint,omitempty"`
	Attrs    map[string]string `cbor:"9,keyasint,omitempty"`
}

// UpdateState is a step of the update sequence as the agent reports it.
type UpdateState string

// Update states, in the order a successful update goes through them.
// Rejected, Failed, Deferred and RolledBack end or pause an attempt.
const (
	UpdateOffered     UpdateState = "offered"
	UpdateDownloading UpdateState = "downloading"
	UpdateVerified    UpdateState = "verified"
	UpdateDeferred    UpdateState = "deferred"
	UpdateInstalling  UpdateState = "installing"
	UpdateTrial       UpdateState = "trial"
	UpdateCommitted   UpdateState = "committed"
	UpdateRolledBack  UpdateState = "rolled_back"
	UpdateRejected    UpdateState = "rejected"
	UpdateFailed      UpdateState = "failed"
)

// Final reports whether no further report follows for the same release.
func (s UpdateState) Final() bool {
	switch s {
	case UpdateCommitted, UpdateRolledBack, UpdateRejected, UpdateFailed:
		return true
	}
	return false
}

// UpdateReport is the update part of an EventUpdate.
type UpdateReport struct {
	Target   string      `cbor:"0,keyasint" json:"target"`                       // "agent" or a payload name
	Version  string      `cbor:"1,keyasint" json:"version"`                      // release version the report is about
	Counter  uint64      `cbor:"2,keyasint" json:"counter"`                      // release counter
	State    UpdateState `cbor:"3,keyasint" json:"state"`                        // step reached
	Progress uint64      `cbor:"4,keyasint,omitempty" json:"progress,omitempty"` // bytes downloaded so far
	Size     uint64      `cbor:"5,keyasint,omitempty" json:"size,omitempty"`     // artifact size
	Reason   string      `cbor:"6,keyasint,omitempty" json:"reason,omitempty"`   // why deferred, rejected, failed or rolled back
	Check    string      `cbor:"7,keyasint,omitempty" json:"check,omitempty"`    // the check that rejected the release
	Rollout  string      `cbor:"8,keyasint,omitempty" json:"rollout,omitempty"`  // rollout id from the offer
	// Patch is the size of the delta patch fetched instead of Size bytes
	// (or before a fallback); 0: the full artifact only (it was offered,
	// or the delta could not apply here and none of it was fetched).
	Patch uint64 `cbor:"9,keyasint,omitempty" json:"patch,omitempty"`
	// Fallback says why the offered delta was given up for the full
	// artifact (the base on the device is not the patch's, the patch or
	// its result is corrupt): the release goes on, fetched whole (what
	// came of the patch came over the air too).
	Fallback string `cbor:"10,keyasint,omitempty" json:"fallback,omitempty"`
}

// CommandKind says what a Command asks.
type CommandKind string

// Command kinds.
const (
	CmdPing   CommandKind = "ping"   // answer with an EventAck
	CmdUpdate CommandKind = "update" // install the offered release; Update is set
	CmdCancel CommandKind = "cancel" // abandon a pending offer that is not yet installing
	// CmdConfirm tells a device in trial that the control plane heard from
	// its new build (release Counter): one of the trial's health checks.
	CmdConfirm CommandKind = "confirm"
	// CmdCertificate answers a device's CertRequest: Cert is set.
	CmdCertificate CommandKind = "certificate"
	// CmdRenew invites a device that authenticates with a password to ask
	// for a certificate (a CertRequest): the control plane issues them.
	CmdRenew CommandKind = "renew"
)

// Command is published by the control plane on a device's cmd topic with QoS1.
// ID makes it idempotent: a device answers a repeated ID without acting twice.
type Command struct {
	ID      string       `cbor:"0,keyasint"`
	Kind    CommandKind  `cbor:"1,keyasint"`
	Issued  int64        `cbor:"2,keyasint,omitempty"` // unix milliseconds, server clock
	Update  *UpdateOffer `cbor:"3,keyasint,omitempty"`
	Rollout string       `cbor:"4,keyasint,omitempty"`
	Counter uint64       `cbor:"5,keyasint,omitempty"` // release counter (confirm)
	Cert    *CertGrant   `cbor:"6,keyasint,omitempty"`
}

// Limits of device certificate messages.
const (
	MaxCSRSize   = 4 << 10 // a PKCS#10 request for one P-256, P-384 or Ed25519 key is well under 1 KiB
	MaxCertSize  = 8 << 10 // one DER certificate
	MaxCertChain = 4       // certificates in a grant, leaf first
)

// CertRequest is published by a device on its csr topic to get a new
// certificate for a key it has just made: the renewal before its current
// certificate expires, or a password device moving to a certificate. The
// connection it arrives on is the proof of identity; the request's own
// signature proves the new key.
type CertRequest struct {
	ID  string `cbor:"0,keyasint"` // echoed in the grant
	CSR []byte `cbor:"1,keyasint"` // PKCS#10, DER
	// Cert and Sig prove the request comes from the holder of the
	// device's current certificate, for brokers that do not tell the
	// control plane which certificate a connection used: Cert is that
	// certificate (DER), Sig its key's signature of RenewalSigned(CSR).
	// Both empty for a device that authenticates with a password.
	Cert []byte `cbor:"2,keyasint,omitempty"`
	Sig  []byte `cbor:"3,keyasint,omitempty"`
}

// RenewalSigned is what the current key signs in a CertRequest: the new
// request, under a context string of its own.
func RenewalSigned(csr []byte) []byte {
	return append([]byte("hangar certificate renewal v1\x00"), csr...)
}

// CertGrant answers a CertRequest.
type CertGrant struct {
	Request string   `cbor:"0,keyasint"`           // the CertRequest's ID
	Chain   [][]byte `cbor:"1,keyasint,omitempty"` // DER certificates, the device's first
	Error   string   `cbor:"2,keyasint,omitempty"` // why the request was refused (Chain empty)
}

// UpdateOffer carries what a device needs to verify and fetch a release. The
// manifest and key list are signed; the URL is not trusted for anything but
// where to download from.
type UpdateOffer struct {
	Manifest []byte `cbor:"0,keyasint"`           // COSE_Sign1 release manifest
	Keys     []byte `cbor:"1,keyasint,omitempty"` // COSE_Sign1 release key list, signed by a root key
	URL      string `cbor:"2,keyasint"`           // artifact location (absolute, or relative to the control plane)
	// FullURL is where the full artifact of a delta offer is: the device
	// falls back to it, once, when the delta path fails, and checks it
	// against the delta manifest's result digest (no second manifest).
	FullURL string `cbor:"3,keyasint,omitempty"`
}

// FlightInput is what the drone's flight software sends to the agent's local
// socket (a Unix datagram or UDP socket on loopback), one CBOR map per
// datagram, whenever its values change or at least once a second. Fields the
// flight stack does not know are left out; the agent keeps the last value
// of each field for at most a few seconds.
type FlightInput struct {
	Battery *uint8      `cbor:"1,keyasint,omitempty"` // percent
	Voltage uint16      `cbor:"2,keyasint,omitempty"` // millivolts
	Lat     int32       `cbor:"6,keyasint,omitempty"` // degrees * 1e7
	Lon     int32       `cbor:"7,keyasint,omitempty"` // degrees * 1e7
	Alt     int32       `cbor:"8,keyasint,omitempty"` // centimetres above home
	Fix     uint8       `cbor:"9,keyasint,omitempty"` // 0 no fix, 2 2D, 3 3D
	Flight  FlightState `cbor:"10,keyasint,omitempty"`
	Link    *uint8      `cbor:"11,keyasint,omitempty"` // link quality percent, if the flight stack knows it
}
