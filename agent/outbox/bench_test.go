package outbox

import "testing"

// BenchmarkAppend appends telemetry batches of a typical 1 KiB; with sync,
// the figure is the disk's fsync latency.
func BenchmarkAppend(b *testing.B) {
	for _, bc := range []struct {
		name   string
		noSync bool
	}{{"nosync", true}, {"sync", false}} {
		b.Run(bc.name, func(b *testing.B) {
			o := openT(b, b.TempDir(), Options{NoSync: bc.noSync})
			rec := payload(Telemetry, 0, 1<<10)
			b.SetBytes(int64(len(rec)))
			b.ReportAllocs()
			for b.Loop() {
				if err := o.Append(Telemetry, rec); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPeekAck is the sender's loop over a backlog: Peek a window of 32
// records of 1 KiB, Ack them. The figure is per record.
func BenchmarkPeekAck(b *testing.B) {
	o := openT(b, b.TempDir(), Options{MaxBytes: 64 << 20, NoSync: true})
	rec := payload(Telemetry, 0, 1<<10)
	const backlog = 20000
	fill := func() {
		for range backlog {
			if err := o.Append(Telemetry, rec); err != nil {
				b.Fatal(err)
			}
		}
	}
	fill()
	b.SetBytes(int64(len(rec)))
	b.ReportAllocs()
	b.ResetTimer()
	for sent := 0; sent < b.N; {
		recs, err := o.Peek(min(32, b.N-sent))
		if err != nil {
			b.Fatal(err)
		}
		if len(recs) == 0 {
			b.StopTimer()
			fill()
			b.StartTimer()
			continue
		}
		if err := o.Ack(ids(recs)...); err != nil {
			b.Fatal(err)
		}
		sent += len(recs)
	}
}
