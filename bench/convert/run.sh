#!/usr/bin/env bash
# Convert benchmark: viridian beside qemu-img and beside the copy limit, every direction.
#
# Source: a raw file (SIZE_MIB, default 1024), half random data (in 1 MiB pieces, distinct per
# MiB so nothing dedups) and half holes; qemu-img makes the VHD/VHDX inputs from it once, so
# both tools read the same files. The page cache is warm (every input is read once first).
#
# Directions: raw<->VHD and raw<->VHDX (dynamic and fixed on the image side), VHD<->VHDX
# (dynamic), and the copy-offloading variants (-C) VHDX->raw and raw->raw.
#
# Each direction runs RUNS times (default 5); in each round the three commands run in a rotated
# order (so a load change does not always hit the same one) with `sync` before each, so no run
# pays for another's writeback. Reported: the median wall time of viridian, of qemu-img, and of
# `cp --sparse=always` of the raw source (the copy limit: the same data bytes read, scanned for
# zeros and written, by a single plain-file copier), the ratios viridian/qemu-img and
# viridian/cp, the median CPU time (user+system) of each, and viridian's peak RSS. Both
# converters run with their default target cache mode (unsafe: no fsync at the end).
#
# Every output is checked: `qemu-img compare` and `viridian compare` against the raw source.
#
# Page frames: on a VM whose balloon reports free pages to the host (free page reporting), page
# frames freed more than ~2 s earlier are handed back to the host and refaulted on their next use;
# writing 512 MiB into such frames took cp 0.8-1.1 s instead of 0.2-0.3 s here. Which command
# of a round got the cold frames depended on the timing of the one before, so before every
# timed command a helper touches and frees WARM_MIB (default SIZE_MIB) of memory: each of
# the three then writes into frames the host has backed, as on a machine without a balloon
# (WARM_MIB=0 turns it off).
#
# Usage: bench/convert/run.sh [WORKDIR]   (needs ~5x SIZE_MIB free in WORKDIR; default a temp
#        dir under /var/tmp); env: SIZE_MIB, RUNS, CASES (a grep -E filter on direction names),
#        WARM_MIB, VIRIDIAN (a viridian binary to measure instead of this tree's release build).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash bench/setup.sh
if [ -z "${VIRIDIAN:-}" ]; then
    cargo build --release -q -p viridian
fi
V="${VIRIDIAN:-$PWD/target/release/viridian}"
W="${1:-$(mktemp -d /var/tmp/viridian-bench.XXXXXX)}"
mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-5}
CASES=${CASES:-.}
WARM_MIB=${WARM_MIB:-$SIZE_MIB}

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

qemu-img convert -f raw -O vhdx "$W/src.raw" "$W/src.vhdx"
qemu-img convert -f raw -O vhdx -o subformat=fixed "$W/src.raw" "$W/src-fixed.vhdx"
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$W/src.raw" "$W/src.vhd"
qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$W/src.raw" "$W/src-fixed.vhd"
cat "$W"/src* >/dev/null # warm the page cache

# One timed command: appends "wall_ms cpu_ms peak_rss_kib" to the file $1.
timed() {
    local log=$1
    shift
    sync
    # Backed page frames for the command (see the header); freed right before it starts.
    if [ "$WARM_MIB" -gt 0 ]; then python3 -c "b = b'\x01' * ($WARM_MIB << 20)"; fi
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -f '%U %S %M' -o "$W/time.out" "$@" >/dev/null 2>"$W/cmd.err" || {
        echo "FAILED: $* ($(head -1 "$W/cmd.err"))" >&2
        return 1
    }
    t1=$(date +%s%N)
    read -r u s m <"$W/time.out"
    python3 -c "print(($t1 - $t0) // 1000000, round(($u + $s) * 1000), $m)" >>"$log"
}

median() { # column file
    python3 -c "
import statistics, sys
v = [float(l.split()[$1]) for l in open('$2') if l.strip()]
print(int(statistics.median(v)))"
}

