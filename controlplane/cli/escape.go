package cli

import (
	"fmt"
	"io"
	"os"
	"unicode/utf8"
)

// Escaper writes to W with every control character but newline and tab
// shown as an escape (\x1b, \u009b): what a device reported (a version, an
// event's text) cannot clear the operator's screen, set the window title
// or move the cursor. Inside JSON strings the escapes are valid JSON.
type Escaper struct{ W io.Writer }

func (e *Escaper) Write(p []byte) (int, error) {
	clean := true
	for i := 0; i < len(p); {
		r, n := utf8.DecodeRune(p[i:])
		if unsafeRune(r, n) {
			clean = false
			break
		}
		i += n
	}
	if clean {
		return e.W.Write(p)
	}
	out := make([]byte, 0, len(p)+16)
	for i := 0; i < len(p); {
		r, n := utf8.DecodeRune(p[i:])
		if unsafeRune(r, n) {
			out = fmt.Appendf(out, `\u%04x`, r)
		} else {
			out = append(out, p[i:i+n]...)
		}
		i += n
	}
	if _, err := e.W.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// unsafeRune: C0 controls but newline and tab, DEL, C1 controls. Invalid
// UTF-8 passes as it is (a terminal shows it as a replacement character).
func unsafeRune(r rune, n int) bool {
	if r == utf8.RuneError && n == 1 {
		return false
	}
	return (r < 0x20 && r != '\n' && r != '\t') || (r >= 0x7f && r <= 0x9f)
}

// oneLine keeps a device-supplied value on its table row.
func oneLine(s string) string {
	out := []rune(nil)
	for _, r := range s {
		if r == '\n' || r == '\t' || r == '\r' {
			r = ' '
		}
		out = append(out, r)
	}
	if out == nil {
		return s
	}
	return string(out)
}

// isTerminal reports whether w is a character device (a terminal): only
// there does the CLI write cursor control codes.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
