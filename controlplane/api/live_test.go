package api_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore/sqlstoretest"
	"github.com/hangarfleet/hangar/proto/prototest"
)

type sseMsg struct {
	event string
	data  string
}

func openStream(t *testing.T, url, token string) (<-chan sseMsg, *http.Response) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url+"/api/v1/events/stream", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan sseMsg, 64)
	go func() {
		defer close(ch)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		var m sseMsg
		for sc.Scan() {
			switch l := sc.Text(); {
			case strings.HasPrefix(l, "event: "):
				m.event = l[7:]
			case strings.HasPrefix(l, "data: "):
				m.data += l[6:]
			case l == "" && m.event != "":
				ch <- m
				m = sseMsg{}
			}
		}
	}()
	return ch, resp
}

func next(t *testing.T, ch <-chan sseMsg, event string) sseMsg {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m, ok := <-ch:
			if !ok {
				t.Fatalf("the stream ended waiting for %s", event)
			}
			if m.event == event {
				return m
			}
		case <-timeout:
			t.Fatalf("no %s message", event)
		}
	}
}

// TestLiveStream: a stream says hello with its principal, tells which
// topics changed with the new events in the message, and ends once its
// token is revoked; one token cannot open more than its share.
func TestLiveStream(t *testing.T) {
	db := sqlstoretest.Open(t, sqlstore.Options{})
	ctx := context.Background()
	admin := api.NewSecret("hga_")
	db.SetToken(ctx, api.TokenAdmin, broker.HashPassword(admin), time.Now())
	a := api.New(api.Options{Store: db, Bus: &fakeBus{}, LiveInterval: 20 * time.Millisecond, LiveKeepAlive: 100 * time.Millisecond,
		MQTTURL: func(*http.Request) string { return "tcp://broker:1883" }})
	srv := httptest.NewServer(a)
	defer srv.Close()
	// First (defers run last in, first out): end the streams, which
	// httptest's Close would otherwise wait for.
	defer a.CloseLive()
	env := &roleEnv{db: db, now: time.Now()}
	viewer := env.addToken(t, "vic", store.RoleViewer, nil)

	ch, _ := openStream(t, srv.URL, viewer)
	hello := next(t, ch, "hello")
	var p api.Principal
	if json.Unmarshal([]byte(hello.data), &p); p.Name != "vic" || p.Role != store.RoleViewer {
		t.Errorf("hello %s", hello.data)
	}
	waitStreams := func(n int) {
		deadline := time.Now().Add(5 * time.Second)
		for a.LiveStreams() != n {
			if time.Now().After(deadline) {
				t.Fatalf("%d streams open, want %d", a.LiveStreams(), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitStreams(1)
	// Until the loop has read its first marks a change goes unannounced:
	// write audit entries until one is announced.
	for announced := false; !announced; {
		if _, err := db.AddAudit(ctx, store.Audit{Time: time.Now(), Actor: "test", Action: "poke"}); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-ch:
			announced = m.event == "change" && strings.Contains(m.data, api.TopicAudit)
		case <-time.After(time.Second):
		}
	}
	enroll := store.Enrollment{ID: "d1", CredHash: []byte("x"), Now: time.Now()}
	if _, err := db.Enroll(ctx, enroll); err != nil {
		t.Fatal(err)
	}
	up := prototest.UpdateEvent()
	if _, err := db.WriteIngest(ctx, []store.IngestItem{{Device: "d1", Kind: store.IngestEvent, Event: &up, Received: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	var change api.LiveChange
	for !strings.Contains(strings.Join(change.Topics, ","), api.TopicEvents) {
		m := next(t, ch, "change")
		change = api.LiveChange{}
		if err := json.Unmarshal([]byte(m.data), &change); err != nil {
			t.Fatal(err)
		}
	}
	if len(change.Events) != 1 || change.Events[0].Device != "d1" || change.Events[0].Update == nil {
		t.Errorf("the change carries %+v", change.Events)
	}
	// A relabelling, which no watermark shows, is announced too.
	req, _ := http.NewRequest(http.MethodPatch, srv.URL+"/api/v1/devices/d1/labels", strings.NewReader(`{"set":{"base":"oslo"}}`))
	req.Header.Set("Authorization", "Bearer "+admin)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("label: %v %v", err, resp)
	}
	resp.Body.Close()
	for deadline := time.Now().Add(10 * time.Second); ; {
		m := next(t, ch, "change")
		if strings.Contains(m.data, api.TopicFleet) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no fleet change after a relabelling; last: %s", m.data)
		}
	}
	// A token's share of streams.
	var extra []*http.Response
	for range api.MaxLiveStreamsPerToken - 1 {
		_, resp := openStream(t, srv.URL, viewer)
		extra = append(extra, resp)
	}
	waitStreams(api.MaxLiveStreamsPerToken)
	req, _ = http.NewRequest(http.MethodGet, srv.URL+"/api/v1/events/stream", nil)
	req.Header.Set("Authorization", "Bearer "+viewer)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Errorf("stream over the token's share: %d", resp.StatusCode)
	}
	for _, r := range extra {
		r.Body.Close()
	}
	// Revoked: the stream ends at its next check.
	if _, err := db.RevokeAPIToken(ctx, "vic", time.Now()); err != nil {
		t.Fatal(err)
	}
	end := next(t, ch, "end")
	if !strings.Contains(end.data, "revoked") {
		t.Errorf("end: %s", end.data)
	}
	waitStreams(0)
}
