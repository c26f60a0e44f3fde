#!/usr/bin/env bash
# Convert benchmark: viridian vs qemu-img, side by side in one run, page cache warm.
#
# Source: a 2 GiB raw file, half random data (in 1 MiB pieces) and half holes.
# Cases: raw->vhdx, vhdx->raw, vhd->vhdx, and vhdx->raw / raw->raw with -C (copy offloading).
# Reports wall time, the ratio viridian/qemu-img, the ratio viridian/cp (the copy limit: `cp
# --sparse=always` of the raw source, the same data bytes read, zero-scanned and written, timed in
# the same rounds) and peak RSS. Both tools run with their default target cache mode (unsafe: no
# fsync at the end). bench/setup.sh installs qemu-img and GNU time.
# Usage: bench/convert/run.sh [WORKDIR]   (needs ~6 GiB free in WORKDIR; default a temp dir)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash bench/setup.sh
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

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

run_case() { # name srcfile srcfmt dstfmt [extra convert flags, e.g. -C]
    local name=$1 src=$2 sf=$3 df=$4 extra=${5:-}
    local qf=$df; [ "$qf" = vhd ] && qf=vpc
    local sq=$sf; [ "$sq" = vhd ] && sq=vpc
    local best_v=999999 best_q=999999 best_c=999999 rss_v=0 rss_q=0 q_ok=1
    for i in 1 2 3; do
        rm -f "$W/out.v" "$W/out.q" "$W/out.c"
        sync # let no run pay for another's writeback
        local t0 tv tq tc
        t0=$(date +%s%N)
        # shellcheck disable=SC2086
        /usr/bin/time -f '%M' -o "$W/rss.v" "$V" convert $extra -f "$sf" -O "$df" "$src" "$W/out.v"
        tv=$(ms_since "$t0")
        sync
        t0=$(date +%s%N)
        # shellcheck disable=SC2086
        if /usr/bin/time -f '%M' -o "$W/rss.q" qemu-img convert $extra -f "$sq" -O "$qf" "$src" "$W/out.q" 2>"$W/q.err"; then
            tq=$(ms_since "$t0")
            [ $tq -lt $best_q ] && best_q=$tq
            rss_q=$(cat "$W/rss.q")
        else
            q_ok=0
        fi
        sync
        t0=$(date +%s%N)
        cp --sparse=always "$W/src.raw" "$W/out.c"
        tc=$(ms_since "$t0")
        [ $tv -lt $best_v ] && best_v=$tv
        [ $tc -lt $best_c ] && best_c=$tc
        rss_v=$(cat "$W/rss.v")
    done
    if [ $q_ok = 1 ]; then
        qemu-img compare -f "$qf" -F "$qf" "$W/out.v" "$W/out.q" >/dev/null
        python3 -c "print(f'$name: viridian {$best_v} ms (peak RSS {$rss_v//1024} MiB), qemu-img {$best_q} ms (peak RSS {$rss_q//1024} MiB), cp {$best_c} ms; ratio to qemu-img {$best_v/$best_q:.2f}, to cp {$best_v/$best_c:.2f}')"
    else
        qemu-img compare -f raw -F "$qf" "$W/src.raw" "$W/out.v" >/dev/null
        python3 -c "print(f'$name: viridian {$best_v} ms (peak RSS {$rss_v//1024} MiB), qemu-img failed ($(head -1 "$W/q.err")), cp {$best_c} ms; ratio to cp {$best_v/$best_c:.2f}')"
    fi
}

echo "source: ${SIZE_MIB} MiB raw, half data; best of 3 runs each; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
run_case "raw->vhdx" "$W/src.raw" raw vhdx
run_case "vhdx->raw" "$W/src.vhdx" vhdx raw
run_case "vhd->vhdx" "$W/src.vhd" vhd vhdx
run_case "vhdx->raw -C" "$W/src.vhdx" vhdx raw -C
run_case "raw->raw -C" "$W/src.raw" raw raw -C
