"""Benchmark the main job and sweeps; prints ratios measured in one run (machines are shared).

(a) `illusions analyze dyck --simplify svd --rank 4` in a fresh process (data cache warm), wall
    seconds and ratio to `python -c "import transformer_lens"` timed in the same run (target <= 2x),
    the two interleaved; their CPU seconds are printed too, as a check less moved by other load;
(b) one sweep of 5 ranks over all splits vs 5 separate analyses in one process (target <= 0.5x),
    ``--repeats`` pairs, medians;
(c) peak resident memory of the main job's process.

Usage: python benchmarks/bench_analyze.py [--threads 2] [--repeats 3] [--parts abc]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ILLUSIONS = [sys.executable, "-m", "illusions"]


def wall(cmd: list[str], env: dict[str, str]) -> float:
    return timed(cmd, env)[0]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="abc", help="which measurements to run, e.g. 'a' or 'ac'")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    main_job = ILLUSIONS + ["analyze", "dyck", "--simplify", "svd", "--rank", "4", "--threads",
                            str(args.threads), "--out", str(out / "main")]
    wall(main_job, env)  # warm the data cache and the OS file cache

    if "a" in args.parts:
        part_a(main_job, env, args.repeats)
    if "c" in args.parts:
        part_c(main_job, env)
    if "b" in args.parts:
        part_b(args.threads, args.repeats)


def part_a(main_job: list[str], env: dict[str, str], repeats: int) -> None:
    # Interleave the two commands so both see the same machine load.
    job, imp = [], []
    for _ in range(repeats):
        imp.append(timed([sys.executable, "-c", "import transformer_lens"], env))
        job.append(timed(main_job, env))
    j, i = statistics.median(w for w, _ in job), statistics.median(w for w, _ in imp)
    ratios = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(job, imp, strict=True))
    print(f"(a) main job: {j:.2f} s median of {repeats}; import transformer_lens: {i:.2f} s; "
          f"ratio {j / i:.2f}x (target <= 2x; pairwise {ratios})")
    # CPU seconds move less than wall seconds with the machine's other load: a cross-check.
    jc, ic = statistics.median(c for _, c in job), statistics.median(c for _, c in imp)
    print(f"    CPU seconds (user + system): main job {jc:.2f}, import {ic:.2f}, ratio {jc / ic:.2f}x")


def part_c(main_job: list[str], env: dict[str, str]) -> None:
    """Peak memory of one more main-job process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    wall(main_job, env)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"(c) peak RSS of the main job: {max(peak, before) / 1024:.0f} MiB")


def part_b(threads: int, repeats: int) -> None:
    """In one process: 5 separate analyses vs one sweep over the same 5 ranks, ``repeats`` pairs."""
    import torch

    torch.set_num_threads(threads)
    from illusions.analyses.run import AnalysisSpec, run_analysis

    ranks = (1, 2, 4, 8, 16)
    run_analysis(AnalysisSpec(ranks=(4,)))  # warm-up: imports, data cache
    separate, swept = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for r in ranks:
            run_analysis(AnalysisSpec(ranks=(r,)))
        separate.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_analysis(AnalysisSpec(ranks=ranks))
        swept.append(time.perf_counter() - t0)
    s, w = statistics.median(separate), statistics.median(swept)
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(swept, separate, strict=True))
    print(f"(b) sweep of {len(ranks)} ranks: {w:.2f} s; {len(ranks)} separate analyses: {s:.2f} s "
          f"(medians of {repeats}); ratio {w / s:.2f}x (target <= 0.5x; pairwise {ratios})")


if __name__ == "__main__":
    main()
