#!/usr/bin/env bash
# storvsc throughput under a kernel-only workload: md RAID1 resync over two LUNs (VHDX -> VHD)
# in the test guest, beside host reads of the same image, with channel I/O on the signalling
# vCPU thread (default) and on the VMM's I/O thread (VIRIDIAN_VMM_IO_THREAD=1), alternating,
# N rounds.
# Needs /dev/kvm; builds the guest kernel on first use (vmm/guest/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-1}"
cargo test --release -p vmm --test md_raid1 --no-run >/dev/null 2>&1
for i in $(seq "$rounds"); do
    for mode in vcpu-thread io-thread; do
        io=0
        [[ $mode == io-thread ]] && io=1
        echo "== round $i, disk I/O on the $mode"
        VIRIDIAN_VMM_IO_THREAD=$io cargo test --release -p vmm --test md_raid1 -- --nocapture 2>&1 |
            grep -E '^md resync:|test result'
    done
done
