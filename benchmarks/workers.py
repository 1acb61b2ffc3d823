"""The environment of a benchmark's worker processes, and how they time calls.

``import mindspore`` sets ``OMP_NUM_THREADS`` (to 1 on a 2-core machine: MindSpore's ``SetOMPThreadNum`` takes half the
cores divided by 4, at least 1) with C ``setenv``. Python's ``os.environ`` does not see that, but a child started with
``env=None`` inherits it: a PyTorch worker started by a parent that had imported MindSpore ran its ops on one thread
(found 2026-12-06, issue #30; the rows measured that way are marked in benchmarks/README). Every worker therefore
gets the environment the parent started with, which ``os.environ`` still holds, plus any extra variables.
"""

import os
import statistics
import time


def worker_env(**extra: str) -> dict:
    return {**os.environ, **extra}


# A MindSpore graph runs its first four or five calls 15-25% slower than the rest (the bench_train.py step 0.50-0.55 s,
# then 0.40-0.43 s; the 256-token forward of bench_nextdit.py 0.22 s, then 0.19 s); PyTorch is steady from its third.
# Training and sampling run one graph hundreds of times, so every framework is timed after this many calls.
WARMUP = 6


def timed(fn, repeats: int) -> tuple:
    """(first call's result, its seconds, median seconds of ``repeats`` calls after ``WARMUP`` calls in all)."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    for _ in range(WARMUP - 1):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return result, first, statistics.median(times)
