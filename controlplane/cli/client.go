package cli

import "github.com/hangarfleet/hangar/controlplane/client"

// Client is the typed API client (package client).
type Client = client.Client

// APIError is an error response of the API.
type APIError = client.APIError

// NewClient returns a client for the API at base with a token.
func NewClient(base, token string) *Client { return client.New(base, token) }
