// Package server assembles the control plane: store, broker, ingest, API
// and dashboard, with their background loops, from one Options value.
package server

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/commands"
	"github.com/hangarfleet/hangar/controlplane/delivery"
	"github.com/hangarfleet/hangar/controlplane/devcert"
	"github.com/hangarfleet/hangar/controlplane/ingest"
	"github.com/hangarfleet/hangar/controlplane/leader"
	"github.com/hangarfleet/hangar/controlplane/metrics"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/controlplane/throttle"
	"github.com/hangarfleet/hangar/controlplane/web"
	"github.com/hangarfleet/hangar/proto"
)

// Defaults of Options.
const (
	DefaultDataDir   = "data"
	DefaultHTTPAddr  = ":8080"
	DefaultMQTTAddr  = ":1883"
	DefaultRetention = 30 * 24 * time.Hour
	// Token files written on first start.
	AdminTokenFile  = "admin.token"
	EnrollTokenFile = "enroll.token"
	DBFile          = "hangar.db"
)

// Options configure a control plane.
type Options struct {
	// NewAdminToken replaces the bootstrap admin token (DATA/admin.token)
	// at start: the previous one stops working.
	NewAdminToken bool
	// LiveInterval is how often the console's live stream looks for
	// changes (default 1 s).
	LiveInterval time.Duration
	// HistoryInterval is how often the fleet's health summary is kept
	// for the console's charts (default DefaultHistoryInterval).
	HistoryInterval time.Duration
	DataDir         string
	// Store is where the control plane keeps its records: a PostgreSQL
	// URL (postgres://...), or a SQLite file (default DATA/hangar.db).
	Store string
	// Replica names this control plane among replicas sharing a
	// PostgreSQL store (default: host name and process id). One of them,
	// holding the scheduler lease, runs the rollout scheduler.
	Replica string
	// LeaseTTL is the scheduler lease's term (default leader.DefaultTTL):
	// how long a leader that died holds up rollouts.
	LeaseTTL time.Duration
	// BrokerClientID is this replica's client id on the external broker
	// (default broker.DefaultExternalClientID; distinct per replica).
	BrokerClientID string
	// BrokerCalloutSeed is the NATS account seed (SA...) the auth callout
	// signs with (a nats:// broker).
	BrokerCalloutSeed string
	// BrokerShare subscribes to device messages through the shared
	// subscription group $share/<BrokerShare>/...: replicas of one group
	// split the ingest, each message stored by one of them.
	BrokerShare string
	HTTPAddr    string
	MQTTAddr    string
	// BrokerURL selects an external broker (tcp://host:port); empty runs
	// the embedded one.
	BrokerURL string
	// BrokerUser and BrokerPassword are the control plane's own account on
	// an external broker; it needs the dynamic-security admin role.
	BrokerUser, BrokerPassword string
	// BrokerNoAccounts: the external broker knows devices by their
	// certificates (hangar broker-config mosquitto) and has no device
	// accounts to make (otherwise: Mosquitto's dynamic security).
	BrokerNoAccounts bool
	// MQTTAdvertise is the broker URL given to devices at enrollment. When
	// empty it is the external broker URL, or the embedded broker's listen
	// address (required when that is every address); never the host an
	// enrollment request names.
	MQTTAdvertise string
	// Retention is how long telemetry and device events are kept.
	Retention     time.Duration
	OnlineTimeout time.Duration
	// ConnectRate caps MQTT connections accepted per second (embedded).
	ConnectRate int
	// MaxConnections caps the embedded broker's open connections,
	// authenticated or not (0: no cap).
	MaxConnections int64
	// EnrollRate limits enrollment attempts per source address (per
	// second, with a burst of ten seconds' worth; 0: no limit). Each
	// device id may try 10 times, then once a minute, whatever the rate.
	EnrollRate float64
	// AuthFailRate limits failed MQTT authentications per source address
	// (per second, burst of ten seconds' worth; 0: no limit): past it,
	// that source's CONNECTs are refused unchecked for a while. Each
	// device id may fail 10 times, then once every 10 s.
	AuthFailRate float64
	// DeviceMsgRate and DeviceByteRate are each device's ingest quota, per
	// second, bursting a minute's worth of messages and 16 MiB (an outbox
	// draining after a long time offline); beyond them its messages are
	// dropped and counted. 0: no quota.
	DeviceMsgRate, DeviceByteRate float64
	// TLS serves the API, the dashboard and the embedded broker over TLS
	// (nil: plain, for tests and --insecure).
	TLS *tls.Config
	// DeviceCA issues device certificates (nil: devices authenticate
	// with passwords). With TLS, the embedded broker and the API verify
	// device certificates against it.
	DeviceCA *devcert.CA
	// CertTTL is a device certificate's lifetime (default
	// devcert.DefaultTTL).
	CertTTL time.Duration
	// Approval holds every enrollment for an operator's approval.
	Approval bool
	// Now is the clock device certificates are issued and verified by
	// (default time.Now; tests move it).
	Now func() time.Time
	// RootKeys are the release root public keys pushed releases must chain
	// to (none: pushes are refused).
	RootKeys []ed25519.PublicKey
	// MaxArtifact caps a pushed artifact (default 1 GiB).
	MaxArtifact int64
	// RolloutInterval is how often active rollouts are planned (default 2 s).
	RolloutInterval time.Duration
	Version         string
	Logger          *slog.Logger
	// Listeners for tests; when set, HTTPAddr/MQTTAddr are ignored.
	HTTPListener, MQTTListener net.Listener
}

