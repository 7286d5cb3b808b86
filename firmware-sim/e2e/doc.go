// Package e2e holds end-to-end tests: a real control plane (embedded broker,
// SQLite file, HTTP API) and simulated drones running the real agent code
// over loopback MQTT and HTTP, all in one test process.
package e2e
