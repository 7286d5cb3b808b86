package update

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/internal/bspatch"
	"github.com/hangarfleet/hangar/proto"
)

// DefaultMaxDeltaResult is the largest build an agent makes of a patch by
// default. bspatch.Apply's memory does not grow with the build; the bound is
// the staging disk's (patch, a copy of the base and the result at once).
const DefaultMaxDeltaResult = 256 << 20

// Patchable is an installer that can open the file of the build in place:
// the base a delta patches. Installers without one take full artifacts.
type Patchable interface {
	Base() (io.ReadCloser, error)
}

// ErrNoBase says an installer does not know the file of its build.
var ErrNoBase = errors.New("the installed file is not known")

// deltaCap is the largest result this agent patches (0: none).
func (u *Updater) deltaCap() uint64 {
	if u.opts.NoDelta {
		return 0
	}
	return u.opts.MaxDeltaResult
}

// DeltaCap is what the agent tells the control plane (State.Deltas): the
// largest build it makes of a patch, 0 when it takes full artifacts only.
func (u *Updater) DeltaCap() uint64 { return u.deltaCap() }

// Builds are the SHA-256 digests of the files in place, by target, of the
// installers that know theirs: what the control plane picks a delta's base
// by. A digest is computed again only when the file's size or time changed.
func (u *Updater) Builds() map[string][]byte {
	out := map[string][]byte{}
	for t, inst := range u.opts.Installers {
		if sum, err := u.baseDigest(t, inst); err == nil {
			out[t] = sum
		}
	}
	return out
}

type baseStamp struct {
	key string
	sum []byte
}

func (u *Updater) baseDigest(target string, inst Installer) ([]byte, error) {
	p, ok := inst.(Patchable)
	if !ok {
		return nil, ErrNoBase
	}
	var key string
	if s, ok := inst.(interface{ BaseStamp() string }); ok {
		key = s.BaseStamp()
	}
	u.basesMu.Lock() // not mu: Offer asks under it
	c, hit := u.bases[target]
	u.basesMu.Unlock()
	if hit && key != "" && c.key == key {
		return c.sum, nil
	}
	r, err := p.Base()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return nil, err
	}
	sum := h.Sum(nil)
	u.basesMu.Lock()
	u.bases[target] = baseStamp{key: key, sum: sum}
	u.basesMu.Unlock()
	return sum, nil
}

// deltaBlocker says why a delta offer cannot be applied here, before
// anything is fetched ("" when it can): then the full artifact is fetched
// instead, when the offer names one.
//
// builds are the digests of the files in place (Builds), taken before the
// updater's lock: hashing a large file must not hold it.
func (u *Updater) deltaBlocker(m proto.Manifest, builds map[string][]byte) string {
	d := m.Delta
	inst := u.opts.Installers[m.Target]
	switch {
	case u.deltaCap() == 0:
		return "this agent takes full artifacts only (--no-delta)"
	case m.Size > u.deltaCap():
		return fmt.Sprintf("the build is %d bytes, over the %d this agent patches", m.Size, u.deltaCap())
	}
	if _, ok := inst.(Patchable); !ok {
		return fmt.Sprintf("the %s installer does not know its installed file", m.Target)
	}
	sum, ok := builds[m.Target]
	if !ok {
		return "the installed file cannot be read"
	}
	if !slices.Equal(sum, d.BaseSHA256) {
		return fmt.Sprintf("the build in place (sha256 %x) is not the patch's base (%x)", sum[:8], d.BaseSHA256[:8])
	}
	return ""
}

// tidy removes from the staging directory what the current job does not
// need: what superseded, cancelled, finished or interrupted jobs left
// (partial downloads, patches, copies of bases, partial results). A full
// staging disk would keep the device from recording its next offer.
func (u *Updater) tidy() {
	u.mu.Lock()
	keep := map[string]bool{}
	if j := u.st.Job; j != nil {
		build := strings.TrimSuffix(filepath.Base(u.stagedPath(j.m)), ".bin")
		keep[build+".bin"], keep[build+".part"], keep[build+".made"] = true, true, true
		if d := j.m.Delta; d != nil {
			patch := filepath.Base(u.patchPath(j.m))
			keep[patch], keep[patch+".part"], keep[hex.EncodeToString(d.BaseSHA256)+".base"] = true, true, true
		}
	}
	u.mu.Unlock()
	entries, err := os.ReadDir(u.opts.Dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.Type().IsRegular() && !keep[e.Name()] {
			if err := os.Remove(filepath.Join(u.opts.Dir, e.Name())); err == nil {
				u.log.Debug("staging file of no job removed", "file", e.Name())
			}
		}
	}
}

// patching reports whether the job fetches a patch (a delta offer that
// has not fallen back).
func (j *job) patching() bool { return j.m.Delta != nil && j.Fallback == "" }

func (u *Updater) patchPath(m proto.Manifest) string {
	return filepath.Join(u.opts.Dir, hex.EncodeToString(m.Delta.PatchSHA256)+".patch")
}

