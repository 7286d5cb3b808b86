// Package bench measures hangar: ingest throughput and latency with real
// MQTT connections into a real control-plane process, side by side for the
// embedded broker and Mosquitto.
package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangarfleet/hangar/agent/clock"
	"github.com/hangarfleet/hangar/controlplane/store/sqlstore"
	"github.com/hangarfleet/hangar/internal/pgserver"
	"github.com/hangarfleet/hangar/proto"
)

// IngestOptions describe one ingest run.
type IngestOptions struct {
	Hangar   string        // path of the hangar binary
	Devices  int           // simulated drones, each with its own connection
	Rate     float64       // messages per second per drone
	Warmup   time.Duration // load before measuring
	Duration time.Duration // measured load
	// Broker is the setup: "embedded", "embedded-mtls", "mosquitto"
	// (SQLite), "mosquitto-pg" (one replica on PostgreSQL) or
	// "mosquitto-pg3" (three replicas on PostgreSQL sharing the ingest
	// through a shared subscription).
	Broker    string
	Inflight  int       // QoS1 messages awaiting PUBACK per connection
	Samples   int       // samples per message
	LogWriter io.Writer // the control plane's log (nil: discarded)
	ServeArgs []string  // extra flags for hangar serve
}

// IngestResult is what one run measured.
type IngestResult struct {
	Broker         string  `json:"broker"`
	Replicas       int     `json:"replicas"`
	Store          string  `json:"store"`
	Devices        int     `json:"devices"`
	Connected      int     `json:"connected"`
	OfferedRate    float64 `json:"offered_msgs_per_s"`
	Sent           int64   `json:"sent"`
	Acked          int64   `json:"acked"`
	Throttled      int64   `json:"throttled"` // sends skipped: the in-flight window was full
	Stored         int64   `json:"stored"`
	Lost           int64   `json:"lost"`    // acknowledged by the broker, missing from the store (sequence holes)
	Checked        int64   `json:"checked"` // acknowledged messages looked up in the store
	Rate           float64 `json:"stored_msgs_per_s"`
	AckP50         float64 `json:"puback_ms_p50"`
	AckP99         float64 `json:"puback_ms_p99"`
	LagP50         float64 `json:"commit_ms_p50"` // publish to SQLite commit (histogram interpolation)
	LagP99         float64 `json:"commit_ms_p99"`
	ServerRSSMB    float64 `json:"server_rss_mb"`
	BrokerRSSMB    float64 `json:"broker_rss_mb,omitempty"`
	RSSPerConnKB   float64 `json:"rss_per_connection_kb"`
	ConnectSeconds float64 `json:"connect_seconds"`
	GroupSize      float64 `json:"messages_per_commit"`
	CommitMS       float64 `json:"store_write_ms"` // mean time of one group write
	ServerCPU      float64 `json:"server_cpu_cores"`
	LoadCPU        float64 `json:"load_generator_cpu_cores"`
	BrokerCPU      float64 `json:"broker_cpu_cores,omitempty"`
	DrainSeconds   float64 `json:"drain_seconds"` // after the load stopped, until everything acknowledged was stored
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func start(name string, args []string, env []string, logw io.Writer) (*proc, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	if logw == nil {
		logw = io.Discard
	}
	cmd.Stdout, cmd.Stderr = logw, logw
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) stop() {
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// cpuSeconds is the user+system CPU time of a process so far.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) start after ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ is 100 on Linux
}

func rssMB(pid int) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	return 0
}

// FreePort returns a free loopback TCP port.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func waitHTTP(url string, timeout time.Duration) error {
	return waitHTTPWith(http.DefaultClient, url, timeout)
}

func (cp *controlPlane) waitHTTP(url string, timeout time.Duration) error {
	return waitHTTPWith(cp.client, url, timeout)
}

func waitHTTPWith(c *http.Client, url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if resp, err := c.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not up after %v", url, timeout)
}

// controlPlane is a hangar serve child process.
type controlPlane struct {
	*proc
	url, admin, enroll string
	dir                string
	// client trusts the control plane's development CA (TLS runs).
	client *http.Client
	roots  *x509.CertPool
}

func startControlPlane(bin, dir string, extra []string, env []string, logw io.Writer) (*controlPlane, error) {
	return startControlPlaneTLS(bin, dir, extra, env, logw, false)
}

