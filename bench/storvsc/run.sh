#!/bin/sh
# Requests per second through the VMBus ring into storvsc with a RAM disk and an in-memory
# dynamic VHDX, queue depth 32.
# Usage: bench/storvsc/run.sh [seconds]
set -e
cd "$(dirname "$0")/../.."
secs=${1:-3}
cargo build --release -p storvsc-backend --example storvsc_bench
bin=${CARGO_TARGET_DIR:-target}/release/examples/storvsc_bench
for backend in ram vhdx; do
    for mode in read write; do
        for size in 4096 65536; do
            echo "backend=$backend"
            "$bin" --backend "$backend" --mode "$mode" --size "$size" --qd 32 --seconds "$secs"
        done
    done
done
