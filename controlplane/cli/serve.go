package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"github.com/hangarfleet/hangar/internal/units"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof" // for --pprof
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/brokerconfig"
	"github.com/hangarfleet/hangar/controlplane/devca"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/leader"
	"github.com/hangarfleet/hangar/controlplane/server"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/proto"
)

func runServe(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("serve")
	var o server.Options
	fs.StringVar(&o.DataDir, "data", envOr(g, "HANGAR_DATA", server.DefaultDataDir), "data directory: SQLite database and token files (env HANGAR_DATA)")
	fs.StringVar(&o.Store, "store", g.env.Getenv("HANGAR_STORE"), "where records are kept: a PostgreSQL URL (postgres://user@host/db; several replicas may share it) or a SQLite file (default DATA/hangar.db; env HANGAR_STORE)")
	fs.StringVar(&o.Replica, "replica", g.env.Getenv("HANGAR_REPLICA"), "this control plane's name among replicas sharing a PostgreSQL store (default: host name and process id; env HANGAR_REPLICA)")
	fs.DurationVar(&o.LeaseTTL, "lease-ttl", leader.DefaultTTL, "term of the scheduler lease: the replica holding it runs rollouts; another takes over this long after it dies")
	fs.StringVar(&o.BrokerClientID, "broker-client-id", g.env.Getenv("HANGAR_BROKER_CLIENT_ID"), "this replica's MQTT client id on the external broker (default hangar:controlplane; distinct per replica, stable across restarts)")
	fs.StringVar(&o.BrokerShare, "broker-share", g.env.Getenv("HANGAR_BROKER_SHARE"), "receive device messages through the shared subscription group $share/GROUP/...: replicas of one group split the ingest (external broker)")
	fs.StringVar(&o.HTTPAddr, "http", envOr(g, "HANGAR_HTTP", server.DefaultHTTPAddr), "REST API and dashboard listen address (env HANGAR_HTTP)")
	fs.StringVar(&o.MQTTAddr, "mqtt", envOr(g, "HANGAR_MQTT", server.DefaultMQTTAddr), "embedded MQTT broker listen address (env HANGAR_MQTT)")
	fs.StringVar(&o.BrokerURL, "broker", g.env.Getenv("HANGAR_BROKER"), "use this external MQTT broker (tcp://host:port) instead of the embedded one (env HANGAR_BROKER)")
	fs.StringVar(&o.BrokerUser, "broker-user", envOr(g, "HANGAR_BROKER_USER", "hangar-admin"), "control plane's account on the external broker")
	brokerAccounts := fs.Bool("broker-accounts", true, "make and delete device accounts on the external broker (Mosquitto's dynamic security plugin); false for a broker that knows devices by certificate (hangar broker-config mosquitto)")
	calloutSeedFile := fs.String("broker-callout-seed-file", g.env.Getenv("HANGAR_BROKER_CALLOUT_SEED_FILE"), "with a nats:// broker: file holding the account seed (SA...) the auth callout signs devices' authorizations with; its public key is the callout issuer in the NATS configuration")
	brokerPassFile := fs.String("broker-password-file", g.env.Getenv("HANGAR_BROKER_PASSWORD_FILE"), "file holding that account's password (or env HANGAR_BROKER_PASSWORD)")
	fs.StringVar(&o.MQTTAdvertise, "mqtt-advertise", g.env.Getenv("HANGAR_MQTT_ADVERTISE"), "broker URL handed to devices at enrollment (default: the broker's listen address; required when it listens on every address)")
	fs.DurationVar(&o.Retention, "retention", server.DefaultRetention, "how long telemetry and device events are kept")
	fs.DurationVar(&o.HistoryInterval, "history-interval", server.DefaultHistoryInterval, "how often the fleet's health summary is kept for the console's charts over time")
	fs.DurationVar(&o.OnlineTimeout, "online-timeout", 90*time.Second, "a device silent this long is shown offline")
	fs.DurationVar(&o.RolloutInterval, "rollout-interval", 2*time.Second, "how often active rollouts are judged and advanced")
	fs.IntVar(&o.ConnectRate, "connect-rate", 0, "cap on MQTT connections accepted per second by the embedded broker (0: none)")
	fs.Int64Var(&o.MaxConnections, "max-connections", 0, "cap on the embedded broker's open connections, authenticated or not; beyond it new ones are closed at once (0: none)")
	fs.Float64Var(&o.EnrollRate, "enroll-rate", 20, "enrollment attempts per second per source address, bursting ten seconds' worth (0: no limit)")
	fs.Float64Var(&o.DeviceMsgRate, "device-msg-rate", 50, "each device's ingest quota in messages per second, bursting a minute's worth; beyond it messages are dropped and counted (0: none)")
	fs.Float64Var(&o.DeviceByteRate, "device-byte-rate", 256<<10, "each device's ingest quota in bytes per second, bursting 16 MiB (0: none)")
	fs.Float64Var(&o.AuthFailRate, "auth-fail-rate", 10, "failed MQTT authentications per second per source address before that source is refused for a while (0: no limit)")
	tlsCert := fs.String("tls-cert", g.env.Getenv("HANGAR_TLS_CERT"), "serve the API, dashboard and embedded broker over TLS with this certificate chain (PEM; env HANGAR_TLS_CERT)")
	tlsKey := fs.String("tls-key", g.env.Getenv("HANGAR_TLS_KEY"), "the private key of --tls-cert (PEM; env HANGAR_TLS_KEY)")
	tlsDev := fs.Bool("tls-dev", true, "without --tls-cert: serve over TLS with a development CA made in DATA/tls (hand DATA/tls/ca.pem to agents as --ca-file); the default")
	insecure := fs.Bool("insecure", false, "serve plain HTTP and MQTT, no TLS (tests, a closed network): tokens and passwords cross the network in clear")
	caCert := fs.String("device-ca-cert", g.env.Getenv("HANGAR_DEVICE_CA_CERT"), "issue device certificates with this CA certificate (PEM) instead of the built-in device CA in DATA/device-ca")
	caKey := fs.String("device-ca-key", g.env.Getenv("HANGAR_DEVICE_CA_KEY"), "the private key of --device-ca-cert (PEM)")
	deviceCerts := fs.Bool("device-certs", true, "authenticate devices with certificates from the device CA over mutual TLS (the built-in CA is made on first start with the embedded broker; see hangar ca init); false: passwords only")
	fs.DurationVar(&o.CertTTL, "cert-ttl", devcert.DefaultTTL, "lifetime of a device certificate; devices renew with a third of it left")
	fs.BoolVar(&o.NewAdminToken, "new-admin-token", false, "replace the bootstrap admin token in DATA/admin.token at this start (the old one stops working); named tokens: hangar token")
	fs.BoolVar(&o.Approval, "enroll-approval", false, "hold every enrollment for an operator's approval (hangar device ls --pending, hangar device approve)")
	var rootKeys []string
	fs.Func("root-key", "release root public key (PEM file); pushed releases must chain to one (repeat for several)", func(v string) error {
		rootKeys = append(rootKeys, v)
		return nil
	})
	maxArtifact := fs.String("max-artifact", "1GiB", "largest release artifact accepted")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	memLimit := fs.String("memory-limit", g.env.Getenv("HANGAR_MEMORY_LIMIT"),
		"soft limit for the Go heap and stacks, e.g. 256MiB or 2GiB (the Go runtime's GOMEMLIMIT; SQLite's page cache comes on top); empty: none")
	pprofAddr := fs.String("pprof", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6060; off when empty")
	if _, err := parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("%w: --log-level: %v", ErrUsage, err)
	}
	o.Logger = slog.New(slog.NewTextHandler(g.env.Stderr, &slog.HandlerOptions{Level: level}))
	if *memLimit != "" {
		n, err := ParseBytes(*memLimit)
		if err != nil {
			return fmt.Errorf("%w: --memory-limit: %v", ErrUsage, err)
		}
		debug.SetMemoryLimit(n)
	}
	o.Version = Version
	switch {
	case (*tlsCert == "") != (*tlsKey == ""):
		return fmt.Errorf("%w: --tls-cert and --tls-key go together", ErrUsage)
	case *tlsCert != "":
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			return fmt.Errorf("tls: %w", err)
		}
		o.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	case !*tlsDev && !*insecure:
		return fmt.Errorf("%w: --tls-dev=false needs --tls-cert/--tls-key, or --insecure for plain HTTP and MQTT", ErrUsage)
	case *insecure:
		o.Logger.Warn("SERVING WITHOUT TLS (--insecure): enrollment tokens, device passwords and telemetry cross the network in clear")
	default:
		var hosts []string
		for _, addr := range []string{o.HTTPAddr, o.MQTTAddr} {
			if h, _, err := net.SplitHostPort(addr); err == nil && h != "" && h != "0.0.0.0" && h != "::" {
				hosts = append(hosts, h)
			}
		}
		if h, err := os.Hostname(); err == nil {
			hosts = append(hosts, h)
		}
		dir := filepath.Join(o.DataDir, "tls")
		cfg, err := devca.Ensure(dir, hosts, time.Now())
		if err != nil {
			return fmt.Errorf("development CA: %w", err)
		}
		o.TLS = cfg
		o.Logger.Warn("serving over TLS with a development CA: give agents --ca-file "+filepath.Join(dir, devca.CAFile)+"; use --tls-cert/--tls-key in production", "ca", filepath.Join(dir, devca.CAFile))
	}
	o.BrokerNoAccounts = !*brokerAccounts
	if err := deviceCA(&o, *caCert, *caKey, *deviceCerts); err != nil {
		return err
	}
	if o.BrokerURL != "" {
		o.BrokerPassword = g.env.Getenv("HANGAR_BROKER_PASSWORD")
		if *brokerPassFile != "" {
			b, err := os.ReadFile(*brokerPassFile)
			if err != nil {
				return fmt.Errorf("broker password: %w", err)
			}
			o.BrokerPassword = string(trimNL(b))
		}
		if *calloutSeedFile != "" {
			b, err := os.ReadFile(*calloutSeedFile)
			if err != nil {
				return fmt.Errorf("--broker-callout-seed-file: %w", err)
			}
			o.BrokerCalloutSeed = string(trimNL(b))
		}
	}
	if *pprofAddr != "" {
		ln, err := net.Listen("tcp", *pprofAddr)
		if err != nil {
			return fmt.Errorf("pprof: %w", err)
		}
		go http.Serve(ln, http.DefaultServeMux) // net/http/pprof registers there
		defer ln.Close()
	}
	if v := g.env.Getenv("HANGAR_ROOT_KEYS"); v != "" && len(rootKeys) == 0 {
		rootKeys = strings.Split(v, ",")
	}
	for _, f := range rootKeys {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("--root-key: %w", err)
		}
		k, err := proto.ParsePublicKey(b)
		if err != nil {
			return fmt.Errorf("--root-key %s: %w", f, err)
		}
		o.RootKeys = append(o.RootKeys, k)
	}
	var err error
	if o.MaxArtifact, err = ParseBytes(*maxArtifact); err != nil {
		return fmt.Errorf("%w: --max-artifact: %v", ErrUsage, err)
	}
	srv, err := server.New(o)
	if err != nil {
		return err
	}
	w := g.env.Stdout
	fmt.Fprintf(w, "hangar %s control plane\n", Version)
	fmt.Fprintf(w, "  dashboard and API: %s\n", srv.URL())
	if a := srv.MQTTAddr(); a != "" {
		fmt.Fprintf(w, "  MQTT broker:       %s (embedded)\n", a)
	} else {
		fmt.Fprintf(w, "  MQTT broker:       %s (external)\n", o.BrokerURL)
	}
	abs, _ := filepath.Abs(o.DataDir)
	fmt.Fprintf(w, "  data:              %s\n", abs)
	if sqlstore.IsPostgresURL(o.Store) {
		fmt.Fprintf(w, "  store:             PostgreSQL, replica %s\n", srv.Replica())
	}
	fmt.Fprintf(w, "  admin token:       %s\n", filepath.Join(abs, server.AdminTokenFile))
	fmt.Fprintf(w, "  enrollment token:  %s\n", filepath.Join(abs, server.EnrollTokenFile))
	if srv.AdminToken != "" {
		fmt.Fprintln(w, "  (token created now; keep it secret, the file is readable only by you; hangar token create makes named ones)")
	}
	return srv.Run(ctx)
}

