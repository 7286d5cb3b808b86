package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/hangarfleet/hangar/agent"
	"github.com/hangarfleet/hangar/agent/transport"
	"github.com/hangarfleet/hangar/agent/transport/mqttlite"
	"github.com/hangarfleet/hangar/controlplane/broker/mosquittotest"
	"github.com/hangarfleet/hangar/controlplane/brokerconfig"
	"github.com/hangarfleet/hangar/controlplane/cli"
	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/proto"
)

func hangar(t *testing.T, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	if err := cli.Run(context.Background(), args, cli.Env{Stdout: &out, Stderr: &errb, Getenv: func(string) string { return "" }}); err != nil {
		t.Fatalf("hangar %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// TestMosquittoWithDeviceCertificates: Mosquitto configured by `hangar
// broker-config mosquitto` gives devices what the embedded broker does:
// the real agent enrolls with a CSR and sends telemetry over mutual TLS;
// no certificate, or one from another CA, is refused at the handshake; a
// certificate is the device it names whatever client id it asks for; a
// device reaches only its own topics; a revoked device's certificate is
// refused once the broker loads the revocation list.
func TestMosquittoWithDeviceCertificates(t *testing.T) {
	data, out := t.TempDir(), t.TempDir()
	if _, err := devca.Ensure(filepath.Join(data, "tls"), nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	hangar(t, "ca", "init", "--data", data)
	db, err := sqlstore.Open(filepath.Join(data, server.DBFile), sqlstore.Options{}) // the database broker-config reads
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	devPort, ctlPort := mosquittotest.FreePort(t), mosquittotest.FreePort(t)
	user := []string{}
	if os.Geteuid() == 0 {
		user = []string{"--user", "root"}
	}
	msg := hangar(t, append([]string{"broker-config", "mosquitto", "--data", data, "--out", out, "--host", "127.0.0.1",
		"--port", strconv.Itoa(devPort), "--control-port", strconv.Itoa(ctlPort)}, user...)...)
	if !strings.Contains(msg, "--broker-accounts=false") {
		t.Fatalf("broker-config says:\n%s", msg)
	}
	acl := string(readFile(t, filepath.Join(out, brokerconfig.ACLFile)))
	if !strings.Contains(acl, "pattern write hangar/v1/dev/%u/telemetry") {
		t.Fatalf("ACL file:\n%s", acl)
	}
	mq := mosquittotest.StartConfig(t, filepath.Join(out, brokerconfig.ConfFile), devPort)
	waitPort(t, ctlPort)

	ca, err := devcert.Load(filepath.Join(data, "device-ca"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := devca.Ensure(filepath.Join(data, "tls"), nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	pool, _ := devca.Pool(filepath.Join(data, "tls", devca.CAFile))
	roots := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	password := strings.TrimSpace(string(readFile(t, filepath.Join(out, brokerconfig.ControlFile))))
	srv, err := server.New(server.Options{DataDir: data, TLS: cfg, DeviceCA: ca, Logger: logger(),
		BrokerURL: fmt.Sprintf("tcp://127.0.0.1:%d", ctlPort), BrokerUser: brokerconfig.ControlUser, BrokerPassword: password,
		BrokerNoAccounts: true, MQTTAdvertise: fmt.Sprintf("tls://127.0.0.1:%d", devPort),
		HTTPListener: listen(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		err := srv.Run(ctx)
		if err != nil && ctx.Err() == nil {
			t.Errorf("the control plane stopped: %v", err)
		}
		done <- err
	}()
	t.Cleanup(func() { cancel(); <-done })

	run := func(id string) (func(), string) {
		state := t.TempDir()
		a, err := agent.New(agent.Options{DeviceID: id, ServerURL: srv.URL(), EnrollToken: srv.EnrollToken, StateDir: state, NoSync: true,
			TLS: roots, Logger: logger().With("device", id), HeartbeatInterval: time.Second, SampleInterval: 200 * time.Millisecond,
			BatchSize: 2, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		actx, acancel := context.WithCancel(context.Background())
		adone := make(chan struct{})
		go func() { defer close(adone); _ = a.Run(actx) }()
		stop := func() { acancel(); <-adone }
		t.Cleanup(stop)
		return stop, state
	}
	stopA, stateA := run("m-a")
	_, stateB := run("m-b")
	for _, id := range []string{"m-a", "m-b"} {
		waitFor(t, 60*time.Second, id+"'s telemetry through Mosquitto", func() (bool, string) {
			d, err := srv.Store().Device(context.Background(), id)
			return err == nil && d.Latest != nil && d.CertNotAfter != nil, fmt.Sprint(err)
		})
	}
	idA, idB := readFile(t, filepath.Join(stateA, "identity.pem")), readFile(t, filepath.Join(stateB, "identity.pem"))

	dial := func(id string, cert []byte, clientID string) (paho.Client, error) {
		c := roots.Clone()
		if cert != nil {
			kp, err := tls.X509KeyPair(certPEM(cert), keyPEM(cert))
			if err != nil {
				t.Fatal(err)
			}
			c.Certificates = []tls.Certificate{kp}
		}
		o := paho.NewClientOptions().AddBroker(fmt.Sprintf("tls://127.0.0.1:%d", devPort)).SetClientID(clientID).SetUsername(id).
			SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetTLSConfig(c).SetProtocolVersion(4)
		cl := paho.NewClient(o)
		tok := cl.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			return nil, errors.New("connect timed out")
		}
		if tok.Error() != nil {
			return nil, tok.Error()
		}
		t.Cleanup(func() { cl.Disconnect(0) })
		return cl, nil
	}
	if _, err := dial("m-a", nil, "m-a"); !handshakeRefused(err) {
		t.Errorf("no certificate: %v", err)
	}
	other, err := devcert.Init(filepath.Join(t.TempDir(), "other"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	foreign := issuePEM(t, other, "m-a")
	if _, err := dial("m-a", foreign, "m-a"); !handshakeRefused(err) {
		t.Errorf("a certificate from another CA: %v", err)
	}

	// m-a's certificate (a copy, the agent stopped) asking for client id
	// m-b is m-a: the real m-b stays connected, and what it publishes "as
	// m-b" reaches nobody.
	stopA()
	forger, err := dial("m-a", idA, "m-b")
	if err != nil {
		t.Fatalf("m-a's certificate: %v", err)
	}
	got := make(chan string, 10)
	tok := forger.Subscribe(proto.DeviceTopic("m-b", proto.KindCmd), 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() })
	// (Mosquitto's ACL file may grant the subscription; it checks read
	// access on every delivery.)
	tok.WaitTimeout(5 * time.Second)
	forged := proto.Batch{Boot: 1, Seq: 1, Base: time.Now().UnixMilli(), Samples: []proto.Sample{{T: 0}}}
	payload, _ := proto.Marshal(&forged)
	forger.Publish(proto.DeviceTopic("m-b", proto.KindTelemetry), 1, false, payload).WaitTimeout(5 * time.Second)
	// A certificate request "as m-b", for a key of m-a's choosing.
	fk, _, _ := agent.FileKeys{}.New()
	fcsr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, fk)
	forgedCSR, _ := proto.Marshal(&proto.CertRequest{ID: "forged", CSR: fcsr})
	forger.Publish(proto.DeviceTopic("m-b", proto.KindCSR), 1, false, forgedCSR).WaitTimeout(5 * time.Second)
	// Its own topic works: the marker arrives, so anything sent before it
	// that was going to arrive has.
	marker := proto.Event{Boot: 99, Seq: 1, Kind: proto.EventMessage, Code: "marker"}
	mb, _ := proto.Marshal(&marker)
	if tok := forger.Publish(proto.DeviceTopic("m-a", proto.KindEvent), 1, false, mb); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("own topic: %v", tok.Error())
	}
	waitFor(t, 30*time.Second, "the marker event", func() (bool, string) {
		evs, _ := srv.Store().Events(context.Background(), "m-a", 0, 1000)
		for _, e := range evs {
			if e.Code == "marker" {
				return true, ""
			}
		}
		return false, "not yet"
	})
	waitFor(t, 10*time.Second, "m-b still connected", func() (bool, string) {
		d, _ := srv.Store().Device(context.Background(), "m-b")
		return d.Online, "offline"
	})
	rows, err := srv.Store().Telemetry(context.Background(), "m-b", time.Time{}, time.Now().Add(time.Hour), 100000)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Boot == 1 {
			t.Fatalf("telemetry forged as m-b was stored: %+v", r)
		}
	}
	audit, _ := srv.Store().AuditLog(context.Background(), "m-b", 100)
	for _, a := range audit {
		if strings.HasPrefix(a.Action, "device.cert-") {
			t.Fatalf("a certificate request forged as m-b reached the control plane: %+v", a)
		}
	}
	// Renewal through Mosquitto, which does not say which certificate a
	// connection used: a request that proves m-a's current certificate is
	// answered; one signed by another key is refused.
	kp, _ := tls.X509KeyPair(certPEM(idA), keyPEM(idA))
	renewal := func(signer crypto.Signer) []byte {
		nk, _, _ := agent.FileKeys{}.New()
		ncsr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, nk)
		sum := sha256.Sum256(proto.RenewalSigned(ncsr))
		sig, err := signer.Sign(rand.Reader, sum[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := proto.Marshal(&proto.CertRequest{ID: fmt.Sprint(time.Now().UnixNano()), CSR: ncsr, Cert: kp.Certificate[0], Sig: sig})
		return b
	}
	impostor, _, _ := agent.FileKeys{}.New()
	forger.Publish(proto.DeviceTopic("m-a", proto.KindCSR), 1, false, renewal(impostor)).WaitTimeout(5 * time.Second)
	forger.Publish(proto.DeviceTopic("m-a", proto.KindCSR), 1, false, renewal(kp.PrivateKey.(crypto.Signer))).WaitTimeout(5 * time.Second)
	waitFor(t, 30*time.Second, "m-a's renewal answered, the impostor's refused", func() (bool, string) {
		audit, _ := srv.Store().AuditLog(context.Background(), "m-a", 100)
		var renewed, refused bool
		for _, a := range audit {
			renewed = renewed || a.Action == "device.cert-renewed"
			refused = refused || a.Action == "device.cert-refused"
		}
		return renewed && refused, fmt.Sprint(audit)
	})

	// A command to m-b reaches m-b (it answers), and not m-a.
	ping, _ := proto.Marshal(&proto.Command{ID: "ping-mb", Kind: proto.CmdPing, Issued: time.Now().UnixMilli()})
	if err := srv.Bus().Publish(context.Background(), "m-b", proto.KindCmd, ping); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "m-b's answer to the ping", func() (bool, string) {
		evs, _ := srv.Store().Events(context.Background(), "m-b", 0, 1000)
		for _, e := range evs {
			if e.Cmd == "ping-mb" {
				return true, ""
			}
		}
		return false, "not yet"
	})
	select {
	case m := <-got:
		t.Fatalf("m-a received m-b's command %s", m)
	case <-time.After(200 * time.Millisecond):
	}

	// Revoke m-b: once the broker loads the revocation list, its
	// certificate no longer gets in.
	if err := srv.Store().Revoke(context.Background(), "m-b"); err != nil {
		t.Fatal(err)
	}
	hangar(t, "broker-config", "mosquitto", "--data", data, "--out", out, "--crl-only")
	mq.Restart(t)
	// The broker is up (m-a gets in) and refuses m-b's certificate at the
	// handshake.
	waitFor(t, 30*time.Second, "m-a after the restart", func() (bool, string) {
		_, err := dial("m-a", idA, "m-a-check")
		return err == nil, fmt.Sprint(err)
	})
	// (With TLS 1.3 the refusal of a client certificate comes after the
	// client's side of the handshake: as an alert, or as a reset.)
	if _, err := dial("m-b", idB, "m-b"); !handshakeRefused(err) {
		t.Fatalf("the revoked certificate: %v", err)
	}
}

// handshakeRefused reports whether a TLS connection was refused by the
// server's side of the handshake: a certificate alert, or the connection
// closed under the client's first write or read (TLS 1.3 checks the
// client's certificate after the client has finished).
func handshakeRefused(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	for _, sign := range []string{"certificate", "connection reset", "broken pipe", "EOF"} {
		if strings.Contains(s, sign) {
			return true
		}
	}
	return false
}

func waitPort(t *testing.T, port int) {
	t.Helper()
	waitFor(t, 10*time.Second, "the control listener", func() (bool, string) {
		c, err := (&mqttlite.Transport{}).Connect(context.Background(), transport.ConnectParams{
			URL: fmt.Sprintf("tcp://127.0.0.1:%d", port), ClientID: "probe", KeepAlive: 10 * time.Second, OnMessage: func(string, []byte) {}})
		if err == nil {
			c.Close()
		}
		return err == nil || errors.Is(err, transport.ErrNotAuthorized), fmt.Sprint(err)
	})
}

// issuePEM is an identity file (as the agent keeps it) for id from ca.
func issuePEM(t *testing.T, ca *devcert.CA, id string) []byte {
	t.Helper()
	k, stored, err := agent.FileKeys{}.New()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509CSR(k)
	if err != nil {
		t.Fatal(err)
	}
	der, _, err := ca.Issue(csr, id, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return identityPEM(stored, der)
}

func x509CSR(k crypto.Signer) (*x509.CertificateRequest, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		return nil, err
	}
	return devcert.ParseCSR(der)
}

func identityPEM(stored, der []byte) []byte {
	return append(pem.EncodeToMemory(&pem.Block{Type: "HANGAR DEVICE KEY", Bytes: stored}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
}
