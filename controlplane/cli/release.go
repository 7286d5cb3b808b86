package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/proto"
)

func flagsOnly(fs *flag.FlagSet, args []string) error {
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", ErrUsage, pos[0])
	}
	return nil
}

func required(name, v string) error {
	if v == "" {
		return fmt.Errorf("%w: --%s is required", ErrUsage, name)
	}
	return nil
}

func releaseKeygen(g *globals, args []string) error {
	fs := g.newFlags("release keygen")
	out := fs.String("out", "", "path prefix: writes PREFIX.key (private, 0600) and PREFIX.pub")
	force := fs.Bool("force", false, "overwrite existing files")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	if err := required("out", *out); err != nil {
		return err
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	privPEM, err := proto.EncodePrivateKey(priv)
	if err != nil {
		return err
	}
	pubPEM, err := proto.EncodePublicKey(pub)
	if err != nil {
		return err
	}
	mode := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if *force {
		mode = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	for _, f := range []struct {
		path string
		data []byte
		perm os.FileMode
	}{{*out + ".key", privPEM, 0o600}, {*out + ".pub", pubPEM, 0o644}} {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			return err
		}
		fh, err := os.OpenFile(f.path, mode, f.perm)
		if err != nil {
			return fmt.Errorf("keygen: %w", err)
		}
		_, err = fh.Write(f.data)
		if cerr := fh.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("keygen: %w", err)
		}
	}
	fmt.Fprintf(g.env.Stdout, "key %s\n  private: %s.key (keep it offline)\n  public:  %s.pub\n", proto.KeyID(pub), *out, *out)
	return nil
}

