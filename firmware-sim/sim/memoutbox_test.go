package sim

import (
	"fmt"
	"testing"

	"github.com/hangarfleet/hangar/agent/outbox"
)

// The in-memory outbox keeps the on-disk outbox's contract: events before
// telemetry, acknowledged records gone, the oldest telemetry dropped first
// when full and the drops reported once.
func TestMemOutbox(t *testing.T) {
	m := newMemOutbox(100)
	for i := range 5 {
		m.Append(outbox.Telemetry, []byte(fmt.Sprintf("t%d-------", i))) // 10 bytes each
	}
	m.Append(outbox.Events, []byte("e0--------"))
	recs, _ := m.Peek(3)
	if len(recs) != 3 || string(recs[0].Data) != "e0--------" || string(recs[1].Data) != "t0-------" {
		t.Fatalf("peek order: %v", recs)
	}
	m.Ack(recs[0].ID, recs[1].ID)
	if st := m.Stats(); st.PendingEvents != 0 || st.PendingTelemetry != 4 {
		t.Fatalf("after ack: %+v", st)
	}
	for i := 5; i < 15; i++ {
		m.Append(outbox.Telemetry, []byte(fmt.Sprintf("t%d------", i)))
	}
	m.Append(outbox.Events, []byte("e1--------"))
	st := m.Stats()
	if st.Bytes > 100 || st.DroppedTelemetry == 0 || st.DroppedEvents != 0 || st.PendingEvents != 1 {
		t.Fatalf("when full: %+v", st)
	}
	recs, _ = m.Peek(100)
	if string(recs[0].Data) != "e1--------" || string(recs[len(recs)-1].Data) != "t14------" {
		t.Fatalf("kept %v", recs)
	}
	if n := m.TakeDropped(); n != st.Dropped || m.TakeDropped() != 0 {
		t.Fatalf("drops reported %d, want %d once", n, st.Dropped)
	}
	m.Close()
	if recs, _ := m.Peek(100); len(recs) == 0 {
		t.Fatal("the outbox must outlive the agent")
	}
}
