// Package metrics holds the control plane's Prometheus collectors. Each
// server owns its registry, so several control planes can run in one
// process (tests, the simulator).
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the control plane's collectors.
type Metrics struct {
	Registry *prometheus.Registry

	Messages       *prometheus.CounterVec // device messages received, by kind
	Samples        prometheus.Counter
	Duplicates     prometheus.Counter
	UnknownDevice  prometheus.Counter
	Refused        prometheus.Counter     // update reports not believed (boot epoch ahead)
	DecodeErrors   *prometheus.CounterVec // malformed messages, by kind
	AgentDropped   prometheus.Counter     // samples the agents' outboxes dropped, as they report
	StoreLatency   prometheus.Histogram   // one group write to SQLite
	GroupSize      prometheus.Histogram   // messages per group write
	StoreErrors    prometheus.Counter
	IngestDelay    prometheus.Histogram   // from a batch's first sample to its storage
	AuthFailures   *prometheus.CounterVec // refused MQTT connections, by reason
	ACLDenials     *prometheus.CounterVec // refused publish/subscribe, by access
	Enrollments    *prometheus.CounterVec // by result
	CommandsSent   prometheus.Counter
	ConnectedGauge prometheus.GaugeFunc
	// Accepted counts TCP connections the embedded broker accepted;
	// AcceptPeak is the most it accepted within any one second (what
	// --connect-rate caps).
	Accepted   prometheus.Counter
	AcceptPeak prometheus.Gauge
	// PreconnectRefused counts connections closed before they
	// authenticated, by reason: timeout (no CONNECT in time), too_large,
	// not_connect, closed.
	PreconnectRefused *prometheus.CounterVec
	// AuthThrottled counts attempts refused by a rate limit before they
	// were checked: enroll_source, enroll_device, mqtt_source, mqtt_device.
	AuthThrottled *prometheus.CounterVec
	// OverQuota counts device messages dropped beyond the device's ingest
	// quota, by quota (messages, bytes).
	OverQuota *prometheus.CounterVec
	// Renewals counts device certificate requests over MQTT, by result.
	Renewals *prometheus.CounterVec
	// Delivery holds the four DORA keys over the last 28 days, by key
	// and hardware revision ("all": the whole fleet); see package
	// delivery. A key without a value (nothing measured yet) is absent.
	Delivery *prometheus.GaugeVec
}

// New creates the collectors in a fresh registry. connected reports the
// number of devices connected to the broker (nil when unknown).
func New(connected func() float64) *Metrics {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{
		Registry: r,
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_ingest_messages_total", Help: "Device messages received, by kind.",
		}, []string{"kind"}),
		Samples: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_ingest_samples_total", Help: "Telemetry samples stored.",
		}),
		Duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_ingest_duplicates_total", Help: "Messages dropped because they were already stored (QoS1 redeliveries).",
		}),
		UnknownDevice: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_ingest_unknown_device_total", Help: "Messages from devices the store does not know or has revoked.",
		}),
		Refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_ingest_refused_reports_total",
			Help: "Update reports not believed: dated by a boot epoch ahead of the device's current connection and of the control plane's clock.",
		}),
		DecodeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_ingest_decode_errors_total", Help: "Malformed device messages, by kind.",
		}, []string{"kind"}),
		AgentDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_agent_dropped_samples_total", Help: "Samples dropped by full agent outboxes, as reported by agents.",
		}),
		StoreLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "hangar_store_write_seconds", Help: "Time to write one group of device messages to the store.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
		GroupSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "hangar_store_group_messages", Help: "Device messages per group write.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12),
		}),
		IngestDelay: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "hangar_ingest_delay_seconds",
			Help:    "Time from a telemetry batch's first sample (device clock) to its storage: batching, outbox, transport and store.",
			Buckets: []float64{.001, .002, .005, .01, .015, .02, .03, .05, .075, .1, .15, .2, .25, .3, .4, .5, .75, 1, 2, 5, 10, 30, 60, 300},
		}),
		StoreErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_store_errors_total", Help: "Failed group writes (the messages were not acknowledged).",
		}),
		AuthFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_mqtt_auth_failures_total", Help: "Refused MQTT connections, by reason.",
		}, []string{"reason"}),
		ACLDenials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_mqtt_acl_denials_total", Help: "Refused publishes and subscriptions, by access.",
		}, []string{"access"}),
		Enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_enrollments_total", Help: "Enrollment requests, by result.",
		}, []string{"result"}),
		CommandsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_commands_sent_total", Help: "Commands published to devices.",
		}),
		Accepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hangar_mqtt_accepted_total", Help: "TCP connections the embedded broker accepted.",
		}),
		AcceptPeak: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hangar_mqtt_accept_rate_peak", Help: "Most connections the embedded broker accepted within any one second since it started.",
		}),
		PreconnectRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_mqtt_preconnect_refused_total", Help: "Connections closed before their CONNECT was read, by reason (timeout, too_large, not_connect, closed, max_connections, tls_handshake).",
		}, []string{"reason"}),
		AuthThrottled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_auth_throttled_total", Help: "Enrollments and MQTT authentications refused by a rate limit, by kind (enroll_source, enroll_device, mqtt_source, mqtt_device, renewal).",
		}, []string{"kind"}),
		OverQuota: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_ingest_over_quota_total", Help: "Device messages dropped beyond the device's ingest quota, by quota (messages, bytes).",
		}, []string{"quota"}),
		Renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hangar_cert_requests_total", Help: "Device certificate requests over MQTT, by result (ok, stale, bad_request, throttled, malformed, no_ca, error).",
		}, []string{"result"}),
		Delivery: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hangar_delivery", Help: "Software delivery keys over the last 28 days: deployments_per_week, lead_time_seconds (median), change_failure_rate, time_to_restore_seconds (median); by hardware revision (all: the fleet).",
		}, []string{"key", "hardware"}),
	}
	r.MustRegister(m.Delivery)
	r.MustRegister(m.Messages, m.Samples, m.Duplicates, m.UnknownDevice, m.Refused, m.DecodeErrors, m.AgentDropped,
		m.StoreLatency, m.GroupSize, m.StoreErrors, m.IngestDelay, m.AuthFailures, m.ACLDenials, m.Enrollments, m.CommandsSent, m.Accepted, m.AcceptPeak,
		m.PreconnectRefused, m.AuthThrottled, m.OverQuota, m.Renewals)
	if connected != nil {
		m.ConnectedGauge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "hangar_mqtt_connected_clients", Help: "Clients connected to the embedded broker.",
		}, connected)
		r.MustRegister(m.ConnectedGauge)
	}
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}
