// Package sensors gives the agent what it puts in a telemetry sample: system
// readings of the companion computer from /proc and /sys (Linux), and the
// battery, position and flight state that the drone's flight software pushes
// to a local socket (Flight). A sampler fills one proto.Sample from both,
// system sensors first, so that the flight stack's battery wins when both know
// one.
//
// # Flight input
//
// The flight software (for example a MAVLink bridge) sends the agent its view
// of the airframe as datagrams, one CBOR map per datagram, whenever a value
// changes and at least once a second. The agent listens on one of:
//
//	unix:/run/hangar-agent/flight.sock   Unix datagram socket (SOCK_DGRAM), mode 0660
//	udp:127.0.0.1:14560            UDP, loopback addresses only
//
// The input is not authenticated, so the agent refuses a UDP address that is
// not loopback, and creates the Unix socket with mode 0660: the flight
// software must run in the socket's group, which is the agent's group, or the
// directory's group when the directory has the setgid bit. A stale socket
// file left by a crashed agent is replaced; a file that is not a socket, or a
// socket another process still receives on, is not.
//
// The map uses the integer keys of proto.FlightInput. Every key is optional;
// values are CBOR integers:
//
//	key  field    unit                              range
//	1    battery  percent                           0..100
//	2    voltage  battery millivolts                0..65535
//	6    lat      degrees * 1e7                     int32
//	7    lon      degrees * 1e7                     int32
//	8    alt      centimetres above home            int32
//	9    fix      0 no fix, 2 2D, 3 3D              0..255
//	10   flight   1 landed, 2 armed, 3 flying       0..3
//	11   link     link quality percent              0..100
//
// For example {1: 64, 10: 3} (battery at 64%, flying) is the 6 bytes
// a2 01 18 40 0a 03. From Python with the cbor2 package:
//
//	s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
//	s.sendto(cbor2.dumps({1: 64, 2: 15800, 10: 3}), "/run/hangar-agent/flight.sock")
//
// A datagram is dropped whole, and counted as malformed, when it is 4096
// bytes or longer, is not exactly one CBOR map, repeats a key, uses
// indefinite lengths or tags, has a value of the wrong type or out of its
// range above, or has fix above 0 with lat outside ±90° or lon outside ±180°.
// Unknown keys are ignored.
//
// # Freshness
//
// A datagram updates only the groups of fields it carries, stamped with the
// time the agent received it; the other groups keep their previous values.
// Because a zero value cannot be told from an absent key, a datagram carries
//
//   - battery when key 1 is present, link when key 11 is present;
//   - voltage when it is above 0;
//   - position (lat, lon, alt and fix together) when fix is above 0 or lat
//     or lon is not 0; alt alone is ignored;
//   - flight state when it is not 0 (unknown).
//
// A value older than Flight.MaxAge (DefaultFlightMaxAge, 5 s) is not put in
// samples. So a flight stack that loses its fix either sends its last
// position without key 9, or stops sending position until the fix returns.
//
// On a Unix datagram socket the kernel makes the sender wait (or fail with
// EAGAIN) when the agent falls behind; senders that must never block should
// use a non-blocking socket and drop the datagram. UDP drops silently.
package sensors
