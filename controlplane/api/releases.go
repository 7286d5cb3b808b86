package api

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/hangarfleet/hangar/controlplane/broker"
	"github.com/hangarfleet/hangar/controlplane/store"
	"github.com/hangarfleet/hangar/controlplane/wire"
	"github.com/hangarfleet/hangar/proto"
)

// ReleaseStore is what release handling needs from storage.
type ReleaseStore interface {
	AddRelease(ctx context.Context, r store.Release) error
	AddReleaseDelta(ctx context.Context, d store.ReleaseDelta) error
	Releases(ctx context.Context, target string) ([]store.Release, error)
	Release(ctx context.Context, target, version string) (store.Release, error)
	DeviceUpdates(ctx context.Context, device, target string, counter uint64) ([]store.DeviceUpdate, error)
	Credential(ctx context.Context, id string) ([]byte, error)
}

// Sender sends commands to devices (see package commands).
type Sender interface {
	Send(ctx context.Context, device string, cmd proto.Command, supersede bool) (string, error)
}

// ReleaseOptions turn on release hosting.
type ReleaseOptions struct {
	Store ReleaseStore
	Send  Sender
	// Roots are the release root public keys: a pushed release must chain
	// to one. The control plane holds no private key.
	Roots []ed25519.PublicKey
	// Dir keeps the artifacts, named by digest.
	Dir string
	// MaxArtifact caps a pushed artifact (default 1 GiB).
	MaxArtifact int64
}

func (a *API) routeReleases(o ReleaseOptions) {
	if o.MaxArtifact == 0 {
		o.MaxArtifact = 1 << 30
	}
	a.rel = &o
	e := a.e
	e.POST("/api/v1/releases", a.pushRelease, a.operator())
	e.GET("/api/v1/releases", a.listReleases, a.viewer(), a.limit)
	e.GET("/api/v1/releases/:target/:version", a.getRelease, a.viewer(), a.limit)
	e.GET("/api/v1/releases/:target/:version/artifact", a.artifact, a.requireDeviceOrViewer)
	e.HEAD("/api/v1/releases/:target/:version/artifact", a.artifact, a.requireDeviceOrViewer)
	e.POST("/api/v1/releases/:target/:version/deltas", a.pushDelta, a.operator())
	e.GET("/api/v1/releases/:target/:version/deltas/:sha256/artifact", a.deltaArtifact, a.requireDeviceOrViewer)
	e.HEAD("/api/v1/releases/:target/:version/deltas/:sha256/artifact", a.deltaArtifact, a.requireDeviceOrViewer)
	e.POST("/api/v1/devices/:id/update", a.updateDevice, a.operator(), a.limit)
	e.GET("/api/v1/devices/:id/updates", a.deviceUpdates, a.viewer(), a.limit)
}

// requireDeviceOrViewer lets devices (their certificate, or HTTP basic
// with their MQTT password) and operators' tokens download artifacts.
func (a *API) requireDeviceOrViewer(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if a.deviceByCert(c) != "" {
			return next(c)
		}
		if user, pass, ok := c.Request().BasicAuth(); ok {
			if proto.ValidateDeviceID(user) == nil {
				h, err := a.rel.Store.Credential(c.Request().Context(), user)
				if err == nil && broker.CheckPassword(h, pass) && !a.certsOnly(c.Request().Context()) {
					return next(c)
				}
				if err != nil && !errors.Is(err, store.ErrNotFound) && !errors.Is(err, store.ErrRevoked) {
					// The store is out of reach (this replica cut off from
					// its database): the device tries again, here or
					// through another replica.
					return echo.NewHTTPError(http.StatusServiceUnavailable, "store unavailable")
				}
			}
			c.Response().Header().Set("WWW-Authenticate", `Basic realm="hangar"`)
			return echo.NewHTTPError(http.StatusUnauthorized, "invalid device credential")
		}
		return a.viewer()(next)(c)
	}
}

func (a *API) artifactPath(sum string) string { return filepath.Join(a.rel.Dir, sum) }

