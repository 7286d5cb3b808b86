package guard

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hangarfleet/hangar/agent/safefs"
)

// Options are the command's seams; the zero value is the real device.
type Options struct {
	FS     safefs.FS // default safefs.OS
	Stderr io.Writer // the guard's log (default os.Stderr)
	// Self is the guard's own executable, handed to the agent (default
	// os.Executable).
	Self string
	// Pause is the wait between two starts of a failing new build
	// (default 1 s).
	Pause time.Duration
	// KillGrace is the time a build past its run time gets between
	// SIGTERM and SIGKILL (default 5 s).
	KillGrace time.Duration
	// Exec replaces the process (default syscall.Exec).
	Exec func(path string, argv, env []string) error
}

// Defaults of Options.
const (
	DefaultPause     = time.Second
	DefaultKillGrace = 5 * time.Second
)

type guard struct {
	opts  Options
	agent string
	args  []string
	sigs  chan os.Signal
}

func (g *guard) logf(format string, a ...any) {
	fmt.Fprintf(g.opts.Stderr, "hangar-guard: "+format+"\n", a...)
}

const usage = `usage: hangar-guard AGENT [ARGS...]

Runs the agent binary AGENT with ARGS. While a new build of the agent is on
trial (a trial record beside AGENT), runs it as a child, counts its starts
and run time, and restores the previous build when it keeps failing.`

// Run is the hangar-guard command. It returns the exit status; when it
// executes the agent it does not return.
func Run(args []string, opts Options) int {
	if opts.FS == nil {
		opts.FS = safefs.OS{}
	}
	if opts.Stderr == nil {
		opts.Stderr = os.Stderr
	}
	if opts.Pause == 0 {
		opts.Pause = DefaultPause
	}
	if opts.KillGrace == 0 {
		opts.KillGrace = DefaultKillGrace
	}
	if opts.Exec == nil {
		opts.Exec = syscall.Exec
	}
	if opts.Self == "" {
		if self, err := os.Executable(); err == nil {
			opts.Self = self
		}
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		fmt.Fprintln(opts.Stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "--version" || args[0] == "-version" {
		fmt.Fprintln(os.Stdout, Version)
		return 0
	}
	g := &guard{opts: opts, args: args[1:]}
	agent, err := resolve(args[0])
	if err != nil {
		g.logf("%v", err)
		return 2
	}
	g.agent = agent
	return g.loop()
}

// resolve finds the agent's binary as the agent itself sees it (symlinks
// followed): the record and the previous build are beside that file.
func resolve(agent string) (string, error) {
	if !strings.Contains(agent, "/") {
		p, err := exec.LookPath(agent)
		if err != nil {
			return "", err
		}
		agent = p
	}
	agent, err := filepath.Abs(agent)
	if err != nil {
		return "", err
	}
	if p, err := filepath.EvalSymlinks(agent); err == nil {
		agent = p
	}
	return agent, nil
}

func (g *guard) loop() int {
	for {
		action, r := Prepare(g.opts.FS, g.agent, g.logf)
		if action != Start {
			return g.exec()
		}
		if status, done := g.supervise(r); done {
			signal.Stop(g.sigs)
			return status
		}
	}
}

// Prepare is the guard's work at a start, short of running anything: it
// reads the trial record, carries out a restore when one is due, and says
// whether to execute the agent binary in place (Exec) or start the new
// build under watch (Start, with its record). Power loss at any of its
// steps comes back to the same decision at the next start.
func Prepare(fsys safefs.FS, agent string, logf func(string, ...any)) (Action, *Record) {
	for {
		r, err := Load(fsys, agent)
		if err != nil {
			logf("%s: %v; starting the agent unguarded", TrialPath(agent), err)
			return Exec, nil
		}
		var sum []byte
		if r != nil {
			if sum, err = safefs.Digest(fsys, agent); err != nil {
				logf("%v; starting the agent unguarded", err)
				return Exec, nil
			}
		}
		prevKept := prevExists(fsys, agent)
		action, reason := Decide(r, sum, prevKept)
		switch action {
		case Exec:
			if r.Live(sum) && !prevKept && r.Verdict == "" {
				// Committed by a build that does not know the record.
				logf("the new build %s committed; trial record removed", r.Version)
				if err := Remove(fsys, agent); err != nil {
					logf("%v", err)
				}
			}
			if r != nil {
				// A restore, or the agent's own rollback, may not be
				// durable yet: make it so before running on it.
				if err := fsys.SyncDir(safefs.Dir(agent)); err != nil {
					logf("%v", err)
				}
			}
			return Exec, nil
		case Start:
			return Start, r
		}
		logf("restoring the previous build: %s", reason)
		if err := DoRestore(fsys, agent, r, reason); err != nil {
			logf("%v", err)
			if !errors.Is(err, ErrCannotRestore) {
				return Exec, nil
			}
		}
	}
}

// env is the agent's environment: the guard's, with the guard named.
func (g *guard) env(notify bool) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k != EnvGuard && k != EnvVersion && k != EnvNotify {
			env = append(env, kv)
		}
	}
	env = append(env, EnvVersion+"="+Version)
	if g.opts.Self != "" {
		env = append(env, EnvGuard+"="+g.opts.Self)
	}
	if notify {
		env = append(env, EnvNotify+"=3")
	}
	return env
}

