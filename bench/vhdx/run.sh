#!/bin/sh
# VHDX benchmarks: our logged allocating writes vs qemu-img bench, and sequential reads vs raw.
#
#   bench/vhdx/run.sh [COUNT]      (default 2048 writes; takes well under 2 minutes)
#
# Workload: COUNT 4 KiB writes, each to a different 1 MiB block (so each one allocates a block
# and changes the BAT), a flush every 64 writes, on a dynamic VHDX with 1 MiB blocks. qemu-img
# bench cannot write in random order, so qemu gets them in ascending order (the easier case for
# it) and we get a random permutation. Both run on the same file system with cache=writeback
# semantics (flush = fdatasync).
set -eu
COUNT=${1:-2048}
STEP=1048576
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-vhdx}
WORK=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/vhdx-bench.XXXXXX")}
trap 'rm -rf "$WORK"' EXIT

cargo build -q --release -p vhdx --example vhdx_bench --manifest-path "$ROOT/Cargo.toml"
BIN=$CARGO_TARGET_DIR/release/examples/vhdx_bench

SIZE=$((COUNT * STEP))
qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M "$WORK/q.vhdx" "$SIZE"
# qemu-img bench reports its own run time ("Run completed in N seconds.").
QOUT=$(qemu-img bench -f vhdx -w -c "$COUNT" -d 1 -s 4096 -S "$STEP" --flush-interval=64 -t writeback "$WORK/q.vhdx")
QSECS=$(echo "$QOUT" | sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p')
QRATE=$(echo "$COUNT / $QSECS" | bc -l)
printf '{"bench":"qemu-img-bench-write","writes":%d,"seconds":%.3f,"writes_per_s":%.0f}\n' "$COUNT" "$QSECS" "$QRATE"

OURS=$("$BIN" write "$WORK/v.vhdx" "$COUNT" "$STEP" 64)
echo "$OURS"
ORATE=$(echo "$OURS" | sed 's/.*"writes_per_s":\([0-9.]*\).*/\1/')
printf '{"bench":"write-ratio","viridian_over_qemu":%.2f}\n' "$(echo "$ORATE / $QRATE" | bc -l)"
qemu-img check -q "$WORK/v.vhdx" && echo '{"qemu-img-check":"clean"}'

"$BIN" read "$WORK/r.vhdx" "$WORK/r.raw" 512
