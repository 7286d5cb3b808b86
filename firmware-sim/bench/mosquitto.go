package bench

import (
	"errors"
	"io"
)

// Mosquitto is a Mosquitto process for the benchmark.
type Mosquitto struct {
	AdminUser, AdminPassword string
}

// StartMosquitto is being written.
func StartMosquitto(dir string, logw io.Writer) (*Mosquitto, error) {
	return nil, errors.New("not yet")
}

func (m *Mosquitto) URL() string { return "" }
func (m *Mosquitto) Pid() int    { return 0 }
func (m *Mosquitto) Stop()       {}
