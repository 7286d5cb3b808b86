package sim

import (
	"sync"

	"github.com/hangarfleet/hangar/agent/outbox"
)

// memOutbox is a simulated drone's outbox in memory: the same contract as
// the on-disk outbox (two lanes, events sent first, bounded, the oldest
// telemetry dropped first and counted), kept across the drone's agent
// restarts, at no file descriptor per drone. The on-disk outbox holds five
// per drone, which caps a simulator process at a few thousand drones under
// the usual descriptor limits; FleetOptions.MemoryOutbox trades its disk
// behaviour (tested on its own, in agent/outbox) for fleet size.
type memOutbox struct {
	mu      sync.Mutex
	max     int64
	lanes   [2][]outbox.Record
	next    [2]uint64
	bytes   int64
	dropped [2]uint64
	untaken uint64
	notify  chan struct{}
}

func newMemOutbox(maxBytes int64) *memOutbox {
	return &memOutbox{max: maxBytes, notify: make(chan struct{}, 1)}
}

func (m *memOutbox) Append(l outbox.Lane, rec []byte) error {
	m.mu.Lock()
	m.next[l]++
	m.lanes[l] = append(m.lanes[l], outbox.Record{ID: outbox.ID{Lane: l, Index: m.next[l]}, Data: append([]byte(nil), rec...)})
	m.bytes += int64(len(rec))
	for m.bytes > m.max {
		victim := outbox.Telemetry
		if len(m.lanes[victim]) == 0 {
			victim = outbox.Events
		}
		if len(m.lanes[victim]) <= 1 && victim == l {
			break // keep the record just appended
		}
		m.bytes -= int64(len(m.lanes[victim][0].Data))
		m.lanes[victim] = m.lanes[victim][1:]
		m.dropped[victim]++
		m.untaken++
	}
	m.mu.Unlock()
	select {
	case m.notify <- struct{}{}:
	default:
	}
	return nil
}

func (m *memOutbox) Peek(max int) ([]outbox.Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []outbox.Record
	for _, l := range []outbox.Lane{outbox.Events, outbox.Telemetry} {
		for _, r := range m.lanes[l] {
			if len(out) >= max {
				return out, nil
			}
			out = append(out, outbox.Record{ID: r.ID, Data: append([]byte(nil), r.Data...)})
		}
	}
	return out, nil
}

func (m *memOutbox) Ack(ids ...outbox.ID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range ids {
		if int(id.Lane) >= len(m.lanes) {
			continue
		}
		recs := m.lanes[id.Lane]
		for i, r := range recs {
			if r.ID == id {
				m.bytes -= int64(len(r.Data))
				m.lanes[id.Lane] = append(recs[:i:i], recs[i+1:]...)
				break
			}
		}
	}
	return nil
}

func (m *memOutbox) TakeDropped() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := m.untaken
	m.untaken = 0
	return n
}

func (m *memOutbox) Notify() <-chan struct{} { return m.notify }

func (m *memOutbox) Stats() outbox.Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return outbox.Stats{PendingEvents: uint64(len(m.lanes[outbox.Events])), PendingTelemetry: uint64(len(m.lanes[outbox.Telemetry])),
		Dropped: m.dropped[0] + m.dropped[1], DroppedEvents: m.dropped[outbox.Events], DroppedTelemetry: m.dropped[outbox.Telemetry], Bytes: m.bytes}
}

// Close does nothing: the "flash" outlives the agent process.
func (m *memOutbox) Close() error { return nil }
