// Package certs holds end-to-end tests of device identity: enrollment with
// a certificate request, mutual TLS, renewal, approval and the move from
// passwords, with the agent library against a real control plane on a
// clock the tests move.
package certs
