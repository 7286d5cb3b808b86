package bench

import (
	"io"
	"os"

	"github.com/hangarfleet/hangar/internal/mosquitto"
)

// Mosquitto is the external broker of the benchmark.
type Mosquitto struct {
	*mosquitto.Mosquitto
}

// StartMosquitto runs Mosquitto with its files in dir.
func StartMosquitto(dir string, logw io.Writer) (*Mosquitto, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	m, err := mosquitto.Start(dir, mosquitto.Options{Quiet: true})
	if err != nil {
		return nil, err
	}
	return &Mosquitto{m}, nil
}

// Stop stops the broker.
func (m *Mosquitto) Stop() { _ = m.Mosquitto.Stop() }
