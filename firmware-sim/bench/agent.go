package bench

import (
	"github.com/hangarfleet/hangar/agent/mavlink/mavlinktest"

	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// AgentOptions describe the agent footprint run.
type AgentOptions struct {
	Hangar   string        // hangar binary (control plane)
	Agent    string        // hangar-agent binary for this machine
	Duration time.Duration // how long the agent runs
	Cross    []string      // cross-built agent binaries whose size to report
	// MAVLinkHz, when set, gives the agent a simulated flight controller
	// streaming its five messages (heartbeat, extended state, battery,
	// position, GPS) at this rate each.
	MAVLinkHz int
	Log       io.Writer
}

// AgentResult is the agent's footprint.
type AgentResult struct {
	RSSMB       float64            `json:"rss_mb"`      // at the end of the run
	PeakRSSMB   float64            `json:"peak_rss_mb"` // VmHWM
	CPUPercent  float64            `json:"cpu_percent"`
	MAVLinkHz   int                `json:"mavlink_hz,omitempty"`
	MAVFrames   float64            `json:"mavlink_frames_per_s,omitempty"` // what the vehicle sent, per second
	Acked       int                `json:"telemetry_batches_stored"`
	BinaryBytes map[string]int64   `json:"binary_bytes"`
	Extra       map[string]float64 `json:"-"`
}

func statusKB(pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			var kb float64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb
		}
	}
	return 0
}

// RunAgent starts a control plane and one real agent process sampling once
// a second, and measures the agent.
func RunAgent(ctx context.Context, o AgentOptions) (AgentResult, error) {
	res := AgentResult{BinaryBytes: map[string]int64{}}
	for _, p := range append([]string{o.Agent}, o.Cross...) {
		if st, err := os.Stat(p); err == nil {
			res.BinaryBytes[filepath.Base(p)] = st.Size()
		}
	}
	dir, err := os.MkdirTemp("", "hangar-bench-agent-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	port, err := FreePort()
	if err != nil {
		return res, err
	}
	cp, err := startControlPlane(o.Hangar, filepath.Join(dir, "data"), []string{"--mqtt", fmt.Sprintf("127.0.0.1:%d", port)}, nil, o.Log)
	if err != nil {
		return res, err
	}
	defer cp.stop()
	args := []string{"--server", cp.url, "--enroll-token", cp.enroll, "--device-id", "footprint",
		"--hardware", "rev-b", "--state-dir", filepath.Join(dir, "agent"), "--flight-input", "udp:127.0.0.1:0",
		"--sample-interval", "1s", "--batch-size", "10", "--log-level", "warn"}
	if o.MAVLinkHz > 0 {
		fc, err := mavlinktest.Start(mavlinktest.Options{Autopilot: mavlinktest.AutopilotPX4, Type: mavlinktest.TypeQuadrotor,
			Period: time.Second / time.Duration(o.MAVLinkHz)})
		if err != nil {
			return res, err
		}
		defer fc.Close()
		args = append(args, "--mavlink", "udp-client://"+fc.Addr())
		res.MAVLinkHz, res.MAVFrames = o.MAVLinkHz, float64(5*o.MAVLinkHz)
	}
	ag, err := start(o.Agent, args, nil, o.Log)
	if err != nil {
		return res, err
	}
	defer ag.stop()
	pid := ag.cmd.Process.Pid
	// Let it enroll and settle before measuring CPU.
	sleepCtx(ctx, 5*time.Second)
	cpu0 := cpuSeconds(pid)
	sleepCtx(ctx, o.Duration)
	res.CPUPercent = (cpuSeconds(pid) - cpu0) / o.Duration.Seconds() * 100
	res.RSSMB = statusKB(pid, "VmRSS") / 1024
	res.PeakRSSMB = statusKB(pid, "VmHWM") / 1024
	vals, _, err := cp.scrape()
	if err == nil {
		res.Acked = int(vals["hangar_ingest_samples_total"] / 10)
	}
	return res, nil
}

// PrintAgent prints the footprint.
func PrintAgent(w io.Writer, r AgentResult) {
	fmt.Fprintf(w, "agent RSS steady / peak:  %.1f / %.1f MB\n", r.RSSMB, r.PeakRSSMB)
	fmt.Fprintf(w, "agent CPU:                %.2f %% of one core (1 sample/s, 1 batch/10 s)\n", r.CPUPercent)
	if r.MAVLinkHz > 0 {
		fmt.Fprintf(w, "with a flight controller: MAVLink, 5 messages at %d Hz each (%.0f frames/s)\n", r.MAVLinkHz, r.MAVFrames)
	}
	fmt.Fprintf(w, "telemetry batches stored: %d\n", r.Acked)
	for name, n := range r.BinaryBytes {
		fmt.Fprintf(w, "binary %-26s %.2f MB (%d bytes)\n", name+":", float64(n)/(1<<20), n)
	}
}

func sha256Sum(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}
