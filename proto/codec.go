package proto

import (
	"errors"
	"fmt"
	"time"

	"github.com/fxamacker/cbor/v2"
)

// Decoding limits. They are deliberately small: a message that needs more is
// a bug or an attack.
const (
	// MaxMessageSize caps any encoded message. It equals the MQTT packet size
	// limit of hangar's broker, so anything the broker accepts can be decoded.
	MaxMessageSize = 256 << 10
	// MaxSamples caps the samples in one Batch and the elements of any array.
	MaxSamples = 1024
	// MaxMapPairs caps the entries of any map (labels, extension metrics).
	MaxMapPairs = 128
	// MaxNesting caps the nesting depth of arrays and maps.
	MaxNesting = 8
	// MaxBatchSpan caps the time between a batch's start and its last
	// sample, so that the control plane can find a time range quickly.
	MaxBatchSpan = time.Hour
)

var (
	encMode cbor.EncMode
	decMode cbor.DecMode
)

func init() {
	var err error
	encMode, err = cbor.EncOptions{
		Sort:          cbor.SortCoreDeterministic,
		ShortestFloat: cbor.ShortestFloat16,
		NaNConvert:    cbor.NaNConvert7e00,
		InfConvert:    cbor.InfConvertFloat16,
		IndefLength:   cbor.IndefLengthForbidden,
		TagsMd:        cbor.TagsForbidden,
	}.EncMode()
	if err != nil {
		panic(err)
	}
	decMode, err = cbor.DecOptions{
		DupMapKey:        cbor.DupMapKeyEnforcedAPF,
		IndefLength:      cbor.IndefLengthForbidden,
		TagsMd:           cbor.TagsForbidden,
		MaxNestedLevels:  MaxNesting,
		MaxArrayElements: MaxSamples,
		MaxMapPairs:      MaxMapPairs,
		UTF8:             cbor.UTF8RejectInvalid,
		NaN:              cbor.NaNDecodeForbidden,
		Inf:              cbor.InfDecodeForbidden,
	}.DecMode()
	if err != nil {
		panic(err)
	}
}

// ErrMalformed wraps every decoding and validation failure, so a receiver can
// count bad input with errors.Is.
var ErrMalformed = errors.New("malformed message")

// Marshal encodes v deterministically (RFC 8949 core deterministic encoding,
// shortest floats). Encoding the same value twice gives the same bytes.
func Marshal(v any) ([]byte, error) {
	b, err := encMode.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %T: %w", v, err)
	}
	if len(b) > MaxMessageSize {
		return nil, fmt.Errorf("encode %T: %d bytes exceeds the %d byte limit", v, len(b), MaxMessageSize)
	}
	return b, nil
}

// validator is implemented by messages with rules beyond their CBOR shape.
type validator interface{ Validate() error }

// Unmarshal decodes exactly one CBOR data item from data into v under the
// strict limits above, then validates it. Trailing bytes, duplicate map keys,
// indefinite lengths, tags, NaN and oversized input are errors; unknown map
// keys are ignored. Every error wraps ErrMalformed.
func Unmarshal(data []byte, v any) error {
	if len(data) > MaxMessageSize {
		return fmt.Errorf("%w: %T: %d bytes exceeds the %d byte limit", ErrMalformed, v, len(data), MaxMessageSize)
	}
	if len(data) == 0 {
		return fmt.Errorf("%w: %T: empty", ErrMalformed, v)
	}
	if err := decMode.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %T: %w", ErrMalformed, v, err)
	}
	if val, ok := v.(validator); ok {
		if err := val.Validate(); err != nil {
			return fmt.Errorf("%w: %T: %w", ErrMalformed, v, err)
		}
	}
	return nil
}

// DecodeState decodes a State message.
func DecodeState(b []byte) (State, error) {
	var m State
	err := Unmarshal(b, &m)
	return m, err
}

// DecodeBatch decodes a telemetry Batch.
func DecodeBatch(b []byte) (Batch, error) {
	var m Batch
	err := Unmarshal(b, &m)
	return m, err
}

// DecodeEvent decodes an Event.
func DecodeEvent(b []byte) (Event, error) {
	var m Event
	err := Unmarshal(b, &m)
	return m, err
}

// DecodeCommand decodes a Command.
func DecodeCommand(b []byte) (Command, error) {
	var m Command
	err := Unmarshal(b, &m)
	if err == nil && m.Update != nil && len(m.Update.Keys) == 0 {
		// An empty key list is no key list: absent and empty mean the
		// same (the device uses the one it holds).
		m.Update.Keys = nil
	}
	if err == nil && m.Cert != nil && len(m.Cert.Chain) == 0 {
		m.Cert.Chain = nil // likewise
	}
	return m, err
}

