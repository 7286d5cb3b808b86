// Package syncbuf is a bytes.Buffer safe for a writer goroutine (a child
// process's output, a command run in the background) and a reader that
// polls it, as tests do.
package syncbuf

import (
	"bytes"
	"sync"
)

// Buffer is a locked bytes.Buffer.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String is what was written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
