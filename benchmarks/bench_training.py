"""Benchmark the training loop against a bare PyTorch loop; prints ratios measured in one run.

(a) Tokens per second (non-PAD targets) of ``illusions.training.train`` vs a bare loop over the same
    model (same architecture and initial weights), the same length-grouped batches and the same
    AdamW with gradient clipping. Runs alternate (ours, bare, ours, bare, ...) so that load from
    other work on a shared machine hits both alike; the median of each is compared (target >= 0.95x).
    Our figure is the loop's own step time (evaluation, checkpoint and data building excluded, as
    the bare loop has none); the whole ``train`` call's wall time is printed beside it.
(b) Wall time of the full recipe: read from the bundled model's metrics.json (measured when it was
    trained), and extrapolated from (a)'s throughput to the recipe's step budget.

Usage: python benchmarks/bench_training.py [--recipe tasks/dyck.toml] [--steps 150] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bare_loop(task, model_cfg, train_cfg, steps: int, device: str = "cpu") -> tuple[int, float]:
    """The same training steps with nothing around them: ``(target tokens, seconds)``."""
    import torch

    from illusions.models import build_model
    from illusions.training import BatchStream, make_optimizer, next_token_loss

    split = task.splits()["train"]
    pad = task.vocab.pad_id
    model = build_model(model_cfg, seed=train_cfg.seed, device=device)
    model.train()
    opt, _ = make_optimizer(model, train_cfg)
    stream = BatchStream(split.lengths, train_cfg.batch_size, train_cfg.bucket_width, train_cfg.seed)
    n_tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        rows = next(stream)
        width = int(split.lengths[rows].max())
        tokens = torch.as_tensor(split.tokens[rows, :width], device=device).long()  # [batch, pos]
        loss = next_token_loss(model(tokens), tokens, pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        n_tokens += int((tokens[:, 1:] != pad).sum())
    return n_tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "tasks" / "dyck.toml"))
    parser.add_argument("--steps", type=int, default=150, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from illusions.bundled import bundled_metrics
    from illusions.errors import IllusionsError
    from illusions.models import ModelConfig
    from illusions.recipes import load_recipe
    from illusions.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, {"model": ModelConfig, "train": TrainConfig})
    full_steps = recipe["train"].steps
    # Same training data distribution; tiny evaluation splits keep the final evaluation cheap.
    recipe = recipe.replace("task", n_eval=min(getattr(recipe.task, "n_eval", 50), 50))
    recipe = recipe.replace("train", steps=args.steps, eval_every=0, checkpoint_every=0)
    task = recipe.make_task()
    task.splits()
    model_cfg, train_cfg = recipe["model"], recipe["train"]

    ours, bare, walls = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for i in range(args.repeats):
            res = train(task, model_cfg, train_cfg, Path(tmp) / f"run{i}")
            ours.append(res.tokens_per_s)
            walls.append(res.wall_seconds)
            n, secs = bare_loop(task, model_cfg, train_cfg, args.steps)
            bare.append(n / secs)
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"threads={args.threads} steps/run={args.steps} batch={train_cfg.batch_size} repeats={args.repeats}")
    print(f"ours: {o:,.0f} tok/s  (runs: {', '.join(f'{x:,.0f}' for x in ours)}; "
          f"train() wall incl. setup, final eval and checkpoint: {statistics.median(walls):.1f}s)")
    print(f"bare: {b:,.0f} tok/s  (runs: {', '.join(f'{x:,.0f}' for x in bare)})")
    print(f"ratio ours/bare: {o / b:.3f}x (target >= 0.95x)")
    tokens_per_step = res.train_tokens / args.steps
    print(f"full recipe: {full_steps} steps ~ {full_steps * tokens_per_step / o / 60:.1f} min at this throughput")
    try:
        m = bundled_metrics(recipe.task_name)
        print(f"full recipe, measured when the bundled model was trained: {m['train_seconds'] / 60:.1f} min "
              f"of training steps, {m['wall_seconds'] / 60:.1f} min in all ({m['threads']} threads)")
    except (IllusionsError, KeyError):
        print("no bundled model with recorded timings")


if __name__ == "__main__":
    main()