// startControlPlaneTLS starts hangar serve; with secure, over TLS with its
// development CA and its device CA (devices get certificates).
func startControlPlaneTLS(bin, dir string, extra []string, env []string, logw io.Writer, secure bool) (*controlPlane, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	// The whole simulated fleet enrolls from this one address.
	args := []string{"serve", "--data", dir, "--http", fmt.Sprintf("127.0.0.1:%d", port), "--log-level", "warn", "--enroll-rate", "0"}
	scheme := "https"
	if !secure {
		args, scheme = append(args, "--insecure"), "http"
	}
	args = append(args, extra...)
	p, err := start(bin, args, env, logw)
	if err != nil {
		return nil, err
	}
	cp := &controlPlane{proc: p, url: fmt.Sprintf("%s://127.0.0.1:%d", scheme, port), dir: dir, client: &http.Client{Timeout: 60 * time.Second}}
	if secure {
		var pemb []byte
		for i := 0; i < 300; i++ {
			if pemb, err = os.ReadFile(filepath.Join(dir, "tls", "ca.pem")); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		cp.roots = x509.NewCertPool()
		if !cp.roots.AppendCertsFromPEM(pemb) {
			p.stop()
			return nil, errors.New("control plane: no development CA")
		}
		cp.client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: cp.roots}, MaxIdleConnsPerHost: 16}
	}
	if err := cp.waitHTTP(cp.url+"/healthz", 30*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	for _, t := range []struct {
		file string
		dst  *string
	}{{"admin.token", &cp.admin}, {"enroll.token", &cp.enroll}} {
		b, err := os.ReadFile(filepath.Join(dir, t.file))
		if err != nil {
			p.stop()
			return nil, err
		}
		*t.dst = strings.TrimSpace(string(b))
	}
	return cp, nil
}

type credential struct {
	MQTTURL     string `json:"mqtt_url"`
	Username    string `json:"username"`
	Password    string `json:"password"`
	Certificate string `json:"certificate"`
	tls         *tls.Config
}

func (cp *controlPlane) enrollAll(ctx context.Context, prefix string, n int) ([]credential, error) {
	creds := make([]credential, n)
	var next atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	client := cp.client
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				req := map[string]any{"enroll_token": cp.enroll, "device_id": fmt.Sprintf("%s%05d", prefix, i), "hardware": "rev-b"}
				var key *ecdsa.PrivateKey
				if cp.roots != nil {
					// As the agent does: a key made here, a certificate for it.
					key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
					der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
					req["csr"] = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
				}
				body, _ := json.Marshal(req)
				resp, err := client.Post(cp.url+"/api/v1/enroll", "application/json", bytes.NewReader(body))
				if err == nil {
					if resp.StatusCode != 200 {
						b, _ := io.ReadAll(resp.Body)
						err = fmt.Errorf("enroll: HTTP %d: %s", resp.StatusCode, b)
					} else {
						err = json.NewDecoder(resp.Body).Decode(&creds[i])
					}
					resp.Body.Close()
				}
				if err == nil && key != nil {
					var chain [][]byte
					for rest := []byte(creds[i].Certificate); ; {
						var blk *pem.Block
						if blk, rest = pem.Decode(rest); blk == nil {
							break
						}
						chain = append(chain, blk.Bytes)
					}
					creds[i].tls = &tls.Config{RootCAs: cp.roots, ServerName: "127.0.0.1",
						Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: key}}}
				}
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return creds, firstErr
}

// scrape reads counters and one histogram from /metrics.
func (cp *controlPlane) scrape() (map[string]float64, []bucket, error) {
	req, _ := http.NewRequest("GET", cp.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+cp.admin)
	resp, err := cp.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	vals := map[string]float64{}
	var hist []bucket
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		v, _ := strconv.ParseFloat(val, 64)
		if le, ok := strings.CutPrefix(name, `hangar_ingest_delay_seconds_bucket{le="`); ok {
			ub, _ := strconv.ParseFloat(strings.TrimSuffix(le, `"}`), 64)
			if strings.HasPrefix(le, "+Inf") {
				ub = 1e9
			}
			hist = append(hist, bucket{ub, v})
			continue
		}
		vals[name] = v
	}
	return vals, hist, sc.Err()
}

