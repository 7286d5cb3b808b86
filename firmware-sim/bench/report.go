package bench

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// PrintIngest prints results side by side, the first as the baseline.
func PrintIngest(w io.Writer, rs []IngestResult) {
	if len(rs) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	row := func(name string, f func(r IngestResult) string) {
		fmt.Fprintf(tw, "%s\t", name)
		for _, r := range rs {
			fmt.Fprintf(tw, "%s\t", f(r))
		}
		fmt.Fprintln(tw)
	}
	row("broker", func(r IngestResult) string { return r.Broker })
	row("drones (connections)", func(r IngestResult) string { return fmt.Sprintf("%d", r.Connected) })
	row("offered msgs/s", func(r IngestResult) string { return fmt.Sprintf("%.0f", r.OfferedRate) })
	row("stored msgs/s", func(r IngestResult) string {
		s := fmt.Sprintf("%.0f", r.Rate)
		if rs[0].Rate > 0 && r.Broker != rs[0].Broker {
			s += fmt.Sprintf(" (%.2fx)", r.Rate/rs[0].Rate)
		}
		return s
	})
	row("sent / stored", func(r IngestResult) string { return fmt.Sprintf("%d / %d", r.Sent, r.Stored) })
	row("lost: acked, not stored (of checked)", func(r IngestResult) string { return fmt.Sprintf("%d (of %d)", r.Lost, r.Checked) })
	row("throttled sends", func(r IngestResult) string { return fmt.Sprintf("%d", r.Throttled) })
	row("PUBACK p50 / p99 ms", func(r IngestResult) string { return fmt.Sprintf("%.1f / %.1f", r.AckP50, r.AckP99) })
	row("publish-to-commit p50 / p99 ms", func(r IngestResult) string { return fmt.Sprintf("%.1f / %.1f", r.LagP50, r.LagP99) })
	row("control plane RSS MB", func(r IngestResult) string { return fmt.Sprintf("%.0f", r.ServerRSSMB) })
	row("broker RSS MB", func(r IngestResult) string {
		if r.BrokerRSSMB == 0 {
			return "(in process)"
		}
		return fmt.Sprintf("%.0f", r.BrokerRSSMB)
	})
	row("RSS per connection KB", func(r IngestResult) string { return fmt.Sprintf("%.1f", r.RSSPerConnKB) })
	row("control plane CPU cores", func(r IngestResult) string { return fmt.Sprintf("%.2f", r.ServerCPU) })
	row("broker CPU cores", func(r IngestResult) string {
		if r.BrokerCPU == 0 {
			return "(in process)"
		}
		return fmt.Sprintf("%.2f", r.BrokerCPU)
	})
	row("drain after load, s", func(r IngestResult) string { return fmt.Sprintf("%.1f", r.DrainSeconds) })
	row("load generator CPU cores", func(r IngestResult) string { return fmt.Sprintf("%.2f", r.LoadCPU) })
	row("messages per commit", func(r IngestResult) string { return fmt.Sprintf("%.0f", r.GroupSize) })
	row("store write ms", func(r IngestResult) string { return fmt.Sprintf("%.1f", r.CommitMS) })
	row("connect all, s", func(r IngestResult) string { return fmt.Sprintf("%.1f", r.ConnectSeconds) })
	tw.Flush()
}
