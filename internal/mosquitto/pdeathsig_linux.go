package mosquitto

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the kernel kill the broker when the test binary dies
// without running its cleanups (a panic, a timeout, SIGKILL). Strictly, the
// signal follows the OS thread that started it; the Go runtime keeps its
// threads unless a goroutine exits while locked to one, which tests here
// do not do.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
