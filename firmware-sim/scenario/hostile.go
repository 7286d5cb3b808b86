package scenario

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/hangarfleet/hangar/proto"
)

// HostileReport is what the hostile device tried and what the control
// plane recorded of it.
type HostileReport struct {
	Attempts []string `json:"attempts"`
	// Counter increases on the control plane over the attack.
	DecodeErrors float64 `json:"decode_errors"`
	ACLDenials   float64 `json:"acl_denials"`
	AuthFailures float64 `json:"auth_failures"`
	// Healthy: the control plane answered /healthz after it, and every
	// drone was still online.
	Healthy bool   `json:"healthy"`
	Detail  string `json:"detail,omitempty"`
}

// metric sums every series of a Prometheus metric on the control plane;
// found is false when it has none (a labelled counter nothing incremented
// yet).
func (r *runner) metric(ctx context.Context, name string) (v float64, found bool, err error) {
	tok, err := os.ReadFile(r.tok)
	if err != nil {
		return 0, false, err
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, false, fmt.Errorf("metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, false, err
	}
	return sumMetric(string(b), name)
}

// sumMetric sums every series of metric name in a Prometheus text
// exposition; found says whether there was any. A value that does not
// parse is an error: an expectation must not pass on a zero nobody
// measured.
func sumMetric(text, name string) (sum float64, found bool, err error) {
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		if i := strings.LastIndexByte(rest, '}'); i >= 0 {
			rest = rest[i+1:]
		}
		f := strings.Fields(rest) // value [timestamp]
		if len(f) == 0 {
			return 0, false, fmt.Errorf("metric %s: no value in %q", name, line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return 0, false, fmt.Errorf("metric %s: %w", name, err)
		}
		sum, found = sum+v, true
	}
	return sum, found, nil
}

// hostile enrolls a device of its own with the fleet token and misbehaves:
// malformed CBOR, an oversized message, publishes to another drone's
// topics, a wildcard subscription, a wrong password and another drone's
// identity.
func (r *runner) hostile(ctx context.Context, victim string) (*HostileReport, error) {
	rep := &HostileReport{}
	names := []string{"hangar_ingest_decode_errors_total", "hangar_mqtt_acl_denials_total", "hangar_mqtt_auth_failures_total"}
	var before [3]float64
	for i, n := range names {
		v, _, err := r.metric(ctx, n)
		if err != nil {
			return nil, err
		}
		before[i] = v
	}
	client := &http.Client{Timeout: 10 * time.Second}
	body, _ := json.Marshal(map[string]any{"enroll_token": r.enroll, "device_id": "hostile-1", "hardware": "rev-a"})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.droneURL+"/api/v1/enroll", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("hostile device: enroll: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		resp.Body.Close()
		return nil, fmt.Errorf("hostile device: enroll: %s: %s", resp.Status, bytes.TrimSpace(b))
	}
	var cred struct {
		MQTTURL, Username, Password string
	}
	err = json.NewDecoder(resp.Body).Decode(&struct {
		MQTTURL  *string `json:"mqtt_url"`
		Username *string `json:"username"`
		Password *string `json:"password"`
	}{&cred.MQTTURL, &cred.Username, &cred.Password})
	resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("hostile device: enroll: %w", err)
	}
	connect := func(user, pass string) (paho.Client, error) {
		o := paho.NewClientOptions().AddBroker(cred.MQTTURL).SetClientID(user).SetUsername(user).SetPassword(pass).
			SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second)
		c := paho.NewClient(o)
		t := c.Connect()
		t.WaitTimeout(10 * time.Second)
		return c, t.Error()
	}
	try := func(what string, err error) {
		res := "refused (" + fmt.Sprint(err) + ")"
		if err == nil {
			res = "taken by the broker, judged by the control plane"
		}
		rep.Attempts = append(rep.Attempts, what+": "+res)
	}
	for _, a := range []struct{ what, user, pass string }{
		{"connect with a wrong password", "hostile-1", "not-the-password"},
		{"connect as " + victim + " with the hostile device's password", victim, cred.Password},
	} {
		c, err := connect(a.user, a.pass)
		if err == nil {
			c.Disconnect(100) // it must not have got in; if it did, do not keep the victim out
		}
		try(a.what, err)
	}
	// Each attempt on a fresh connection: a broker may drop a client after
	// a refused publish, and the next attempt must be judged on its own.
	attempt := func(what string, do func(c paho.Client) paho.Token) error {
		c, err := connect(cred.Username, cred.Password)
		if err != nil {
			return fmt.Errorf("hostile device: connect: %w", err)
		}
		t := do(c)
		t.WaitTimeout(5 * time.Second)
		err = t.Error()
		if st, ok := t.(*paho.SubscribeToken); ok && err == nil {
			for _, code := range st.Result() {
				if code == 0x80 {
					err = errors.New("SUBACK failure")
				}
			}
		}
		if err == nil {
			time.Sleep(200 * time.Millisecond)
			if !c.IsConnected() {
				err = errors.New("disconnected")
			}
		}
		try(what, err)
		c.Disconnect(100)
		return nil
	}
	pub := func(topic string, payload []byte) func(c paho.Client) paho.Token {
		return func(c paho.Client) paho.Token { return c.Publish(topic, 1, false, payload) }
	}
	sub := func(topic string) func(c paho.Client) paho.Token {
		return func(c paho.Client) paho.Token { return c.Subscribe(topic, 1, nil) }
	}
	own := proto.DeviceTopic("hostile-1", proto.KindTelemetry)
	for _, a := range []struct {
		what string
		do   func(c paho.Client) paho.Token
	}{
		{"malformed CBOR as telemetry", pub(own, []byte{0xbf, 0xff, 0x00, 0x13, 0x37})},
		{"a map with duplicate keys", pub(own, []byte{0xa2, 0x01, 0x01, 0x01, 0x02})},
		{"an event that is not CBOR", pub(proto.DeviceTopic("hostile-1", proto.KindEvent), []byte(`{"kind":"alert"}`))},
		{"telemetry into " + victim + "'s topic", pub(proto.DeviceTopic(victim, proto.KindTelemetry), []byte{0xa0})},
		{"a command into " + victim + "'s topic", pub(proto.DeviceTopic(victim, proto.KindCmd), []byte{0xa0})},
		{"subscribe to every topic", sub(proto.TopicPrefix + "/#")},
		{"subscribe to " + victim + "'s commands", sub(proto.DeviceTopic(victim, proto.KindCmd))},
		{"an oversized message (1 MiB)", pub(own, bytes.Repeat([]byte{0x40}, 1<<20))},
	} {
		if err := attempt(a.what, a.do); err != nil {
			return nil, err
		}
	}
	time.Sleep(3 * time.Second) // ingest and metrics catch up
	for i, n := range names {
		v, _, err := r.metric(ctx, n)
		if err != nil {
			return nil, err
		}
		d := v - before[i]
		switch i {
		case 0:
			rep.DecodeErrors = d
		case 1:
			rep.ACLDenials = d
		case 2:
			rep.AuthFailures = d
		}
	}
	hreq, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/healthz", nil)
	h, err := client.Do(hreq)
	switch {
	case err != nil:
		rep.Detail = "healthz: " + err.Error()
	case h.StatusCode != http.StatusOK:
		rep.Detail = "healthz: " + h.Status
	default:
		rep.Healthy = true
	}
	if err == nil {
		h.Body.Close()
	}
	if rep.Healthy {
		if err := r.waitOnline(ctx, 30*time.Second); err != nil {
			rep.Healthy, rep.Detail = false, err.Error()
		}
	}
	return rep, nil
}
