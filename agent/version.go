package agent

// BuildVersion is the agent's version, set when building with
// -ldflags "-X github.com/hangarfleet/hangar/agent.BuildVersion=1.2.3".
var BuildVersion = "dev"

// BuildTime is when the binary was built (unix seconds), set with
// -ldflags "-X github.com/hangarfleet/hangar/agent.BuildTime=...". The
// agent never trusts a clock that reads earlier.
var BuildTime = "0"
