package cli

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"text/tabwriter"
	"time"

	"github.com/hangarfleet/hangar/controlplane/api"
	"github.com/hangarfleet/hangar/controlplane/store"
)

const tokenAbout = `Named API tokens for operators and automation. A viewer reads; an operator
also pushes releases, runs rollouts, updates and labels devices; an admin
also manages tokens, enrollment profiles, approvals and revocation. The
audit log records the token's name. The secret is shown once.`

func runToken(ctx context.Context, g *globals, args []string) error {
	sub := ""
	if len(args) > 0 {
		sub, args = args[0], args[1:]
	}
	fs := g.newFlags("token " + sub)
	g.register(fs)
	fs.Usage = func() { fmt.Fprintln(g.env.Stderr, tokenAbout); fs.PrintDefaults() }
	var name, role, out, reason *string
	var expires *time.Duration
	switch sub {
	case "create":
		name = fs.String("name", "", "the token's name (a-z 0-9 . _ @ -), recorded in the audit log")
		role = fs.String("role", "", "viewer, operator or admin")
		expires = fs.Duration("expires", 0, "lifetime (e.g. 720h); 0: no expiry")
		out = fs.String("out", "", "write the secret to this file (mode 0600) instead of printing it")
	case "revoke", "rm":
		reason = fs.String("reason", "", "why, for the audit log")
	case "ls", "list":
	default:
		return unknownSub("token", sub)
	}
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	switch sub {
	case "ls", "list":
		var ts []store.APIToken
		if err := c.Do(ctx, http.MethodGet, "/api/v1/tokens", nil, nil, &ts); err != nil {
			return err
		}
		if g.output == "json" {
			return printJSON(g.env.Stdout, ts)
		}
		tw := tabwriter.NewWriter(g.env.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tROLE\tSTATE\tCREATED\tBY\tEXPIRES\tLAST USED")
		for _, t := range ts {
			state := "active"
			switch {
			case t.Revoked != nil:
				state = "revoked " + humanTime(*t.Revoked)
			case !t.Valid(now()):
				state = "expired"
			}
			exp := "never"
			if t.Expires != nil {
				exp = humanTime(*t.Expires)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.Name, t.Role, state, humanTime(t.Created), dash(t.CreatedBy), exp, ago(t.LastUsed))
		}
		return tw.Flush()
	case "revoke", "rm":
		if len(pos) != 1 {
			return fmt.Errorf("%w: token revoke NAME", ErrUsage)
		}
		q := reasonQuery(*reason)
		var r api.RevokedToken
		if err := c.Do(ctx, http.MethodDelete, "/api/v1/tokens/"+url.PathEscape(pos[0]), q, nil, &r); err != nil {
			return err
		}
		if g.output == "json" {
			return printJSON(g.env.Stdout, r)
		}
		if r.AlreadyRevoked {
			fmt.Fprintf(g.env.Stdout, "token %s: already revoked\n", pos[0])
		} else {
			fmt.Fprintf(g.env.Stdout, "token %s revoked: it is refused from now on\n", pos[0])
		}
		return nil
	}
	if len(pos) != 0 || *name == "" || *role == "" {
		return fmt.Errorf("%w: token create --name NAME --role viewer|operator|admin", ErrUsage)
	}
	req := api.CreateToken{Name: *name, Role: *role}
	if *expires > 0 {
		req.ExpiresIn = expires.String()
	}
	var t api.CreatedToken
	if err := c.Do(ctx, http.MethodPost, "/api/v1/tokens", nil, req, &t); err != nil {
		return err
	}
	exp := "no expiry"
	if t.Expires != nil {
		exp = "expires " + t.Expires.Local().Format(time.DateTime)
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(t.Token+"\n"), 0o600); err != nil {
			return err
		}
		fmt.Fprintf(g.env.Stdout, "token %s (%s, %s): secret written to %s\n", t.Name, t.Role, exp, *out)
		return nil
	}
	if g.output == "json" {
		return printJSON(g.env.Stdout, t)
	}
	fmt.Fprintf(g.env.Stdout, "token %s (%s, %s). Its secret (shown once):\n  %s\n", t.Name, t.Role, exp, t.Token)
	return nil
}
