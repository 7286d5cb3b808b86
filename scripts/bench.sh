#!/usr/bin/env bash
# make bench: every figure of docs/benchmarks.md, each beside its baseline
# from the same run. Needs bin/ built (make bench does it) and, for the
# Mosquitto column, mosquitto installed. Knobs: DEVICES, RATE, DURATION,
# CONNECTIONS (the idle-fleet run), MEMORY_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-2000}
RATE=${RATE:-15}
DURATION=${DURATION:-20s}
CONNECTIONS=${CONNECTIONS:-10000}
MEMORY_LIMIT=${MEMORY_LIMIT:-400MiB}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"

echo "== machine"
echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(go version)"
echo

echo "== wire codec and outbox (go test -bench; JSON is the baseline of CBOR)"
go test -run XXX -bench 'Sample' -benchmem -count 1 ./proto/ | grep -E '^Benchmark'
go test -run XXX -bench . -benchmem -count 1 ./agent/outbox/ | grep -E '^Benchmark'
go test -run TestSampleSize -v ./proto/ | grep 'sample:'
echo

# embedded (plain TCP) is the baseline of embedded-mtls (TLS, each drone
# with its own device certificate) and of Mosquitto.
brokers=embedded,embedded-mtls
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then brokers=embedded,embedded-mtls,mosquitto; fi
echo "== ingest: $DEVICES drones x $RATE msg/s, QoS1, real connections ($brokers)"
./bin/hangar-sim bench ingest --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --brokers "$brokers" --json "$OUT/ingest.json"
echo

echo "== ingest below saturation: $DEVICES drones x $((RATE * 2 / 3)) msg/s"
./bin/hangar-sim bench ingest --devices "$DEVICES" --rate "$((RATE * 2 / 3))" --duration "$DURATION" --brokers "$brokers" --json "$OUT/ingest-two-thirds.json"
echo

echo "== $CONNECTIONS connected drones, one batch each per 10 s (embedded broker, plain and mutual TLS, --memory-limit $MEMORY_LIMIT)"
./bin/hangar-sim bench ingest --devices "$CONNECTIONS" --rate 0.1 --warmup 10s --duration 40s --brokers embedded,embedded-mtls \
	--serve-args "--memory-limit $MEMORY_LIMIT" --json "$OUT/connections.json"
echo

echo "== agent footprint"
make --no-print-directory cross >/dev/null
./bin/hangar-sim bench agent --duration 30s
echo "-- the same, beside a flight controller streaming MAVLink at 50 Hz"
./bin/hangar-sim bench agent --duration 30s --mavlink-hz 50
echo

echo "== signed update of a 6 MiB payload on a real agent (loopback)"
./bin/hangar-sim bench update --size 6291456 --cuts 3
echo

echo "== delta updates: hangar's streaming patcher against selfupdate's (a 4 MiB build); patches of linux/arm64 agent releases"
go test -run XXX -bench 'Apply' -benchmem -count 1 ./internal/bspatch/ | grep -E '^Benchmark'
./scripts/delta-sizes.sh "$OUT/delta" | grep -E '^==|delta from'
echo

echo "== rollouts: plan (10k vs 100k devices), start to first wave, notification rate"
go test -run XXX -bench 'BenchmarkPlan' -benchmem -benchtime 10x -count 1 ./controlplane/rollout/ | grep -E '^Benchmark'
go test -run XXX -bench 'BenchmarkRolloutStart|BenchmarkNotify' -benchtime 3x -count 1 -timeout 30m ./controlplane/server/ | grep -E '^Benchmark'
echo

echo "== console and API at 10,000 devices: device list pages (the whole list is the baseline), live stream watermarks and fan-out"
go test -run XXX -bench 'BenchmarkDeviceList|BenchmarkLiveMarks|BenchmarkLiveFanout' -benchtime 200x -count 1 -timeout 30m ./controlplane/server/ | grep -E '^Benchmark'
echo "== a 1,000-drone rollout with 0 (baseline) and 10 consoles' live streams open"
go test -run XXX -bench 'BenchmarkRolloutWithConsoles' -benchtime 1x -count 1 -timeout 30m ./firmware-sim/e2e/ | grep -E '^Benchmark'
echo

echo "== a device's connect to the embedded broker: plain TCP (baseline) vs TLS vs mutual TLS with a device certificate, same run"
go test -run XXX -bench 'BenchmarkConnect' -benchtime 2s -count 1 ./controlplane/broker/ | grep -E '^Benchmark'
echo

echo "== MQTT transport footprint per connection: paho (the agent's) vs lite (the simulator's option); broker in another process"
go test -run XXX -bench 'BenchmarkFootprint' -benchtime 3x -count 1 ./agent/transport/ | grep -E '^Benchmark'
