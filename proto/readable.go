package proto

import "time"

// Reading is a Sample in natural units with JSON names, as the REST API
// serves it. It is also the JSON baseline the CBOR encoding is measured
// against.
type Reading struct {
	Time       time.Time          `json:"time"`
	BatteryPct *float64           `json:"battery_pct"`
	VoltageV   *float64           `json:"voltage_v"`
	TempC      *float64           `json:"temperature_c"`
	CPUPct     float64            `json:"cpu_pct"`
	MemPct     float64            `json:"memory_pct"`
	Lat        *float64           `json:"latitude,omitempty"`
	Lon        *float64           `json:"longitude,omitempty"`
	AltM       *float64           `json:"altitude_m,omitempty"`
	Flight     string             `json:"flight_state"`
	LinkPct    float64            `json:"link_quality_pct"`
	Errors     uint32             `json:"errors"`
	Reboots    uint32             `json:"reboots"`
	UptimeS    uint32             `json:"uptime_s"`
	Ext        map[string]float64 `json:"ext,omitempty"`
}

func ptr(v float64) *float64 { return &v }

// Reading converts s, taken base milliseconds after the epoch plus its
// offset, to natural units.
func (s *Sample) Reading(base int64) Reading {
	r := Reading{
		Time:    time.UnixMilli(base + int64(s.T)).UTC(),
		CPUPct:  float64(s.CPU) / 10,
		MemPct:  float64(s.Mem) / 10,
		Flight:  s.Flight.String(),
		LinkPct: float64(s.Link),
		Errors:  s.Errors,
		Reboots: s.Reboots,
		UptimeS: s.Uptime,
		Ext:     s.Ext,
	}
	if s.Battery != nil {
		r.BatteryPct = ptr(float64(*s.Battery))
	}
	if s.Voltage != 0 {
		r.VoltageV = ptr(float64(s.Voltage) / 1000)
	}
	if s.Temp != nil {
		r.TempC = ptr(float64(*s.Temp) / 10)
	}
	if s.Fix > 0 {
		r.Lat = ptr(float64(s.Lat) / 1e7)
		r.Lon = ptr(float64(s.Lon) / 1e7)
		r.AltM = ptr(float64(s.Alt) / 100)
	}
	return r
}