func envOr(g *globals, key, def string) string {
	if v := g.env.Getenv(key); v != "" {
		return v
	}
	return def
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// ParseBytes reads sizes such as 512MiB, 2GiB, 300MB or a plain number of
// bytes.
func ParseBytes(s string) (int64, error) { return units.ParseBytes(s) }

// DeviceCADir is where the built-in device CA lives in the data directory.
const DeviceCADir = "device-ca"

// deviceCA picks the device CA: the operator's (--device-ca-cert/key), or
// the built-in one, made on first start when the embedded broker serves
// TLS (an external broker uses it once hangar ca init made it). Plain TCP
// cannot carry client certificates: --insecure means passwords.
func deviceCA(o *server.Options, certFile, keyFile string, on bool) error {
	switch {
	case (certFile == "") != (keyFile == ""):
		return fmt.Errorf("%w: --device-ca-cert and --device-ca-key go together", ErrUsage)
	case !on:
		return nil
	case o.TLS == nil:
		if certFile != "" {
			return fmt.Errorf("%w: device certificates need TLS (drop --insecure)", ErrUsage)
		}
		return nil
	case certFile != "":
		ca, err := devcert.LoadFiles(certFile, keyFile)
		if err != nil {
			return err
		}
		o.DeviceCA = ca
		return nil
	}
	dir := filepath.Join(o.DataDir, DeviceCADir)
	ca, err := devcert.Load(dir)
	if errors.Is(err, devcert.ErrNoCA) && o.BrokerURL == "" {
		if ca, err = devcert.Init(dir, time.Now()); err == nil {
			o.Logger.Info("created the device CA", "dir", dir)
		}
	}
	if errors.Is(err, devcert.ErrNoCA) {
		o.Logger.Warn("no device CA (hangar ca init): devices of the external broker authenticate with passwords")
		return nil
	}
	if err != nil {
		return fmt.Errorf("device CA: %w", err)
	}
	o.DeviceCA = ca
	return nil
}

func runBackup(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("backup")
	data := fs.String("data", envOr(g, "HANGAR_DATA", server.DefaultDataDir), "data directory of the control plane (env HANGAR_DATA)")
	storeURL := fs.String("store", g.env.Getenv("HANGAR_STORE"), "the store, when not DATA/hangar.db")
	out := fs.String("out", "", "the copy to write (a new file)")
	if _, err := parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *out == "" {
		return fmt.Errorf("%w: --out FILE is required", ErrUsage)
	}
	if *storeURL == "" {
		*storeURL = filepath.Join(*data, server.DBFile)
	}
	if err := sqlstore.Backup(ctx, *storeURL, *out); err != nil {
		return err
	}
	st, _ := os.Stat(*out)
	fmt.Fprintf(g.env.Stdout, "backed up %s to %s (%d bytes); restore: stop hangar serve, put it in place of %s\n", *storeURL, *out, st.Size(), server.DBFile)
	return nil
}

// runBrokerConfigNATS writes a NATS cluster's configuration for hangar:
// one file per node, the auth callout's account seed and the control
// plane's password.
func runBrokerConfigNATS(g *globals, args []string) error {
	fs := g.newFlags("broker-config nats")
	out := fs.String("out", "", "directory to write the files into (nats-NAME.conf per node, callout.seed, control.password)")
	var hosts []string
	fs.Func("node", "a node's host name or address, as the others and the control plane reach it (repeat: three for a cluster)", func(v string) error {
		hosts = append(hosts, v)
		return nil
	})
	clientPort := fs.Int("client-port", 4222, "NATS clients' port (the control plane)")
	mqttPort := fs.Int("mqtt-port", 1883, "the devices' MQTT port")
	routePort := fs.Int("route-port", 6222, "the cluster's route port")
	httpPort := fs.Int("http-port", 8222, "monitoring port (/healthz; 0: none)")
	storeDir := fs.String("store-dir", "/var/lib/nats/jetstream", "JetStream's directory on each node")
	user := fs.String("user", "hangar", "the control plane's account")
	if _, err := parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *out == "" || len(hosts) == 0 {
		return fmt.Errorf("%w: --out DIR and --node HOST (for each node) are required", ErrUsage)
	}
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return err
	}
	akp, err := nkeys.CreateAccount()
	if err != nil {
		return err
	}
	seed, _ := akp.Seed()
	pub, _ := akp.PublicKey()
	pass := strings.TrimPrefix(api.NewSecret(""), "_")
	c := brokerconfig.NATSCluster{User: *user, Password: pass, CalloutIssuer: pub, RoutePassword: strings.TrimPrefix(api.NewSecret(""), "_")}
	for i, h := range hosts {
		c.Nodes = append(c.Nodes, brokerconfig.NATSNode{Name: fmt.Sprintf("n%d", i+1), Host: h, ClientPort: *clientPort,
			MQTTPort: *mqttPort, RoutePort: *routePort, HTTPPort: *httpPort, StoreDir: *storeDir})
	}
	var nats, mqtt []string
	for i, n := range c.Nodes {
		p := filepath.Join(*out, "nats-"+n.Name+".conf")
		if err := os.WriteFile(p, []byte(brokerconfig.NATSConfig(c, i)), 0o600); err != nil {
			return err
		}
		nats = append(nats, fmt.Sprintf("nats://%s:%d", n.Host, n.ClientPort))
		mqtt = append(mqtt, fmt.Sprintf("tcp://%s:%d", n.Host, n.MQTTPort))
	}
	for name, secret := range map[string][]byte{"callout.seed": seed, "control.password": []byte(pass)} {
		if err := writeSecretFile(filepath.Join(*out, name), secret); err != nil {
			return err
		}
	}
	w := g.env.Stdout
	fmt.Fprintf(w, "wrote %d node configurations, callout.seed and control.password to %s\n", len(c.Nodes), *out)
	fmt.Fprintf(w, "on each node:  nats-server -c nats-NAME.conf   (the files hold secrets: keep them 0600)\n")
	fmt.Fprintf(w, "the routes authenticate with a password, but client, MQTT and route traffic is plain TCP: add tls blocks (docs/operations.md) off a private network\n")
	fmt.Fprintf(w, "control plane: hangar serve --broker %s --broker-user %s \\\n    --broker-password-file %s --broker-callout-seed-file %s \\\n    --mqtt-advertise %s\n",
		strings.Join(nats, ","), *user, filepath.Join(*out, "control.password"), filepath.Join(*out, "callout.seed"), strings.Join(mqtt, ","))
	return nil
}

