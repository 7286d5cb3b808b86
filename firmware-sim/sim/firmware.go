package sim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"time"
)

// Behaviours of simulated builds.
const (
	Good       = "good"       // runs fine
	CrashLoop  = "crashloop"  // crashes a second after every start
	FailHealth = "failhealth" // starts, but its own health check fails
	Errors     = "errors"     // runs, raising its error counter (ErrorsPerMinute)
	Reboots    = "reboots"    // runs, restarting every RebootEvery
	Drain      = "drain"      // runs, draining the battery DrainFactor times faster
	SlowBoot   = "slowboot"   // takes BootDelay to start
	Brick      = "brick"      // never starts on BrickFraction of BrickHardware devices
)

// Firmware is what a simulated build does. It is the content of a
// simulated release artifact, signed and pushed like any release, so a
// drone behaves as the build it actually installed.
type Firmware struct {
	Version         string   `json:"version"`
	Behaviour       string   `json:"behaviour"`
	ErrorsPerMinute float64  `json:"errors_per_minute,omitempty"`
	RebootEvery     Duration `json:"reboot_every,omitempty"`
	DrainFactor     float64  `json:"drain_factor,omitempty"`
	BootDelay       Duration `json:"boot_delay,omitempty"`
	BrickFraction   float64  `json:"brick_fraction,omitempty"`
	BrickHardware   string   `json:"brick_hardware,omitempty"`
	// OnlyHardware: the behaviour shows on this hardware revision only;
	// on every other the build is good (a driver bug, say).
	OnlyHardware string `json:"only_hardware,omitempty"`
	// Size pads the artifact to this many bytes (a realistic download).
	Size int `json:"size,omitempty"`
}

const artifactMagic = "HANGAR-SIM-FIRMWARE v1\n"

// DefaultFactorySize is the factory builds' size of hangar-sim's fleet:
// that of hangar-sim firmware's builds, so that a delta from one is what a
// patch release's is.
const DefaultFactorySize = 256 << 10

// FactoryFirmware is the good build of version a drone leaves the factory
// with, its artifact padded to size bytes: the base a delta from that
// version patches.
func FactoryFirmware(version string, size int) Firmware {
	return Firmware{Version: version, Behaviour: Good, Size: size}
}

// Artifact encodes fw as a release artifact.
func (fw Firmware) Artifact() []byte {
	head, _ := json.Marshal(fw)
	b := append([]byte(artifactMagic), head...)
	b = append(b, '\n')
	for len(b) < fw.Size {
		// Deterministic filler, so a build's digest is stable.
		b = append(b, byte(len(b)*131))
	}
	return b
}

// ParseArtifact reads a simulated artifact.
func ParseArtifact(b []byte) (Firmware, error) {
	var fw Firmware
	rest, ok := bytes.CutPrefix(b, []byte(artifactMagic))
	if !ok {
		return fw, errors.New("not a simulated firmware artifact")
	}
	head, _, ok := bytes.Cut(rest, []byte("\n"))
	if !ok {
		return fw, errors.New("simulated firmware: no header")
	}
	if err := json.Unmarshal(head, &fw); err != nil {
		return fw, fmt.Errorf("simulated firmware: %w", err)
	}
	return fw, nil
}

// On is the build as it behaves on hardware hw.
func (fw Firmware) On(hw string) Firmware {
	if fw.OnlyHardware != "" && fw.OnlyHardware != hw {
		fw.Behaviour = Good
	}
	return fw
}

// Bricks reports whether this build never starts on device id of
// hardware hw.
func (fw Firmware) Bricks(id, hw string) bool {
	if fw.Behaviour != Brick || (fw.BrickHardware != "" && fw.BrickHardware != hw) {
		return false
	}
	h := fnv.New64a()
	h.Write([]byte(fw.Version + "/" + id))
	return float64(h.Sum64()>>11)/float64(1<<53) < fw.BrickFraction
}

// Duration reads and writes JSON as "10m".
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

func (d *Duration) UnmarshalJSON(b []byte) error {
	v, err := time.ParseDuration(string(bytes.Trim(b, `"`)))
	*d = Duration(v)
	return err
}
