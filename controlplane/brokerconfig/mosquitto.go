// Package brokerconfig writes the configuration of an external broker
// that gives devices the guarantees of the embedded one: mutual TLS with
// the device CA, the client id and the topics bound to the certificate's
// device id, and a listener for the control plane's own account.
package brokerconfig

import (
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/hangarfleet/hangar/proto"
)

// ControlUser is the control plane's account on the generated broker.
const ControlUser = "hangar-control"

// Files written into the output directory.
const (
	ConfFile     = "mosquitto.conf"
	ACLFile      = "acl"
	PasswordFile = "passwords"        // mosquitto's password_file: the control plane's account only
	ControlFile  = "control.password" // that account's password, for hangar serve --broker-password-file
	CAFile       = "device-ca.pem"    // verifies device certificates
	CRLFile      = "devices.crl"      // certificates that no longer speak for a device
	CertFile     = "server.pem"       // the broker's certificate chain
	KeyFile      = "server.key"
)

// Mosquitto describes a Mosquitto 2 broker for a hangar fleet.
type Mosquitto struct {
	Dir string // where the files go (and where the broker reads them)
	// DevicePort is the devices' mutual-TLS listener (8883); ControlAddr
	// and ControlPort the control plane's password listener (127.0.0.1,
	// 1884): keep it off public networks.
	DevicePort  int
	ControlAddr string
	ControlPort int
	// DeviceCA, CRL, ServerCert and ServerKey are PEM.
	DeviceCA, CRL, ServerCert, ServerKey []byte
	// ControlPassword is the control plane's password (made when empty).
	ControlPassword string
	// User is the account mosquitto runs as (empty: its default,
	// "mosquitto", which must be able to read Dir).
	User string
	// Persistence keeps queued messages across broker restarts.
	Persistence bool
}

// ACL is the broker's access list: the control plane reads every device's
// messages and writes their commands; each device, named by its
// certificate (%u with use_identity_as_username), writes its own state,
// telemetry, events and certificate requests and reads its commands.
func ACL() string {
	var b strings.Builder
	b.WriteString("# written by hangar broker-config: devices are known by their certificate (%u is its subject's CN)\n")
	fmt.Fprintf(&b, "user %s\n", ControlUser)
	for _, k := range proto.DeviceKinds {
		fmt.Fprintf(&b, "topic read %s\n", proto.AllDevices(k))
		fmt.Fprintf(&b, "topic read $share/+/%s\n", proto.AllDevices(k))
	}
	fmt.Fprintf(&b, "topic write %s\n\n", proto.AllDevices(proto.KindCmd))
	for _, k := range proto.DeviceKinds {
		fmt.Fprintf(&b, "pattern write %s\n", proto.DeviceTopic("%u", k))
	}
	fmt.Fprintf(&b, "pattern read %s\n", proto.DeviceTopic("%u", proto.KindCmd))
	return b.String()
}

// Write writes every file. The keys and the password are 0600.
func (m *Mosquitto) Write() error {
	if m.DevicePort == 0 {
		m.DevicePort = 8883
	}
	if m.ControlAddr == "" {
		m.ControlAddr = "127.0.0.1"
	}
	if m.ControlPort == 0 {
		m.ControlPort = 1884
	}
	if len(m.DeviceCA) == 0 || len(m.ServerCert) == 0 || len(m.ServerKey) == 0 || len(m.CRL) == 0 {
		return errors.New("broker config: the device CA, a revocation list and the broker's certificate and key are needed")
	}
	if m.ControlPassword == "" {
		m.ControlPassword = rand.Text()
	}
	if err := os.MkdirAll(m.Dir, 0o750); err != nil {
		return err
	}
	hash, err := passwordHash(m.ControlPassword)
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(m.Dir)
	if err != nil {
		return err
	}
	p := func(name string) string { return filepath.Join(abs, name) }
	var conf strings.Builder
	fmt.Fprintf(&conf, `# written by hangar broker-config mosquitto
per_listener_settings true
`)
	if m.User != "" {
		fmt.Fprintf(&conf, "user %s\n", m.User)
	}
	if m.Persistence {
		fmt.Fprintf(&conf, "persistence true\npersistence_location %s/\n", abs)
	}
	fmt.Fprintf(&conf, `max_queued_messages 100000
retain_available false

# Devices: mutual TLS with the device CA. The certificate's CN is the user
# name and the client id: a device can be nobody else, and its topics are
# the patterns of the ACL file.
listener %d
cafile %s
certfile %s
keyfile %s
crlfile %s
require_certificate true
use_identity_as_username true
use_username_as_clientid true
tls_version tlsv1.2
acl_file %s
allow_anonymous false

# The control plane: its own account, on a private address.
listener %d %s
password_file %s
acl_file %s
allow_anonymous false
`, m.DevicePort, p(CAFile), p(CertFile), p(KeyFile), p(CRLFile), p(ACLFile),
		m.ControlPort, m.ControlAddr, p(PasswordFile), p(ACLFile))
	files := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{CAFile, m.DeviceCA, 0o644},
		{CRLFile, m.CRL, 0o644},
		{CertFile, m.ServerCert, 0o644},
		{KeyFile, m.ServerKey, 0o640},
		{ACLFile, []byte(ACL()), 0o644},
		{PasswordFile, []byte(ControlUser + ":" + hash + "\n"), 0o640},
		{ControlFile, []byte(m.ControlPassword + "\n"), 0o600},
		{ConfFile, []byte(conf.String()), 0o644},
	}
	gid := -1
	if g, err := user.LookupGroup(groupOf(m.User)); err == nil && os.Geteuid() == 0 {
		// The broker drops root for its own account: let its group read
		// the key and the password file.
		gid, _ = strconv.Atoi(g.Gid)
	}
	for _, f := range files {
		if err := os.WriteFile(p(f.name), f.data, f.perm); err != nil {
			return err
		}
		if err := os.Chmod(p(f.name), f.perm); err != nil {
			return err
		}
		if gid >= 0 && f.name != ControlFile {
			_ = os.Chown(p(f.name), -1, gid)
		}
	}
	if gid >= 0 {
		_ = os.Chown(abs, -1, gid)
	}
	return nil
}

func groupOf(u string) string {
	if u == "" {
		return "mosquitto"
	}
	return u
}

// passwordHash is a Mosquitto 2 password_file hash: PBKDF2-SHA512, 101
// iterations, 12-byte salt ("$7$101$salt$hash", base64), as mosquitto_passwd
// writes it.
func passwordHash(password string) (string, error) {
	salt := make([]byte, 12)
	rand.Read(salt)
	k, err := pbkdf2.Key(sha512.New, password, salt, 101, sha512.Size)
	if err != nil {
		return "", err
	}
	return "$7$101$" + base64.StdEncoding.EncodeToString(salt) + "$" + base64.StdEncoding.EncodeToString(k), nil
}
