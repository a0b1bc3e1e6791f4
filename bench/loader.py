"""
Loader benchmark: packed tokens/s of prepare.make_dataloader on one CPU core.

Target: at least 2 M packed tokens/s on one core, so the loader is never what a step waits on.
Side by side in the same run: upstream's packing rule done by a linear scan of the buffer
(what the bisect-on-sorted-lengths packer replaces), same documents, same core. The packer is
measured as training uses it, keeping cropped remainders; the scan drops them, as upstream's does.

    AUTORESEARCH_CACHE=/tmp/bench-cache autoresearch prepare --source ../shared/data/mixed-en --profile cpu
    AUTORESEARCH_CACHE=/tmp/bench-cache python bench/loader.py
"""

import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare  # noqa: E402


def linear_scan_rows(documents, B, T, buffer_size=1000):
    """Upstream's best-fit rule with a scan over the buffer for every slot (the baseline)."""
    capacity, buffer = T + 1, []
    while True:
        rows = np.empty((B, capacity), dtype=np.int32)
        for r in range(B):
            pos = 0
            while pos < capacity:
                while len(buffer) < buffer_size:
                    buffer.append(next(documents)[0])
                remaining = capacity - pos
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best < 0:
                    best = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                doc = buffer.pop(best)[:remaining]
                rows[r, pos : pos + len(doc)] = doc
                pos += len(doc)
        yield rows, 1


def measure(make_rows, B, T, seconds=3.0, repeats=3):
    rates = []
    for _ in range(repeats):
        rows = make_rows(prepare._documents("train"), B, T)
        next(rows)  # buffer fill excluded
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += next(rows)[0].size
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    meta = prepare.load_meta()
    tokens = sum(np.load(p, mmap_mode="r").size for p in prepare.tokens_dir().glob("shard_0*[0-9].npy"))
    docs = sum(len(np.load(p)) - 1 for p in prepare.tokens_dir().glob("*.offsets.npy"))
    print(f"cache: {prepare.cache_dir()} ({meta['profile']['name']} profile, {docs} documents, "
          f"{tokens / docs:.0f} tokens/document on average)")
    print(f"{'B x T':>12} {'packer':>12} {'M tokens/s':>11} {'vs scan':>8}")
    for B, T in ((16, 256), (32, 1024), (8, 2048)):
        ours = measure(functools.partial(prepare.pack_rows, keep_remainders=True), B, T)  # as training packs
        scan = measure(linear_scan_rows, B, T, seconds=1.5, repeats=2)
        print(f"{f'{B} x {T}':>12} {'bisect':>12} {ours / 1e6:11.2f} {ours / scan:7.1f}x")
        print(f"{'':>12} {'linear scan':>12} {scan / 1e6:11.2f} {1:7.1f}x")


if __name__ == "__main__":
    main()
