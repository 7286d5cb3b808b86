package guard

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sampleRecord() *Record {
	return &Record{
		Version: "1.2.0", SHA256: bytes.Repeat([]byte{1}, 32), PrevSHA256: bytes.Repeat([]byte{2}, 32),
		MaxStarts: 3, Budget: 150 * time.Second, Starts: 2, Used: 1234 * time.Millisecond, Reached: true,
		Last: "exited with status 1\nafter 3ms", Verdict: "v", GaveUp: true,
	}
}

func TestRecordRoundTrip(t *testing.T) {
	r := sampleRecord()
	got, err := Unmarshal(r.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	want := *r
	want.Last = "exited with status 1 after 3ms" // kept on its line
	if !reflect.DeepEqual(got, &want) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, &want)
	}
	// A newer agent's extra keys are ignored.
	withExtra := append(r.Marshal(), "future-key 7\n"...)
	if _, err := Unmarshal(withExtra); err != nil {
		t.Errorf("extra key: %v", err)
	}
}

func TestRecordRejects(t *testing.T) {
	good := string(sampleRecord().Marshal())
	for name, data := range map[string]string{
		"empty":        "",
		"other format": strings.Replace(good, RecordFormat, "hangar-trial 2", 1),
		"no digest":    RecordFormat + "\nversion 1\n",
		"short digest": strings.Replace(good, "sha256 "+strings.Repeat("01", 32), "sha256 0101", 1),
		"bad number":   strings.Replace(good, "starts 2", "starts -2", 1),
	} {
		if _, err := Unmarshal([]byte(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestDecide(t *testing.T) {
	sum := bytes.Repeat([]byte{1}, 32)
	other := bytes.Repeat([]byte{3}, 32)
	fresh := func(edit func(*Record)) *Record {
		r := &Record{Version: "1.2.0", SHA256: sum, MaxStarts: 3, Budget: time.Minute}
		edit(r)
		return r
	}
	for _, c := range []struct {
		name string
		r    *Record
		sum  []byte
		want Action
		says string
		gone bool // the previous build is not kept
	}{
		{"no record", nil, sum, Exec, "", false},
		{"another build in place", fresh(func(r *Record) {}), other, Exec, "", false},
		{"first start", fresh(func(r *Record) {}), sum, Start, "", false},
		{"starts left", fresh(func(r *Record) { r.Starts = 2 }), sum, Start, "", false},
		{"out of starts", fresh(func(r *Record) { r.Starts = 3 }), sum, Restore, "started 3 times", false},
		{"out of time", fresh(func(r *Record) { r.Used = time.Minute }), sum, Restore, "within 1m0s of run time", false},
		{"restore begun", fresh(func(r *Record) { r.Verdict = "earlier verdict" }), sum, Restore, "earlier verdict", false},
		{"restore done", fresh(func(r *Record) { r.Verdict = "earlier verdict" }), other, Exec, "", false},
		{"gave up", fresh(func(r *Record) { r.Starts, r.GaveUp = 9, true }), sum, Exec, "", false},
		{"committed by a build that keeps the record", fresh(func(r *Record) { r.Starts = 3 }), sum, Exec, "", true},
		{"restore begun, previous build gone", fresh(func(r *Record) { r.Verdict = "v" }), sum, Restore, "v", true},
	} {
		got, says := Decide(c.r, c.sum, !c.gone)
		if got != c.want || !strings.Contains(says, c.says) {
			t.Errorf("%s: %v %q, want %v saying %q", c.name, got, says, c.want, c.says)
		}
	}
}

func FuzzUnmarshal(f *testing.F) {
	f.Add(sampleRecord().Marshal())
	f.Add([]byte(RecordFormat + "\nsha256 " + strings.Repeat("ab", 32) + "\n"))
	f.Add([]byte(RecordFormat + "\nstarts 99999999999999999999\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Unmarshal(data)
		if err != nil {
			return
		}
		// What the guard accepts, it writes back the same.
		again, err := Unmarshal(r.Marshal())
		if err != nil || !reflect.DeepEqual(r, again) {
			t.Fatalf("round trip of %q: %v\n%+v\n%+v", data, err, r, again)
		}
	})
}