// Server is a running control plane.
type Server struct {
	opts    Options
	log     *slog.Logger
	db      *sqlstore.DB
	bus     broker.Bus
	ingest  *ingest.Ingester
	cmds    *commands.Dispatcher
	roll    *rollout.Applier
	elector *leader.Elector
	leadCh  chan struct{} // the elector's changes
	api     *api.API
	metrics *metrics.Metrics
	httpLn  net.Listener
	// renewals limits certificate requests per device, invites the
	// invitations to password devices, renewing those being answered.
	renewals, invites *throttle.Limiter
	renewing          chan struct{}
	http              *http.Server
	mqttURL           string

	// AdminToken and EnrollToken are set when this start created them.
	AdminToken, EnrollToken string
}

// New opens the data directory and prepares every part; Run starts them.
func New(opts Options) (*Server, error) {
	if opts.DataDir == "" {
		opts.DataDir = DefaultDataDir
	}
	if opts.HTTPAddr == "" {
		opts.HTTPAddr = DefaultHTTPAddr
	}
	if opts.MQTTAddr == "" {
		opts.MQTTAddr = DefaultMQTTAddr
	}
	if opts.Retention == 0 {
		opts.Retention = DefaultRetention
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.TLS != nil && opts.DeviceCA != nil {
		// Device certificates are checked against the clock they were
		// issued by.
		opts.TLS = opts.TLS.Clone()
		opts.TLS.Time = opts.Now
	}
	s := &Server{opts: opts, log: opts.Logger}
	ok := false
	defer func() {
		if !ok {
			s.closeAll()
		}
	}()
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	if opts.Store == "" {
		opts.Store = filepath.Join(opts.DataDir, DBFile)
		s.opts.Store = opts.Store
	}
	db, err := sqlstore.OpenURL(opts.Store, sqlstore.Options{OnlineTimeout: opts.OnlineTimeout})
	if err != nil {
		return nil, err
	}
	s.db = db
	if opts.Replica == "" {
		host, _ := os.Hostname()
		opts.Replica = fmt.Sprintf("%s-%d", host, os.Getpid())
		s.opts.Replica = opts.Replica
	}
	s.leadCh = make(chan struct{}, 1)
	s.elector = leader.New(leader.Options{Store: db, Holder: opts.Replica, TTL: opts.LeaseTTL, Logger: opts.Logger,
		OnChange: func(bool, store.Lease) {
			select {
			case s.leadCh <- struct{}{}:
			default:
			}
		}})
	if err := s.initTokens(); err != nil {
		return nil, err
	}
	s.metrics = metrics.New(func() float64 {
		if s.bus == nil {
			return 0
		}
		return float64(s.bus.Connected())
	})
	if opts.BrokerURL == "" {
		e, err := broker.NewEmbedded(broker.EmbeddedOptions{
			Addr: opts.MQTTAddr, Listener: opts.MQTTListener, Credentials: db, Metrics: s.metrics,
			Logger: opts.Logger, ConnectRate: opts.ConnectRate, MaxClients: opts.MaxConnections,
			FailedAuthSource: limiter(opts.AuthFailRate), FailedAuthDevice: throttle.New(0.1, 10, 100_000),
			TLS: opts.TLS, DeviceCAs: s.deviceCAs(),
		})
		if err != nil {
			return nil, err
		}
		s.bus = e
		s.mqttURL = listenURL(map[bool]string{true: "tls", false: "tcp"}[opts.TLS != nil], e.Addr())
		// Nobody is connected to a broker that has just started.
		if err := db.MarkAllOffline(context.Background()); err != nil {
			return nil, err
		}
	} else if strings.HasPrefix(opts.BrokerURL, "nats://") {
		// A NATS cluster: devices on its MQTT listeners, which only
		// --mqtt-advertise names.
		if opts.MQTTAdvertise == "" {
			return nil, errors.New("with a NATS broker, give the MQTT listeners devices connect to with --mqtt-advertise (tcp://n1:1883,tcp://n2:1883,...)")
		}
		first, _, _ := strings.Cut(opts.MQTTAdvertise, ",")
		x, err := broker.NewNATS(broker.NATSOptions{URL: opts.BrokerURL, User: opts.BrokerUser, Password: opts.BrokerPassword,
			CalloutSeed: opts.BrokerCalloutSeed, Credentials: db, MQTTURL: first, Metrics: s.metrics, Logger: opts.Logger, Now: opts.Now,
			FailedAuthSource: limiter(opts.AuthFailRate), FailedAuthDevice: throttle.New(0.1, 10, 100_000)})
		if err != nil {
			return nil, err
		}
		s.bus = x
		s.mqttURL = opts.MQTTAdvertise
	} else {
		x, err := broker.NewExternal(broker.ExternalOptions{
			URL: opts.BrokerURL, Username: opts.BrokerUser, Password: opts.BrokerPassword, NoAccounts: opts.BrokerNoAccounts,
			Metrics: s.metrics, Logger: opts.Logger, ClientID: opts.BrokerClientID, Shared: opts.BrokerShare,
		})
		if err != nil {
			return nil, err
		}
		s.bus = x
		s.mqttURL = opts.BrokerURL
	}
	if opts.MQTTAdvertise != "" {
		s.mqttURL = opts.MQTTAdvertise
	}
	if s.mqttURL == "" {
		// Never from the Host header of an enrollment request: an on-path
		// attacker would send devices to a broker of its own.
		return nil, fmt.Errorf("the broker listens on every address (%s): give the URL devices must use with --mqtt-advertise (e.g. tcp://hangar.example.com:1883)", opts.MQTTAddr)
	}
	s.cmds = commands.New(commands.Options{Store: db, Bus: s.bus, Metrics: s.metrics, Logger: opts.Logger})
	s.roll = rollout.New(rollout.Options{Store: db, Publish: s.cmds, Logger: opts.Logger, Interval: opts.RolloutInterval})
	onEvent := func(device string, e *proto.Event) {
		s.cmds.OnEvent(device, e)
		if e.Kind == proto.EventUpdate && e.Update.Rollout != "" {
			s.roll.Poke()
		}
	}
	io := ingest.Options{Metrics: s.metrics, Logger: opts.Logger, OnEvent: onEvent, OnState: s.cmds.OnState}
	if opts.DeviceMsgRate > 0 {
		io.Messages = throttle.New(opts.DeviceMsgRate, 60*opts.DeviceMsgRate, 1_000_000)
	}
	if opts.DeviceByteRate > 0 {
		io.Bytes = throttle.New(opts.DeviceByteRate, max(16<<20, 60*opts.DeviceByteRate), 1_000_000)
	}
	s.ingest = ingest.New(db, io)
	s.api = api.New(api.Options{
		Delivery:     s.db,
		LiveInterval: opts.LiveInterval,
		Store:        db, Bus: s.bus, Metrics: s.metrics, Logger: opts.Logger, Version: opts.Version,
		MQTTURL: s.advertisedMQTT, Static: web.Handler(),
		EnrollSource: limiter(opts.EnrollRate), EnrollDevice: throttle.New(1.0/60, 10, 100_000),
		Releases: &api.ReleaseOptions{Store: db, Send: s.cmds, Roots: opts.RootKeys,
			Dir: filepath.Join(opts.DataDir, "artifacts"), MaxArtifact: opts.MaxArtifact},
		Rollouts: s.roll, DeviceCA: opts.DeviceCA, Now: opts.Now, CertTTL: opts.CertTTL, Approval: opts.Approval,
		NoPasswords: opts.BrokerNoAccounts, Replica: opts.Replica, Leading: func() bool { return s.Leading() },
	})
	s.renewals = throttle.New(1.0/600, 3, 100_000)
	s.invites = throttle.New(1.0/3600, 1, 100_000)
	s.renewing = make(chan struct{}, 4)
	s.httpLn = opts.HTTPListener
	if s.httpLn == nil {
		if s.httpLn, err = net.Listen("tcp", opts.HTTPAddr); err != nil {
			return nil, fmt.Errorf("http: %w", err)
		}
	}
	if opts.TLS != nil {
		cfg := opts.TLS
		if pool := s.deviceCAs(); pool != nil {
			// Devices download artifacts with their certificate; browsers
			// and the CLI present none. It is checked by the API, not the
			// handshake: a device whose certificate expired must still
			// reach enrollment.
			cfg = cfg.Clone()
			cfg.ClientAuth, cfg.ClientCAs = tls.RequestClientCert, pool
		}
		s.httpLn = tls.NewListener(s.httpLn, cfg)
	}
	s.http = &http.Server{Handler: s.api, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		// Failed handshakes (scanners, clients that do not trust the CA)
		// are routine on a public address.
		ErrorLog: slog.NewLogLogger(opts.Logger.With("component", "http").Handler(), slog.LevelDebug)}
	s.http.RegisterOnShutdown(s.api.CloseLive)
	ok = true
	return s, nil
}

// limiter is a per-source limiter of rate a second, bursting ten seconds'
// worth (nil: no limit).
func limiter(rate float64) *throttle.Limiter {
	if rate <= 0 {
		return nil
	}
	return throttle.New(rate, 10*rate, 100_000)
}

// advertisedMQTT is the broker URL handed to enrolling devices: from the
// operator's configuration only (--mqtt-advertise, or the broker's own
// listen address), never from the request.
func (s *Server) advertisedMQTT(*http.Request) string { return s.mqttURL }

// listenURL is the URL of a listener bound to a specific address; "" when
// it listens on every address (no single address to give out).
func listenURL(scheme string, a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok || tcp.IP == nil || tcp.IP.IsUnspecified() {
		return ""
	}
	return scheme + "://" + net.JoinHostPort(tcp.IP.String(), strconv.Itoa(tcp.Port))
}

func (s *Server) initTokens() error {
	ctx := context.Background()
	for _, t := range []struct {
		name, file, prefix string
		dst                *string
	}{
		{api.TokenAdmin, AdminTokenFile, "hga_", &s.AdminToken},
		{api.TokenEnroll, EnrollTokenFile, "hge_", &s.EnrollToken},
	} {
		_, err := s.db.TokenHash(ctx, t.name)
		rotate := t.name == api.TokenAdmin && s.opts.NewAdminToken
		switch {
		case err == nil && !rotate:
			continue
		case err == nil, errors.Is(err, store.ErrNotFound):
			// make one (again)
		default:
			return err
		}
		tok := api.NewSecret(t.prefix)
		path := filepath.Join(s.opts.DataDir, t.file)
		if err := writeSecret(path, tok); err != nil {
			return err
		}
		if err := s.db.SetToken(ctx, t.name, broker.HashPassword(tok), time.Now()); err != nil {
			return err
		}
		*t.dst = tok
		s.log.Info("created token", "token", t.name, "file", path)
		if t.name == api.TokenAdmin {
			_, _ = s.db.AddAudit(ctx, store.Audit{Time: time.Now(), Actor: "hangar serve", Action: "token.bootstrap", Target: api.TokenAdmin,
				Reason: map[bool]string{true: "--new-admin-token: the previous one no longer works", false: "first start"}[s.opts.NewAdminToken]})
		}
	}
	return nil
}

func writeSecret(path, secret string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = f.WriteString(secret + "\n")
	if err2 := f.Sync(); err == nil {
		err = err2
	}
	if err2 := f.Close(); err == nil {
		err = err2
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.Chmod(path, 0o600)
}

// URL is the base URL of the API.
func (s *Server) URL() string {
	addr := s.httpLn.Addr().(*net.TCPAddr)
	host := addr.IP.String()
	if addr.IP.IsUnspecified() {
		host = "127.0.0.1"
	}
	scheme := "http"
	if s.opts.TLS != nil {
		scheme = "https"
	}
	return (&url.URL{Scheme: scheme, Host: net.JoinHostPort(host, fmt.Sprint(addr.Port))}).String()
}

// MQTTAddr is the embedded broker's address, or "" with an external broker.
func (s *Server) MQTTAddr() string {
	if e, ok := s.bus.(*broker.Embedded); ok {
		return e.Addr().String()
	}
	return ""
}

// Store exposes the store (tests, simulator).
func (s *Server) Store() *sqlstore.DB { return s.db }

// Bus exposes the broker.
func (s *Server) Bus() broker.Bus { return s.bus }

// Rollouts exposes the rollout applier.
func (s *Server) Rollouts() *rollout.Applier { return s.roll }

// Commands exposes the command dispatcher.
func (s *Server) Commands() *commands.Dispatcher { return s.cmds }

// Metrics exposes the collectors.
func (s *Server) Metrics() *metrics.Metrics { return s.metrics }

// Run serves until ctx is done, then shuts everything down.
func (s *Server) Run(ctx context.Context) error {
	defer s.closeAll()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Ingest outlives the broker at shutdown, so that messages already
	// handed over are stored; those still arriving stay unacknowledged.
	ingestCtx, stopIngest := context.WithCancel(context.Background())
	defer stopIngest()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.ingest.Run(ingestCtx) }()
	if err := s.bus.Start(ctx, s.handle); err != nil {
		stopIngest()
		wg.Wait()
		return err
	}
	errc := make(chan error, 1)
	go func() {
		if err := s.http.Serve(s.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("http: %w", err)
		}
	}()
	wg.Add(1)
	go func() { defer wg.Done(); s.retention(ctx) }()
	s.elector.Campaign(ctx)
	wg.Add(1)
	go func() { defer wg.Done(); s.elector.Run(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); s.cmds.Run(ctx, s.elector.Leading) }()
	wg.Add(1)
	go func() { defer wg.Done(); s.schedule(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); releaseMemory(ctx, time.Minute) }()
	wg.Add(1)
	go func() { defer wg.Done(); s.enrollSummary(ctx, 10*time.Second) }()
	wg.Add(1)
	go func() { defer wg.Done(); s.history(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); s.deliveryGauges(ctx, 5*time.Minute) }()
	s.log.Info("control plane running", "api", s.URL(), "mqtt", s.mqttURL, "data", s.opts.DataDir,
		"store", s.db.Engine(), "replica", s.opts.Replica)
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutdown, cancelShutdown := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelShutdown()
	_ = s.http.Shutdown(shutdown)
	_ = s.bus.Close()
	cancel()
	stopIngest()
	wg.Wait()
	return err
}

// schedule runs the rollout scheduler for as long as this replica leads,
// each term under the term's context: cancelled when it ends, its writes
// fenced by its lease.
func (s *Server) schedule(ctx context.Context) {
	for {
		if term, ok := s.elector.Leading(); ok {
			tctx, cancel := context.WithCancel(ctx)
			stop := context.AfterFunc(term, cancel)
			s.roll.Run(store.WithFence(tctx, mustFence(term)))
			stop()
			cancel()
		}
		select {
		case <-ctx.Done():
			return
		case <-s.leadCh:
		}
	}
}

func mustFence(ctx context.Context) store.Lease {
	l, _ := store.FenceFrom(ctx)
	return l
}

// Replica is this control plane's name among replicas.
func (s *Server) Replica() string { return s.opts.Replica }

// Leading says whether this replica runs the scheduler now.
func (s *Server) Leading() bool {
	_, ok := s.elector.Leading()
	return ok
}

// deliveryGauges keeps the delivery metrics' gauges current.
func (s *Server) deliveryGauges(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	gaugeSeries := map[[2]string]bool{}
	for {
		now := time.Now()
		in, err := delivery.Load(ctx, s.db, now.Add(-api.DefaultDeliveryWindow), now)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("delivery metrics", "err", err)
			}
		} else {
			rep := delivery.Compute(in)
			g := s.metrics.Delivery
			// Set the new values, then drop the series that have none now
			// (no Reset: a scrape in between would see no gauge at all).
			now := map[[2]string]bool{}
			set := func(hw string, m delivery.Metrics) {
				g.WithLabelValues("deployments_per_week", hw).Set(m.DeploymentFrequency.PerWeek)
				now[[2]string{"deployments_per_week", hw}] = true
				for key, v := range map[string]*float64{"lead_time_seconds": m.LeadTime.MedianSeconds,
					"change_failure_rate": m.ChangeFailureRate.Rate, "time_to_restore_seconds": m.TimeToRestore.MedianSeconds} {
					if v != nil {
						g.WithLabelValues(key, hw).Set(*v)
						now[[2]string{key, hw}] = true
					}
				}
			}
			set("all", rep.Overall)
			for hw, m := range rep.ByHardware {
				set(hw, m)
			}
			for k := range gaugeSeries {
				if !now[k] {
					g.DeleteLabelValues(k[0], k[1])
				}
			}
			gaugeSeries = now
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// DefaultHistoryInterval is how often the fleet health summary is kept.
const DefaultHistoryInterval = time.Minute

// history keeps the fleet's health summary every HistoryInterval, and
// drops summaries older than the telemetry retention.
func (s *Server) history(ctx context.Context) {
	every := s.opts.HistoryInterval
	if every <= 0 {
		every = DefaultHistoryInterval
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for n := 0; ; n++ {
		if !s.Leading() {
			// One replica keeps the history for all.
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				continue
			}
		}
		h, err := s.db.FleetHealth(ctx)
		if err == nil {
			err = s.db.RecordFleetHealth(ctx, h)
		}
		if err != nil && ctx.Err() == nil {
			s.log.Warn("fleet history", "err", err)
		}
		if n%60 == 0 {
			_, _ = s.db.PruneFleetHistory(ctx, time.Now().Add(-s.opts.Retention))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// enrollSummary logs one line per period in which devices enrolled (each
// enrollment is a debug line: a fleet coming up would scroll everything
// else away).
func (s *Server) enrollSummary(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	var last uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n := s.api.Enrolled(); n != last {
			s.log.Info("devices enrolled", "last_period", n-last, "period", period, "since_start", n)
			last = n
		}
	}
}

func (s *Server) retention(ctx context.Context) {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		if !s.Leading() {
			// One replica prunes for all.
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				continue
			}
		}
		n, err := s.db.PruneTelemetry(ctx, time.Now().Add(-s.opts.Retention))
		if err != nil && ctx.Err() == nil {
			s.log.Error("telemetry retention failed", "err", err)
		} else if n > 0 {
			s.log.Info("telemetry retention", "deleted_samples", n, "horizon", s.opts.Retention)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *Server) closeAll() {
	if s.bus != nil {
		_ = s.bus.Close()
	}
	if s.httpLn != nil {
		_ = s.httpLn.Close()
	}
	if s.db != nil {
		_ = s.db.Close()
	}
}

// releaseMemory hands idle heap back to the operating system every period.
// Connection bursts (thousands of devices reconnecting after a restart)
// grow goroutine stacks that the garbage collector later shrinks; the
// freed memory stays mapped, and Go's background scavenger returns it only
// slowly, so a fleet's worth of it would show in the RSS for a long time.
func releaseMemory(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapIdle-ms.HeapReleased > 64<<20 {
				debug.FreeOSMemory()
			}
		}
	}
}
