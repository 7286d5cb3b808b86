// Package mosquitto runs a real Mosquitto broker with its dynamic security
// plugin, configured as hangar expects an external broker to be, for tests
// and benchmarks.
//
// The broker listens on a free loopback port, refuses anonymous clients,
// denies everything by default and knows one client, the control plane's
// account (AdminUser), which may administer dynamic security and has exactly
// the rights broker.ControlPlaneACLs lists. Devices are added by the control
// plane, through the plugin's $CONTROL API.
package mosquitto

import (
	"bytes"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/controlplane/broker"

	"github.com/hangarfleet/hangar/internal/freeport"
)

// Names of the account and role the broker is created with.
const (
	AdminUser = "hangar-admin"
	AdminRole = "hangar-controlplane"
)

// Timeouts for the broker process.
const (
	startTimeout = 10 * time.Second
	stopTimeout  = 10 * time.Second
)

// PluginEnv overrides the path of mosquitto_dynamic_security.so.
const PluginEnv = "MOSQUITTO_DYNSEC_PLUGIN"

// Mosquitto is a running broker.
type Mosquitto struct {
	// AdminUser and AdminPassword are the control plane's account.
	AdminUser, AdminPassword string
	// Dir holds the configuration, the dynamic security file, the
	// persistence database and the log.
	Dir string

	bin  string
	port int
	opts Options
	conf string // the configuration file (default Dir/mosquitto.conf)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// ErrNotInstalled is returned by Start when the mosquitto binary or its
// dynamic security plugin is missing.
var ErrNotInstalled = errors.New("mosquitto not installed")

// Options tune the broker.
type Options struct {
	// Quiet logs only errors, warnings and notices: logging every packet
	// (the default, which tests print when they fail) costs Mosquitto,
	// which is single-threaded, a large part of its throughput.
	Quiet bool
}

// Start runs a broker with its files in dir.
func Start(dir string, opts Options) (*Mosquitto, error) {
	bin, plugin, err := find()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotInstalled, err)
	}
	m := &Mosquitto{AdminUser: AdminUser, AdminPassword: rand.Text(), Dir: dir, bin: bin, opts: opts}
	if err := m.writeDynsec(); err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	// A port found free may be taken before mosquitto binds it: try again
	// with another one.
	for attempt := 1; ; attempt++ {
		port, err := freeport.Port()
		if err != nil {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
		m.port = port
		if err := m.writeConfig(plugin); err != nil {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
		err = m.start()
		if err == nil {
			return m, nil
		}
		if attempt == 3 {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
	}
}

// StartConfig runs mosquitto with a configuration written elsewhere
// (hangar broker-config), which listens on port; it needs no dynamic
// security plugin. Restart and Stop work as with Start.
func StartConfig(conf string, port int) (*Mosquitto, error) {
	bin, err := findBinary()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotInstalled, err)
	}
	m := &Mosquitto{Dir: filepath.Dir(conf), bin: bin, port: port, conf: conf}
	if err := m.start(); err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	return m, nil
}

// URL is the broker's address for paho.
func (m *Mosquitto) URL() string { return "tcp://" + m.Addr() }

// Addr is the broker's host:port.
func (m *Mosquitto) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(m.port)) }

// DynsecFile is the dynamic security configuration; the plugin rewrites it
// after every change.
func (m *Mosquitto) DynsecFile() string { return filepath.Join(m.Dir, "dynamic-security.json") }

// LogFile is the broker's log (log_type all).
func (m *Mosquitto) LogFile() string { return filepath.Join(m.Dir, "mosquitto.log") }

// Stop terminates the broker gracefully (SIGTERM), so that it saves its
// persistence database, and waits for it to exit.
func (m *Mosquitto) Stop() error { return m.stop() }

// Restart stops the broker and starts it again on the same port with the
// same dynamic security file and persistence database: sessions, queued
// messages and accounts survive, connections do not.
func (m *Mosquitto) Restart() error {
	if err := m.stop(); err != nil {
		return err
	}
	if err := m.start(); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	return nil
}

// Kill ends the broker at once.
func (m *Mosquitto) Kill() { m.kill() }

// Pid is the broker's process id, or 0 when it is not running.
func (m *Mosquitto) Pid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return 0
	}
	return m.cmd.Process.Pid
}

// findBinary finds mosquitto on PATH, or where Debian installs it
// (/usr/sbin, which a non-root PATH lacks).
func findBinary() (string, error) {
	bin, err := exec.LookPath("mosquitto")
	if err == nil {
		return bin, nil
	}
	for _, p := range []string{"/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"} {
		if _, serr := os.Stat(p); serr == nil {
			return p, nil
		}
	}
	return "", err
}

func find() (bin, plugin string, err error) {
	if bin, err = findBinary(); err != nil {
		return "", "", err
	}
	if p := os.Getenv(PluginEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", "", fmt.Errorf("%s: %w", PluginEnv, err)
		}
		return bin, p, nil
	}
	patterns := []string{
		"/usr/lib/*/mosquitto_dynamic_security.so",
		"/usr/lib/mosquitto_dynamic_security.so",
		"/usr/local/lib/mosquitto_dynamic_security.so",
		"/usr/local/lib/*/mosquitto_dynamic_security.so",
		"/usr/lib/mosquitto/mosquitto_dynamic_security.so",
	}
	for _, pat := range patterns {
		if ms, _ := filepath.Glob(pat); len(ms) > 0 {
			return bin, ms[0], nil
		}
	}
	return "", "", fmt.Errorf("mosquitto_dynamic_security.so not found (set %s)", PluginEnv)
}

