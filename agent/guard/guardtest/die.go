//go:build linux

// Package guardtest helps tests build agents that die the ways real builds
// do, for the trial guard to catch.
package guardtest

import (
	"os"
	"syscall"
	"time"
	"unsafe"
)

// DieBySignal ends the process killed by sig, as a C program's crash
// would: Go's runtime catches SIGSEGV and friends and exits with status 2,
// so the default action is put back first.
func DieBySignal(sig syscall.Signal) {
	var sa [4]uintptr // struct kernel_sigaction, all zero: SIG_DFL
	_, _, _ = syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&sa)), 0, 8, 0, 0)
	_ = syscall.Kill(os.Getpid(), sig)
	time.Sleep(time.Minute)
	os.Exit(99)
}

// Hang blocks forever without looking like a deadlock to Go's runtime.
func Hang() {
	for {
		time.Sleep(time.Hour)
	}
}
