#!/usr/bin/env bash
# kill-soak.sh: run the kill -9 rollout test over and over with more kills
# and a fresh random seed each time. A failure prints the seed that
# replays it (HANGAR_TEST_SEED=... go test ./firmware-sim/e2e -run TestRolloutSurvivesKill9).
#
#   scripts/kill-soak.sh [ROUNDS] [KILLS]     defaults: 10 rounds of 60 kills
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
kills=${2:-60}
log=$(mktemp -t hangar-kill-soak.XXXXXX)
go test -c -race -o "$log.test" ./firmware-sim/e2e
pass=0
for i in $(seq 1 "$rounds"); do
	seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
	if HANGAR_TEST_KILLS=$kills HANGAR_TEST_SEED=$seed "$log.test" -test.run '^TestRolloutSurvivesKill9$' -test.v -test.timeout 30m >"$log" 2>&1; then
		pass=$((pass + 1))
		echo "round $i: ok ($(grep -o '[0-9]* kills over [0-9a-z.]*' "$log"))"
	else
		echo "round $i: FAILED, seed $seed; log in $log"
		tail -40 "$log"
		exit 1
	fi
done
rm -f "$log" "$log.test"
echo "$pass of $rounds rounds passed, $kills kills each"