func writeSecretFile(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err2 := f.Close(); err == nil {
		err = err2
	}
	return err
}

func runCA(ctx context.Context, g *globals, args []string) error {
	if len(args) == 0 || args[0] != "init" {
		return fmt.Errorf("%w: hangar ca init [--data DIR]", ErrUsage)
	}
	fs := g.newFlags("ca init")
	data := fs.String("data", envOr(g, "HANGAR_DATA", server.DefaultDataDir), "data directory of the control plane (env HANGAR_DATA)")
	if _, err := parse(fs, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	dir := filepath.Join(*data, DeviceCADir)
	ca, err := devcert.Init(dir, time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "device CA created in %s\n  certificate: %s (brokers verify devices with it)\n  key:         %s (keep it here; back it up offline)\n  subject:     %s\n",
		dir, filepath.Join(dir, devcert.CertFile), filepath.Join(dir, devcert.KeyFile), ca.Cert.Subject.CommonName)
	return nil
}

func runBrokerConfig(ctx context.Context, g *globals, args []string) error {
	if len(args) > 0 && args[0] == "nats" {
		return runBrokerConfigNATS(g, args[1:])
	}
	if len(args) == 0 || args[0] != "mosquitto" {
		return fmt.Errorf("%w: hangar broker-config mosquitto --out DIR --host HOST [flags] | nats --out DIR --node HOST... [flags]", ErrUsage)
	}
	fs := g.newFlags("broker-config mosquitto")
	data := fs.String("data", envOr(g, "HANGAR_DATA", server.DefaultDataDir), "data directory of the control plane: its device CA, development TLS CA and database (env HANGAR_DATA)")
	out := fs.String("out", "", "directory to write the broker's files into (mosquitto.conf and what it names)")
	var hosts []string
	fs.Func("host", "the broker's host name or address, as devices reach it (repeat for several); its certificate names them", func(v string) error {
		hosts = append(hosts, v)
		return nil
	})
	port := fs.Int("port", 8883, "the devices' mutual-TLS listener port")
	controlAddr := fs.String("control-addr", "127.0.0.1", "address of the control plane's password listener (keep it private)")
	controlPort := fs.Int("control-port", 1884, "port of the control plane's listener")
	tlsCert := fs.String("tls-cert", "", "the broker's certificate chain (PEM); default: one issued for --host by the development CA in DATA/tls")
	tlsKey := fs.String("tls-key", "", "the private key of --tls-cert")
	user := fs.String("user", "", "account mosquitto runs as (default: mosquitto's own, \"mosquitto\")")
	caCert := fs.String("device-ca-cert", "", "the device CA certificate, when hangar serve uses its own (--device-ca-cert)")
	caKey := fs.String("device-ca-key", "", "its key")
	storeURL := fs.String("store", g.env.Getenv("HANGAR_STORE"), "the control plane's store, where revocations are read (a PostgreSQL URL; default DATA/hangar.db)")
	crlOnly := fs.Bool("crl-only", false, "only write the revocation list again (after revocations and renewals; restart the broker to load it)")
	if _, err := parse(fs, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *out == "" {
		return fmt.Errorf("%w: --out DIR is required", ErrUsage)
	}
	var ca *devcert.CA
	var err error
	if *caCert != "" || *caKey != "" {
		ca, err = devcert.LoadFiles(*caCert, *caKey)
	} else if ca, err = devcert.Load(filepath.Join(*data, DeviceCADir)); err != nil {
		err = fmt.Errorf("%w (hangar ca init --data %s)", err, *data)
	}
	if err != nil {
		return err
	}
	if *storeURL == "" {
		*storeURL = filepath.Join(*data, server.DBFile)
	}
	db, err := sqlstore.OpenURL(*storeURL, sqlstore.Options{})
	if err != nil {
		return err
	}
	serials, err := db.RevokedSerials(ctx, time.Now())
	db.Close()
	if err != nil {
		return err
	}
	crl, err := ca.CRL(serials, time.Now(), time.Until(ca.Cert.NotAfter))
	if err != nil {
		return err
	}
	if *crlOnly {
		path := filepath.Join(*out, brokerconfig.CRLFile)
		if err := os.WriteFile(path+".tmp", crl, 0o644); err != nil {
			return err
		}
		if err := os.Rename(path+".tmp", path); err != nil { // the broker never reads half a list
			return err
		}
		fmt.Fprintf(g.env.Stdout, "wrote %s (%d revoked certificate%s); restart the broker to load it\n",
			filepath.Join(*out, brokerconfig.CRLFile), len(serials), plural(len(serials)))
		return nil
	}
	if len(hosts) == 0 && *tlsCert == "" {
		return fmt.Errorf("%w: --host is required (the name devices reach the broker by), or --tls-cert/--tls-key", ErrUsage)
	}
	m := brokerconfig.Mosquitto{Dir: *out, DevicePort: *port, ControlAddr: *controlAddr, ControlPort: *controlPort,
		DeviceCA: ca.PEM(), CRL: crl, User: *user, Persistence: true}
	switch {
	case (*tlsCert == "") != (*tlsKey == ""):
		return fmt.Errorf("%w: --tls-cert and --tls-key go together", ErrUsage)
	case *tlsCert != "":
		if m.ServerCert, err = os.ReadFile(*tlsCert); err != nil {
			return err
		}
		if m.ServerKey, err = os.ReadFile(*tlsKey); err != nil {
			return err
		}
	default:
		if m.ServerCert, m.ServerKey, err = devca.IssueServer(filepath.Join(*data, "tls"), hosts, time.Now()); err != nil {
			return err
		}
	}
	if b, err := os.ReadFile(filepath.Join(*out, brokerconfig.ControlFile)); err == nil {
		m.ControlPassword = string(trimNL(b)) // keep the control plane's password across runs
	}
	if err := m.Write(); err != nil {
		return err
	}
	host := "HOST"
	if len(hosts) > 0 {
		host = hosts[0]
	}
	fmt.Fprintf(g.env.Stdout, `wrote a Mosquitto configuration for mutual TLS to %s
  run the broker:        mosquitto -c %s
  run the control plane: hangar serve --data %s --broker tcp://%s \
                           --broker-user %s --broker-password-file %s --broker-accounts=false \
                           --mqtt-advertise tls://%s
  after revocations:     hangar broker-config mosquitto --data %s --out %s --crl-only, then restart the broker
`, *out, filepath.Join(*out, brokerconfig.ConfFile), *data, net.JoinHostPort(*controlAddr, strconv.Itoa(*controlPort)),
		brokerconfig.ControlUser, filepath.Join(*out, brokerconfig.ControlFile), net.JoinHostPort(host, strconv.Itoa(*port)), *data, *out)
	return nil
}