func (g *guard) exec() int {
	if g.sigs != nil {
		signal.Stop(g.sigs)
		// A stop that came while the guard was between two starts (or
		// restoring) ends the service here.
		for pending := true; pending; {
			select {
			case sig := <-g.sigs:
				if isStop(sig) || sig == syscall.SIGABRT {
					g.logf("stopped by %s", signalName(sig.(syscall.Signal)))
					return 0
				}
			default:
				pending = false
			}
		}
	}
	argv := append([]string{g.agent}, g.args...)
	if err := g.opts.Exec(g.agent, argv, g.env(false)); err != nil {
		g.logf("exec %s: %v", g.agent, err)
		return 1
	}
	return 0 // a test's Exec
}

// stopSignals end the service: the guard passes them on and exits with the
// build, without counting that start as a failure. The watchdog's SIGABRT
// is passed on too, and counts.
var stopSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT}

// supervise runs the new build of the record as a child, once, and says
// how the guard goes on: with done, it exits with status.
func (g *guard) supervise(r *Record) (status int, done bool) {
	if g.sigs == nil {
		g.sigs = make(chan os.Signal, 4)
		signal.Notify(g.sigs, append(stopSignals, syscall.SIGABRT, syscall.SIGUSR1, syscall.SIGUSR2)...)
	}
	r.Starts++
	// What the next start reads if this one is never accounted for: the
	// power went, or the guard itself was killed with its child.
	r.Last = fmt.Sprintf("start %d did not end under the guard's watch (power loss, or the guard was killed with it)", r.Starts)
	if err := Save(g.opts.FS, g.agent, r); err != nil {
		// Go on with the count in memory: it still bounds the starts made
		// by this guard.
		g.logf("cannot record the start: %v", err)
	}
	g.logf("starting the new build %s on trial (start %d of %d, %v of %v run time used)", r.Version, r.Starts, r.MaxStarts, roundRun(r.Used), r.Budget)
	pr, pw, err := os.Pipe()
	if err != nil {
		g.logf("%v", err)
		return 1, true
	}
	cmd := exec.Command(g.agent, g.args...)
	cmd.Args[0] = g.agent
	cmd.Env = g.env(true)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{pw}
	// The build dies with the guard, as it would with its service. Linux
	// sends Pdeathsig when the *thread* that forked the child ends; Go ends
	// threads only under a goroutine locked to one, which the guard never
	// does. (What the build itself starts is not covered: the service's
	// control group is.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	began := time.Now()
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		r.Last = "could not be started: " + err.Error()
		g.account(r, 0)
		return g.pause()
	}
	reached, pipeDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(pipeDone)
		defer pr.Close()
		var b [64]byte
		if n, _ := pr.Read(b[:]); n > 0 {
			close(reached)
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	budget := time.NewTimer(max(r.Budget-r.Used, 0))
	defer budget.Stop()
	var (
		stopped   os.Signal
		watchdog  bool
		killed    bool
		forceKill <-chan time.Time
		reachedC  = (<-chan struct{})(reached)
	)
wait:
	for {
		select {
		case <-reachedC:
			reachedC = nil
			// Durably, so that a power cut later in this start does not
			// read as a build that never ran; but never bring back a
			// record the build removed meanwhile (it committed).
			if !r.Reached && g.onTrial(r) {
				r.Reached = true
				if err := Save(g.opts.FS, g.agent, r); err != nil {
					g.logf("cannot record the trial: %v", err)
				}
			}
		case sig := <-g.sigs:
			_ = cmd.Process.Signal(sig)
			switch {
			case sig == syscall.SIGABRT:
				watchdog = true
			case isStop(sig):
				stopped = sig
			}
		case <-budget.C:
			if g.onTrial(r) {
				g.logf("the new build %s has not committed within %v of run time: stopping it", r.Version, r.Budget)
				killed = true
				_ = cmd.Process.Signal(syscall.SIGTERM)
				forceKill = time.After(g.opts.KillGrace)
			}
		case <-forceKill:
			_ = cmd.Process.Kill()
		case <-exited:
			break wait
		}
	}
	ran := time.Since(began)
	// A build that said it reached its trial and exited at once: the
	// word may still be in the pipe.
	select {
	case <-pipeDone:
	case <-time.After(time.Second):
	}
	select {
	case <-reached:
		r.Reached = true
	default:
	}
	how := describe(cmd.ProcessState, ran)
	status = exitStatus(cmd.ProcessState)
	if !g.onTrial(r) {
		// The trial ended while the build ran: it committed, or rolled
		// back by itself. The guard has nothing more to decide.
		g.logf("the new build %s is no longer on trial (%s)", r.Version, how)
		switch {
		case stopped != nil && status == 128+int(stopped.(syscall.Signal)):
			return 0, true // the stop went as asked
		case stopped != nil || watchdog || status != ExitRestart:
			return status, true
		}
		return 0, false
	}
	switch {
	case killed:
		r.Last = fmt.Sprintf("hung: stopped at the end of its %v of run time (%s)", r.Budget, how)
	case watchdog:
		r.Last = "killed by the supervisor's watchdog (" + how + ")"
	case stopped != nil && r.Reached:
		// A stop of a build that runs its trial is not a failure of the
		// build; its run time counts.
		r.Starts--
		r.Last = fmt.Sprintf("stopped by %s (%s)", signalName(stopped.(syscall.Signal)), how)
	case stopped != nil:
		// Before its trial code ran, a stop counts: it is also how a
		// supervisor ends a start that hangs (systemd's TimeoutStartSec=).
		r.Last = fmt.Sprintf("stopped by %s before it reached its trial (%s)", signalName(stopped.(syscall.Signal)), how)
	default:
		r.Last = how
	}
	g.account(r, ran)
	if stopped != nil && status == 128+int(stopped.(syscall.Signal)) {
		return 0, true // the stop went as asked: a clean exit for the supervisor
	}
	if stopped != nil || watchdog {
		return status, true
	}
	return g.pause()
}

