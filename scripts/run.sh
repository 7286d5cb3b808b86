#!/usr/bin/env bash
# Runs the control plane with its defaults (embedded MQTT broker, SQLite in
# ./data) and a simulated fleet against it. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${HANGAR_DATA:-data}
HTTP=${HANGAR_HTTP:-127.0.0.1:8080}
MQTT=${HANGAR_MQTT:-127.0.0.1:1883}
DEVICES=${SIM_DEVICES:-100}

pids=()
cleanup() {
	trap - INT TERM EXIT
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

# Demo release keys, made once and kept in $DATA (never in git): the
# control plane and the simulated drones trust their root, so a build
# signed with them can be rolled out (see the README's tour). In
# production the keys live offline, with the release engineer.
KEYS="$DATA/release-keys"
if [ ! -s "$KEYS/keys.cose" ]; then
	mkdir -p "$KEYS" && chmod 700 "$KEYS"
	./bin/hangar release keygen --out "$KEYS/root" >/dev/null
	./bin/hangar release keygen --out "$KEYS/release" >/dev/null
	./bin/hangar release keys --root-key "$KEYS/root.key" --add "$KEYS/release.pub" --out "$KEYS/keys.cose" >/dev/null
fi

FRESH_SIM=0
if [ -s "$DATA/hangar.db" ] && [ ! -d "$DATA/sim" ]; then FRESH_SIM=1; fi

# TLS with a development CA made in $DATA/tls (agents, the simulator and
# the CLI pin its ca.pem). The whole simulated fleet enrolls from
# 127.0.0.1: no per-address enrollment limit.
./bin/hangar serve --data "$DATA" --http "$HTTP" --mqtt "$MQTT" --tls-dev --enroll-rate 0 --root-key "$KEYS/root.pub" &
pids+=($!)
CA="$DATA/tls/ca.pem"
export HANGAR_SERVER="https://$HTTP" HANGAR_CA_FILE="$CA"

for _ in $(seq 1 100); do
	if [ -s "$CA" ] && curl -fsS --cacert "$CA" "https://$HTTP/healthz" >/dev/null 2>&1 && [ -s "$DATA/enroll.token" ]; then break; fi
	if ! kill -0 "${pids[0]}" 2>/dev/null; then echo "run.sh: the control plane did not start" >&2; exit 1; fi
	sleep 0.1
done

# The operator's part: the drones' hardware revisions and bases, as the
# factory lists them, become their labels (the control plane groups
# devices by operators' labels only, never by what a device says).
./bin/hangar-sim inventory --devices "$DEVICES" >"$DATA/inventory"
./bin/hangar device import "$DATA/inventory" --token-file "$DATA/admin.token" >/dev/null
if [ "$FRESH_SIM" = 1 ]; then
	# A database from an earlier run whose drones kept no state: they must
	# enroll again, which only an operator allows for an enrolled id.
	cut -d' ' -f1 "$DATA/inventory" | while read -r id; do
		./bin/hangar device rekey "$id" --reason "make run: simulated drone state is new" --token-file "$DATA/admin.token" >/dev/null 2>&1 || true
	done
fi

# The drones keep their state (credentials, outboxes) beside the control
# plane's: a second run finds them enrolled (the enrollment token never
# re-keys an enrolled device).
./bin/hangar-sim --server "https://$HTTP" --ca-file "$CA" --enroll-token "$DATA/enroll.token" --devices "$DEVICES" --state-dir "$DATA/sim" \
	--root-key "$KEYS/root.pub" &
pids+=($!)

cat <<EOT

  hangar is running.
    dashboard and API:  https://$HTTP/   (sign in with the admin token; the
                        certificate is from the development CA $CA)
    admin token:        $(cd "$DATA" && pwd)/admin.token
    CLI:                export HANGAR_SERVER=https://$HTTP HANGAR_CA_FILE=$CA
                        ./bin/hangar device ls --token-file $DATA/admin.token
    simulated drones:   $DEVICES (they trust the demo release root in $KEYS)
  Ctrl-C stops everything; the database stays in $DATA/.

EOT
wait -n "${pids[@]}"
