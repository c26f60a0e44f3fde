#!/usr/bin/env bash
# NBD server benchmark: Viridian's nbd crate (nbd/examples/serve_raw) beside qemu-nbd and (for raw
# exports) nbdkit's file plugin, serving the same 2 GiB sparse raw image (half of it random data)
# on Unix sockets, in one run. bench/setup.sh installs the peers, fio and nbdcopy.
#
#   1. nbdcopy of the whole export to null: (extents on, so holes are skipped)
#   2. fio 4 KiB random reads through fio's nbd ioengine (when fio has it)
#
# Each measurement runs ROUNDS times, alternating servers; the best and the median round are
# reported (on a shared machine the best is the least disturbed). Server CPU seconds per round
# are printed too: they are far less noisy than wall time when other jobs compete for the CPUs.
#
# FORMAT=vhdx serves a dynamic VHDX (1 MiB blocks) made from that image instead: `viridian serve`
# beside `qemu-nbd -f vhdx`.
#
# Usage: bench/nbd/run.sh [workdir]      env: ROUNDS=3 FIO_RUNTIME=8 SIZE_MIB=2048 FORMAT=raw|vhdx
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../common.sh
. "$ROOT/bench/common.sh"
bash "$ROOT/bench/setup.sh"
WORK=${1:-$(mktemp -d /tmp/nbd-bench.XXXXXX)}
mkdir -p "$WORK"
ROUNDS=${ROUNDS:-3}
FIO_RUNTIME=${FIO_RUNTIME:-8}
SIZE_MIB=${SIZE_MIB:-2048}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-nbd}

HAVE_FIO=0
if fio --enghelp 2>/dev/null | grep -qw nbd; then HAVE_FIO=1; fi

echo "== building serve_raw (release)"
(cd "$ROOT" && cargo build --release -q -p nbd --example serve_raw)
SERVE_RAW=$CARGO_TARGET_DIR/release/examples/serve_raw

IMG=$WORK/bench.raw
bench_image "$IMG" "$SIZE_MIB"
FORMAT=${FORMAT:-raw}
if [ "$FORMAT" = vhdx ]; then
    (cd "$ROOT" && cargo build --release -q -p viridian)
    VIRIDIAN=$CARGO_TARGET_DIR/release/viridian
    VIMG=$WORK/bench.vhdx
    rm -f "$VIMG"
    "$VIRIDIAN" convert -q -O vhdx "$IMG" "$VIMG"
    IMG=$VIMG
fi
# Warm the page cache so both servers read from memory.
cat "$IMG" >/dev/null

VSOCK=$WORK/viridian.sock
QSOCK=$WORK/qemu.sock
KSOCK=$WORK/nbdkit.sock
rm -f "$VSOCK" "$QSOCK" "$KSOCK"
if [ "$FORMAT" = vhdx ]; then
    "$VIRIDIAN" serve --socket "$VSOCK" "$IMG" 2>"$WORK/viridian.log" &
else
    "$SERVE_RAW" --unix "$VSOCK" "$IMG" 2>"$WORK/viridian.log" &
fi
VPID=$!
# qemu-nbd at its best for this job: persistent, read-only, 8 connections allowed (which also
# makes it advertise multi-conn), page cache, thread pool AIO.
qemu-nbd -r -t -f "$FORMAT" -e 8 --cache=writeback --aio=threads -k "$QSOCK" "$IMG" 2>"$WORK/qemu.log" &
QPID=$!
# nbdkit's file plugin: the plainest NBD server of a file there is (raw exports only), read-only,
# its default thread model (parallel), foreground.
KPID=
if [ "$FORMAT" = raw ]; then
    nbdkit -r -f -U "$KSOCK" file "$IMG" 2>"$WORK/nbdkit.log" &
    KPID=$!
fi
trap 'kill $VPID $QPID $KPID 2>/dev/null || true' EXIT
for s in "$VSOCK" "$QSOCK" ${KPID:+"$KSOCK"}; do
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
done
VURI="nbd+unix:///?socket=$VSOCK"
QURI="nbd+unix:///?socket=$QSOCK"
nbdinfo "$VURI" | grep -E 'can_multi_conn|export-size:' | sed 's/^/  viridian: /' || true
nbdinfo "$QURI" | grep -E 'can_multi_conn|export-size:' | sed 's/^/  qemu-nbd: /' || true
KURI="nbd+unix:///?socket=$KSOCK"
[ -n "$KPID" ] && { nbdinfo "$KURI" | grep -E 'can_multi_conn|export-size:' | sed 's/^/  nbdkit:   /' || true; }


TICK=$(getconf CLK_TCK)
cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; } # user+system ticks of a process
cpu_s() { awk -v a="$1" -v b="$2" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }'; }

copy_once() { # uri pid -> "seconds server-cpu-seconds"
    local t0 t1 c0 c1
    c0=$(cpu_of "$2"); t0=$(secs); nbdcopy "$1" null: ; t1=$(secs); c1=$(cpu_of "$2")
    python3 -c "print(f'{$t1-$t0:.3f} {($c1-$c0)/$TICK:.2f}')"
}

