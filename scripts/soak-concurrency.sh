#!/usr/bin/env bash
# Soaks the concurrency stress tests (tools/tests/stress.rs): runs them again and again with
# successive seeds and more rounds until the time is up; stops at the first failure and prints
# the seed that repeats it.
#
#   scripts/soak-concurrency.sh [SECONDS] [SEED] [FILTER] [ROUNDS]
#
# SECONDS  how long to keep going (default 600)
# SEED     first seed (default: from the clock); run k uses SEED+k
# FILTER   test name filter, e.g. threads::, nbd::vhdx, fuse::vhd_diff (default: all)
# ROUNDS   rounds per test run (default 400; the suite uses 300 for threads, 120 for NBD and
#          FUSE O_DIRECT, 60 for FUSE buffered)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
seed=${2:-$(( $(date +%s%N) % 1000000007 ))}
filter=${3:-}
rounds=${4:-400}
cargo test -q -p viridian --test stress --no-run
end=$(( $(date +%s) + secs ))
runs=0
while [ "$(date +%s)" -lt "$end" ]; do
    echo "== soak run $runs: VIRIDIAN_STRESS_SEED=$seed VIRIDIAN_STRESS_ROUNDS=$rounds $filter"
    if ! VIRIDIAN_STRESS_SEED=$seed VIRIDIAN_STRESS_ROUNDS=$rounds \
        cargo test -q -p viridian --test stress -- --test-threads=2 $filter; then
        echo "FAILED with VIRIDIAN_STRESS_SEED=$seed VIRIDIAN_STRESS_ROUNDS=$rounds (filter '$filter')"
        exit 1
    fi
    seed=$(( seed + 1 ))
    runs=$(( runs + 1 ))
done
echo "soak passed: $runs runs in ${secs}s"
