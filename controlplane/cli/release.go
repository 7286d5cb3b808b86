package cli

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
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
	"github.com/hangarfleet/hangar/controlplane/client"
	"github.com/hangarfleet/hangar/controlplane/delta"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/internal/bspatch"
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
	var from listFlag
	fs.Var(&from, "delta-from", "also make a delta from this earlier build, FILE or FILE@VERSION: writes ARTIFACT.from-SHA.patch and its manifest PATCH.manifest (repeat)")
	if err := flagsOnly(fs, args); err != nil {
		return err
	}
	for n, v := range map[string]string{"key": *key, "artifact": *artifact, "version": *version, "hardware": *hardware} {
		if err := required(n, v); err != nil {
			return err
		}
	}
	bases := make([]deltaBase, len(from))
	for i, f := range from {
		bases[i] = parseDeltaBase(f)
		if bases[i].version != "" && !proto.ValidVersion(bases[i].version) {
			return fmt.Errorf("%w: --delta-from %s: %q is not a semantic version", ErrUsage, f, bases[i].version)
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
	if len(bases) == 0 {
		return nil
	}
	build, err := os.ReadFile(*artifact)
	if err != nil {
		return err
	}
	if sum := sha256.Sum256(build); !bytes.Equal(sum[:], m.SHA256) {
		return fmt.Errorf("%s changed while it was signed", *artifact)
	}
	for _, b := range bases {
		if err := signDelta(g, priv, m, build, *artifact, b); err != nil {
			return err
		}
	}
	return nil
}

// deltaBase is an earlier build a delta starts from.
type deltaBase struct{ file, version string }

// parseDeltaBase reads FILE or FILE@VERSION (a file that exists under the
// whole name is that file).
func parseDeltaBase(s string) deltaBase {
	if _, err := os.Stat(s); err == nil {
		return deltaBase{file: s}
	}
	if i := strings.LastIndex(s, "@"); i > 0 && !strings.ContainsAny(s[i+1:], `/\`) {
		return deltaBase{file: s[:i], version: s[i+1:]}
	}
	return deltaBase{file: s}
}

// listFlag collects a repeated flag's values.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// signDelta makes the patch from base to build and signs its manifest:
// the release's, with the delta named.
func signDelta(g *globals, priv ed25519.PrivateKey, m proto.Manifest, build []byte, artifact string, b deltaBase) error {
	old, err := os.ReadFile(b.file)
	if err != nil {
		return fmt.Errorf("--delta-from: %w", err)
	}
	baseSum := sha256.Sum256(old)
	if bytes.Equal(baseSum[:], m.SHA256) {
		return fmt.Errorf("--delta-from %s: it is the build released (the same sha256): a delta from it patches nothing", b.file)
	}
	start := time.Now()
	patch, err := delta.Make(old, build)
	if err != nil {
		return fmt.Errorf("--delta-from %s: %w", b.file, err)
	}
	took := time.Since(start)
	patchSum := sha256.Sum256(patch)
	m.Delta = &proto.Delta{BaseSHA256: baseSum[:], BaseSize: uint64(len(old)), PatchSHA256: patchSum[:], PatchSize: uint64(len(patch)),
		BaseVersion: b.version}
	signed, err := proto.SignManifest(priv, m)
	if err != nil {
		return fmt.Errorf("--delta-from %s: %w", b.file, err)
	}
	path := fmt.Sprintf("%s.from-%x.patch", artifact, baseSum[:6])
	if err := os.WriteFile(path, patch, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(path+".manifest", signed, 0o644); err != nil {
		return err
	}
	from := b.version
	if from == "" {
		from = filepath.Base(b.file)
	}
	fmt.Fprintf(g.env.Stdout, "  delta from %s (sha256 %x): %s, %.1f%% of the full %s, made in %s -> %s (manifest %s.manifest)\n",
		from, baseSum[:6], humanBytes(len(patch)), 100*float64(len(patch))/float64(len(build)), humanBytes(len(build)),
		took.Round(time.Millisecond), path, path)
	if len(patch) >= len(build) {
		fmt.Fprintf(g.env.Stdout, "  (the patch is no smaller than the build: devices on %s gain nothing from it)\n", from)
	}
	return nil
}

func releaseVerify(g *globals, args []string) error {
	fs := g.newFlags("release verify")
	rootPub := fs.String("root-key", "", "root public key(s), comma separated (PREFIX.pub)")
	keysFile := fs.String("keys", "keys.cose", "signed key list")
	manifest := fs.String("manifest", "", "signed manifest")
	artifact := fs.String("artifact", "", "also check this artifact against the manifest")
	hardware := fs.String("hardware", "", "also check the manifest allows this hardware")
	base := fs.String("base", "", "for a delta manifest: the build it patches; checks it is the base, applies the patch (--artifact) and checks the result")
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
		// A delta's artifact is its patch.
		sum, size, derr := digestFile(*artifact)
		switch {
		case derr != nil:
			err = derr
		case size != m.ArtifactSize():
			err = &proto.VerifyError{Check: proto.CheckSize, Err: fmt.Errorf("artifact has %d bytes, the manifest says %d", size, m.ArtifactSize())}
		case string(sum) != string(m.ArtifactSHA256()):
			err = &proto.VerifyError{Check: proto.CheckHash, Err: errors.New("artifact digest differs from the manifest's")}
		}
	}
	if err == nil && *base != "" {
		err = verifyDeltaResult(m, *base, *artifact)
	}
	if err != nil {
		return fmt.Errorf("INVALID: %w", err)
	}
	delta := ""
	if d := m.Delta; d != nil {
		from := d.BaseVersion
		if from == "" {
			from = fmt.Sprintf("sha256 %x", d.BaseSHA256[:6])
		}
		delta = fmt.Sprintf(", a delta from %s (patch %d bytes)", from, d.PatchSize)
		if *base != "" {
			delta += ": base, patch and result checked"
		}
	}
	fmt.Fprintf(g.env.Stdout, "OK: %s %s, counter %d, hardware %s, arch %s, %d bytes%s, signed by %s, expires %s\n",
		m.Target, m.Version, m.Counter, strings.Join(m.Hardware, ","), strings.Join(m.Arch, ","), m.Size, delta, m.KeyID,
		time.Unix(m.Expires, 0).UTC().Format(time.RFC3339))
	return nil
}

// verifyDeltaResult checks, as a device would, that base is a delta
// manifest's base and that its patch makes the build it names of it.
func verifyDeltaResult(m proto.Manifest, base, patch string) error {
	if m.Delta == nil {
		return fmt.Errorf("--base: %s %s is not a delta", m.Target, m.Version)
	}
	if patch == "" {
		return fmt.Errorf("%w: --base needs the patch (--artifact)", ErrUsage)
	}
	sum, size, err := digestFile(base)
	if err != nil {
		return err
	}
	if size != m.Delta.BaseSize || !bytes.Equal(sum, m.Delta.BaseSHA256) {
		return &proto.VerifyError{Check: proto.CheckDelta, Err: fmt.Errorf("%s (%d bytes, sha256 %x) is not the delta's base (%d bytes, %x)", base, size, sum[:6], m.Delta.BaseSize, m.Delta.BaseSHA256[:6])}
	}
	bf, err := os.Open(base)
	if err != nil {
		return err
	}
	defer bf.Close()
	pf, err := os.Open(patch)
	if err != nil {
		return err
	}
	defer pf.Close()
	h := sha256.New()
	if err := bspatch.Apply(bf, int64(size), pf, int64(m.Delta.PatchSize), int64(m.Size), 0, h); err != nil {
		return &proto.VerifyError{Check: proto.CheckDelta, Err: err}
	}
	if !bytes.Equal(h.Sum(nil), m.SHA256) {
		return &proto.VerifyError{Check: proto.CheckDelta, Err: errors.New("the patch makes a build whose digest is not the manifest's")}
	}
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
	var deltas listFlag
	fs.Var(&deltas, "delta", "also push this delta of the release (a patch of release sign --delta-from; its manifest: PATCH.manifest) (repeat)")
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
	var lines []string
	switch {
	case err == nil:
		lines = append(lines, fmt.Sprintf("pushed %s %s (counter %d, %s)", r.Target, r.Version, r.Counter, humanBytes(r.Size)))
	case len(deltas) > 0 && isStatus(err, http.StatusConflict):
		// Deltas may come after their release: from builds that were
		// not known when it was pushed.
		if r, err = pushedAlready(ctx, c, mb); err != nil {
			return err
		}
		lines = append(lines, fmt.Sprintf("%s %s was pushed already (counter %d, %s)", r.Target, r.Version, r.Counter, humanBytes(r.Size)))
	default:
		return err
	}
	for _, p := range deltas {
		d, err := pushDelta(ctx, c, r, p)
		if err != nil {
			return err
		}
		r.Deltas = append(r.Deltas, d)
		from := d.BaseVersion
		if from == "" {
			from = "sha256 " + d.BaseSHA256[:12]
		}
		lines = append(lines, fmt.Sprintf("pushed delta from %s: %s, %.1f%% of the full artifact", from, humanBytes(d.PatchSize),
			100*float64(d.PatchSize)/float64(max(r.Size, 1))))
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, r)
	}
	for _, l := range lines {
		fmt.Fprintln(g.env.Stdout, l)
	}
	return nil
}

func isStatus(err error, status int) bool {
	var ae *client.APIError
	return errors.As(err, &ae) && ae.Status == status
}

// pushedAlready is the release a manifest names, when it is the one
// pushed (the same build under the same counter).
func pushedAlready(ctx context.Context, c *client.Client, manifest []byte) (store.Release, error) {
	m, err := proto.DecodeManifestUnverified(manifest)
	if err != nil {
		return store.Release{}, err
	}
	r, err := c.Release(ctx, m.Target, m.Version)
	if err != nil {
		return r, err
	}
	if r.SHA256 != hex.EncodeToString(m.SHA256) || r.Counter != m.Counter {
		return r, fmt.Errorf("%s %s is pushed with another build or counter (sha256 %.12s, counter %d): its deltas cannot be this manifest's",
			r.Target, r.Version, r.SHA256, r.Counter)
	}
	return r, nil
}

func pushDelta(ctx context.Context, c *client.Client, r store.Release, patch string) (store.ReleaseDelta, error) {
	mb, err := os.ReadFile(patch + ".manifest")
	if err != nil {
		return store.ReleaseDelta{}, fmt.Errorf("--delta %s: %w", patch, err)
	}
	f, err := os.Open(patch)
	if err != nil {
		return store.ReleaseDelta{}, fmt.Errorf("--delta: %w", err)
	}
	defer f.Close()
	d, err := c.PushDelta(ctx, r.Target, r.Version, mb, f)
	if err != nil {
		return d, fmt.Errorf("delta %s: %w", patch, err)
	}
	return d, nil
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
	fmt.Fprintln(tw, "TARGET\tVERSION\tCOUNTER\tHARDWARE\tARCH\tSIZE\tDELTAS\tEXPIRES\tKEY")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Target, r.Version, r.Counter, strings.Join(r.Hardware, ","),
			dash(strings.Join(r.Arch, ",")), humanBytes(r.Size), deltaList(r.Deltas), r.Expires.Format(time.DateOnly), r.KeyID)
	}
	return tw.Flush()
}

// deltaList names the bases of a release's deltas, with their sizes.
func deltaList(ds []store.ReleaseDelta) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		from := d.BaseVersion
		if from == "" {
			from = d.BaseSHA256[:min(12, len(d.BaseSHA256))]
		}
		parts[i] = "from " + from + " " + humanBytes(d.PatchSize)
	}
	return dash(strings.Join(parts, ", "))
}

func deviceUpdate(ctx context.Context, g *globals, args []string) error {
	fs := g.newFlags("device update")
	g.register(fs)
	release := fs.String("release", "", "release to offer: VERSION or TARGET@VERSION")
	reason := fs.String("reason", "", "why (recorded in the audit log)")
	full := fs.Bool("full", false, "offer the full artifact even when a delta from the device's build exists")
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
	if err := c.Do(ctx, http.MethodPost, "/api/v1/devices/"+id+"/update", nil, api.UpdateRequest{Release: *release, Reason: *reason, Full: *full}, &resp); err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, resp)
	}
	via := "the full artifact, " + humanBytes(resp.Size)
	if d := resp.Delta; d != nil {
		from := d.BaseVersion
		if from == "" {
			from = "sha256 " + d.BaseSHA256[:min(12, len(d.BaseSHA256))]
		}
		via = fmt.Sprintf("a delta from %s, %s (the full artifact is its fallback)", from, humanBytes(d.PatchSize))
	}
	fmt.Fprintf(g.env.Stdout, "offered %s %s (counter %d) to %s as %s (command %s); follow it with: hangar device updates %s\n",
		resp.Target, resp.Version, resp.Counter, id, via, resp.Command, id)
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
	fmt.Fprintln(tw, "TARGET\tVERSION\tCOUNTER\tSTATE\tVIA\tWHEN\tREASON")
	for _, u := range us {
		reason := u.Reason
		if u.Check != "" {
			reason = u.Check + ": " + reason
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", u.Target, u.Version, u.Counter, u.State, via(u), u.Updated.Local().Format(time.DateTime), reason)
	}
	return tw.Flush()
}

// via says how a device fetched a release: full, delta (its size), or
// delta→full with the reason it fell back.
func via(u store.DeviceUpdate) string {
	switch u.Via() {
	case store.ViaDelta:
		return "delta " + humanBytes(u.Patch)
	case store.ViaFallback:
		return "delta→full (" + u.Fallback + ")"
	}
	return "full"
}
