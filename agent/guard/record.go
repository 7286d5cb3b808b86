package guard

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hangarfleet/hangar/agent/safefs"
)

// RecordFormat is the first line of a trial record. A guard refuses a
// record of another format (and then guards nothing): an agent release
// that must change it says so in its notes, and ships a guard that reads
// it first.
const RecordFormat = "hangar-trial 1"

// maxRecord bounds what the guard reads of a record.
const maxRecord = 64 << 10

// NextPath, PrevPath and TrialPath are the files an install keeps beside
// the agent's binary: the staged new build, the previous build (a hard
// link) and the trial record.
func NextPath(agent string) string  { return beside(agent, ".new") }
func PrevPath(agent string) string  { return beside(agent, ".prev") }
func TrialPath(agent string) string { return beside(agent, ".trial") }

func beside(agent, suffix string) string {
	dir, base := filepath.Split(agent)
	return filepath.Join(dir, "."+base+suffix)
}

// Record is the trial record: the agent writes it, before the swap, for a
// new build of itself; the guard counts that build's starts in it and
// writes its verdict there; the agent removes it when the trial is over
// (committed, or rolled back and reported).
type Record struct {
	// Written by the agent that installs the new build.
	Version    string        // the new build's version, for messages
	SHA256     []byte        // the new build: the record is live while the binary has this digest
	PrevSHA256 []byte        // the previous build, kept at PrevPath
	MaxStarts  int           // starts without committing before the guard restores the previous build
	Budget     time.Duration // run time the new build gets to commit (its trial deadline and a grace)

	// Written by the guard.
	Starts  int           // starts of the new build so far
	Used    time.Duration // run time of the new build so far, summed over its starts
	Reached bool          // some start said it reached its trial code
	Last    string        // how the latest start ended
	Verdict string        // why the previous build is restored (set before the restore begins)
	GaveUp  bool          // the previous build could not be restored: the new build runs unguarded
}

// Live reports whether the record guards the binary whose digest is sum.
func (r *Record) Live(sum []byte) bool { return r != nil && bytes.Equal(r.SHA256, sum) }

// maxText bounds a text value of the record (it ends up in a report).
const maxText = 1024

// oneLine keeps a value on its line, and short.
func oneLine(s string) string {
	if len(s) > maxText {
		s = s[:maxText]
	}
	return strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' {
			return ' '
		}
		return r
	}, s)
}

// Marshal is the record's text form: the format line, then one "key value"
// per line. Unknown keys are ignored when read back.
func (r *Record) Marshal() []byte {
	var b bytes.Buffer
	b.WriteString(RecordFormat + "\n")
	kv := func(k, v string) { fmt.Fprintf(&b, "%s %s\n", k, oneLine(v)) }
	kv("version", r.Version)
	kv("sha256", hex.EncodeToString(r.SHA256))
	if len(r.PrevSHA256) > 0 {
		kv("prev-sha256", hex.EncodeToString(r.PrevSHA256))
	}
	kv("max-starts", strconv.Itoa(r.MaxStarts))
	kv("budget-ms", strconv.FormatInt(r.Budget.Milliseconds(), 10))
	kv("starts", strconv.Itoa(r.Starts))
	kv("used-ms", strconv.FormatInt(r.Used.Milliseconds(), 10))
	if r.Reached {
		kv("reached", "1")
	}
	if r.Last != "" {
		kv("last", r.Last)
	}
	if r.Verdict != "" {
		kv("verdict", r.Verdict)
	}
	if r.GaveUp {
		kv("gave-up", "1")
	}
	return b.Bytes()
}

// ErrFormat is a record the guard cannot read.
var ErrFormat = errors.New("trial record: unknown format")

// Unmarshal reads a record written by Marshal.
func Unmarshal(data []byte) (*Record, error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxRecord)
	if !sc.Scan() || sc.Text() != RecordFormat {
		return nil, ErrFormat
	}
	r := &Record{}
	var err error
	num := func(k, v string) int64 {
		n, e := strconv.ParseInt(v, 10, 64)
		if e != nil || n < 0 {
			err = fmt.Errorf("trial record: %s %q", k, v)
		}
		return n
	}
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), " ")
		switch k {
		case "version":
			r.Version = oneLine(v)
		case "sha256", "prev-sha256":
			sum, e := hex.DecodeString(v)
			if e != nil || len(sum) != 32 {
				err = fmt.Errorf("trial record: %s %q", k, v)
			}
			if k == "sha256" {
				r.SHA256 = sum
			} else {
				r.PrevSHA256 = sum
			}
		case "max-starts":
			r.MaxStarts = int(min(num(k, v), 1<<20))
		case "budget-ms":
			r.Budget = time.Duration(min(num(k, v), 1<<40)) * time.Millisecond
		case "starts":
			r.Starts = int(min(num(k, v), 1<<20))
		case "used-ms":
			r.Used = time.Duration(min(num(k, v), 1<<40)) * time.Millisecond
		case "reached":
			r.Reached = v == "1"
		case "last":
			r.Last = oneLine(v)
		case "verdict":
			r.Verdict = oneLine(v)
		case "gave-up":
			r.GaveUp = v == "1"
		}
	}
	if err == nil {
		err = sc.Err()
	}
	if err == nil && len(r.SHA256) == 0 {
		err = errors.New("trial record: no sha256")
	}
	if err != nil {
		return nil, err
	}
	return r, nil
}

// Load reads the trial record of the agent binary at path; it returns nil,
// nil when there is none.
func Load(fsys safefs.FS, agent string) (*Record, error) {
	st, err := fsys.Stat(TrialPath(agent))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		// A FIFO or a device would block or never end the read: the guard
		// must always get to start an agent.
		return nil, fmt.Errorf("trial record: not a regular file (%v)", st.Mode())
	}
	f, err := fsys.Open(TrialPath(agent))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxRecord+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxRecord {
		return nil, errors.New("trial record: too large")
	}
	return Unmarshal(data)
}

// Save writes the record atomically and durably.
func Save(fsys safefs.FS, agent string, r *Record) error {
	return safefs.WriteFile(fsys, TrialPath(agent), r.Marshal(), 0o600)
}

// Remove deletes the record durably (nothing to do when there is none).
func Remove(fsys safefs.FS, agent string) error {
	// Sync even when it is gone: an earlier removal may not be durable.
	if err := fsys.Remove(TrialPath(agent)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return fsys.SyncDir(safefs.Dir(agent))
}
