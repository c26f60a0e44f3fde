#!/usr/bin/env python3
"""Runs a stress plan (see stress_model.rs write_plan) against a file (a FUSE-mounted disk):
one process per worker, all writing with O_DIRECT from a page-aligned mmap buffer (MODE
direct) or all with buffered pwrite (MODE buffered); Z0 is fallocate(ZERO_RANGE), Z1
fallocate(PUNCH_HOLE), F fsync. A barrier across all processes ends each round.

Usage: stress_fuse.py FILE PLAN_DIR WORKERS MODE
"""
import ctypes
import mmap
import multiprocessing
import os
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

path, plan_dir, workers, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
assert mode in ("direct", "buffered"), mode
ops = [[] for _ in range(workers)]
with open(f"{plan_dir}/plan.txt") as f:
    rounds = int(f.readline().split()[1])
    for line in f:
        r, w, op, off, ln = line.split()
        ops[int(w)].append((int(r), op, int(off), int(ln)))

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, off, ln):
    if libc.fallocate(fd, mode, off, ln) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate({mode:#x}, {off}, {ln}): {os.strerror(e)}")


def worker(w, barrier):
    try:
        direct = mode == "direct"
        flags = os.O_WRONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        with open(f"{plan_dir}/payload-{w}.bin", "rb") as f:
            data = f.read()
        aligned = mmap.mmap(-1, 2 << 20)  # page aligned, as O_DIRECT wants
        pos = 0
        mine = ops[w]
        i = 0
        for r in range(rounds):
            while i < len(mine) and mine[i][0] == r:
                _, op, off, ln = mine[i]
                i += 1
                if op == "W":
                    piece = data[pos:pos + ln]
                    pos += ln
                    if direct:
                        aligned[:ln] = piece
                        n = os.pwrite(fd, memoryview(aligned)[:ln], off)
                    else:
                        n = os.pwrite(fd, piece, off)
                    if n != ln:
                        raise OSError(f"short write {n} of {ln} at {off}")
                elif op == "Z0":
                    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, ln)
                elif op == "Z1":
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
                elif op == "F":
                    os.fsync(fd)
                else:
                    raise ValueError(f"unsupported op {op}")
            barrier.wait()
        os.fsync(fd)
        os.close(fd)
    except Exception as e:  # noqa: BLE001 - report, break the barrier, fail the run
        print(f"worker {w} ({mode}): {e!r}", file=sys.stderr)
        barrier.abort()
        sys.exit(1)


if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=worker, args=(w, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(0 if all(p.exitcode == 0 for p in procs) else 1)
