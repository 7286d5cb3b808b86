// Package proto is hangar's wire contract: the CBOR messages that agents and
// the control plane exchange over MQTT, the topic layout, the decoding limits
// both sides enforce, and (in manifest.go) signed release manifests.
//
// It imports only the standard library and its codec and crypto libraries, so
// that the agent, the control plane and the simulator can all depend on it.
package proto

// ProtocolVersion is the version of the wire contract spoken by this build.
// It is carried in every State message so that the control plane knows what an
// agent understands. Bump it for every change to a message, topic or limit and
// add a line below; never reuse a CBOR key with a different meaning.
//
// History:
//
//	1 (2026-11-25): first version: State (hello, goodbye and last will),
//	    telemetry Batch of Samples, Event (alerts, update reports, command
//	    acknowledgements), Command, FlightInput on the agent's local socket;
//	    signed release Manifest and KeyList (COSE_Sign1, Ed25519); the
//	    confirm command for a build in trial.
const ProtocolVersion = 1