// pushRelease takes a multipart body with the signed manifest ("manifest"),
// the root-signed key list ("keys") and the artifact ("artifact"), in that
// order. Everything is verified, the artifact streamed to disk while
// hashed, before the release exists.
func (a *API) pushRelease(c echo.Context) error {
	if len(a.rel.Roots) == 0 {
		return echo.NewHTTPError(http.StatusServiceUnavailable, "no release root key configured: start the server with --root-key")
	}
	ctx := c.Request().Context()
	var m proto.Manifest
	parts, tmp, err := readUpload(c, []uploadPart{{"manifest", proto.MaxManifestSize}, {"keys", proto.MaxKeyListSize}},
		func(parts map[string][]byte, artifact *multipart.Part) (string, error) {
			var err error
			if m, err = a.verifyRelease(parts["manifest"], parts["keys"]); err != nil {
				return "", err
			}
			if m.Delta != nil {
				return "", echo.NewHTTPError(http.StatusUnprocessableEntity,
					"release refused: a delta manifest: push the full release, then the delta to /api/v1/releases/TARGET/VERSION/deltas (hangar release push --delta)")
			}
			tmp, _, err := a.receiveArtifact(artifact, m.Size, m.SHA256, "artifact")
			return tmp, err
		})
	defer func() {
		if tmp != "" {
			os.Remove(tmp)
		}
	}()
	if err != nil {
		return err
	}
	manifest, keys := parts["manifest"], parts["keys"]
	sum := hex.EncodeToString(m.SHA256)
	if err := os.Rename(tmp, a.artifactPath(sum)); err != nil {
		return err
	}
	tmp = ""
	r := store.Release{
		Target: m.Target, Version: m.Version, Counter: m.Counter, Size: m.Size, SHA256: sum, Hardware: m.Hardware,
		Arch: m.Arch, Created: unix(m.Created), Expires: unix(m.Expires), KeyID: m.KeyID, Notes: m.Notes,
		PushedAt: a.opts.Now(), PushedBy: a.actor(c), Manifest: manifest, Keys: keys,
	}
	if err := a.rel.Store.AddRelease(ctx, r); err != nil {
		if errors.Is(err, store.ErrExists) {
			return echo.NewHTTPError(http.StatusConflict, err.Error())
		}
		return err
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "release.push",
		Target: m.Target + "@" + m.Version, Attrs: map[string]string{"counter": fmt.Sprint(m.Counter), "sha256": sum, "key": m.KeyID}})
	a.log.Info("release pushed", "target", m.Target, "version", m.Version, "counter", m.Counter)
	return c.JSON(http.StatusCreated, r)
}

func readPart(p *multipart.Part, max int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(p, max+1))
	if err != nil {
		return nil, badRequest("part %s: %v", p.FormName(), err)
	}
	if int64(len(b)) > max {
		return nil, echo.NewHTTPError(http.StatusRequestEntityTooLarge, fmt.Sprintf("part %s larger than %d bytes", p.FormName(), max))
	}
	return b, nil
}

// verifyRelease runs the checks a device would, against the server's
// roots: a release that no device would accept is refused at the door.
func (a *API) verifyRelease(manifest, keys []byte) (proto.Manifest, error) {
	refused := func(err error) error {
		return echo.NewHTTPError(http.StatusUnprocessableEntity, fmt.Sprintf("release refused: %v", err))
	}
	kl, err := proto.OpenKeyList(keys, a.rel.Roots)
	if err != nil {
		return proto.Manifest{}, refused(err)
	}
	now := a.opts.Now()
	if err := kl.Check(nil, now); err != nil {
		return proto.Manifest{}, refused(err)
	}
	m, err := proto.OpenManifest(manifest, kl, now)
	if err != nil {
		return m, refused(err)
	}
	if int64(m.Size) > a.rel.MaxArtifact {
		return m, echo.NewHTTPError(http.StatusRequestEntityTooLarge, fmt.Sprintf("artifact of %d bytes, more than %d", m.Size, a.rel.MaxArtifact))
	}
	return m, nil
}

// receiveArtifact streams an artifact (what is "artifact" or "patch") to
// a temporary file, refusing more or fewer bytes than the manifest says,
// or another digest. It returns the file and the artifact's first bytes
// (a delta's header).
func (a *API) receiveArtifact(r io.Reader, size uint64, sum []byte, what string) (string, []byte, error) {
	if err := os.MkdirAll(a.rel.Dir, 0o700); err != nil {
		return "", nil, err
	}
	f, err := os.CreateTemp(a.rel.Dir, ".upload-*")
	if err != nil {
		return "", nil, err
	}
	name := f.Name()
	h := sha256.New()
	head := &headWriter{max: proto.DeltaHeaderSize}
	n, err := io.Copy(io.MultiWriter(f, h, head), io.LimitReader(r, int64(size)+1))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	switch {
	case err != nil:
		os.Remove(name)
		return "", nil, badRequest("%s upload: %v", what, err)
	case uint64(n) != size:
		os.Remove(name)
		return "", nil, echo.NewHTTPError(http.StatusUnprocessableEntity, fmt.Sprintf("release refused: %s has %d bytes or more, the manifest says %d", what, n, size))
	case !bytes.Equal(h.Sum(nil), sum):
		os.Remove(name)
		return "", nil, echo.NewHTTPError(http.StatusUnprocessableEntity, fmt.Sprintf("release refused: %s digest differs from the manifest's", what))
	}
	return name, head.b, nil
}

