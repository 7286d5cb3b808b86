package rollout

import (
	"strings"
	"testing"
)

// FuzzParseStages: what parses is a list of valid stages that prints and
// parses back to itself.
func FuzzParseStages(f *testing.F) {
	for _, s := range []string{"1%,10%,50%,100%", "5,50,100%", "0.5%", " 3 , 7%", "100%,", "1e3", "NaN%", "-1", "0x10", "0.001%", "33.333%"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseStages(s)
		if err != nil {
			return
		}
		var parts []string
		for _, x := range st {
			if (x.Count > 0) == (x.Percent > 0) || x.Percent > 100 || x.Count < 0 {
				t.Fatalf("%q: invalid stage %+v", s, x)
			}
			parts = append(parts, x.String())
		}
		again, err := ParseStages(strings.Join(parts, ","))
		if err != nil || len(again) != len(st) {
			t.Fatalf("%q printed as %q does not parse back: %v", s, strings.Join(parts, ","), err)
		}
	})
}

// FuzzParseWindow: what parses is a window of minutes within a day.
func FuzzParseWindow(f *testing.F) {
	for _, s := range []string{"22:00-06:00", "00:00-24:00", "9:05-10:07", "-1:00-02:00", "23:59-00:00", "1:2-3:4junk"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		w, err := ParseWindow(s)
		if err != nil {
			return
		}
		if w.Start < 0 || w.Start >= 24*60 || w.End < 0 || w.End > 24*60 {
			t.Fatalf("%q: window %+v outside a day", s, w)
		}
	})
}