type bucket struct{ le, count float64 }

// quantile interpolates linearly within the histogram bucket holding q.
func quantile(after, before []bucket, q float64) float64 {
	if len(after) == 0 || len(after) != len(before) {
		return 0
	}
	total := after[len(after)-1].count - before[len(before)-1].count
	if total <= 0 {
		return 0
	}
	rank := q * total
	prevLE, prevCount := 0.0, 0.0
	for i := range after {
		c := after[i].count - before[i].count
		if c >= rank {
			if c == prevCount {
				return after[i].le
			}
			return prevLE + (after[i].le-prevLE)*(rank-prevCount)/(c-prevCount)
		}
		prevLE, prevCount = after[i].le, c
	}
	return after[len(after)-1].le
}

func percentile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	sort.Float64s(xs)
	return xs[min(len(xs)-1, int(q*float64(len(xs))))]
}

// RunIngest measures one broker setup.
func RunIngest(ctx context.Context, o IngestOptions) (IngestResult, error) {
	res := IngestResult{Broker: o.Broker, Devices: o.Devices, OfferedRate: o.Rate * float64(o.Devices)}
	if o.Inflight == 0 {
		o.Inflight = 64
	}
	if o.Samples == 0 {
		o.Samples = 1
	}
	dir, err := os.MkdirTemp("", "hangar-bench-")
	if err != nil {
		return res, err
	}
	if os.Getenv("HANGAR_BENCH_KEEP") != "" {
		fmt.Fprintln(os.Stderr, "bench: keeping", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	var extra, env []string
	var mosq *Mosquitto
	replicas, storeLoc := 1, filepath.Join(dir, "data", "hangar.db")
	res.Store = "sqlite"
	if strings.HasPrefix(o.Broker, "mosquitto-pg") {
		pg, err := pgserver.Start()
		if err != nil {
			return res, fmt.Errorf("postgres: %w", err)
		}
		defer pg.Stop()
		if storeLoc, err = pg.CreateDatabase("hangar_bench"); err != nil {
			return res, err
		}
		extra = append(extra, "--store", storeLoc)
		res.Store = "postgres"
		if o.Broker == "mosquitto-pg3" {
			replicas = 3
		}
	}
	res.Replicas = replicas
	if strings.HasPrefix(o.Broker, "mosquitto") {
		mosq, err = StartMosquitto(filepath.Join(dir, "mosquitto"), o.LogWriter)
		if err != nil {
			return res, err
		}
		defer mosq.Stop()
		extra = append(extra, "--broker", mosq.URL(), "--broker-user", mosq.AdminUser)
		env = append(env, "HANGAR_BROKER_PASSWORD="+mosq.AdminPassword)
	} else {
		port, err := FreePort()
		if err != nil {
			return res, err
		}
		extra = append(extra, "--mqtt", fmt.Sprintf("127.0.0.1:%d", port))
	}
	extra = append(extra, o.ServeArgs...)
	secure := o.Broker == "embedded-mtls"
	// Replicas share the data directory (the first makes the tokens) and
	// the ingest.
	var cps replicaSet
	for r := range replicas {
		args := extra
		if res.Store == "postgres" {
			args = append(slices.Clone(extra), "--replica", fmt.Sprintf("r%d", r+1),
				"--broker-share", "hangar", "--broker-client-id", fmt.Sprintf("hangar:r%d", r+1))
		}
		c, err := startControlPlaneTLS(o.Hangar, filepath.Join(dir, "data"), args, env, o.LogWriter, secure)
		if err != nil {
			cps.stop()
			return res, fmt.Errorf("control plane: %w", err)
		}
		cps = append(cps, c)
	}
	defer cps.stop()
	cp := cps[0]
	creds, err := cp.enrollAll(ctx, "bench-", o.Devices)
	if err != nil {
		return res, err
	}
	var acked atomic.Int64
	var latMu sync.Mutex
	var lats []float64
	measuring := atomic.Bool{}
	onAck := func(d time.Duration) {
		if measuring.Load() {
			acked.Add(1)
			latMu.Lock()
			lats = append(lats, float64(d.Microseconds())/1000)
			latMu.Unlock()
		}
	}
	baseRSS := cps.rss()
	conns := make([]*loadConn, len(creds))
	t0 := time.Now()
	for i, c := range creds {
		addr := strings.TrimPrefix(strings.TrimPrefix(c.MQTTURL, "tcp://"), "tls://")
		conns[i], err = dialMQTT(addr, c.Username, c.Username, c.Password, 60*time.Second, onAck, c.tls)
		if err != nil {
			return res, fmt.Errorf("connect %s: %w", c.Username, err)
		}
	}
	res.ConnectSeconds = time.Since(t0).Seconds()
	res.Connected = len(conns)
	defer func() {
		for _, c := range conns {
			c.close()
		}
	}()
	// A few pacing goroutines, each owning a share of the connections whose
	// send times are spread evenly over the period: the load generator runs
	// on the same machine as the server, so it must not spend a goroutine
	// wake-up per message.
	var sent, throttled atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	period := time.Duration(float64(time.Second) / o.Rate)
	boot := uint64(time.Now().Unix())
	const pacers = 4
	for p := range pacers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			type slot struct {
				c     *loadConn
				topic string
				next  time.Time
				seq   uint64
			}
			var mine []*slot
			start := time.Now()
			for i := p; i < len(conns); i += pacers {
				mine = append(mine, &slot{c: conns[i], topic: proto.DeviceTopic(creds[i].Username, proto.KindTelemetry),
					next: start.Add(time.Duration(int64(period) * int64(i) / int64(len(conns))))})
			}
			sample := proto.Sample{CPU: 200, Mem: 300, Flight: proto.FlightLanded}
			t := time.NewTicker(2 * time.Millisecond)
			defer t.Stop()
			lastPing := time.Now()
			for {
				select {
				case <-stop:
					return
				case now := <-t.C:
					for _, sl := range mine {
						if now.Before(sl.next) {
							continue
						}
						sl.next = sl.next.Add(period)
						if now.Sub(sl.next) > time.Second {
							sl.next = now // fell far behind: do not burst to catch up
						}
						sl.seq++
						b := proto.Batch{Boot: boot, Seq: sl.seq, Base: now.UnixMilli()}
						for range o.Samples {
							b.Samples = append(b.Samples, sample)
						}
						payload, _ := proto.Marshal(&b)
						err := sl.c.publish(sl.topic, payload, o.Inflight, sl.seq)
						switch {
						case errors.Is(err, errInflight):
							throttled.Add(1)
							sl.seq--
						case err != nil:
						case measuring.Load():
							sent.Add(1)
						}
					}
					if now.Sub(lastPing) > 20*time.Second {
						for _, sl := range mine {
							sl.c.pingreq()
						}
						lastPing = now
					}
				}
			}
		}()
	}
	if !sleepCtx(ctx, o.Warmup) {
		close(stop)
		wg.Wait()
		return res, ctx.Err()
	}
	before, hBefore, err := cps.scrape()
	if err != nil {
		return res, err
	}
	measuring.Store(true)
	tm := time.Now()
	selfCPU := cpuSeconds(os.Getpid())
	serverCPU := cps.cpu()
	var brokerCPU float64
	if mosq != nil {
		brokerCPU = cpuSeconds(mosq.Pid())
	}
	sleepCtx(ctx, o.Duration)
	measuring.Store(false)
	elapsed := time.Since(tm).Seconds()
	res.LoadCPU = (cpuSeconds(os.Getpid()) - selfCPU) / elapsed
	res.ServerCPU = (cps.cpu() - serverCPU) / elapsed
	if mosq != nil {
		res.BrokerCPU = (cpuSeconds(mosq.Pid()) - brokerCPU) / elapsed
	}
	close(stop)
	wg.Wait()
	// Let in-flight messages finish before reading the store's counters.
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		n := 0
		for _, c := range conns {
			n += c.inflight()
		}
		if n == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	// An external broker acknowledges before the control plane stores:
	// wait until the store has caught up (or stops making progress).
	var after map[string]float64
	var hAfter []bucket
	drainStart := time.Now()
	for last, still := -1.0, time.Now(); ; {
		if after, hAfter, err = cps.scrape(); err != nil {
			return res, err
		}
		stored := after["hangar_ingest_samples_total"] - before["hangar_ingest_samples_total"]
		if stored >= float64(sent.Load()*int64(o.Samples)) || time.Since(still) > 5*time.Second || time.Since(drainStart) > 2*time.Minute {
			break
		}
		if stored != last {
			last, still = stored, time.Now()
		}
		time.Sleep(250 * time.Millisecond)
	}
	res.DrainSeconds = time.Since(drainStart).Seconds()
	res.ServerRSSMB = cps.rss()
	if mosq != nil {
		res.BrokerRSSMB = rssMB(mosq.Pid())
	}
	res.RSSPerConnKB = (res.ServerRSSMB + res.BrokerRSSMB - baseRSS) * 1024 / float64(len(conns))
	res.Sent, res.Acked, res.Throttled = sent.Load(), acked.Load(), throttled.Load()
	// Messages acked during the measurement were sent during or just
	// before it; the store's counter covers the same interval plus the
	// drain, so stored >= acked when nothing is lost.
	res.Stored = int64((after["hangar_ingest_samples_total"] - before["hangar_ingest_samples_total"]) / float64(o.Samples))
	// Loss is counted by the messages missing from the store: each
	// acknowledged (boot, seq) looked up, so that duplicates cannot hide
	// a loss.
	acks := make([][]uint64, len(conns))
	for i, c := range conns {
		acks[i] = c.acknowledged()
	}
	cps.stop()
	if res.Lost, res.Checked, err = missing(ctx, storeLoc, creds, acks, boot); err != nil {
		return res, err
	}
	res.Rate = float64(res.Stored) / elapsed
	res.AckP50, res.AckP99 = percentile(lats, 0.5), percentile(lats, 0.99)
	d := func(k string) float64 { return after[k] - before[k] }
	if n := d("hangar_store_group_messages_count"); n > 0 {
		res.GroupSize = d("hangar_store_group_messages_sum") / n
		res.CommitMS = d("hangar_store_write_seconds_sum") / d("hangar_store_write_seconds_count") * 1000
	}
	res.LagP50, res.LagP99 = quantile(hAfter, hBefore, 0.5)*1000, quantile(hAfter, hBefore, 0.99)*1000
	return res, nil
}

