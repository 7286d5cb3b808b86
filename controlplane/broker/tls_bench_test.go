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
	"github.com/hangarfleet/hangar/controlplane/metrics"
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
	for _, c := range []struct {
		name   string
		srv    *tls.Config
		scheme string
	}{{"tcp", nil, "tcp"}, {"tls", srvTLS, "tls"}} {
		b.Run(c.name, func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			e, err := broker.NewEmbedded(broker.EmbeddedOptions{Listener: ln, Credentials: fakeCreds{"d1": "pw1"}, Metrics: metrics.New(nil), TLS: c.srv})
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
				o := paho.NewClientOptions().AddBroker(url).SetClientID("d1").SetUsername("d1").SetPassword("pw1").
					SetAutoReconnect(false).SetTLSConfig(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
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
