#!/usr/bin/env bash
# Convert benchmark: viridian vs qemu-img, side by side in one run, page cache warm.
#
# Source: a 2 GiB raw file, half random data (in 1 MiB pieces) and half holes.
# Cases: raw->vhdx, vhdx->raw, vhd->vhdx. Reports wall time, ratio viridian/qemu-img, and peak RSS.
# Both tools run with their default target cache mode (unsafe: no fsync at the end).
# Usage: bench/convert/run.sh [WORKDIR]   (needs ~6 GiB free in WORKDIR; default a temp dir)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p viridian
V="$PWD/target/release/viridian"
W="${1:-$(mktemp -d /var/tmp/viridian-bench.XXXXXX)}"
mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
SIZE_MIB=${SIZE_MIB:-2048}

python3 - "$W/src.raw" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(mib << 20)
    rnd = os.urandom(1 << 20)
    for i in range(mib):
        # Every other MiB holds data (distinct per MiB so nothing dedups), the rest is a hole.
        if i % 2 == 0:
            f.seek(i << 20)
            f.write(rnd[i % 4096:] + rnd[: i % 4096])
PY

# Inputs for the non-raw cases, made once by qemu-img so both tools read the same file.
qemu-img convert -O vhdx "$W/src.raw" "$W/src.vhdx"
qemu-img convert -O vpc -o subformat=dynamic,force_size=on "$W/src.raw" "$W/src.vhd"
cat "$W"/src.* >/dev/null  # warm the page cache

run_case() { # name srcfile srcfmt dstfmt
    local name=$1 src=$2 sf=$3 df=$4
    local qf=$df; [ "$qf" = vhd ] && qf=vpc
    local sq=$sf; [ "$sq" = vhd ] && sq=vpc
    local best_v=999999 best_q=999999 rss_v=0 rss_q=0
    for i in 1 2 3; do
        rm -f "$W/out.v" "$W/out.q"
        sync # let neither run pay for the other's writeback
        local t0 t1
        t0=$(date +%s%N)
        /usr/bin/time -f '%M' -o "$W/rss.v" "$V" convert -f "$sf" -O "$df" "$src" "$W/out.v"
        t1=$(date +%s%N)
        local tv=$(( (t1 - t0) / 1000000 ))
        sync
        t0=$(date +%s%N)
        /usr/bin/time -f '%M' -o "$W/rss.q" qemu-img convert -f "$sq" -O "$qf" "$src" "$W/out.q"
        t1=$(date +%s%N)
        local tq=$(( (t1 - t0) / 1000000 ))
        [ $tv -lt $best_v ] && best_v=$tv
        [ $tq -lt $best_q ] && best_q=$tq
        rss_v=$(cat "$W/rss.v"); rss_q=$(cat "$W/rss.q")
    done
    qemu-img compare -f "$qf" -F "$qf" "$W/out.v" "$W/out.q" >/dev/null
    python3 -c "print(f'$name: viridian {$best_v} ms (peak RSS {$rss_v//1024} MiB), qemu-img {$best_q} ms (peak RSS {$rss_q//1024} MiB), ratio {$best_v/$best_q:.2f}')"
}

echo "source: ${SIZE_MIB} MiB raw, half data; best of 3 runs each"
run_case "raw->vhdx" "$W/src.raw" raw vhdx
run_case "vhdx->raw" "$W/src.vhdx" vhdx raw
run_case "vhd->vhdx" "$W/src.vhd" vhd vhdx
