#!/usr/bin/env bash
# Sets the machine up, builds `viridian` (release) and runs it.
#   scripts/run.sh ARGS...   runs `viridian ARGS...` (e.g. `scripts/run.sh info disk.vhdx`)
#   scripts/run.sh           runs a short demo in a temporary folder: create a VHDX, write,
#                            snapshot, map, convert to VHD and raw, check and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p viridian
V="$PWD/target/release/viridian"
if [ $# -gt 0 ]; then
    exec "$V" "$@"
fi
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
cd "$d"
set -x
"$V" create -f vhdx base.vhdx 1G
"$V" io -c "write -P 0xab 0 4M" -c "write -P 0xcd 512M 1M" base.vhdx
"$V" snapshot -c child.vhdx base.vhdx
"$V" io -c "write -P 0xef 1M 64k" child.vhdx
"$V" info --backing-chain child.vhdx
"$V" map child.vhdx
"$V" convert -O vpc child.vhdx flat.vhd
"$V" convert -O raw flat.vhd flat.raw
"$V" check flat.vhd
"$V" compare child.vhdx flat.raw
qemu-img compare -f vpc -F raw flat.vhd flat.raw
