#!/usr/bin/env bash
# storvsc throughput under a kernel-only workload: md RAID1 resync over two LUNs (VHDX -> VHD)
# in the test guest, beside host reads of the same image, with channel I/O on the VMM's I/O
# thread (default) and on the vCPU thread (VIRIDIAN_VMM_SYNC_IO=1), alternating, N rounds.
# Needs /dev/kvm; builds the guest kernel on first use (vmm/guest/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-1}"
cargo test --release -p vmm --test md_raid1 --no-run >/dev/null 2>&1
for i in $(seq "$rounds"); do
    for mode in io-thread vcpu-thread; do
        sync=0
        [[ $mode == vcpu-thread ]] && sync=1
        echo "== round $i, disk I/O on the $mode"
        VIRIDIAN_VMM_SYNC_IO=$sync cargo test --release -p vmm --test md_raid1 -- --nocapture 2>&1 |
            grep -E '^md resync:|test result'
    done
done
