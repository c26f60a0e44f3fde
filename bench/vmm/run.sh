#!/usr/bin/env bash
# storvsc throughput under a kernel-only workload: md RAID1 resync over two LUNs (VHDX -> VHD)
# in the test guest, beside host reads of the same image. Prints the numbers the test reports.
# Needs /dev/kvm; builds the guest kernel on first use (vmm/guest/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-1}"
for i in $(seq "$runs"); do
    cargo test --release -p vmm --test md_raid1 -- --nocapture 2>&1 | grep -E '^md resync:|test result'
done
