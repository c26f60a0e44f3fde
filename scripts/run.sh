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
# Shell completions and man pages, generated from the same definitions as --help, installed
# for this user (bash-completion, zsh with ~/.local/share/zsh/site-functions in fpath, fish, man).
share="${XDG_DATA_HOME:-$HOME/.local/share}"
fish_dir="${XDG_CONFIG_HOME:-$HOME/.config}/fish/completions"
mkdir -p "$share/bash-completion/completions" "$share/zsh/site-functions" "$fish_dir" \
    "$share/man/man1"
"$V" completions bash >"$share/bash-completion/completions/viridian"
"$V" completions zsh >"$share/zsh/site-functions/_viridian"
"$V" completions fish >"$fish_dir/viridian.fish"
"$V" man --dir "$share/man/man1"
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