// headWriter keeps the first max bytes written to it.
type headWriter struct {
	b   []byte
	max int
}

func (w *headWriter) Write(p []byte) (int, error) {
	if n := w.max - len(w.b); n > 0 {
		w.b = append(w.b, p[:min(n, len(p))]...)
	}
	return len(p), nil
}

// pushDelta takes a multipart body with a delta's signed manifest
// ("manifest") and the patch ("artifact"), in that order, for a pushed
// release. The manifest is verified as the release's was, with the
// release's key list, and must describe the same build under the same
// counter, hardware and expiry; the patch is streamed to disk while
// hashed, and its header must announce that build's size.
func (a *API) pushDelta(c echo.Context) error {
	if len(a.rel.Roots) == 0 {
		return echo.NewHTTPError(http.StatusServiceUnavailable, "no release root key configured: start the server with --root-key")
	}
	rel, err := a.release(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	var m proto.Manifest
	parts, tmp, err := readUpload(c, []uploadPart{{"manifest", proto.MaxManifestSize}},
		func(parts map[string][]byte, artifact *multipart.Part) (string, error) {
			var err error
			if m, err = a.verifyDelta(rel, parts["manifest"]); err != nil {
				return "", err
			}
			base := hex.EncodeToString(m.Delta.BaseSHA256)
			if slices.ContainsFunc(rel.Deltas, func(d store.ReleaseDelta) bool { return d.BaseSHA256 == base }) {
				return "", deltaExists(rel, base)
			}
			tmp, head, err := a.receiveArtifact(artifact, m.Delta.PatchSize, m.Delta.PatchSHA256, "patch")
			if err != nil {
				return "", err
			}
			h, err := proto.ParseDeltaHeader(head, int64(m.Delta.PatchSize), int64(m.Size))
			if err == nil && h.NewSize != int64(m.Size) {
				err = fmt.Errorf("the patch makes %d bytes, the manifest says %d", h.NewSize, m.Size)
			}
			if err != nil {
				return tmp, echo.NewHTTPError(http.StatusUnprocessableEntity, fmt.Sprintf("delta refused: %v", err))
			}
			return tmp, nil
		})
	defer func() {
		if tmp != "" {
			os.Remove(tmp)
		}
	}()
	if err != nil {
		return err
	}
	manifest := parts["manifest"]
	patch := hex.EncodeToString(m.Delta.PatchSHA256)
	if err := os.Rename(tmp, a.artifactPath(patch)); err != nil {
		return err
	}
	tmp = ""
	d := store.ReleaseDelta{Target: rel.Target, Version: rel.Version, BaseSHA256: hex.EncodeToString(m.Delta.BaseSHA256),
		BaseSize: m.Delta.BaseSize, BaseVersion: m.Delta.BaseVersion, PatchSHA256: patch, PatchSize: m.Delta.PatchSize,
		PushedAt: a.opts.Now(), PushedBy: a.actor(c), Manifest: manifest}
	if err := a.rel.Store.AddReleaseDelta(ctx, d); err != nil {
		// On a conflict the patch file stays: it is named by its digest,
		// and may be the one the delta already stored serves. Otherwise
		// nothing refers to it.
		if !errors.Is(err, store.ErrExists) {
			os.Remove(a.artifactPath(patch))
		}
		switch {
		case errors.Is(err, store.ErrExists):
			return deltaExists(rel, d.BaseSHA256)
		case errors.Is(err, store.ErrNotFound):
			return echo.NewHTTPError(http.StatusNotFound, "release "+rel.Target+"@"+rel.Version+" not found")
		}
		return err
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "release.delta.push",
		Target: rel.Target + "@" + rel.Version, Attrs: map[string]string{"counter": fmt.Sprint(m.Counter), "base": d.BaseSHA256,
			"base_version": d.BaseVersion, "patch": patch, "size": fmt.Sprint(d.PatchSize), "key": m.KeyID}})
	a.log.Info("release delta pushed", "target", rel.Target, "version", rel.Version, "base", d.BaseSHA256[:12], "size", d.PatchSize)
	return c.JSON(http.StatusCreated, d)
}

