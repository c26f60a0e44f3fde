#!/usr/bin/env python3
"""Runs a stress plan (see stress_model.rs write_plan) against an NBD export: one thread and
one libnbd connection per worker; every request of a round is in flight at once on its
connection; a barrier across all connections ends each round.

Usage: stress_nbd.py URI PLAN_DIR WORKERS
"""
import sys
import threading

import nbd

uri, plan_dir, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
ops = [[] for _ in range(workers)]
with open(f"{plan_dir}/plan.txt") as f:
    rounds = int(f.readline().split()[1])
    for line in f:
        r, w, op, off, ln = line.split()
        ops[int(w)].append((int(r), op, int(off), int(ln)))

barrier = threading.Barrier(workers)
errors = []


def worker(w):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        with open(f"{plan_dir}/payload-{w}.bin", "rb") as f:
            data = f.read()
        pos = 0
        mine = ops[w]
        i = 0
        for r in range(rounds):
            cookies, buffers = [], []
            while i < len(mine) and mine[i][0] == r:
                _, op, off, ln = mine[i]
                i += 1
                if op == "W":
                    buf = nbd.Buffer.from_bytearray(bytearray(data[pos:pos + ln]))
                    pos += ln
                    buffers.append(buf)
                    cookies.append(h.aio_pwrite(buf, off))
                elif op == "Z0":
                    cookies.append(h.aio_zero(ln, off, flags=nbd.CMD_FLAG_NO_HOLE))
                elif op == "Z1":
                    cookies.append(h.aio_zero(ln, off))
                elif op == "D":
                    cookies.append(h.aio_trim(ln, off))
                elif op == "F":
                    cookies.append(h.aio_flush())
                else:
                    raise ValueError(f"unknown op {op}")
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cookies:
                h.aio_command_completed(c)  # raises if the server failed the request
            barrier.wait()
        h.shutdown()
    except Exception as e:  # noqa: BLE001 - report every failure, then fail the run
        errors.append(f"worker {w}: {e!r}")
        barrier.abort()


threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
