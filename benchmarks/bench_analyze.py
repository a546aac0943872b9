"""Benchmark the main job and sweeps; prints ratios measured in one run (machines are shared).

(a) `illusions analyze dyck --simplify svd --rank 4` in a fresh process (data cache warm), wall
    seconds and ratio to `python -c "import transformer_lens"` timed in the same run (target <= 2x),
    the two interleaved; their CPU seconds are printed too, as a check less moved by other load;
(b) one sweep of 5 ranks over all splits vs 5 separate analyses in one process (target <= 0.5x),
    ``--repeats`` pairs, medians;
(c) peak resident memory of the main job's process.

Part (a) also times a bare TransformerLens loop on the same work: every forward pass the main job makes
(recorded once by a spy on ``HookedTransformer.forward``: the fit's collection, the warnings' calibration,
each split's clean and proxy passes, the report's), replayed in a fresh process that imports
TransformerLens, builds the same model from its weights and calls ``model(input, start_at_layer=...,
stop_at_layer=...)`` on the same shapes without hooks, metrics, bootstrap or report. It is the least any
implementation of the job's passes takes; its ratio to the import says how much of the target it leaves.

``--baseline SRC`` times another checkout's main job too (``PYTHONPATH=SRC``, e.g. ``/work/main/src``),
interleaved with this one's, so a change is measured against what it changes in one run; ``--busy``
measures part (a) once more with one CPU-bound process (``while True: pass``) running beside, started
``--busy-warmup`` seconds before (the default thread count reads other processes' CPU use since the
command started; code that read the 1-minute load average instead needs ``--busy-warmup 60``).
``--threads auto`` passes no ``--threads`` (the command's default: the free cores).

Usage: python benchmarks/bench_analyze.py [--threads 2|auto] [--repeats 3] [--parts abc]
       [--baseline SRC] [--busy] [--busy-warmup 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ILLUSIONS = [sys.executable, "-m", "illusions"]

# Run in a child: the main job in-process with every HookedTransformer.forward recorded (token inputs
# whole, residual inputs by shape), then the model's config and weights, for the bare replay.
RECORD = r"""
import json, sys, warnings
import numpy as np
import torch
warnings.filterwarnings("ignore", category=DeprecationWarning)
from transformer_lens import HookedTransformer
folder, argv = sys.argv[1], json.loads(sys.argv[2])
calls, tokens, seen = [], [], {}
forward = HookedTransformer.forward
def spy(self, input, *args, **kwargs):
    seen["model"] = self
    call = {k: kwargs.get(k) for k in ("start_at_layer", "stop_at_layer")}
    if input.dtype in (torch.int64, torch.int32):
        call["tokens"] = len(tokens)
        tokens.append(input.detach().cpu().numpy())
    else:
        call["shape"] = list(input.shape)
    calls.append(call)
    return forward(self, input, *args, **kwargs)
HookedTransformer.forward = spy
from illusions.cli import app
try:
    app(argv, prog_name="illusions")
except SystemExit as exit:
    if exit.code:
        raise
from safetensors.torch import save_file
model = seen["model"]
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder + "/weights.safetensors")
np.savez(folder + "/tokens.npz", *tokens)
cfg = {k: v for k, v in model.cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None), list))}
json.dump({"calls": calls, "cfg": cfg}, open(folder + "/calls.json", "w"))
"""

# The bare loop: the recorded passes, plainly, in a fresh process.
BARE = r"""
import json, sys, warnings
from illusions.devices import cpu_use, free_cores
started = cpu_use()
import numpy as np
import torch
warnings.filterwarnings("ignore", category=DeprecationWarning)
from transformer_lens import HookedTransformer, HookedTransformerConfig
from safetensors.torch import load_file
folder, threads = sys.argv[1], sys.argv[2]
# "auto": the main job's default rule (illusions.cli.app.auto_threads), the free cores, at most 2.
torch.set_num_threads(free_cores(started, 2) if threads == "auto" else int(threads))
record = json.load(open(folder + "/calls.json"))
known = HookedTransformerConfig.__dataclass_fields__
cfg = HookedTransformerConfig(**{k: v for k, v in record["cfg"].items() if k in known and k != "seed"})
model = HookedTransformer(cfg).eval()
model.load_state_dict(load_file(folder + "/weights.safetensors"))
tokens = np.load(folder + "/tokens.npz")
with torch.inference_mode():
    for call in record["calls"]:
        kw = {k: call[k] for k in ("start_at_layer", "stop_at_layer") if call[k] is not None}
        x = (torch.as_tensor(tokens[f"arr_{call['tokens']}"]) if "tokens" in call
             else torch.zeros(call["shape"], dtype=torch.float32))
        model(x, **kw)
