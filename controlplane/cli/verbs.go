package cli

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/hangarfleet/hangar/controlplane/rollout"
)

// verb is one subcommand of a command group. The group's dispatch, its
// usage, the top-level listing and the shell completion all read the
// group's verbs: a verb is declared in one place.
type verb struct {
	names []string // the name, then aliases
	args  string   // after the name, in the usage
	help  string
	run   func(ctx context.Context, g *globals, args []string) error
}

// group runs the verb args name, or prints the group's usage.
func group(name, about string, verbs []verb) func(ctx context.Context, g *globals, args []string) error {
	return func(ctx context.Context, g *globals, args []string) error {
		sub := ""
		if len(args) > 0 {
			sub, args = args[0], args[1:]
		}
		for _, v := range verbs {
			if slices.Contains(v.names, sub) {
				return v.run(ctx, g, args)
			}
		}
		w := g.env.Stderr
		fmt.Fprintf(w, "Usage: hangar %s %s ...\n\n", name, verbList(verbs))
		if about != "" {
			fmt.Fprintf(w, "%s\n\n", about)
		}
		for _, v := range verbs {
			if use := strings.TrimSpace(v.names[0] + " " + v.args); len(use) <= 44 {
				fmt.Fprintf(w, "  %-44s %s\n", use, v.help)
			} else {
				fmt.Fprintf(w, "  %s\n  %-44s %s\n", use, "", v.help)
			}
		}
		fmt.Fprintf(w, "\nhangar %s VERB -h lists a verb's flags.\n", name)
		return unknownSub(name, sub)
	}
}

func verbList(verbs []verb) string {
	names := make([]string, len(verbs))
	for i, v := range verbs {
		names[i] = v.names[0]
	}
	return strings.Join(names, "|")
}

// sub passes a verb to a command that reads it from its arguments (the
// verb decides which flags it declares).
func sub(run func(ctx context.Context, g *globals, args []string) error, name string) func(ctx context.Context, g *globals, args []string) error {
	return func(ctx context.Context, g *globals, args []string) error {
		return run(ctx, g, append([]string{name}, args...))
	}
}

func deviceVerbs() []verb {
	return []verb{
		{[]string{"ls", "list"}, "[--selector k=v] [--online true] [--version V] [--search S] [--sort -last_seen] [--limit N --offset M] [--pending]", "list devices", deviceList},
		{[]string{"show"}, "ID", "one device: labels, what it reports, its latest reading", deviceShow},
		{[]string{"add"}, "ID [--hardware H] [--label k=v]", "pre-provision, with a credential (shown once)", deviceAdd},
		{[]string{"rm", "revoke"}, "ID [--reason R]", "revoke and disconnect", deviceRemove},
		{[]string{"rekey"}, "ID [--within 24h] [--reason R]", "let an enrolled device that lost its credential enroll again, once", deviceRekey},
		{[]string{"approve"}, "ID [--key FINGERPRINT]", "let an enrollment held for approval complete, for the key it asked with", deviceApprove},
		{[]string{"deny"}, "ID [--reason R]", "drop an enrollment held for approval", deviceDeny},
		{[]string{"passwords"}, "[on|off]", "show, or turn on or off, password authentication for the fleet", devicePasswords},
		{[]string{"update"}, "ID --release V [--full]", "offer a signed release to one device (a delta from its build when there is one)", deviceUpdate},
		{[]string{"updates"}, "ID", "where the device stands with each release, and how it fetched it", deviceUpdates},
		{[]string{"label"}, "ID k=v [k2-] | --file FILE", "set operators' labels (k- removes k)", deviceLabel},
		{[]string{"import"}, "FILE", `pre-provision devices from lines "ID k=v ..."; label those known`, deviceImport},
	}
}