best() { sort -g | head -1; }
bestmax() { sort -g | tail -1; }

secs() { date +%s.%N; }
echo "== nbdcopy $SIZE_MIB MiB export to null: ($ROUNDS rounds)"
VC=(); QC=(); KC=()
for r in $(seq "$ROUNDS"); do
    read -r vt vcpu < <(copy_once "$VURI" "$VPID"); read -r qt qcpu < <(copy_once "$QURI" "$QPID")
    VC+=("$vt"); QC+=("$qt")
    line="  round $r: viridian $vt s (server cpu $vcpu s), qemu-nbd $qt s (server cpu $qcpu s)"
    if [ -n "$KPID" ]; then
        read -r kt kcpu < <(copy_once "$KURI" "$KPID"); KC+=("$kt")
        line="$line, nbdkit $kt s (server cpu $kcpu s)"
    fi
    echo "$line"
done
VCB=$(printf '%s\n' "${VC[@]}" | best); QCB=$(printf '%s\n' "${QC[@]}" | best)
KCB=; KCM=
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
VCM=$(printf '%s\n' "${VC[@]}" | median); QCM=$(printf '%s\n' "${QC[@]}" | median)
if [ -n "$KPID" ]; then
    KCB=$(printf '%s\n' "${KC[@]}" | best); KCM=$(printf '%s\n' "${KC[@]}" | median)
fi

fio_once() { # uri -> IOPS
    fio --name=randread --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 \
        --numjobs=2 --size="${SIZE_MIB}M" --time_based --runtime="$FIO_RUNTIME" \
        --group_reporting --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):]); print(round(j["jobs"][0]["read"]["iops"]))'
}

if [ "$HAVE_FIO" = 1 ]; then
    echo "== fio nbd engine, 4 KiB random reads, 2 jobs x iodepth 32, ${FIO_RUNTIME}s ($ROUNDS rounds)"
    VF=(); QF=(); KF=()
    for r in $(seq "$ROUNDS"); do
        c0=$(cpu_of "$VPID"); VF+=("$(fio_once "$VURI")"); c1=$(cpu_of "$VPID")
        d0=$(cpu_of "$QPID"); QF+=("$(fio_once "$QURI")"); d1=$(cpu_of "$QPID")
        line="  round $r: viridian ${VF[-1]} IOPS (server cpu $(cpu_s "$c0" "$c1") s), qemu-nbd ${QF[-1]} IOPS (server cpu $(cpu_s "$d0" "$d1") s)"
        if [ -n "$KPID" ]; then
            e0=$(cpu_of "$KPID"); KF+=("$(fio_once "$KURI")"); e1=$(cpu_of "$KPID")
            line="$line, nbdkit ${KF[-1]} IOPS (server cpu $(cpu_s "$e0" "$e1") s)"
        fi
        echo "$line"
    done
    VFB=$(printf '%s\n' "${VF[@]}" | bestmax); QFB=$(printf '%s\n' "${QF[@]}" | bestmax)
    VFM=$(printf '%s\n' "${VF[@]}" | median); QFM=$(printf '%s\n' "${QF[@]}" | median)
    if [ -n "$KPID" ]; then
        KFB=$(printf '%s\n' "${KF[@]}" | bestmax); KFM=$(printf '%s\n' "${KF[@]}" | median)
    fi
else
    echo "== fio has no nbd engine: FAILED to measure random reads" >&2
    exit 1
fi

echo
echo "== results (best round; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
python3 - "$SIZE_MIB" "$VCB" "$QCB" "${VFB:-}" "${QFB:-}" "$VCM" "$QCM" "${VFM:-}" "${QFM:-}" \
    "${KCB:-}" "${KCM:-}" "${KFB:-}" "${KFM:-}" <<'PY'
import sys
a = sys.argv
mib = int(a[1])
# Ratios are viridian's speed over the peer's: above 1 is faster.
for label, vc, qc, kc in (("best  ", a[2], a[3], a[10]), ("median", a[6], a[7], a[11])):
    vc, qc = float(vc), float(qc)
    line = f"nbdcopy {label} viridian {mib/vc:6.0f} MiB/s ({vc:.3f} s)  qemu-nbd {mib/qc:6.0f} MiB/s ({qc:.3f} s)  ratio {qc/vc:.2f}"
    if kc:
        kc = float(kc)
        line += f"  nbdkit {mib/kc:6.0f} MiB/s ({kc:.3f} s)  ratio {kc/vc:.2f}"
    print(line)
if a[4]:
    for label, vf, qf, kf in (("best  ", a[4], a[5], a[12]), ("median", a[8], a[9], a[13])):
        vf, qf = int(vf), int(qf)
        line = f"fio 4k  {label} viridian {vf:6d} IOPS              qemu-nbd {qf:6d} IOPS              ratio {vf/qf:.2f}"
        if kf:
            kf = int(kf)
            line += f"  nbdkit {kf:6d} IOPS  ratio {vf/kf:.2f}"
        print(line)
PY
