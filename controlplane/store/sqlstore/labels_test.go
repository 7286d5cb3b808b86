package sqlstore

import (
	"encoding/json"
	"fmt"
	"testing"
)

func TestParseLabels(t *testing.T) {
	for _, s := range []string{
		`{}`, ``, `null`, `{"hw":"rev-b"}`, `{"base":"zurich","hw":"rev-b"}`, `{"a":""}`,
		`{"quote":"x\"y"}`, "{\"\":\"\xe5\"}", "{\"k\":\"\x01\"}", `{"u":"\u00e9t\u00e9"}`, `{ "spaced" : "v" }`, `{"k":"v",}`, `{"k":1}`, `[1]`, `{"k":"v"`,
	} {
		want := map[string]string{}
		_ = json.Unmarshal([]byte(s), &want)
		if got := parseLabels(s); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("parseLabels(%q) = %v, encoding/json says %v", s, got, want)
		}
	}
}

func FuzzParseLabels(f *testing.F) {
	f.Add(`{"base":"zurich","hw":"rev-b"}`)
	f.Add(`{"k":"v\"w"}`)
	f.Fuzz(func(t *testing.T, s string) {
		want := map[string]string{}
		if err := json.Unmarshal([]byte(s), &want); err != nil {
			parseLabels(s) // must not panic
			return
		}
		if got := parseLabels(s); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("parseLabels(%q) = %v, encoding/json says %v", s, got, want)
		}
	})
}
