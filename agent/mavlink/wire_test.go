package mavlink

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/bluenviron/gomavlib/v3/pkg/dialect"
	"github.com/bluenviron/gomavlib/v3/pkg/dialects/common"
	"github.com/bluenviron/gomavlib/v3/pkg/frame"
	"github.com/bluenviron/gomavlib/v3/pkg/message"
)

// TestCRCExtraMatchesCommon: every message of the hand-written dialect
// has the CRC_EXTRA of MAVLink's own definition (gomavlib's generated
// common dialect, linked by this test only): a wrong field name, type or
// order would change it, and frames of the message would be refused.
func TestCRCExtraMatchesCommon(t *testing.T) {
	ref := map[uint32]message.Message{}
	for _, m := range common.Dialect.Messages {
		ref[m.GetID()] = m
	}
	for _, m := range Dialect.Messages {
		a := &message.ReadWriter{Message: m}
		b := &message.ReadWriter{Message: ref[m.GetID()]}
		if err := a.Initialize(); err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		if err := b.Initialize(); err != nil {
			t.Fatal(err)
		}
		if a.CRCExtra() != b.CRCExtra() {
			t.Errorf("%T: crc extra %d, MAVLink's is %d", m, a.CRCExtra(), b.CRCExtra())
		}
	}
}

// vectors are frames made by node-mavlink 2.3.0 (testdata/node-mavlink/gen.js),
// an encoder hangar did not write.
func vectors(t *testing.T) map[string][]byte {
	b, err := os.ReadFile("testdata/node-mavlink-2.3.0.txt")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(l)
		raw, err := hex.DecodeString(f[1])
		if err != nil {
			t.Fatal(err)
		}
		m[f[0]] = raw
	}
	return m
}

func newReader(t testing.TB, b []byte, key *frame.V2Key) *frame.Reader {
	drw := &dialect.ReadWriter{Dialect: Dialect}
	if err := drw.Initialize(); err != nil {
		t.Fatal(err)
	}
	r := &frame.Reader{BufByteReader: bufio.NewReader(bytes.NewReader(b)), DialectRW: drw, InKey: key}
	if err := r.Initialize(); err != nil {
		t.Fatal(err)
	}
	return r
}

// readAll returns the frames and the read errors until the end.
func readAll(r *frame.Reader) (fs []frame.Frame, errs []error) {
	for {
		f, err := r.Read()
		var re frame.ReadError
		switch {
		case err == nil:
			fs = append(fs, f)
		case errors.As(err, &re):
			errs = append(errs, err)
		case errors.Is(err, io.EOF):
			return
		default:
			return fs, append(errs, err)
		}
	}
}