"""


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
    parser.add_argument("--threads", default="2", help="--threads of the main job, or 'auto' (none given)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="abc", help="which measurements to run, e.g. 'a' or 'ac'")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="src folder of another checkout whose main job is timed too, interleaved")
    parser.add_argument("--busy", action="store_true", help="part (a) again with one CPU-bound process beside")
    parser.add_argument("--busy-warmup", type=float, default=5.0,
                        help="seconds the busy process runs before the measurement (60: for the load average to rise)")
    args = parser.parse_args()
    auto = args.threads == "auto"
    env = {k: v for k, v in os.environ.items() if not (auto and k == "OMP_NUM_THREADS")}
    if not auto:
        env["OMP_NUM_THREADS"] = str(int(args.threads))
    out = Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    threads = [] if auto else ["--threads", str(int(args.threads))]
    main_job = ILLUSIONS + ["analyze", "dyck", "--simplify", "svd", "--rank", "4", *threads, "--overwrite",
                            "--out", str(out / "main")]
    jobs = {"this checkout": (main_job, env)}
    if args.baseline is not None:
        base_env = {**env, "PYTHONPATH": str(args.baseline.resolve())}
        jobs["baseline " + str(args.baseline)] = (main_job[:-1] + [str(out / "baseline")], base_env)
    for job, job_env in jobs.values():
        wall(job, job_env)  # warm the data cache and the OS file cache

    if "a" in args.parts:
        record = out / "record"
        record.mkdir()
        subprocess.run([sys.executable, "-c", RECORD, str(record), json.dumps(main_job[len(ILLUSIONS):-1] + [str(record / "run")])],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        calls = json.loads((record / "calls.json").read_text())["calls"]
        bare_threads = "auto" if auto else str(int(args.threads))
        print(f"    bare loop: the main job's {len(calls)} forward passes replayed "
              f"({sum(1 for c in calls if 'tokens' in c)} from tokens, the others from a residual), "
              f"{bare_threads} thread(s)")
        jobs["bare TransformerLens loop, same passes"] = (
            [sys.executable, "-c", BARE, str(record), bare_threads], env)
        part_a(jobs, env, args.repeats)
        if args.busy:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(args.busy_warmup)
                print(f"    with one busy process beside (load average {os.getloadavg()[0]:.2f}):")
                part_a(jobs, env, args.repeats)
            finally:
                busy.kill()
                busy.wait()
    if "c" in args.parts:
        part_c(main_job, env)
    if "b" in args.parts:
        part_b(1 if auto else int(args.threads), args.repeats)


def part_a(jobs: dict[str, tuple[list[str], dict[str, str]]], env: dict[str, str], repeats: int) -> None:
    """Each main job against ``import transformer_lens``, interleaved so that all see the same load."""
    imp: list[tuple[float, float]] = []
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for _ in range(repeats):
        imp.append(timed([sys.executable, "-c", "import transformer_lens"], env))
        for name, (job, job_env) in jobs.items():
            times[name].append(timed(job, job_env))
    i, ic = statistics.median(w for w, _ in imp), statistics.median(c for _, c in imp)
    print(f"(a) import transformer_lens: {i:.2f} s wall, {ic:.2f} s CPU (medians of {repeats})")
    for name, job in times.items():
        j, jc = statistics.median(w for w, _ in job), statistics.median(c for _, c in job)
        ratios = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(job, imp, strict=True))
        print(f"    main job ({name}): {j:.2f} s wall, ratio {j / i:.2f}x (target <= 1.4x; pairwise {ratios}); "
              f"CPU (user + system) {jc:.2f} s, ratio {jc / ic:.2f}x")


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
