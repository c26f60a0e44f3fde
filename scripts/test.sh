#!/usr/bin/env bash
# Sets up the machine and runs every test. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --all-targets
# The VMM boot tests need the minimal guest kernel (built once from Debian's linux-source-6.1,
# cached outside the repository; the tests would build it too, this makes the step visible).
if [ -e /dev/kvm ]; then
    vmm/guest/build.sh >/dev/null
fi
cargo test --workspace -- --test-threads=2