func rolloutVerbs() []verb {
	vs := []verb{
		{[]string{"create"}, "--release V [--selector k=v] [--stages 1%,10%,50%,100%] [gates] [--full] [--dry-run] [--start]", "create (or preview) a staged rollout", rolloutCreate},
		{[]string{"ls", "list"}, "", "list rollouts", rolloutList},
		{[]string{"status"}, "ID|latest", "stages, gates with their measured values, strata", func(ctx context.Context, g *globals, args []string) error {
			return rolloutStatus(ctx, g, args, false)
		}},
		{[]string{"watch"}, "ID|latest", "the status, redrawn until the rollout ends", func(ctx context.Context, g *globals, args []string) error {
			return rolloutStatus(ctx, g, args, true)
		}},
		{[]string{"events"}, "ID|latest", "transitions and operators' actions", rolloutEvents},
		{[]string{"devices"}, "ID|latest [--state waiting]", "each member: stage, state, version, last report", rolloutDevices},
	}
	for _, op := range rollout.Ops {
		help := map[rollout.Op]string{rollout.OpStart: "start a created rollout", rollout.OpPause: "stop offering; judging goes on",
			rollout.OpResume: "offer again", rollout.OpAbort: "stop for good; offers are withdrawn",
			rollout.OpPromote: "skip the rest of the current stage's soak", rollout.OpRevert: "offer the revert release to the devices that took the release"}[op]
		vs = append(vs, verb{[]string{string(op)}, "ID|latest --reason R", help, func(ctx context.Context, g *globals, args []string) error {
			return rolloutAct(ctx, g, op, args)
		}})
	}
	return vs
}

func releaseVerbs() []verb {
	offline := func(f func(g *globals, args []string) error) func(ctx context.Context, g *globals, args []string) error {
		return func(_ context.Context, g *globals, args []string) error { return f(g, args) }
	}
	return []verb{
		{[]string{"keygen"}, "--out PREFIX", "make an Ed25519 key pair (root or release key); offline", offline(releaseKeygen)},
		{[]string{"keys"}, "--root-key K --add PUB", "sign the list of release keys with the root key; offline", offline(releaseKeys)},
		{[]string{"sign"}, "--key K --artifact F --version V --hardware H [--delta-from OLD[@V]]...", "sign a release manifest for an artifact, and deltas from earlier builds; offline", offline(releaseSign)},
		{[]string{"verify"}, "--manifest M --keys K [--artifact F] [--base B]", "check a manifest (and artifact; a delta's patch against its base) as a device would", offline(releaseVerify)},
		{[]string{"push"}, "--artifact F --keys K [--delta PATCH]...", "upload manifest, key list and artifact, then the deltas", releasePush},
		{[]string{"ls", "list"}, "", "list pushed releases", releaseList},
	}
}

func tokenVerbs() []verb {
	return []verb{
		{[]string{"create"}, "--name N --role viewer|operator|admin [--expires 720h]", "make a named token; its secret is shown once", sub(runToken, "create")},
		{[]string{"ls", "list"}, "", "list tokens: role, state, creator, expiry, last use", sub(runToken, "ls")},
		{[]string{"revoke", "rm"}, "NAME [--reason R]", "refuse the token from now on", sub(runToken, "revoke")},
	}
}

func profileVerbs() []verb {
	return []verb{
		{[]string{"create"}, "NAME --label k=v [--out FILE] [--replace]", "an enrollment token that gives its devices labels", sub(runProfile, "create")},
		{[]string{"ls", "list"}, "", "list profiles", sub(runProfile, "ls")},
		{[]string{"rm", "delete"}, "NAME", "its token no longer enrolls devices", sub(runProfile, "rm")},
	}
}

func reportVerbs() []verb {
	return []verb{
		{[]string{"delivery"}, "[--since 672h | --from T --to T]", "deployment frequency, lead time, change failure rate, time to restore", sub(runReport, "delivery")},
	}
}

func completionVerbs() []verb {
	return []verb{
		{[]string{"bash"}, "", "source <(hangar completion bash)", sub(runCompletion, "bash")},
		{[]string{"zsh"}, "", "source <(hangar completion zsh)", sub(runCompletion, "zsh")},
	}
}