func (m *Mosquitto) writeConfig(plugin string) error {
	conf := fmt.Sprintf(`# written by hangar's mosquitto package
listener %d 127.0.0.1
allow_anonymous false
per_listener_settings false
# Keep root when the tests run as root; ignored otherwise.
user root
persistence true
persistence_location %s/
persistence_file mosquitto.db
# The control plane keeps many handlers in flight (group commit).
max_inflight_messages 1000
max_queued_messages 100000
set_tcp_nodelay true
# As the embedded broker: device messages are events, not state to keep.
retain_available false
plugin %s
plugin_opt_config_file %s
log_dest file %s
%s
log_timestamp_format %%H:%%M:%%S
`, m.port, m.Dir, plugin, m.DynsecFile(), m.LogFile(), m.logTypes())
	return os.WriteFile(filepath.Join(m.Dir, "mosquitto.conf"), []byte(conf), 0o600)
}

type dynsecConfig struct {
	DefaultACLAccess map[string]bool `json:"defaultACLAccess"`
	Clients          []dynsecClient  `json:"clients"`
	Roles            []dynsecRole    `json:"roles"`
	Groups           []any           `json:"groups"`
}

type dynsecClient struct {
	Username   string           `json:"username"`
	TextName   string           `json:"textname,omitempty"`
	Password   string           `json:"password"`
	Salt       string           `json:"salt"`
	Iterations int              `json:"iterations"`
	Roles      []map[string]any `json:"roles"`
}

type dynsecRole struct {
	RoleName string             `json:"rolename"`
	TextName string             `json:"textname,omitempty"`
	ACLs     []broker.DynsecACL `json:"acls"`
}

// dynsecIterations is what `mosquitto_ctrl dynsec init` writes on 2.0.11.
const dynsecIterations = 101

// hashPassword hashes a password as the dynamic security plugin does:
// PBKDF2-HMAC-SHA512 with a 12-byte salt, 64-byte key, both base64.
func hashPassword(password string) (hash, salt string, err error) {
	s := make([]byte, 12)
	rand.Read(s)
	k, err := pbkdf2.Key(sha512.New, password, s, dynsecIterations, sha512.Size)
	if err != nil {
		return "", "", err
	}
	return base64.StdEncoding.EncodeToString(k), base64.StdEncoding.EncodeToString(s), nil
}

// writeDynsec writes the plugin's configuration: every default denies,
// and the admin account has the control plane's role. This is what
// `mosquitto_ctrl dynsec init` does, minus the admin's rights on "#" and
// plus the hangar ACLs; writing it here keeps the admin's password off the
// command line and tests the documented ACLs rather than a superuser.
func (m *Mosquitto) writeDynsec() error {
	hash, salt, err := hashPassword(m.AdminPassword)
	if err != nil {
		return err
	}
	cfg := dynsecConfig{
		DefaultACLAccess: map[string]bool{
			"publishClientSend": false, "publishClientReceive": false, "subscribe": false, "unsubscribe": false,
		},
		Clients: []dynsecClient{{
			Username: m.AdminUser, TextName: "hangar control plane",
			Password: hash, Salt: salt, Iterations: dynsecIterations,
			Roles: []map[string]any{{"rolename": AdminRole}},
		}},
		Roles:  []dynsecRole{{RoleName: AdminRole, ACLs: broker.ControlPlaneACLs()}},
		Groups: []any{},
	}
	b, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return err
	}
	return os.WriteFile(m.DynsecFile(), b, 0o600)
}

// start runs mosquitto and waits until it accepts connections.
func (m *Mosquitto) start() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return errors.New("already running")
	}
	out, err := os.OpenFile(filepath.Join(m.Dir, "stderr.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	conf := m.conf
	if conf == "" {
		conf = filepath.Join(m.Dir, "mosquitto.conf")
	}
	cmd := exec.Command(m.bin, "-c", conf)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = m.Dir
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	m.cmd, m.done = cmd, done

	deadline := time.Now().Add(startTimeout)
	for {
		c, err := net.DialTimeout("tcp", m.Addr(), 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-done:
			m.cmd, m.done = nil, nil
			return fmt.Errorf("exited before listening (%s); stderr: %s", cmd.ProcessState, m.stderr())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-done
			m.cmd, m.done = nil, nil
			return fmt.Errorf("not listening on %s after %v: %w", m.Addr(), startTimeout, err)
		}
	}
}

func (m *Mosquitto) stop() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return nil
	}
	cmd, done := m.cmd, m.done
	m.cmd, m.done = nil, nil
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		return nil
	case <-time.After(stopTimeout):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("did not stop within %v of SIGTERM; killed", stopTimeout)
	}
}

// kill ends the broker at cleanup; a graceful stop is not needed there.
func (m *Mosquitto) kill() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return
	}
	_ = m.cmd.Process.Kill()
	<-m.done
	m.cmd, m.done = nil, nil
}

func (m *Mosquitto) stderr() string {
	b, _ := os.ReadFile(filepath.Join(m.Dir, "stderr.log"))
	return strings.TrimSpace(string(b))
}

func (m *Mosquitto) logTypes() string {
	if m.opts.Quiet {
		return "log_type error\nlog_type warning\nlog_type notice"
	}
	return "log_type all"
}

// LogTail returns the end of the broker's log and its stderr, which say why
// a client was refused or a message denied.
func (m *Mosquitto) LogTail() string {
	const max = 64 << 10
	b, err := os.ReadFile(m.LogFile())
	if err != nil {
		return fmt.Sprintf("mosquitto log: %v", err)
	}
	if len(b) > max {
		b = b[len(b)-max:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
		b = append([]byte("...\n"), b...)
	}
	out := fmt.Sprintf("mosquitto log (%s):\n%s", m.LogFile(), b)
	if s := m.stderr(); s != "" {
		out += "\nmosquitto stderr:\n" + s
	}
	return out
}
