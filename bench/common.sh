# Shared pieces of the benchmark scripts (sourced, not run).

# bench_image PATH MIB: a raw image of MIB MiB where every other 4 MiB extent holds random
# data and the rest are holes (made once; an existing file is reused).
bench_image() {
    local path=$1 mib=$2
    [ -f "$path" ] && return 0
    echo "== creating $path: ${mib} MiB, every other 4 MiB extent random data"
    python3 - "$path" "$mib" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
ext = 4 << 20
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for off in range(0, mib << 20, 2 * ext):
        f.seek(off)
        f.write(os.urandom(ext))
PY
}
