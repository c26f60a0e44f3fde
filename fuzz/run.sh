#!/bin/sh
# Soak every fuzz target for a few minutes (not CI). Usage:
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      (default 180 s, all targets)
#
# With cargo-fuzz installed it runs libFuzzer (coverage-guided) on the stable toolchain through
# RUSTC_BOOTSTRAP=1 and --sanitizer none (no nightly exists here); set VIRIDIAN_FUZZ_DRIVER=soak
# (or lack cargo-fuzz) to use the libFuzzer-free mutation loop `soak` instead. Seeds are
# generated, never committed: `soak --write-seeds` writes them into fuzz/corpus/TARGET
# (ignored by git), including the dfvfs sample VHDs when /work/shared/testdata/dfvfs exists.
# Findings land in fuzz/artifacts/TARGET/; replay one with
#
#   cargo run --release --bin replay -- TARGET fuzz/artifacts/TARGET/crash-...
set -eu
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-180}
[ $# -gt 0 ] && shift
targets=${*:-"vhd_open vhdx_open chain_open metadata nbd_server"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}
cd "$here"
cargo build --release --bins
bin=$CARGO_TARGET_DIR/release
driver=${VIRIDIAN_FUZZ_DRIVER:-}
if [ -z "$driver" ]; then
    if command -v cargo-fuzz >/dev/null 2>&1; then driver=libfuzzer; else driver=soak; fi
fi
status=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    "$bin/soak" --write-seeds "$t" "corpus/$t"
    echo "== $t ($driver, ${secs}s)"
    if [ "$driver" = libfuzzer ]; then
        # VHDX seeds are ~4 MiB: allow inputs that large.
        RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --features libfuzzer "$t" "corpus/$t" -- \
            -max_total_time="$secs" -max_len=8388608 -rss_limit_mb=2048 -timeout=20 \
            -artifact_prefix="artifacts/$t/" -print_final_stats=1 || status=1
    else
        "$bin/soak" "$t" --seconds "$secs" --corpus "corpus/$t" --out "artifacts/$t" || status=1
    fi
done
exit $status