// missing counts the acknowledged messages the store does not hold, by
// each device's sequence numbers.
func missing(ctx context.Context, store string, creds []credential, acks [][]uint64, boot uint64) (lost, checked int64, err error) {
	db, err := sqlstore.OpenURL(store, sqlstore.Options{})
	if err != nil {
		return 0, 0, err
	}
	defer db.Close()
	for i, c := range creds {
		rows, err := db.Telemetry(ctx, c.Username, time.Time{}, time.Now().Add(time.Hour), 10_000_000)
		if err != nil {
			return 0, 0, err
		}
		have := make(map[uint64]bool, len(rows))
		for _, r := range rows {
			if r.Boot == boot {
				have[r.Seq] = true
			}
		}
		for _, s := range acks[i] {
			checked++
			if !have[s] {
				lost++
			}
		}
	}
	return lost, checked, nil
}

// replicaSet is the control planes of one run.
type replicaSet []*controlPlane

func (rs replicaSet) stop() {
	for _, c := range rs {
		c.stop()
	}
}

func (rs replicaSet) cpu() (sum float64) {
	for _, c := range rs {
		sum += cpuSeconds(c.cmd.Process.Pid)
	}
	return sum
}

func (rs replicaSet) rss() (sum float64) {
	for _, c := range rs {
		sum += rssMB(c.cmd.Process.Pid)
	}
	return sum
}

// scrape sums the replicas' counters and commit-delay histograms.
func (rs replicaSet) scrape() (map[string]float64, []bucket, error) {
	vals := map[string]float64{}
	var hist []bucket
	for i, c := range rs {
		v, h, err := c.scrape()
		if err != nil {
			return nil, nil, err
		}
		for k, x := range v {
			vals[k] += x
		}
		if i == 0 {
			hist = h
			continue
		}
		if len(h) != len(hist) {
			return nil, nil, errors.New("replicas' histograms differ")
		}
		for j := range h {
			hist[j].count += h[j].count
		}
	}
	return vals, hist, nil
}

// sleepCtx waits d, or less when ctx ends first (then false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	return clock.Sleep(clock.Real{}, d, ctx.Done())
}
