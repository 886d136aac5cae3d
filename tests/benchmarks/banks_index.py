"""Benchmark: a PDQ bank of a million entries: load time, memory, match latency and recall.

    .venv/bin/python -m tests.benchmarks.banks_index --size 1000000 --queries 1000

A script, not a test: its figures are read by people. One bank (threshold 31) is filled with
`--size` random PDQ hashes through `Banks.add` (as a file or the banks topic would fill it), then
folded into the FAISS snapshot (`Banks.rebuild`). Each query is one of those hashes with d bits
flipped, d = 0, 1, ..., 40 in turn: a near-duplicate planted at a known distance. Every query goes
through `Banks.match` (with a sha256 and md5 no bank holds, so the PDQ search is what is timed).
Recall: of the queries at d <= 31, those whose match is the planted entry at distance d (an exact
index finds all); queries at d > 31 must match nothing (random hashes are ~128 bits apart).
Memory is the process's resident set (VmRSS) before and after the load; the 10^7 projection
scales the per-entry growth.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import numpy as np

from service.core.banks import BankEntry, Banks, BankSpec
from service.core.hashing import Pdq
from tests.benchmarks.harness import peak_rss, rss
from tests.benchmarks.report import markdown_table, number, percentiles

MAX_PLANTED_DISTANCE = 40


def planted_query(rng: np.random.Generator, planted: bytes, distance: int) -> str:
    bits = np.unpackbits(np.frombuffer(planted, dtype=np.uint8))
    bits[rng.choice(bits.size, distance, replace=False)] ^= 1
    return np.packbits(bits).tobytes().hex()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="entries [%(default)s]")
    parser.add_argument("--queries", type=int, default=1000, help="queries [%(default)s]")
    parser.add_argument("--seed", type=int, default=1, help="random seed [%(default)s]")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    hashes = rng.integers(0, 256, size=(args.size, 32), dtype=np.uint8)
    values = [row.tobytes().hex() for row in hashes]
    banks = Banks({"bench": BankSpec("bench", "block", "O2")})

    rss_before = rss(os.getpid())
    started = time.perf_counter()
    for number_, value in enumerate(values):
        banks.add(BankEntry("bench", "pdq", value, f"e{number_}"))
    added = time.perf_counter() - started
    banks.rebuild()
    loaded = time.perf_counter() - started
    rss_after = rss(os.getpid())

    no_sha, no_md5 = hashlib.sha256(b"none").hexdigest(), hashlib.md5(b"none").hexdigest()
    timings: list[float] = []
    found = wanted = false_matches = 0
    for query in range(args.queries):
        distance = query % (MAX_PLANTED_DISTANCE + 1)
        target = int(rng.integers(args.size))
        pdq = Pdq(planted_query(rng, hashes[target].tobytes(), distance), quality=100)
        began = time.perf_counter()
        match = banks.match(no_sha, no_md5, pdq)
        timings.append((time.perf_counter() - began) * 1000)
        if distance <= 31:
            wanted += 1
            found += match is not None and match.entry.entry_id == f"e{target}"
            found -= match is not None and match.distance != distance
        else:
            false_matches += match is not None

    per_entry = (rss_after - rss_before) / args.size
    p50, p99 = percentiles(timings, [50, 99])
    figures = {
        "entries": args.size,
        "Banks.add of every entry (s)": added,
        "load with the final rebuild (s)": loaded,
        "resident memory growth (MiB)": (rss_after - rss_before) / 2**20,
        "per entry (bytes)": per_entry,
        "peak resident memory of the process (MiB)": peak_rss(os.getpid()) / 2**20,
        "projected at 10^7 entries (GiB)": per_entry * 10**7 / 2**30,
        "Banks.match p50 (ms)": p50,
        "Banks.match p99 (ms)": p99,
        "recall, planted at d <= 31": found / max(wanted, 1),
        "matches of queries at d > 31": false_matches,
    }
    rows = [[name, number(value, 0 if value >= 100 else 3)] for name, value in figures.items()]
    print(markdown_table(["PDQ bank", "value"], rows))
    return figures


if __name__ == "__main__":
    main()
