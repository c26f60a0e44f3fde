#!/usr/bin/env bash
# Installs the peers the benchmarks compare against, so no measurement is silently skipped on a
# fresh machine: qemu-img/qemu-nbd/qemu-storage-daemon (qemu-utils from bookworm-backports, via
# scripts/setup.sh), fio, nbdkit (file plugin), libnbd-bin (nbdcopy, nbdinfo) and GNU time
# (/usr/bin/time -v for peak RSS). Idempotent. Sourced or run by the bench scripts.
set -euo pipefail
BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$BENCH_ROOT/scripts/setup.sh" 2>/dev/null

bench_need=()
command -v fio >/dev/null 2>&1 || bench_need+=(fio)
command -v nbdkit >/dev/null 2>&1 || bench_need+=(nbdkit)
command -v nbdcopy >/dev/null 2>&1 || bench_need+=(libnbd-bin)
[ -x /usr/bin/time ] || bench_need+=(time)
command -v qemu-storage-daemon >/dev/null 2>&1 || bench_need+=(qemu-utils)
if [ ${#bench_need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "bench/setup: installing ${bench_need[*]}" >&2
    $SUDO apt-get update -qq
    # qemu-storage-daemon ships in qemu-utils; take it from backports like scripts/setup.sh.
    if printf '%s\n' "${bench_need[@]}" | grep -qx qemu-utils; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports qemu-utils >/dev/null
    fi
    rest=()
    for p in "${bench_need[@]}"; do [ "$p" = qemu-utils ] || rest+=("$p"); done
    if [ ${#rest[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${rest[@]}" >/dev/null
    fi
fi
for t in fio nbdkit nbdcopy qemu-img qemu-nbd qemu-storage-daemon /usr/bin/time; do
    command -v "$t" >/dev/null 2>&1 || { echo "bench/setup: $t still missing" >&2; exit 1; }
done