// TestWireVectors: MAVLink 1 and 2 frames, and a signed MAVLink 2 frame,
// from node-mavlink decode to the values it encoded.
func TestWireVectors(t *testing.T) {
	v := vectors(t)
	one := func(name string) frame.Frame {
		t.Helper()
		fs, errs := readAll(newReader(t, v[name], nil))
		if len(fs) != 1 || len(errs) != 0 {
			t.Fatalf("%s: %d frames, errors %v", name, len(fs), errs)
		}
		return fs[0]
	}
	for _, name := range []string{"v1_heartbeat", "v2_heartbeat", "v2_heartbeat_signed"} {
		f := one(name)
		hb, ok := f.GetMessage().(*MessageHeartbeat)
		if !ok || hb.Type != 2 || hb.Autopilot != 12 || hb.BaseMode&MAV_MODE_FLAG_SAFETY_ARMED == 0 || hb.CustomMode != 0x04040000 || hb.SystemStatus != MAV_STATE_ACTIVE {
			t.Errorf("%s: %+v", name, f.GetMessage())
		}
		_, v2 := f.(*frame.V2Frame)
		if v2 != strings.HasPrefix(name, "v2") || f.GetSystemID() != 1 || f.GetComponentID() != 1 {
			t.Errorf("%s: v2 %v, system %d, component %d", name, v2, f.GetSystemID(), f.GetComponentID())
		}
	}
	if !one("v2_heartbeat_signed").(*frame.V2Frame).IsSigned() {
		t.Error("the signed frame reads as unsigned")
	}
	for _, name := range []string{"v1_sys_status", "v2_sys_status"} {
		if ss, ok := one(name).GetMessage().(*MessageSysStatus); !ok || ss.VoltageBattery != 15800 || ss.CurrentBattery != 1250 || ss.BatteryRemaining != 64 || ss.Load != 350 {
			t.Errorf("%s: %+v", name, ss)
		}
	}
	if gp, ok := one("v2_global_position_int").GetMessage().(*MessageGlobalPositionInt); !ok || gp.Lat != 473977418 || gp.Lon != 85455938 || gp.RelativeAlt != 12000 || gp.Hdg != 9000 {
		t.Errorf("global position: %+v", gp)
	}
	for _, name := range []string{"v1_statustext", "v2_statustext"} {
		if st, ok := one(name).GetMessage().(*MessageStatustext); !ok || st.Severity != SeverityWarning || st.Text != "Preflight Fail: low battery" {
			t.Errorf("%s: %+v", name, st)
		}
	}
	// With a key, the signature is checked: the right one passes, another
	// is refused, and so is an unsigned frame.
	key := frame.NewV2Key(bytes.Repeat([]byte{0x4f}, 32))
	if fs, errs := readAll(newReader(t, v["v2_heartbeat_signed"], key)); len(fs) != 1 || len(errs) != 0 {
		t.Errorf("right key: %d frames, %v", len(fs), errs)
	}
	if fs, _ := readAll(newReader(t, v["v2_heartbeat_signed"], frame.NewV2Key([]byte("wrong")))); len(fs) != 0 {
		t.Error("a frame signed with another key was read")
	}
	if fs, _ := readAll(newReader(t, v["v2_heartbeat"], key)); len(fs) != 0 {
		t.Error("an unsigned frame was read where signing is required")
	}
}

// TestWireBadFrames: line noise, a frame with a wrong CRC and a frame cut
// short are errors (counted by the source), and the good frames around
// them are still read.
func TestWireBadFrames(t *testing.T) {
	v := vectors(t)
	bad := bytes.Clone(v["v2_sys_status"])
	bad[len(bad)-1] ^= 0xff
	var stream []byte
	stream = append(stream, "\x00\x01noise"...)
	stream = append(stream, bad...)
	stream = append(stream, v["v1_heartbeat"]...)
	stream = append(stream, v["v2_heartbeat"]...)
	stream = append(stream, v["v2_statustext"][:9]...) // cut short
	fs, errs := readAll(newReader(t, stream, nil))
	if len(fs) != 2 {
		t.Fatalf("%d good frames read, want the 2 heartbeats", len(fs))
	}
	for _, f := range fs {
		if _, ok := f.GetMessage().(*MessageHeartbeat); !ok {
			t.Errorf("read %T", f.GetMessage())
		}
	}
	if len(errs) < 3 {
		t.Errorf("%d errors for noise, a bad CRC and a cut frame: %v", len(errs), errs)
	}
}

// FuzzFrameReader: whatever bytes arrive, the reader ends, never panics,
// and every frame it returns carries a message of the dialect or a raw
// one (an id the agent does not read).
func FuzzFrameReader(f *testing.F) {
	for _, s := range []string{"fd09000001010100000000000404020c810403db7b", "fe090001010000000404020c8104035136"} {
		b, _ := hex.DecodeString(s)
		f.Add(b)
	}
	drw := &dialect.ReadWriter{Dialect: Dialect}
	if err := drw.Initialize(); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := &frame.Reader{BufByteReader: bufio.NewReader(bytes.NewReader(b)), DialectRW: drw}
		if err := r.Initialize(); err != nil {
			t.Fatal(err)
		}
		for i := 0; i <= len(b); i++ { // each read takes a byte at least
			fr, err := r.Read()
			var re frame.ReadError
			switch {
			case err == nil:
				if fr.GetMessage() == nil {
					t.Fatal("a frame without a message")
				}
			case errors.As(err, &re):
			default:
				return // the end
			}
		}
		t.Fatal("the reader did not end")
	})
}
