"""Benchmark building the Dyck training set and every split: from scratch and from the on-disk cache.

(a) From scratch: ``DyckTask(config, cache_dir=<empty folder>).splits()`` (sampling, rejection for
    every split, scoring, writing the cache), wall seconds per stage; target <= 10 s on 2 cores.
(b) From cache: a fresh ``DyckTask`` in a fresh process loading the ``.npz`` (imports excluded);
    target <= 1 s.
(c) The cache file's size, and each split's acceptance rate (candidates kept / drawn).
Each measurement is repeated ``--repeats`` times (fresh folders for (a)) and the median printed,
since the machine is shared.

Usage: python benchmarks/bench_dyck_data.py [--n-train 200000] [--n-eval 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from illusions.tasks.dyck import DyckConfig, DyckTask


def from_scratch(config: DyckConfig, folder: Path) -> tuple[float, list[tuple[str, float]]]:
    """Wall seconds of one build into an empty folder, and the seconds of each stage."""
    stages: list[tuple[str, float]] = []
    start = time.perf_counter()
    last = [start, "start"]

    def progress(message: str) -> None:
        now = time.perf_counter()
        stages.append((str(last[1]), now - float(last[0])))
        last[:] = [now, message]

    DyckTask(config, cache_dir=folder).splits(progress=progress)
    end = time.perf_counter()
    stages.append((str(last[1]), end - float(last[0])))
    return end - start, stages[1:]


LOAD = """
import json, sys, time
from illusions.tasks.dyck import DyckConfig, DyckTask
config = DyckConfig.from_dict(json.loads(sys.argv[1]))
start = time.perf_counter()
task = DyckTask(config, cache_dir=sys.argv[2])
assert task.is_cached()
splits = task.splits(progress=lambda msg: sys.exit(f"cache missed: {msg}"))
print(time.perf_counter() - start)
"""


def from_cache(config: DyckConfig, folder: Path) -> float:
    """Seconds to load every split in a fresh process (imports excluded): a new session's cost.

    A fresh process matters: in the building process the allocator reuses memory it already holds,
    which hides the page faults of materialising the int64 token arrays.
    """
    out = subprocess.run(
        [sys.executable, "-c", LOAD, json.dumps(config.to_dict()), str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = DyckConfig(n_train=args.n_train, n_eval=args.n_eval)

    scratch: list[float] = []
    stage_runs: list[list[tuple[str, float]]] = []
    folders = [Path(tempfile.mkdtemp(prefix="bench-dyck-")) for _ in range(args.repeats)]
    try:
        for folder in folders:
            total, stages = from_scratch(config, folder)
            scratch.append(total)
            stage_runs.append(stages)
        cached = [from_cache(config, folders[0]) for _ in range(args.repeats)]
        task = DyckTask(config, cache_dir=folders[0])
        size = task.cache_path.stat().st_size
        stats = task.sampling_stats()
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    print(
        f"config: n_train={config.n_train:,} n_eval={config.n_eval:,} (per split), repeats={args.repeats}"
    )
    print(
        f"(a) from scratch: median {statistics.median(scratch):.2f} s  "
        f"(runs: {', '.join(f'{s:.2f}' for s in scratch)}; target <= 10 s)"
    )
    best = (
        stage_runs[scratch.index(statistics.median(scratch))] if args.repeats % 2 else stage_runs[0]
    )
    for name, seconds in best:
        print(f"      {seconds:6.2f} s  {name}")
    print(
        f"(b) from cache:   median {statistics.median(cached):.3f} s  "
        f"(runs: {', '.join(f'{s:.3f}' for s in cached)}; target <= 1 s)"
    )
    print(f"(c) cache file:   {size / 1e6:.1f} MB")
    if "sampler_acceptance" in stats["train"]:
        print(
            f"      sampler acceptance (>= {config.min_brackets} brackets, <= {config.max_len} tokens): "
            f"{100 * stats['train']['sampler_acceptance']:.1f}%"
        )
    for name, s in stats.items():
        if name != "train":
            print(
                f"      {name:<20} kept {s['kept']:>6,} of {s['candidates']:>7,} candidates "
                f"({100 * s['acceptance']:.1f}%)"
            )


if __name__ == "__main__":
    main()
