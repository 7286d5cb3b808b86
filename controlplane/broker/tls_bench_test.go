package broker_test

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// BenchmarkConnect measures a device's whole connect (TCP, TLS when on,
// CONNECT, authentication, CONNACK) against the embedded broker: plain
// TCP is the baseline of TLS, in the same run.
func BenchmarkConnect(b *testing.B) {
	dir := b.TempDir()
	srvTLS, err := devca.Ensure(dir, nil, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	pem, _ := os.ReadFile(filepath.Join(dir, devca.CAFile))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	ca, err := devcert.Init(filepath.Join(dir, "device-ca"), time.Now())
	if err != nil {
		b.Fatal(err)
	}
	mb := &mtlsBroker{ca: ca, creds: &certCreds{auth: map[string]store.DeviceAuth{}}}
	dev := mb.cert(b, ca, "d1", time.Now(), time.Hour, true)
	for _, c := range []struct {
		name   string
		srv    *tls.Config
		scheme string
		mtls   bool
	}{{"tcp", nil, "tcp", false}, {"tls", srvTLS, "tls", false}, {"mtls", srvTLS, "tls", true}} {
		b.Run(c.name, func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			opts := broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1"}, Metrics: metrics.New(nil), TLS: c.srv}
			clientTLS := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
			pass := "pw1"
			if c.mtls {
				opts.Credentials, opts.DeviceCAs = mb.creds, ca.Pool()
				clientTLS.Certificates = []tls.Certificate{dev}
				pass = ""
			}
			e, err := broker.NewEmbedded(opts)
			if err != nil {
				b.Fatal(err)
			}
			if err := e.Start(b.Context(), syncHandler(nil).async); err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			url := c.scheme + "://" + ln.Addr().String()
			b.ResetTimer()
			for range b.N {
				o := paho.NewClientOptions().AddBroker(url).SetClientID("d1").SetUsername("d1").SetPassword(pass).
					SetAutoReconnect(false).SetTLSConfig(clientTLS)
				cl := paho.NewClient(o)
				if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
					b.Fatalf("connect: %v", tok.Error())
				}
				cl.Disconnect(0)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "connects/s")
		})
	}
}