func readPrivate(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := proto.ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func readPublic(path string) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := proto.ParsePublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func commaList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func releaseKeys(g *globals, args []string) error {
	fs := g.newFlags("release keys")
	rootKey := fs.String("root-key", "", "root private key (PREFIX.key)")
	add := fs.String("add", "", "release public keys to list, comma separated (PREFIX.pub)")
	revoke := fs.String("revoke", "", "key ids to revoke, comma separated")
	keyExpires := fs.Duration("key-expires", 365*24*time.Hour, "how long the listed release keys are trusted")
	expires := fs.Duration("expires", 365*24*time.Hour, "how long the list itself is valid")
	targets := fs.String("targets", "", "restrict the keys to these targets, comma separated (default: any)")
	version := fs.Uint64("version", 0, "list version, above every earlier list (default: the current unix time)")
	out := fs.String("out", "keys.cose", "where to write the signed list")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	if err := required("root-key", *rootKey); err != nil {
		return err
	}
	root, err := readPrivate(*rootKey)
	if err != nil {
		return err
	}
	now := time.Now()
	kl := proto.KeyList{Version: *version, Created: now.Unix(), Expires: now.Add(*expires).Unix(), Revoked: commaList(*revoke)}
	if kl.Version == 0 {
		kl.Version = uint64(now.Unix())
	}
	for _, p := range commaList(*add) {
		pub, err := readPublic(p)
		if err != nil {
			return err
		}
		kl.Keys = append(kl.Keys, proto.ReleaseKey{ID: proto.KeyID(pub), Public: pub, Expires: now.Add(*keyExpires).Unix(), Targets: commaList(*targets)})
	}
	signed, err := proto.SignKeyList(root, kl)
	if err != nil {
		return err
	}
	if err := os.WriteFile(*out, signed, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "key list version %d signed by root %s: %d keys, %d revoked -> %s\n",
		kl.Version, proto.KeyID(root.Public().(ed25519.PublicKey)), len(kl.Keys), len(kl.Revoked), *out)
	return nil
}

func digestFile(path string) ([]byte, uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	return h.Sum(nil), uint64(n), err
}

func releaseSign(g *globals, args []string) error {
	fs := g.newFlags("release sign")
	key := fs.String("key", "", "release private key (PREFIX.key)")
	artifact := fs.String("artifact", "", "the file to release")
	version := fs.String("version", "", "semantic version, e.g. 1.5.0")
	hardware := fs.String("hardware", "", "hardware revisions it runs on, comma separated")
	arch := fs.String("arch", "", "architectures (GOARCH), comma separated; required for --target agent")
	target := fs.String("target", proto.TargetAgent, "agent, or the name of a payload (e.g. fc-firmware)")
	counter := fs.Uint64("counter", 0, "release counter, above every earlier release (default: the current unix time)")
	expires := fs.Duration("expires", 90*24*time.Hour, "devices refuse the manifest after this")
	notes := fs.String("notes", "", "release notes")
	out := fs.String("out", "", "where to write the signed manifest (default: ARTIFACT.manifest)")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	for n, v := range map[string]string{"key": *key, "artifact": *artifact, "version": *version, "hardware": *hardware} {
		if err := required(n, v); err != nil {
			return err
		}
	}
	priv, err := readPrivate(*key)
	if err != nil {
		return err
	}
	sum, size, err := digestFile(*artifact)
	if err != nil {
		return err
	}
	now := time.Now()
	m := proto.Manifest{Version: *version, Counter: *counter, Target: *target, Hardware: commaList(*hardware), Arch: commaList(*arch),
		Size: size, SHA256: sum, Created: now.Unix(), Expires: now.Add(*expires).Unix(), Notes: *notes}
	if m.Counter == 0 {
		m.Counter = uint64(now.Unix())
	}
	signed, err := proto.SignManifest(priv, m)
	if err != nil {
		return err
	}
	if *out == "" {
		*out = *artifact + ".manifest"
	}
	if err := os.WriteFile(*out, signed, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(g.env.Stdout, "%s %s (counter %d, %d bytes, sha256 %x) signed by %s -> %s\n",
		m.Target, m.Version, m.Counter, m.Size, m.SHA256, proto.KeyID(priv.Public().(ed25519.PublicKey)), *out)
	return nil
}

func releaseVerify(g *globals, args []string) error {
	fs := g.newFlags("release verify")
	rootPub := fs.String("root-key", "", "root public key(s), comma separated (PREFIX.pub)")
	keysFile := fs.String("keys", "keys.cose", "signed key list")
	manifest := fs.String("manifest", "", "signed manifest")
	artifact := fs.String("artifact", "", "also check this artifact against the manifest")
	hardware := fs.String("hardware", "", "also check the manifest allows this hardware")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	for n, v := range map[string]string{"root-key": *rootPub, "manifest": *manifest} {
		if err := required(n, v); err != nil {
			return err
		}
	}
	var roots []ed25519.PublicKey
	for _, p := range commaList(*rootPub) {
		k, err := readPublic(p)
		if err != nil {
			return err
		}
		roots = append(roots, k)
	}
	kb, err := os.ReadFile(*keysFile)
	if err != nil {
		return err
	}
	mb, err := os.ReadFile(*manifest)
	if err != nil {
		return err
	}
	now := time.Now()
	kl, err := proto.OpenKeyList(kb, roots)
	if err == nil {
		err = kl.Check(nil, now)
	}
	var m proto.Manifest
	if err == nil {
		m, err = proto.OpenManifest(mb, kl, now)
	}
	if err == nil && *hardware != "" && !containsStr(m.Hardware, *hardware) {
		err = &proto.VerifyError{Check: proto.CheckHardware, Err: fmt.Errorf("built for %v", m.Hardware)}
	}
	if err == nil && *artifact != "" {
		sum, size, derr := digestFile(*artifact)
		switch {
		case derr != nil:
			err = derr
		case size != m.Size:
			err = &proto.VerifyError{Check: proto.CheckSize, Err: fmt.Errorf("artifact has %d bytes, the manifest says %d", size, m.Size)}
		case string(sum) != string(m.SHA256):
			err = &proto.VerifyError{Check: proto.CheckHash, Err: errors.New("artifact digest differs from the manifest's")}
		}
	}
	if err != nil {
		return fmt.Errorf("INVALID: %w", err)
	}
	fmt.Fprintf(g.env.Stdout, "OK: %s %s, counter %d, hardware %s, arch %s, %d bytes, signed by %s, expires %s\n",
		m.Target, m.Version, m.Counter, strings.Join(m.Hardware, ","), strings.Join(m.Arch, ","), m.Size, m.KeyID,
		time.Unix(m.Expires, 0).UTC().Format(time.RFC3339))
	return nil
}

func containsStr(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

func releasePush(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("release push")
	g.register(fs)
	manifest := fs.String("manifest", "", "signed manifest (default: ARTIFACT.manifest)")
	keysFile := fs.String("keys", "keys.cose", "signed key list")
	artifact := fs.String("artifact", "", "the released file")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	if err := required("artifact", *artifact); err != nil {
		return err
	}
	if *manifest == "" {
		*manifest = *artifact + ".manifest"
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	mb, err := os.ReadFile(*manifest)
	if err != nil {
		return err
	}
	kb, err := os.ReadFile(*keysFile)
	if err != nil {
		return err
	}
	f, err := os.Open(*artifact)
	if err != nil {
		return err
	}
	defer f.Close()
	// The body is streamed: the artifact is never held in memory.
	r, err := c.PushRelease(ctx, mb, kb, f)
	if err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, r)
	}
	fmt.Fprintf(g.env.Stdout, "pushed %s %s (counter %d, %s)\n", r.Target, r.Version, r.Counter, humanBytes(r.Size))
	return nil
}

func releaseList(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("release ls")
	g.register(fs)
	target := fs.String("target", "", "only this target")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	q := url.Values{}
	if *target != "" {
		q.Set("target", *target)
	}
	var rs []store.Release
	if err := c.Do(ctx, http.MethodGet, "/api/v1/releases", q, nil, &rs); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, rs)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tVERSION\tCOUNTER\tHARDWARE\tARCH\tSIZE\tEXPIRES\tKEY")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", r.Target, r.Version, r.Counter, strings.Join(r.Hardware, ","),
			dash(strings.Join(r.Arch, ",")), humanBytes(r.Size), r.Expires.Format(time.DateOnly), r.KeyID)
	}
	return tw.Flush()
}

func deviceUpdate(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device update")
	g.register(fs)
	release := fs.String("release", "", "release to offer: VERSION or TARGET@VERSION")
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	id, err := oneID(fs, args, "device update")
	if err != nil {
		return err
	}
	if err := required("release", *release); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var resp api.UpdateResponse
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices/"+id+"/update", nil, api.UpdateRequest{Release: *release, Reason: *reason}, &resp); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, resp)
	}
	fmt.Fprintf(g.env.Stdout, "offered %s %s (counter %d) to %s (command %s); follow it with: hangar device updates %s\n",
		resp.Target, resp.Version, resp.Counter, id, resp.Command, id)
	return nil
}

func deviceUpdates(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device updates")
	g.register(fs)
	id, err := oneID(fs, args, "device updates")
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	var us []store.DeviceUpdate
	if err := c.Do(ctx, http.MethodGet, "/api/v1/devices/"+id+"/updates", nil, nil, &us); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, us)
	}
	tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tVERSION\tCOUNTER\tSTATE\tWHEN\tREASON")
	for _, u := range us {
		reason := u.Reason
		if u.Check != "" {
			reason = u.Check + ": " + reason
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", u.Target, u.Version, u.Counter, u.State, u.Updated.Local().Format(time.DateTime), reason)
	}
	return tw.Flush()
}
