package update

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/proto"
)

// errTransient marks download failures worth retrying (the link, the
// server); anything else refuses the release.
var errTransient = errors.New("transient")

// stagedPath is where the verified artifact of m waits to be installed.
func (u *Updater) stagedPath(m proto.Manifest) string {
	return filepath.Join(u.opts.Dir, hex.EncodeToString(m.SHA256)+".bin")
}

// blob is a file to download: its signed size and digest, and where it
// goes once it has them.
type blob struct {
	size uint64
	sha  []byte
	path string
}

// artifact is the full artifact of m, staged for its install.
func (u *Updater) artifact(m proto.Manifest) blob {
	return blob{size: m.Size, sha: m.SHA256, path: u.stagedPath(m)}
}

// download fetches a blob (an artifact, a patch) to the staging directory,
// resuming a partial file with an HTTP Range request, stopping at the
// declared size and checking the digest over the whole file. Memory stays
// bounded whatever the blob's size, and whatever the server sends.
func (u *Updater) download(ctx context.Context, m blob, rawURL string, progress func(n uint64)) (string, error) {
	final := m.path
	if fileHasDigest(OSFS{}, final, m.sha) == nil {
		return final, nil
	}
	if err := os.MkdirAll(u.opts.Dir, 0o700); err != nil {
		return "", err
	}
	part := strings.TrimSuffix(final, ".bin") + ".part"
	f, err := os.OpenFile(part, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return "", err
	}
	defer f.Close()
	have, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return "", err
	}
	if uint64(have) > m.size {
		if err := f.Truncate(0); err != nil {
			return "", err
		}
		have, _ = f.Seek(0, io.SeekStart)
	}
	if uint64(have) < m.size {
		if err := u.fetch(ctx, f, &have, m, rawURL, progress); err != nil {
			return "", err
		}
	}
	if err := f.Sync(); err != nil {
		return "", err
	}
	if err := fileHasDigest(OSFS{}, part, m.sha); err != nil {
		os.Remove(part)
		return "", err
	}
	if err := os.Rename(part, final); err != nil {
		return "", err
	}
	return final, nil
}

// idleTimeout ends a download attempt that receives nothing for this long.
const idleTimeout = time.Minute

func (u *Updater) fetch(ctx context.Context, f *os.File, have *int64, m blob, rawURL string, progress func(uint64)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	idle := time.AfterFunc(idleTimeout, cancel)
	defer idle.Stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return &proto.VerifyError{Check: proto.CheckFormat, Err: fmt.Errorf("artifact URL: %v", err)}
	}
	etag := `"` + hex.EncodeToString(m.sha) + `"`
	if *have > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(*have, 10)+"-")
		req.Header.Set("If-Range", etag)
	}
	if u.opts.Auth != nil {
		u.opts.Auth(req)
	}
	resp, err := u.opts.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("%w: download: %v", errTransient, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if !strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes "+strconv.FormatInt(*have, 10)+"-") {
			return fmt.Errorf("%w: download: server resumed at %q, not at byte %d", errTransient, resp.Header.Get("Content-Range"), *have)
		}
	case http.StatusOK:
		// A full body: start over.
		if err := f.Truncate(0); err != nil {
			return err
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
		*have = 0
	case http.StatusRequestedRangeNotSatisfiable:
		if err := f.Truncate(0); err != nil {
			return err
		}
		*have, _ = f.Seek(0, io.SeekStart)
		return fmt.Errorf("%w: download: range refused, starting over", errTransient)
	default:
		err := fmt.Errorf("download: HTTP %d", resp.StatusCode)
		if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusUnauthorized {
			err = fmt.Errorf("%w: %v", errTransient, err)
		}
		return err
	}
	remaining := int64(m.size) - *have
	tooMuch := func() error {
		_ = f.Truncate(0)
		*have = 0
		return &proto.VerifyError{Check: proto.CheckSize, Err: fmt.Errorf("the server sent more than the declared %d bytes", m.size)}
	}
	if resp.ContentLength > remaining {
		return tooMuch()
	}
	// Copy at most what remains, then make sure nothing follows: a server
	// that streams past the declared size is refused without reading on.
	w := &countingWriter{w: f, n: have, progress: progress, idle: idle}
	_, err = io.CopyN(w, resp.Body, remaining)
	if err != nil {
		if parent := context.Cause(ctx); errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || parent == context.Canceled || ctx.Err() != nil {
			return fmt.Errorf("%w: download interrupted at %d of %d bytes: %v", errTransient, *have, m.size, err)
		}
		return err
	}
	if resp.ContentLength == remaining {
		return nil // the server said how much it would send, and sent it
	}
	// A body of unknown length: anything after the declared size is an
	// attack; a server that just keeps the connection open is not.
	extra := make(chan bool, 1)
	go func() {
		var one [1]byte
		n, _ := io.ReadFull(resp.Body, one[:])
		extra <- n > 0
	}()
	select {
	case more := <-extra:
		if more {
			return tooMuch()
		}
	case <-time.After(2 * time.Second):
		resp.Body.Close()
	}
	return nil
}

type countingWriter struct {
	w        io.Writer
	n        *int64
	progress func(uint64)
	idle     *time.Timer
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.idle.Reset(idleTimeout)
	n, err := c.w.Write(p)
	*c.n += int64(n)
	if c.progress != nil {
		c.progress(uint64(*c.n))
	}
	return n, err
}

var _ = sha256.New
