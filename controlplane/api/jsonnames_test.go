package api_test

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// served are the types the API answers with, and the request bodies the
// console writes.
var served = []any{
	api.CreateRollout{}, api.CreateToken{}, api.LabelRequest{}, api.UpdateRequest{}, api.ActRequest{},
	store.Device{}, store.Event{}, store.Audit{}, store.AuditVerification{}, store.FleetHealth{}, store.Release{},
	store.DeviceUpdate{}, store.APIToken{}, store.Profile{},
	rollout.Rollout{}, rollout.StatusReport{}, rollout.MemberReport{}, rollout.Preview{},
	api.CreateResult{}, api.DeliveryReport{}, api.TelemetryResponse{}, api.Principal{}, api.LiveChange{}, api.CreatedToken{}, api.RevokedToken{},
}

var snake = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// jsonNames walks a type and returns every JSON name it can send; a field
// without a snake_case name is an error.
func jsonNames(t *testing.T, typ reflect.Type, path string, seen map[reflect.Type]bool, names map[string]bool) {
	for typ.Kind() == reflect.Pointer || typ.Kind() == reflect.Slice || typ.Kind() == reflect.Array || typ.Kind() == reflect.Map {
		if typ.Kind() == reflect.Map && typ.Key().Kind() == reflect.Struct {
			t.Errorf("%s: a map keyed by a struct", path)
		}
		typ = typ.Elem()
	}
	if typ.Kind() != reflect.Struct || seen[typ] || typ.PkgPath() == "time" {
		return
	}
	seen[typ] = true
	for i := range typ.NumField() {
		f := typ.Field(i)
		if !f.IsExported() {
			continue
		}
		tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if tag == "-" {
			continue
		}
		if tag == "" && f.Anonymous {
			jsonNames(t, f.Type, path, seen, names)
			continue
		}
		if !snake.MatchString(tag) {
			t.Errorf("%s.%s is sent as %q: give it a snake_case json name", path, f.Name, f.Name)
			continue
		}
		names[tag] = true
		jsonNames(t, f.Type, path+"."+f.Name, seen, names)
	}
}

// TestJSONSnakeCase: every field the API sends or takes has a snake_case
// name, and every snake_case property the console reads or writes is one
// of them.
func TestJSONSnakeCase(t *testing.T) {
	names := map[string]bool{}
	seen := map[reflect.Type]bool{}
	for _, v := range served {
		typ := reflect.TypeOf(v)
		jsonNames(t, typ, typ.String(), seen, names)
	}
	// Member states are keys of the stage counts the console reads.
	for _, s := range rollout.MemberStates {
		names[string(s)] = true
	}
	files, _ := filepath.Glob("../web/static/js/*.js")
	if len(files) == 0 {
		t.Fatal("no console scripts found")
	}
	prop := regexp.MustCompile(`\.([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b`)
	var missing []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range prop.FindAllStringSubmatch(string(b), -1) {
			if !names[m[1]] {
				missing = append(missing, filepath.Base(f)+": "+m[1])
			}
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the console uses fields the API neither sends nor takes:\n%s", strings.Join(missing, "\n"))
	}
}
