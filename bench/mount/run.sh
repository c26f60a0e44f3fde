#!/usr/bin/env bash
# FUSE mount benchmark: Viridian's mount crate (mount/examples/mount_raw) beside
# `qemu-storage-daemon --export type=fuse`, both exposing the same 2 GiB sparse-ish raw image
# (every other 4 MiB extent random data, the rest holes), in one run.
#
#   seq-1M      fio sequential reads, 1 MiB blocks, O_DIRECT, 1 job (whole file)
#   seq-1M-buf  the same through the page cache (buffered; fio invalidates the file's cache first)
#   rand-4k     fio 4 KiB random reads, O_DIRECT, 4 jobs (the FUSE request path, in parallel)
#   rand-4k-qd1 the same with 1 job
#
# The backing image is read once beforehand so that both servers read it from the host page
# cache: the numbers compare the FUSE request paths, not the host disk. Each measurement runs
# ROUNDS times, alternating servers; the best round counts (the machine is shared). Prints a
# table and the viridian/qemu ratios. Without fio, falls back to dd for the sequential test.
#
# Usage: bench/mount/run.sh [workdir]
#   env: ROUNDS=3 FIO_RUNTIME=8 SIZE_MIB=2048 THREADS=4 (viridian request threads)
#        FORMAT=vhdx: both serve a dynamic VHDX (1 MiB blocks) made from the raw image, ours
#        through `viridian mount --foreground`, qemu's through its vhdx driver.
# Needs root (FUSE mounts, drop of the FUSE page cache); bench/setup.sh installs the peers
# (qemu-storage-daemon from qemu-utils in bookworm-backports, fio).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../common.sh
. "$ROOT/bench/common.sh"
bash "$ROOT/bench/setup.sh"
WORK=${1:-$(mktemp -d /tmp/mount-bench.XXXXXX)}
mkdir -p "$WORK"
ROUNDS=${ROUNDS:-3}
FIO_RUNTIME=${FIO_RUNTIME:-8}
SIZE_MIB=${SIZE_MIB:-2048}
THREADS=${THREADS:-4}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-mount}

[ -e /dev/fuse ] || { echo "missing /dev/fuse"; exit 1; }
HAVE_FIO=0
command -v fio >/dev/null && HAVE_FIO=1

echo "== building mount_raw (release)"
(cd "$ROOT" && cargo build --release -q -p mount --example mount_raw)
MOUNT_RAW=$CARGO_TARGET_DIR/release/examples/mount_raw

IMG=$WORK/bench.raw
bench_image "$IMG" "$SIZE_MIB"
FORMAT=${FORMAT:-raw}
if [ "$FORMAT" = vhdx ]; then
    (cd "$ROOT" && cargo build --release -q -p viridian)
    VIRIDIAN=$CARGO_TARGET_DIR/release/viridian
    rm -f "$WORK/bench.vhdx"
    "$VIRIDIAN" convert -q -O vhdx "$IMG" "$WORK/bench.vhdx"
    IMG=$WORK/bench.vhdx
fi
cat "$IMG" >/dev/null # warm the host page cache for both servers

MP_V=$WORK/mnt-viridian
MP_Q=$WORK/qemu-export
mkdir -p "$MP_V"
: >"$MP_Q"
VPID=""
QPID=""
cleanup() {
    [ -n "$VPID" ] && kill -TERM "$VPID" 2>/dev/null && wait "$VPID" 2>/dev/null || true
    [ -n "$QPID" ] && kill -TERM "$QPID" 2>/dev/null && wait "$QPID" 2>/dev/null || true
    for m in "$MP_V" "$MP_Q"; do
        if grep -q " $m " /proc/self/mountinfo; then fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" || true; fi
    done
}
trap cleanup EXIT

wait_mounted() { # path
    for _ in $(seq 200); do
        grep -q " $1 " /proc/self/mountinfo && return 0
        sleep 0.05
    done
    echo "$1 did not get mounted"
    exit 1
}

echo "== mounting: viridian on $MP_V ($THREADS threads), qemu-storage-daemon on $MP_Q"
if [ "$FORMAT" = vhdx ]; then
    "$VIRIDIAN" mount --foreground --threads "$THREADS" "$IMG" "$MP_V" &