// uploadPart is a small part of a push (a signed document) and its limit.
type uploadPart struct {
	name string
	max  int64
}

// readUpload reads a push's multipart body: each of the small parts once,
// all before the artifact, then the artifact, which must be the last part;
// receive verifies the small parts and streams the artifact to a
// temporary file, whose name it returns (also with an error: the caller
// removes it). What is stored is what was verified: a part after the
// artifact, or a small part twice, is refused.
func readUpload(c echo.Context, small []uploadPart, receive func(parts map[string][]byte, artifact *multipart.Part) (string, error)) (map[string][]byte, string, error) {
	names := make([]string, len(small))
	for i, p := range small {
		names[i] = p.name
	}
	mr, err := c.Request().MultipartReader()
	if err != nil {
		return nil, "", badRequest("want a multipart/form-data body with parts %s and artifact: %v", strings.Join(names, ", "), err)
	}
	parts := map[string][]byte{}
	var tmp string
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return parts, tmp, badRequest("multipart body: %v", err)
		}
		name := part.FormName()
		if tmp != "" {
			return parts, tmp, badRequest("part %q after the artifact: the artifact must be the last part", name)
		}
		if name == "artifact" {
			if len(parts) < len(small) {
				return parts, tmp, badRequest("send the %s parts before the artifact", strings.Join(names, " and "))
			}
			if tmp, err = receive(parts, part); err != nil {
				return parts, tmp, err
			}
			continue
		}
		i := slices.IndexFunc(small, func(p uploadPart) bool { return p.name == name })
		switch {
		case i < 0:
			return parts, tmp, badRequest("unexpected part %q", name)
		case parts[name] != nil:
			return parts, tmp, badRequest("more than one %s part", name)
		}
		if parts[name], err = readPart(part, small[i].max); err != nil {
			return parts, tmp, err
		}
	}
	if tmp == "" {
		return parts, tmp, badRequest("no artifact part")
	}
	return parts, tmp, nil
}

func deltaExists(rel store.Release, base string) error {
	return echo.NewHTTPError(http.StatusConflict, fmt.Sprintf("release %s@%s already has a delta from base %.12s", rel.Target, rel.Version, base))
}

// verifyDelta verifies a delta's manifest as a release's (with the
// release's key list) and checks that it is a delta of that release: a
// device that takes it installs the build the release names, under the
// same counter, hardware and expiry.
func (a *API) verifyDelta(rel store.Release, manifest []byte) (proto.Manifest, error) {
	m, err := a.verifyRelease(manifest, rel.Keys)
	if err != nil {
		return m, err
	}
	if m.Delta == nil {
		return m, echo.NewHTTPError(http.StatusUnprocessableEntity, "delta refused: not a delta manifest (no base): push it as a release")
	}
	mismatch := func(what string, got, want any) error {
		return echo.NewHTTPError(http.StatusUnprocessableEntity,
			fmt.Sprintf("delta refused: its %s (%v) is not the release's (%v): sign the delta with the release (hangar release sign --delta-from)", what, got, want))
	}
	switch {
	case m.Target != rel.Target:
		return m, mismatch("target", m.Target, rel.Target)
	case m.Version != rel.Version:
		return m, mismatch("version", m.Version, rel.Version)
	case m.Counter != rel.Counter:
		return m, mismatch("counter", m.Counter, rel.Counter)
	case m.Size != rel.Size:
		return m, mismatch("result size", m.Size, rel.Size)
	case hex.EncodeToString(m.SHA256) != rel.SHA256:
		return m, mismatch("result sha256", hex.EncodeToString(m.SHA256), rel.SHA256)
	case !slices.Equal(m.Hardware, rel.Hardware):
		return m, mismatch("hardware", m.Hardware, rel.Hardware)
	case !slices.Equal(m.Arch, rel.Arch):
		return m, mismatch("arch", m.Arch, rel.Arch)
	case m.Expires != rel.Expires.Unix():
		return m, mismatch("expiry", unix(m.Expires).Format(time.RFC3339), rel.Expires.Format(time.RFC3339))
	case m.Created != rel.Created.Unix():
		return m, mismatch("creation time", unix(m.Created).Format(time.RFC3339), rel.Created.Format(time.RFC3339))
	case int64(m.Delta.PatchSize) > a.rel.MaxArtifact:
		return m, echo.NewHTTPError(http.StatusRequestEntityTooLarge, fmt.Sprintf("patch of %d bytes, more than %d", m.Delta.PatchSize, a.rel.MaxArtifact))
	}
	return m, nil
}