// DecodeCertRequest decodes a CertRequest.
func DecodeCertRequest(b []byte) (CertRequest, error) {
	var m CertRequest
	err := Unmarshal(b, &m)
	if err == nil && len(m.Cert) == 0 {
		m.Cert, m.Sig = nil, nil // absent and empty mean the same
	}
	return m, err
}

// DecodeFlightInput decodes a FlightInput datagram.
func DecodeFlightInput(b []byte) (FlightInput, error) {
	var m FlightInput
	err := Unmarshal(b, &m)
	return m, err
}

// Validate checks the rules of a State that CBOR cannot express.
func (s *State) Validate() error {
	if s.Boot == 0 {
		return errors.New("boot epoch is zero")
	}
	return ValidateLabels(s.Labels)
}

// Validate checks the rules of a Batch that CBOR cannot express.
func (b *Batch) Validate() error {
	if b.Boot == 0 || b.Seq == 0 {
		return errors.New("boot epoch and sequence must be positive")
	}
	if len(b.Samples) == 0 {
		return errors.New("no samples")
	}
	for i := range b.Samples {
		if b.Samples[i].T > uint32(MaxBatchSpan.Milliseconds()) {
			return fmt.Errorf("sample %d is %d ms after the batch start, more than %v", i, b.Samples[i].T, MaxBatchSpan)
		}
		if err := b.Samples[i].Validate(); err != nil {
			return fmt.Errorf("sample %d: %w", i, err)
		}
	}
	return nil
}

// Validate checks the ranges of a Sample.
func (s *Sample) Validate() error {
	if s.Battery != nil && *s.Battery > 100 {
		return fmt.Errorf("battery %d%% above 100", *s.Battery)
	}
	if s.Link > 100 {
		return fmt.Errorf("link quality %d%% above 100", s.Link)
	}
	if s.CPU > 1000 || s.Mem > 1000 {
		return errors.New("cpu or memory above 1000 per mille")
	}
	if s.Fix > 0 && (s.Lat < -900_000_000 || s.Lat > 900_000_000 || s.Lon < -1_800_000_000 || s.Lon > 1_800_000_000) {
		return errors.New("position out of range")
	}
	return nil
}

// Validate checks the rules of an Event that CBOR cannot express.
func (e *Event) Validate() error {
	if e.Boot == 0 || e.Seq == 0 {
		return errors.New("boot epoch and sequence must be positive")
	}
	if e.Kind == EventUpdate && e.Update == nil {
		return errors.New("update event without update report")
	}
	return nil
}

// Validate checks the rules of a Command that CBOR cannot express.
func (c *Command) Validate() error {
	if c.ID == "" {
		return errors.New("command without id")
	}
	if c.Kind == CmdUpdate && c.Update == nil {
		return errors.New("update command without offer")
	}
	if c.Kind == CmdCertificate && c.Cert == nil {
		return errors.New("certificate command without grant")
	}
	if g := c.Cert; g != nil {
		if len(g.Chain) > MaxCertChain {
			return fmt.Errorf("certificate chain of %d, more than %d", len(g.Chain), MaxCertChain)
		}
		for _, der := range g.Chain {
			if len(der) == 0 || len(der) > MaxCertSize {
				return fmt.Errorf("certificate must be 1 to %d bytes", MaxCertSize)
			}
		}
		if len(g.Chain) == 0 && g.Error == "" {
			return errors.New("certificate grant with neither a chain nor an error")
		}
	}
	return nil
}

// Validate checks a CertRequest's sizes.
func (r *CertRequest) Validate() error {
	if len(r.ID) == 0 || len(r.ID) > 64 {
		return errors.New("certificate request id must be 1 to 64 bytes")
	}
	if len(r.CSR) == 0 || len(r.CSR) > MaxCSRSize {
		return fmt.Errorf("certificate request must be 1 to %d bytes", MaxCSRSize)
	}
	if len(r.Cert) > MaxCertSize || len(r.Sig) > 512 || (len(r.Cert) == 0) != (len(r.Sig) == 0) {
		return errors.New("certificate request: the current certificate and its signature go together, within size")
	}
	return nil
}

// Validate checks the ranges of a FlightInput.
func (f *FlightInput) Validate() error {
	if f.Battery != nil && *f.Battery > 100 {
		return fmt.Errorf("battery %d%% above 100", *f.Battery)
	}
	if f.Link != nil && *f.Link > 100 {
		return fmt.Errorf("link quality %d%% above 100", *f.Link)
	}
	if f.Flight > FlightFlying {
		return fmt.Errorf("unknown flight state %d", f.Flight)
	}
	if f.Lat < -900_000_000 || f.Lat > 900_000_000 || f.Lon < -1_800_000_000 || f.Lon > 1_800_000_000 {
		return errors.New("position out of range")
	}
	return nil
}