else
    "$MOUNT_RAW" "$IMG" "$MP_V" --threads "$THREADS" &
fi
VPID=$!
qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename="$IMG",read-only=on \
    --blockdev driver="$FORMAT",node-name=raw0,file=file0,read-only=on \
    --export type=fuse,id=exp0,node-name=raw0,mountpoint="$MP_Q",writable=off &
QPID=$!
wait_mounted "$MP_V"
wait_mounted "$MP_Q"
F_V=$MP_V/disk
F_Q=$MP_Q
cmp -n $((64 << 20)) "$F_V" "$F_Q" || { echo "the two exports differ"; exit 1; }

# fio_bw NAME FILE RW BS JOBS DIRECT -> prints "MB/s IOPS"
fio_bw() {
    local name=$1 file=$2 rw=$3 bs=$4 jobs=$5 direct=$6 extra=()
    if [ "$rw" = read ]; then extra=(--size="${SIZE_MIB}M"); else extra=(--time_based --runtime="$FIO_RUNTIME"); fi
    fio --name="$name" --filename="$file" --rw="$rw" --bs="$bs" --direct="$direct" \
        --ioengine=psync --numjobs="$jobs" --group_reporting --invalidate=1 \
        --output-format=json "${extra[@]}" 2>/dev/null |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print("%.1f %.0f" % (r["bw_bytes"]/1e6, r["iops"]))'
}

dd_bw() { # FILE -> "MB/s IOPS" (1 MiB reads)
    local s e
    s=$(date +%s.%N)
    dd if="$1" of=/dev/null bs=1M iflag=direct status=none
    e=$(date +%s.%N)
    python3 -c "import sys; t=$e-$s; print('%.1f %.0f' % ($SIZE_MIB*1048576/t/1e6, $SIZE_MIB/t))"
}

TESTS=(seq-1M seq-1M-buf rand-4k rand-4k-qd1)
declare -A BEST_BW BEST_IOPS
measure() { # TEST FILE
    case "$1" in
    seq-1M) if [ $HAVE_FIO = 1 ]; then fio_bw "$1" "$2" read 1M 1 1; else dd_bw "$2"; fi ;;
    seq-1M-buf) fio_bw "$1" "$2" read 1M 1 0 ;;
    rand-4k) fio_bw "$1" "$2" randread 4k 4 1 ;;
    rand-4k-qd1) fio_bw "$1" "$2" randread 4k 1 1 ;;
    esac
}

for r in $(seq "$ROUNDS"); do
    for t in "${TESTS[@]}"; do
        [ $HAVE_FIO = 0 ] && [ "$t" != seq-1M ] && continue
        for who in viridian qemu; do
            if [ $who = viridian ]; then f=$F_V; else f=$F_Q; fi
            read -r bw iops < <(measure "$t" "$f")
            echo "round $r  $t  $who  ${bw} MB/s  ${iops} IOPS"
            k="$t/$who"
            if [ -z "${BEST_BW[$k]:-}" ] || python3 -c "import sys; sys.exit(0 if $bw > ${BEST_BW[$k]} else 1)"; then
                BEST_BW[$k]=$bw
                BEST_IOPS[$k]=$iops
            fi
        done
    done
done

echo
echo "== best of $ROUNDS rounds ($(nproc) CPUs, image ${SIZE_MIB} MiB, viridian threads $THREADS)"
printf '%-12s %14s %14s %14s %14s %8s\n' test "viridian MB/s" "qemu MB/s" "viridian IOPS" "qemu IOPS" ratio
for t in "${TESTS[@]}"; do
    [ -z "${BEST_BW[$t/viridian]:-}" ] && continue
    ratio=$(python3 -c "print('%.2f' % (${BEST_BW[$t/viridian]} / max(${BEST_BW[$t/qemu]}, 1e-9)))")
    printf '%-12s %14s %14s %14s %14s %8s\n' "$t" "${BEST_BW[$t/viridian]}" "${BEST_BW[$t/qemu]}" \
        "${BEST_IOPS[$t/viridian]}" "${BEST_IOPS[$t/qemu]}" "$ratio"
done