// runDelta fetches the patch, makes the build of the base in place and
// stages it where a full download would have put it; from there the
// install is the same. Any failure of the delta path falls back to the
// full artifact, once.
func (u *Updater) runDelta(ctx context.Context, j *job, src string, progress func(uint64), fetched func() bool) error {
	m := j.m
	staged := u.stagedPath(m)
	patch := u.patchPath(m)
	if fileHasDigest(u.fs(), staged, m.SHA256) == nil {
		os.Remove(patch) // made before a restart
		return nil
	}
	// The settings may have changed since the offer (a restart with
	// --no-delta, the file in place replaced): then the delta is given up
	// before anything of it is fetched.
	if reason := u.deltaBlocker(m, u.Builds()); reason != "" && !fetched() {
		return u.fallback(j, reason, false)
	}
	_, err := u.download(ctx, blob{size: m.Delta.PatchSize, sha: m.Delta.PatchSHA256, path: patch}, src, progress)
	if err != nil {
		if errors.Is(err, errTransient) || ctx.Err() != nil {
			return err
		}
		return u.fallback(j, "the patch: "+err.Error(), fetched())
	}
	inst, _ := u.opts.Installers[m.Target].(Patchable)
	if inst == nil {
		return u.fallback(j, "the installer does not know its installed file", true)
	}
	start := time.Now()
	if err = u.stageDelta(ctx, inst, m, patch, staged); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%w: patching stopped: %v", errTransient, err)
		}
		return u.fallback(j, err.Error(), true)
	}
	os.Remove(patch)
	u.log.Info("delta applied", "version", m.Version, "patch_bytes", m.Delta.PatchSize, "build_bytes", m.Size,
		"took", time.Since(start).Round(time.Millisecond), "peak_rss_kb", peakRSSKB())
	return nil
}

// peakRSSKB is the largest resident set of this process's image so far
// (VmHWM, which starts again at exec; getrusage's maxrss would count the
// parent that spawned it), 0 when unknown.
func peakRSSKB() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb
		}
	}
	return 0
}

// ctxWriter stops a patch being applied when the agent stops.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// errFellBack ends a download attempt whose job now fetches the full
// artifact.
var errFellBack = errors.New("delta given up for the full artifact")

// fallback gives the delta up for the full artifact, once, or refuses the
// release when the offer named none. The release is not spent: nothing
// was installed.
//
// fetched says whether any of the patch came over the air: a delta given
// up before is reported as a full fetch (no patch).
func (u *Updater) fallback(j *job, reason string, fetched bool) error {
	if reason == "" {
		reason = "the delta path failed"
	}
	_ = os.Remove(u.patchPath(j.m))
	_ = os.Remove(u.patchPath(j.m) + ".part")
	if j.FullURL == "" {
		err := &proto.VerifyError{Check: proto.CheckDelta, Err: errors.New(reason)}
		u.log.Warn("delta refused, and the offer names no full artifact", "version", j.m.Version, "reason", reason)
		u.report(j, proto.UpdateRejected, func(r *proto.UpdateReport) { r.Check, r.Reason = string(proto.CheckDelta), err.Error() })
		if ferr := u.finish(j, nil); ferr != nil {
			return ferr
		}
		return err
	}
	if err := u.set(j, func(j *job) { j.Fallback, j.URL, j.NoPatch = reason, j.FullURL, !fetched }); err != nil {
		return err
	}
	u.log.Warn("delta given up, fetching the full artifact", "version", j.m.Version, "reason", reason)
	u.report(j, proto.UpdateDownloading, nil)
	return errFellBack
}

// stageDelta makes m's build of the base in place with the patch and
// stages it at staged, through the updater's file system: the base is
// copied to the staging directory while its digest is taken (what is
// patched is what was checked), the result is written to a part file,
// synced, checked against the manifest's size and digest, and renamed
// into place. A cut anywhere leaves no staged file, or the checked one.
func (u *Updater) stageDelta(ctx context.Context, inst Patchable, m proto.Manifest, patchPath, staged string) (err error) {
	d := m.Delta
	basePath := filepath.Join(u.opts.Dir, hex.EncodeToString(d.BaseSHA256)+".base")
	base, err := os.OpenFile(basePath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		base.Close()
		os.Remove(basePath)
	}()
	src, err := inst.Base()
	if err != nil {
		return fmt.Errorf("the installed file cannot be read: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(base, h), io.LimitReader(src, int64(d.BaseSize)+1))
	src.Close()
	if err != nil {
		return fmt.Errorf("copy the installed file: %w", err)
	}
	if sum := h.Sum(nil); uint64(n) != d.BaseSize || !slices.Equal(sum, d.BaseSHA256) {
		return fmt.Errorf("the build in place (%d bytes, sha256 %x) is not the patch's base (%d bytes, %x)", n, sum[:8], d.BaseSize, d.BaseSHA256[:8])
	}
	patch, err := os.Open(patchPath)
	if err != nil {
		return err
	}
	defer patch.Close()
	fsys := u.fs()
	part := strings.TrimSuffix(staged, ".bin") + ".made" // not the full download's .part
	out, err := fsys.Create(part, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = fsys.Remove(part)
		}
	}()
	rh := sha256.New()
	bw := bufio.NewWriterSize(ctxWriter{ctx, io.MultiWriter(out, rh)}, 64<<10)
	err = bspatch.Apply(base, int64(d.BaseSize), patch, int64(d.PatchSize), int64(m.Size), 0, bw)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	// The patcher's buffers go back before the install needs memory.
	debug.FreeOSMemory()
	if sum := rh.Sum(nil); !slices.Equal(sum, m.SHA256) {
		err = &proto.VerifyError{Check: proto.CheckHash, Err: fmt.Errorf("the patch makes a build with sha256 %x, the manifest says %x", sum[:8], m.SHA256[:8])}
		return err
	}
	if err = fsys.Rename(part, staged); err != nil {
		return err
	}
	return fsys.SyncDir(filepath.Dir(staged))
}
