#!/usr/bin/env bash
# Scale benchmark: what an empty huge dynamic image costs, viridian beside qemu-img, in one run.
#
# For a dynamic VHDX of 1, 16 and 64 TiB (1 MiB blocks, both tools) and a 2 TiB dynamic VHD:
#   create       `create` of the empty image
#   info         `info` (open, read what is needed, print)
#   first write  open + one 1 MiB write at the middle of the disk + close (viridian io / qemu-io)
# Each prints wall time and peak RSS (GNU time -v), and the image's space on disk after create.
# Best of ROUNDS runs (default 3) for time; the RSS is the largest seen.
#
# Usage: bench/scale/run.sh [WORKDIR]      env: ROUNDS=3
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/bench/setup.sh"
(cd "$ROOT" && cargo build --release -q -p viridian)
V=${CARGO_TARGET_DIR:-$ROOT/target}/release/viridian
W=${1:-$(mktemp -d /var/tmp/viridian-scale.XXXXXX)}
mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
ROUNDS=${ROUNDS:-3}

# measure OUTFILE CMD... -> appends "ms rss_kib" (exits on failure)
measure() {
    local out=$1; shift
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -v -o "$W/time.txt" "$@" >/dev/null
    t1=$(date +%s%N)
    echo "$(( (t1 - t0) / 1000000 )) $(awk -F': ' '/Maximum resident set size/ {print $2}' "$W/time.txt")" >>"$out"
}
summary() { # file -> "best_ms max_rss_mib"
    sort -n "$1" | awk 'NR==1 {b=$1} {if ($2>m) m=$2} END {printf "%d %.1f", b, m/1024}'
}

row() { # label size viridian-format qemu-format qemu-create-options
    local label=$1 size=$2 vf=$3 qf=$4 qopts=$5
    local half=$(( $(numfmt --from=iec "$size") / 2 ))
    rm -f "$W"/*.m
    for _ in $(seq "$ROUNDS"); do
        rm -f "$W/v.$vf" "$W/q.$vf"
        measure "$W/vc.m" "$V" create -f "$vf" -o "$qopts" "$W/v.$vf" "$size"
        measure "$W/qc.m" qemu-img create -f "$qf" -o "$qopts" "$W/q.$vf" "$size"
        vdisk=$(du -k "$W/v.$vf" | cut -f1); qdisk=$(du -k "$W/q.$vf" | cut -f1)
        measure "$W/vi.m" "$V" info "$W/v.$vf"
        measure "$W/qi.m" qemu-img info -f "$qf" "$W/q.$vf"
        measure "$W/vw.m" "$V" io -f "$vf" -c "write -P 0x5a $half 1M" "$W/v.$vf"
        measure "$W/qw.m" qemu-io -f "$qf" -c "write -P 0x5a $half 1M" "$W/q.$vf"
    done
    # Each tool reads the other's write back (a whole-disk compare of 64 TiB takes too long).
    qemu-io -r -f "$qf" -c "read -P 0x5a $half 1M" "$W/v.$vf" | grep -q "^read 1048576/" ||
        { echo "qemu-io cannot read viridian's write back"; exit 1; }
    "$V" io -r -f "$vf" -c "read -P 0x5a $half 1M" "$W/q.$vf" >/dev/null ||
        { echo "viridian cannot read qemu-io's write back"; exit 1; }
    python3 - "$label" "$vdisk" "$qdisk" "$(summary "$W/vc.m")" "$(summary "$W/qc.m")" \
        "$(summary "$W/vi.m")" "$(summary "$W/qi.m")" "$(summary "$W/vw.m")" "$(summary "$W/qw.m")" <<'PY'
import sys
a = sys.argv
label, vdisk, qdisk = a[1], int(a[2]), int(a[3])
print(f"{label}: on disk after create viridian {vdisk/1024:.1f} MiB, qemu-img {qdisk/1024:.1f} MiB")
for name, v, q in (("create", a[4], a[5]), ("info", a[6], a[7]), ("first write", a[8], a[9])):
    vt, vr = v.split(); qt, qr = q.split()
    vt, qt = int(vt), int(qt)
    print(f"  {name:12s} viridian {vt:6d} ms {float(vr):7.1f} MiB RSS   qemu {qt:6d} ms {float(qr):7.1f} MiB RSS"
          f"   time ratio {vt/max(qt,1):.2f}")
PY
}

echo "best of $ROUNDS rounds; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
row "VHDX 1 TiB, 1 MiB blocks" 1T vhdx vhdx "block_size=1M"
row "VHDX 16 TiB, 1 MiB blocks" 16T vhdx vhdx "block_size=1M"
row "VHDX 64 TiB, 1 MiB blocks" 64T vhdx vhdx "block_size=1M"
row "VHD 2 TiB dynamic" 2040G vpc vpc "subformat=dynamic"