# name src srcfmt(ours) srcfmt(qemu) dstfmt(ours) dstfmt(qemu) our-opts qemu-opts [extra]
run_case() {
    local name=$1 src=$2 sf=$3 sq=$4 df=$5 dq=$6 vo=$7 qo=$8 extra=${9:-}
    echo "$name" | grep -Eq -- "$CASES" || return 0
    rm -f "$W"/log.*
    # shellcheck disable=SC2206 # $extra is empty or one flag
    local vargs=(convert $extra -f "$sf" -O "$df") qargs=(convert $extra -f "$sq" -O "$dq")
    [ -n "$vo" ] && vargs+=(-o "$vo")
    [ -n "$qo" ] && qargs+=(-o "$qo")
    for i in $(seq 1 "$RUNS"); do
        for k in 0 1 2; do
            rm -f "$W/out.v" "$W/out.q" "$W/out.c"
            case $(((i + k) % 3)) in
            0) timed "$W/log.v" "$V" "${vargs[@]}" "$src" "$W/out.v" ;;
            1) timed "$W/log.q" qemu-img "${qargs[@]}" "$src" "$W/out.q" ;;
            2) timed "$W/log.c" cp --sparse=always "$W/src.raw" "$W/out.c" ;;
            esac
        done
    done
    # Fresh outputs for the checks (the timing loop removes each before the next command).
    rm -f "$W/out.v" "$W/out.q"
    "$V" "${vargs[@]}" "$src" "$W/out.v"
    qemu-img "${qargs[@]}" "$src" "$W/out.q"
    qemu-img compare -f raw -F "$dq" "$W/src.raw" "$W/out.v" >/dev/null ||
        { echo "$name: qemu-img compare: output differs from the source" >&2; exit 1; }
    "$V" compare -f raw -F "$df" "$W/src.raw" "$W/out.v" >/dev/null ||
        { echo "$name: viridian compare: output differs from the source" >&2; exit 1; }
    local tv tq tc cv cq cc rss
    tv=$(median 0 "$W/log.v") tq=$(median 0 "$W/log.q") tc=$(median 0 "$W/log.c")
    cv=$(median 1 "$W/log.v") cq=$(median 1 "$W/log.q") cc=$(median 1 "$W/log.c")
    rss=$(median 2 "$W/log.v")
    python3 -c "print(f'| {\"$name\":<16} | {$tv:>6} | {$tq:>6} | {$tc:>6} | {$tv/$tq:>5.2f} | {$tv/$tc:>5.2f} | {$cv:>5} / {$cq:>5} / {$cc:>5} | {$rss//1024:>4} |')"
}

echo "source: ${SIZE_MIB} MiB raw, half data; median of $RUNS runs; $(nproc) CPUs;" \
    "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| direction        | ours ms | qemu ms | cp ms | /qemu | /cp  | CPU ms ours / qemu / cp | RSS MiB |"
echo "|------------------|--------:|--------:|------:|------:|-----:|-------------------------|--------:|"
D=dynamic F=fixed
run_case "raw->vhd" "$W/src.raw" raw raw vhd vpc "" "subformat=$D,force_size=on"
run_case "raw->vhd fixed" "$W/src.raw" raw raw vhd vpc "subformat=$F" "subformat=$F,force_size=on"
run_case "raw->vhdx" "$W/src.raw" raw raw vhdx vhdx "" ""
run_case "raw->vhdx fixed" "$W/src.raw" raw raw vhdx vhdx "subformat=$F" "subformat=$F"
run_case "vhd->raw" "$W/src.vhd" vhd vpc raw raw "" ""
run_case "vhd fixed->raw" "$W/src-fixed.vhd" vhd vpc raw raw "" ""
run_case "vhdx->raw" "$W/src.vhdx" vhdx vhdx raw raw "" ""
run_case "vhdx fixed->raw" "$W/src-fixed.vhdx" vhdx vhdx raw raw "" ""
run_case "vhd->vhdx" "$W/src.vhd" vhd vpc vhdx vhdx "" ""
run_case "vhdx->vhd" "$W/src.vhdx" vhdx vhdx vhd vpc "" "subformat=$D,force_size=on"
run_case "vhdx->raw -C" "$W/src.vhdx" vhdx vhdx raw raw "" "" -C
run_case "raw->raw -C" "$W/src.raw" raw raw raw raw "" "" -C
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
