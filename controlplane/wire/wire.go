// Package wire holds the request and response types of the control
// plane's REST API that are not store or rollout types: what a client
// (the CLI, the scenario runner, the browser tests) and the server agree
// on. It depends on no server code, so a client links none.
package wire

import (
	"time"

	"github.com/hangarfleet/hangar/controlplane/delivery"
	"github.com/hangarfleet/hangar/controlplane/rollout"
	"github.com/hangarfleet/hangar/controlplane/store"
)

// CreateRollout is the body of POST /api/v1/rollouts.
type CreateRollout struct {
	Release          string           `json:"release"`                  // VERSION or TARGET@VERSION
	RevertRelease    string           `json:"revert_release,omitempty"` // signed re-release of the previous build
	Selector         string           `json:"selector,omitempty"`       // k=v,k2=v2
	FromVersions     []string         `json:"from_versions,omitempty"`
	Stages           string           `json:"stages,omitempty"` // 1%,10%,50%,100%
	MinCanary        int              `json:"min_canary,omitempty"`
	Strata           []string         `json:"strata,omitempty"`
	Gates            rollout.Gates    `json:"gates"`
	MaxInFlight      int              `json:"max_in_flight,omitempty"`
	Budgets          []string         `json:"budgets,omitempty"` // label:N or label:P%
	Windows          []string         `json:"windows,omitempty"` // HH:MM-HH:MM UTC
	DeferredDeadline rollout.Duration `json:"deferred_deadline,omitempty"`
	OfflineDeadline  rollout.Duration `json:"offline_deadline,omitempty"`
	OnFailure        string           `json:"on_failure,omitempty"`
	AutoRevert       bool             `json:"auto_revert,omitempty"`
	Full             bool             `json:"full,omitempty"` // full artifacts only, no deltas
	Start            bool             `json:"start,omitempty"`
	DryRun           bool             `json:"dry_run,omitempty"`
	Reason           string           `json:"reason,omitempty"`
}

// CreateResult is the answer to POST /api/v1/rollouts: the rollout
// created (absent for a dry run) and the devices each stage takes.
type CreateResult struct {
	Rollout *rollout.Rollout `json:"rollout,omitempty"`
	rollout.Preview
}

// ActRequest is the body of POST /api/v1/rollouts/:id/:action.
type ActRequest struct {
	Reason string `json:"reason,omitempty"`
}

// DeliveryReport is the body of GET /api/v1/metrics/delivery: the four
// keys, overall and per hardware revision, and the fleet's health over
// the same window beside them.
type DeliveryReport struct {
	delivery.Report
	Health []HealthPoint `json:"health"`
}

// HealthPoint is the fleet's health at one time of the window.
type HealthPoint struct {
	Time       time.Time `json:"time"`
	Devices    int       `json:"devices"`
	Online     int       `json:"online"`
	LowBattery int       `json:"low_battery"`
	// Versions is the number of versions in the fleet (fewer: a fleet
	// more up to date).
	Versions int `json:"versions"`
}

// CreateToken is the body of POST /api/v1/tokens.
type CreateToken struct {
	Name string `json:"name"`
	Role string `json:"role"`
	// ExpiresIn is a Go duration ("720h"); empty: no expiry.
	ExpiresIn string `json:"expires_in,omitempty"`
}

// CreatedToken is its reply: the secret is shown once.
type CreatedToken struct {
	store.APIToken
	Token string `json:"token"`
}

// RevokedToken is the reply of DELETE /api/v1/tokens/:name.
type RevokedToken struct {
	Name           string `json:"name"`
	AlreadyRevoked bool   `json:"already_revoked,omitempty"`
}

// Principal is who a request authenticated as: the bootstrap admin token
// (name "admin") or a named token.
type Principal struct {
	Name    string     `json:"name"`
	Role    string     `json:"role"`
	Expires *time.Time `json:"expires,omitempty"`
}

// LiveChange is the data of one "change" message.
type LiveChange struct {
	Topics []string      `json:"topics"`
	Events []store.Event `json:"events,omitempty"`
	// Truncated: more events came than the message holds; re-read them.
	Truncated bool      `json:"truncated,omitempty"`
	Time      time.Time `json:"time"`
}

// ImportResult is the answer to an inventory import.
type ImportResult struct {
	Created  int `json:"created"`  // pre-provisioned: awaiting their enrollment
	Labelled int `json:"labelled"` // known already: labels set
}

// UpdateRequest is the body of POST /api/v1/devices/:id/update.
type UpdateRequest struct {
	Release string `json:"release"` // VERSION or TARGET@VERSION
	Reason  string `json:"reason,omitempty"`
	// Full offers the full artifact even when a delta from the device's
	// build exists.
	Full bool `json:"full,omitempty"`
}

// UpdateResponse tells which command carries the offer, and what the
// device is to download.
type UpdateResponse struct {
	Command string `json:"command"`
	Target  string `json:"target"`
	Version string `json:"version"`
	Counter uint64 `json:"counter"`
	// Delta is the delta offered (none: the full artifact).
	Delta *store.ReleaseDelta `json:"delta,omitempty"`
	// Size is what the device downloads: the patch, or the artifact.
	Size uint64 `json:"size"`
}

// Error is the JSON body of every error response.
type Error struct {
	Error string `json:"error"`
}

// LabelsRequest is the body of POST /api/v1/devices/labels (several
// devices in one change) and POST /api/v1/devices/import (devices not
// known yet are pre-provisioned).
type LabelsRequest struct {
	Devices []store.LabelChange `json:"devices"`
}
