# hangar: fleet agent and control plane for drones.

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo 0.1.0-dev)
BUILD_TIME ?= $(shell date -u +%s)
PKG := github.com/hangarfleet/hangar
LDFLAGS := -X $(PKG)/agent.BuildVersion=$(VERSION) -X $(PKG)/agent.BuildTime=$(BUILD_TIME) \
	-X $(PKG)/controlplane/cli.Version=$(VERSION)
GO ?= go
TEST_TIMEOUT ?= 30m
SIM_DEVICES ?= 100

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## build hangar, hangar-agent, hangar-guard and hangar-sim into bin/
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/ ./controlplane/cmd/hangar ./agent/cmd/hangar-agent ./agent/cmd/hangar-guard ./firmware-sim/cmd/hangar-sim

.PHONY: run
run: build ## run the control plane (embedded broker, SQLite in ./data) and $(SIM_DEVICES) simulated drones
	SIM_DEVICES=$(SIM_DEVICES) ./scripts/run.sh

# The packages whose tests run again on PostgreSQL (a private server each
# test binary starts from Debian's postgresql; skipped without it, except
# under CI).
STORE_PKGS := ./controlplane/store/... ./controlplane/api/ ./controlplane/commands/ ./controlplane/leader/

.PHONY: test
test: ## run the whole test suite with the race detector, then the store's users again on PostgreSQL
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) test-postgres

.PHONY: test-postgres
test-postgres: ## run the store tests (and the API's, the dispatcher's, the election's) on PostgreSQL
	HANGAR_TEST_STORE=postgres $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(STORE_PKGS)

.PHONY: check
check: ## gofmt, go vet, then the tests
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(MAKE) test

.PHONY: bench
bench: build ## benchmarks: wire codec, ingest (embedded vs Mosquitto), agent footprint; see docs/benchmarks.md
	./scripts/bench.sh

.PHONY: soak
soak: ## kill -9 the control plane during rollouts, ROUNDS (10) times KILLS (60) kills
	./scripts/kill-soak.sh $${ROUNDS:-10} $${KILLS:-60}

.PHONY: cross
cross: ## static hangar-agent and hangar-guard for linux/arm64 and linux/arm (GOARM=7) into bin/
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o bin/hangar-agent-linux-arm64 ./agent/cmd/hangar-agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o bin/hangar-agent-linux-armv7 ./agent/cmd/hangar-agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -trimpath -ldflags "-s -w" -o bin/hangar-guard-linux-arm64 ./agent/cmd/hangar-guard
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -trimpath -ldflags "-s -w" -o bin/hangar-guard-linux-armv7 ./agent/cmd/hangar-guard
	@ls -l bin/hangar-agent-linux-* bin/hangar-guard-linux-*

.PHONY: fuzz
FUZZ_PKGS := ./proto/ ./internal/bspatch/ ./agent/ ./agent/guard/ ./agent/outbox/ ./agent/transport/mqtt/ ./agent/daemon/ ./agent/update/ ./controlplane/devcert/ ./controlplane/rollout/ ./controlplane/store/sqlite/

fuzz: ## run every fuzz target for FUZZTIME (default 30s) each
	@for p in $(FUZZ_PKGS); do for f in $$($(GO) test -list 'Fuzz.*' $$p | grep ^Fuzz); do \
	$(GO) test -run XXX -fuzz "^$$f$$" -fuzztime $${FUZZTIME:-30s} $$p || exit 1; done; done

.PHONY: clean
clean: ## remove bin/ (./data is kept: it holds the demo's database and tokens)
	rm -rf bin/
