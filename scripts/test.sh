#!/usr/bin/env bash
# Sets up the machine and runs every test. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Incremental caches double target/ and buy nothing in a one-shot run.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
free_mib=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "$free_mib" -lt 6000 ]; then
    echo "warning: only ${free_mib} MiB free on $(df -P . | awk 'NR==2 {print $6}'); the build and tests need about 6 GiB" >&2
fi
cargo build --workspace --all-targets
# The VMM boot tests need the minimal guest kernel (built once from Debian's linux-source-6.1,
# cached outside the repository; the tests would build it too, this makes the step visible).
if [ -e /dev/kvm ]; then
    vmm/guest/build.sh >/dev/null
fi
cargo test --workspace -- --test-threads=2
