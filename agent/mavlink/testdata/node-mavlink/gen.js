// npm install && node gen.js > ../node-mavlink-2.3.0.txt   (node-mavlink 2.3.0, Node 20, CommonJS): frames from an
// encoder hangar did not write, which agent/mavlink tests decode.
const { MavLinkProtocolV1, MavLinkProtocolV2, minimal, common } = require('node-mavlink')
const { x25crc } = require('mavlink-mappings')

// node-mavlink 2.3.0 writes extension fields into MAVLink 1 frames, which the
// spec (and gomavlib) forbid: cut the payload to the base fields and redo the CRC.
function v1(msg, seq) {
  const def = msg.constructor
  const full = new MavLinkProtocolV1(1, 1).serialize(msg, seq)
  const base = def.FIELDS.filter(f => !f.extension).reduce((n, f) => n + f.size * Math.max(f.length, 1), 0)
  const buf = Buffer.concat([full.subarray(0, 6 + base), Buffer.alloc(2)])
  buf.writeUInt8(base, 1)
  buf.writeUInt16LE(x25crc(buf, 1, 2, def.MAGIC_NUMBER), buf.length - 2)
  return buf
}

const hb = new minimal.Heartbeat()
hb.type = minimal.MavType.QUADROTOR
hb.autopilot = minimal.MavAutopilot.PX4
hb.baseMode = 0x81 // CUSTOM_MODE_ENABLED | SAFETY_ARMED
hb.customMode = 0x04040000
hb.systemStatus = minimal.MavState.ACTIVE
hb.mavlinkVersion = 3

const ss = new common.SysStatus()
ss.voltageBattery = 15800
ss.currentBattery = 1250
ss.batteryRemaining = 64
ss.load = 350

const gp = new common.GlobalPositionInt()
gp.timeBootMs = 123456
gp.lat = 473977418
gp.lon = 85455938
gp.alt = 488000
gp.relativeAlt = 12000
gp.hdg = 9000

const st = new common.StatusText()
st.severity = common.MavSeverity.WARNING
st.text = 'Preflight Fail: low battery'

const p2 = new MavLinkProtocolV2(1, 1)
const out = (name, buf) => console.log(name + ' ' + buf.toString('hex'))
out('v1_heartbeat', v1(hb, 0))
out('v2_heartbeat', p2.serialize(hb, 1))
out('v1_sys_status', v1(ss, 2))
out('v2_sys_status', p2.serialize(ss, 3))
out('v2_global_position_int', p2.serialize(gp, 4))
out('v1_statustext', v1(st, 5))
out('v2_statustext', p2.serialize(st, 5))
const signer = new MavLinkProtocolV2(1, 1, MavLinkProtocolV2.IFLAG_SIGNED)
out('v2_heartbeat_signed', signer.sign(signer.serialize(hb, 6), 7, Buffer.alloc(32, 0x4f), 1700000000000))
