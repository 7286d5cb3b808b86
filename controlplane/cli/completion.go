package cli

import (
	"context"
	"fmt"
	"sort"
	"strings"
)

// subcommands are the verbs of a command that is not a group (ca init,
// broker-config mosquitto), from its usage line; groups list theirs.
func subcommands(c command) []string {
	if c.verbs != nil {
		return nil
	}
	first := strings.Fields(c.args)
	if len(first) == 0 || !strings.Contains(first[0], "|") && !isVerb(first[0]) {
		return nil
	}
	var out []string
	for _, v := range strings.Split(first[0], "|") {
		if isVerb(v) {
			out = append(out, v)
		}
	}
	return out
}

func isVerb(s string) bool {
	if s == "" || s == "..." || strings.HasPrefix(s, "-") {
		return false // a flag, not a verb
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && r != '-' {
			return false
		}
	}
	return true
}

const completionUsage = "hangar completion bash|zsh: print a shell completion script (bash: source <(hangar completion bash); zsh: the same, it uses bashcompinit)"

func runCompletion(_ context.Context, g *globals, args []string) error {
	if len(args) != 1 || (args[0] != "bash" && args[0] != "zsh") {
		if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(g.env.Stdout, completionUsage)
			return nil
		}
		return fmt.Errorf("%w: %s", ErrUsage, completionUsage)
	}
	var names []string
	cases := &strings.Builder{}
	for _, c := range commands() {
		names = append(names, c.name)
		subs := subcommands(c)
		for _, v := range c.verbs {
			subs = append(subs, v.names...)
		}
		if len(subs) > 0 {
			sort.Strings(subs)
			fmt.Fprintf(cases, "    %s) words=%q ;;\n", c.name, strings.Join(subs, " "))
		}
	}
	w := g.env.Stdout
	if args[0] == "zsh" {
		fmt.Fprintln(w, "autoload -U +X bashcompinit && bashcompinit")
	}
	fmt.Fprintf(w, `_hangar() {
  local cur=${COMP_WORDS[COMP_CWORD]} words=""
  if [ "$COMP_CWORD" -eq 1 ]; then
    words=%q
  elif [ "$COMP_CWORD" -eq 2 ]; then
    case ${COMP_WORDS[1]} in
%s    esac
  fi
  if [[ $cur == -* ]]; then
    words="--server --token --token-file --ca-file -o --help"
  fi
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -o default -F _hangar hangar
`, strings.Join(names, " "), cases.String())
	return nil
}