// account records a start that ended.
func (g *guard) account(r *Record, ran time.Duration) {
	r.Used += ran
	g.logf("the new build %s %s", r.Version, r.Last)
	if err := Save(g.opts.FS, g.agent, r); err != nil {
		g.logf("cannot record the end of the start: %v", err)
	}
}

// pause waits before the next start; a stop signal meanwhile ends the
// guard.
func (g *guard) pause() (int, bool) {
	t := time.NewTimer(g.opts.Pause)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return 0, false
		case sig := <-g.sigs:
			if isStop(sig) || sig == syscall.SIGABRT {
				return 128 + int(sig.(syscall.Signal)), true
			}
		}
	}
}

// onTrial reports whether the record's trial still goes on: the record on
// disk is the same trial and the new build is in place.
func (g *guard) onTrial(r *Record) bool {
	cur, err := Load(g.opts.FS, g.agent)
	if err != nil || cur == nil || !bytes.Equal(cur.SHA256, r.SHA256) || cur.GaveUp || cur.Verdict != "" {
		return false
	}
	sum, err := safefs.Digest(g.opts.FS, g.agent)
	return err == nil && cur.Live(sum) && prevExists(g.opts.FS, g.agent)
}

func prevExists(fsys safefs.FS, agent string) bool {
	_, err := fsys.Stat(PrevPath(agent))
	return err == nil
}

func isStop(sig os.Signal) bool {
	for _, s := range stopSignals {
		if s == sig {
			return true
		}
	}
	return false
}

// describe says how a start ended.
func describe(ps *os.ProcessState, ran time.Duration) string {
	ws, ok := ps.Sys().(syscall.WaitStatus)
	switch {
	case !ok:
		return fmt.Sprintf("ended (%v) after %v", ps, roundRun(ran))
	case ws.Signaled():
		s := fmt.Sprintf("killed by %s after %v", signalName(ws.Signal()), roundRun(ran))
		if ws.CoreDump() {
			s += " (core dumped)"
		}
		return s
	case ws.Exited():
		s := fmt.Sprintf("exited with status %d after %v", ws.ExitStatus(), roundRun(ran))
		switch ws.ExitStatus() {
		case 2:
			s += " (a Go panic or fatal error exits 2)"
		case ExitRestart:
			s += " (asked to be restarted)"
		}
		return s
	}
	return fmt.Sprintf("ended (%v) after %v", ps, roundRun(ran))
}

func exitStatus(ps *os.ProcessState) int {
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

var signalNames = map[syscall.Signal]string{
	syscall.SIGABRT: "SIGABRT", syscall.SIGBUS: "SIGBUS", syscall.SIGFPE: "SIGFPE", syscall.SIGHUP: "SIGHUP",
	syscall.SIGILL: "SIGILL", syscall.SIGINT: "SIGINT", syscall.SIGKILL: "SIGKILL", syscall.SIGPIPE: "SIGPIPE",
	syscall.SIGQUIT: "SIGQUIT", syscall.SIGSEGV: "SIGSEGV", syscall.SIGSYS: "SIGSYS", syscall.SIGTERM: "SIGTERM",
	syscall.SIGTRAP: "SIGTRAP", syscall.SIGUSR1: "SIGUSR1", syscall.SIGUSR2: "SIGUSR2",
}

func signalName(s syscall.Signal) string {
	if n, ok := signalNames[s]; ok {
		return n + " (" + s.String() + ")"
	}
	return "signal " + strconv.Itoa(int(s)) + " (" + s.String() + ")"
}
