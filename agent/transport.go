package agent

import "github.com/hangarfleet/hangar/agent/transport"

// The transport seam; see package transport.
type (
	Transport     = transport.Transport
	Conn          = transport.Conn
	Token         = transport.Token
	ConnectParams = transport.ConnectParams
)

// ErrNotAuthorized: the broker refused the credential.
var ErrNotAuthorized = transport.ErrNotAuthorized
