package cli

import (
	"fmt"
	"time"
)

// now is the clock the tables read (tests set it).
var now = time.Now

// humanDuration is a duration as people read it: the two largest units
// ("3d4h", "2h5m", "4m10s", "12s").
func humanDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	switch {
	case d < time.Second:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d/time.Minute), int(d%time.Minute/time.Second))
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d/time.Hour), int(d%time.Hour/time.Minute))
	}
	days := int(d / (24 * time.Hour))
	if days >= 100 {
		return fmt.Sprintf("%dd", days)
	}
	return fmt.Sprintf("%dd%dh", days, int(d%(24*time.Hour)/time.Hour))
}

// humanTime is a moment relative to now ("5m10s ago", "in 3d2h"); the
// exact value is in -o json.
func humanTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now().Sub(t)
	if d >= 0 {
		return humanDuration(d) + " ago"
	}
	return "in " + humanDuration(-d)
}

func ago(t *time.Time) string {
	if t == nil {
		return "never"
	}
	return humanTime(*t)
}

// humanBytes is a size in binary units ("7.5 MiB").
func humanBytes[N int64 | uint64 | int](v N) string {
	n := uint64(v)
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
