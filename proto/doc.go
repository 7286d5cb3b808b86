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
//	2 (2026-12-01): delta updates: Manifest.Delta (base, patch and result
//	    of a BSDIFF40 patch), UpdateOffer.FullURL (the fallback),
//	    State.Builds (digests of the files in place) and State.Deltas (the
//	    largest result the agent patches; 0 or absent: full artifacts
//	    only), UpdateReport.Patch and Fallback. Agents of version 1 refuse
//	    a delta manifest (format check) and are never offered one.
const ProtocolVersion = 2
