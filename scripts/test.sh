#!/usr/bin/env bash
# Sets up the machine and runs every test. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