func (a *API) listReleases(c echo.Context) error {
	rs, err := a.rel.Store.Releases(c.Request().Context(), c.QueryParam("target"))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, rs)
}

func (a *API) release(c echo.Context) (store.Release, error) {
	r, err := a.rel.Store.Release(c.Request().Context(), c.Param("target"), c.Param("version"))
	if err != nil {
		return r, notFound(err, "release "+c.Param("target")+"@"+c.Param("version"))
	}
	return r, nil
}

func (a *API) getRelease(c echo.Context) error {
	r, err := a.release(c)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, r)
}

// artifact serves a release's artifact with Range, If-Range and an ETag
// (its digest), so that interrupted downloads resume.
func (a *API) artifact(c echo.Context) error {
	r, err := a.release(c)
	if err != nil {
		return err
	}
	return a.serveArtifact(c, r.SHA256, r.Version, r.PushedAt)
}

// deltaArtifact serves a delta of a release, named by its patch's digest,
// as artifact serves the full one.
func (a *API) deltaArtifact(c echo.Context) error {
	r, err := a.release(c)
	if err != nil {
		return err
	}
	sum := strings.ToLower(c.Param("sha256"))
	i := slices.IndexFunc(r.Deltas, func(d store.ReleaseDelta) bool { return d.PatchSHA256 == sum })
	if i < 0 {
		return echo.NewHTTPError(http.StatusNotFound, fmt.Sprintf("release %s@%s has no delta %s", r.Target, r.Version, sum))
	}
	d := r.Deltas[i]
	return a.serveArtifact(c, d.PatchSHA256, r.Version+".patch", d.PushedAt)
}

func (a *API) serveArtifact(c echo.Context, sum, name string, modtime time.Time) error {
	f, err := os.Open(a.artifactPath(sum))
	if err != nil {
		return echo.NewHTTPError(http.StatusNotFound, "artifact missing on the server").SetInternal(err)
	}
	defer f.Close()
	w := c.Response()
	w.Header().Set("ETag", `"`+sum+`"`)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Cache-Control", "private, max-age=31536000, immutable")
	http.ServeContent(w, c.Request(), name, modtime, f)
	return nil
}

// UpdateRequest is wire.UpdateRequest.
type UpdateRequest = wire.UpdateRequest

// UpdateResponse is wire.UpdateResponse.
type UpdateResponse = wire.UpdateResponse

func (a *API) updateDevice(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	var req UpdateRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	target, version, ok := strings.Cut(req.Release, "@")
	if !ok {
		target, version = "", req.Release
	}
	ctx := c.Request().Context()
	r, err := a.rel.Store.Release(ctx, target, version)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return echo.NewHTTPError(http.StatusNotFound, "release "+req.Release+" not found")
		}
		return badRequest("%v", err)
	}
	dev, err := a.opts.Store.Device(ctx, id)
	if err != nil {
		return notFound(err, "device "+id)
	}
	offer, delta := store.OfferFor(r, r.Deltas, dev.DeviceBuilds(), req.Full)
	cmdID, err := a.rel.Send.Send(ctx, id, proto.Command{Kind: proto.CmdUpdate, Update: offer}, true)
	if err != nil {
		return notFound(err, "device "+id)
	}
	attrs := map[string]string{"release": r.Target + "@" + r.Version, "command": cmdID}
	resp := UpdateResponse{Command: cmdID, Target: r.Target, Version: r.Version, Counter: r.Counter, Size: r.Size}
	if delta != nil {
		attrs["delta_base"], attrs["delta_size"] = delta.BaseSHA256, fmt.Sprint(delta.PatchSize)
		resp.Delta, resp.Size = delta, delta.PatchSize
	}
	_, _ = a.opts.Store.AddAudit(ctx, store.Audit{Time: a.opts.Now(), Actor: a.actor(c), Action: "device.update", Target: id,
		Reason: req.Reason, Attrs: attrs})
	return c.JSON(http.StatusAccepted, resp)
}

func (a *API) deviceUpdates(c echo.Context) error {
	id, err := a.deviceID(c)
	if err != nil {
		return err
	}
	if _, err := a.opts.Store.Device(c.Request().Context(), id); err != nil {
		return notFound(err, "device "+id)
	}
	us, err := a.rel.Store.DeviceUpdates(c.Request().Context(), id, "", 0)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, us)
}

func unix(s int64) time.Time { return time.Unix(s, 0).UTC() }
