#!/usr/bin/env bash
# Longer runs of the SIGKILL suites: commit / undo commit / rebase, and serve / mount under
# flushing writers. Usage: scripts/kill-soak.sh [ROUNDS] (default 100). Prints each seed;
# replay one with VIRIDIAN_KILL_SEED=N.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-100}"
export VIRIDIAN_KILL_ROUNDS="$rounds"
cargo test -p viridian --test crash_commit -- --test-threads=1 --nocapture
cargo test -p viridian --test crash_writers -- --test-threads=1 --nocapture
