"""The search for a paper-like Dyck recipe (issue #17): train candidates, measure iid and unseen_depth.

Each candidate is a change of ``tools/search_paperlike_start.toml`` (the starting point; the chosen
configuration is ``tasks/dyck-paperlike.toml``) (the plan and its reasons are in
``tasks/README.md``, "Paper-like Dyck: search plan"). For each one this script trains the model with
``illusions.training.train`` into ``<out>/<candidate>/run/`` and records, from the final full-split
evaluation, the accuracy on ``iid`` and ``unseen_depth`` and on the ``unseen_depth`` closers whose
opener is deeper than the training depth (the task's position group), with the steps, the parameter
count and the wall time, in ``<out>/<candidate>/result.json``. It then writes the table of every
finished candidate to ``<out>/search.md`` (the format of the README's table) and ``<out>/search.json``.

Work is never repeated: a candidate whose ``result.json`` holds the same resolved recipe is reused, an
interrupted one resumes (bit-exact) where its run stopped. ``--time-budget S`` stops the training in
progress cleanly after S seconds (as Ctrl-C does: a checkpoint is saved), so the search can run in
pieces on a machine whose commands are limited in time; run the same command again to continue.

Usage:
    python tools/search_paperlike.py --list
    python tools/search_paperlike.py --out runs/search-paperlike [--candidates start,rotary] \\
        [--device cuda] [--threads 2] [--time-budget 540] [--steps N] [--set model.d_model=32 ...]

``--steps`` and ``--set`` change every selected candidate (for smoke tests: a tiny model for a few
steps); their results are marked as such in the table and never count as the search's findings.
Exit status: 0 when every selected candidate is finished, 3 when the time budget stopped one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The search's starting point (what tasks/dyck-paperlike.toml held before the search chose a
# configuration); every candidate is a change of it, so finished candidates stay reusable.
BASE = REPO / "tools" / "search_paperlike_start.toml"
IID_TARGET = 0.99  # in-distribution accuracy the recipe must reach
IID_KEEP = 0.97  # below this a candidate is weak everywhere, not specifically at depth
DEPTH_TARGET = (0.70, 0.88)  # unseen_depth accuracy of a paper-like model (the paper: ~80%)
EXIT_BUDGET = 3

# The model settings most candidates share: the narrow model, and the chosen one-head variant of it.
NARROW = {"d_model": 32, "d_head": 16, "d_mlp": 128}
ONE_HEAD = {**NARROW, "n_heads": 1, "d_head": 32}
# name -> (what it changes and why, {section: {key: value}}); the order of tasks/README.md's table.
CANDIDATES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "start": ("the starting point as it is: half the reference's width and heads", {}),
    "reference": ("the reference model's architecture (tasks/dyck.toml)",
                  {"model": {"d_model": 128, "n_heads": 4, "d_head": 32, "d_mlp": 512}}),
    "rotary": ("relative (rotary) positions instead of learned absolute ones",
               {"model": {"positional_embedding": "rotary"}}),
    "shortformer": ("positions added to queries and keys only (shortformer)",
                    {"model": {"positional_embedding": "shortformer"}}),
    "attn-only": ("no MLP: depth must be read off attention alone", {"model": {"d_mlp": 0}}),
    "one-head": ("one head of 64 per layer: counting and matching cannot share a layer",
                 {"model": {"n_heads": 1, "d_head": 64}}),
    "narrow": ("d_model 32, 2x16 heads, d_mlp 128: fewer spare directions for new depths",
               {"model": NARROW}),
    "three-layers": ("a third layer: more room to build a depth code that may or may not extrapolate",
                     {"model": {"n_layers": 3}}),
    "short-training": ("half the steps: less time after the fit to clean up the circuit",
                       {"train": {"steps": 3500}}),
    "low-lr": ("peak lr 5e-4 instead of 2e-3", {"train": {"lr": 5e-4}}),
    "no-weight-decay": ("weight decay 0 instead of 0.01", {"train": {"weight_decay": 0.0}}),
    "strong-weight-decay": ("weight decay 0.1 instead of 0.01", {"train": {"weight_decay": 0.1}}),
    "rms-pre": ("RMSPre normalization instead of LayerNorm", {"model": {"normalization": "RMSPre"}}),
    # Second round, around `narrow` (the first candidate near the target: iid 0.988, unseen_depth 0.888).
    "narrow-long": ("`narrow` trained twice as long (14000 steps): more steps to fit in distribution",
                    {"model": NARROW, "train": {"steps": 14000}}),
    "narrow-mlp": ("`narrow` with the start's MLP (d_mlp 256): in-distribution capacity without attention width",
                   {"model": {**NARROW, "d_mlp": 256}}),
    "mid-width": ("between `narrow` and `start`: d_model 48, 2x24 heads, d_mlp 192",
                  {"model": {"d_model": 48, "d_head": 24, "d_mlp": 192}}),
    "narrow-one-head": ("`narrow` with one head of 32 per layer",
                        {"model": ONE_HEAD}),
    "narrow-rotary": ("`narrow` with rotary positions",
                      {"model": {**NARROW, "positional_embedding": "rotary"}}),
    "narrow-strong-wd": ("`narrow` with weight decay 0.1",
                         {"model": NARROW, "train": {"weight_decay": 0.1}}),
    "narrow-attn-only": ("`narrow` without MLPs",
                         {"model": {**NARROW, "d_mlp": 0}}),
    # Data: the depth wall (10) made rare in training (train.wall_keep), evaluation splits unchanged.
    "narrow-mlp-rare-wall": ("`narrow-mlp` trained on only 10% of the strings that reach depth 10",
                             {"model": {**NARROW, "d_mlp": 256}, "train": {"wall_keep": 0.1}}),
    "narrow-long-rare-wall": ("`narrow-long` trained on only 10% of the strings that reach depth 10",
                              {"model": NARROW,
                               "train": {"steps": 14000, "wall_keep": 0.1}}),
    "narrow-mlp-wall-30": ("`narrow-mlp` trained on 30% of the strings that reach depth 10",
                           {"model": {**NARROW, "d_mlp": 256}, "train": {"wall_keep": 0.3}}),
    "narrow-one-head-mlp": ("`narrow-one-head` with d_mlp 256",
                            {"model": {**ONE_HEAD, "d_mlp": 256}}),
    # Third round, around the chosen `narrow-one-head`: the optimiser and depth settings not yet tried.
    "one-head-low-lr": ("`narrow-one-head` with peak lr 1e-3 instead of 2e-3",
                        {"model": ONE_HEAD, "train": {"lr": 1e-3}}),
    "one-head-strong-wd": ("`narrow-one-head` with weight decay 0.1",
                           {"model": ONE_HEAD,
                            "train": {"weight_decay": 0.1}}),
    "one-head-three-layers": ("`narrow-one-head` with a third layer",
                              {"model": {**ONE_HEAD, "n_layers": 3}}),
}

HEADER = ("candidate", "change from the starting point", "parameters", "steps", "iid", "unseen_depth",
          "unseen_depth (opener > 10)", "verdict", "train s", "wall s")


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"error: --set takes section.key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[field] = value
    return out


def resolved_recipe(changes: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> Any:
    """The base recipe with a candidate's changes (then ``--steps``/``--set``) applied and validated."""
    from illusions.models import ModelConfig
    from illusions.recipes import load_recipe
    from illusions.training import TrainConfig

    recipe = load_recipe(BASE, {"model": ModelConfig, "train": TrainConfig})
    for source in (changes, extra):
        for section, fields in source.items():
            recipe = recipe.replace(section, **fields)
    return recipe


def deep_accuracy(task: Any, model: Any, batch_size: int = 128) -> dict[str, Any]:
    """Accuracy on each of the task's position groups (Dyck: unseen_depth, opener > max_depth)."""
    import numpy as np

    from illusions.scoring import accuracy_on_split
    from illusions.tasks.base import Split

    out = {}
    splits = task.splits()
    for name, group in task.position_groups().items():
        split = splits[group.split]
        mask = group.mask(split.scored.meta)
        if mask is None or not mask.any():
            continue
        sub = Split(split.name, split.tokens, split.lengths, split.scored.subset(mask), split.description)
        rows = np.unique(sub.scored.seq)
        acc, n = accuracy_on_split(model, sub, task.candidates, batch_size=batch_size, rows=rows)
        out[f"{group.split} ({name})"] = {"accuracy": acc, "n_positions": n}
    return out


def verdict(iid: float, depth: float) -> str:
    if iid < IID_KEEP:
        return "dropped: iid < 0.97 (weak everywhere)"
    if depth > DEPTH_TARGET[1]:
        return "depth too high" + ("" if iid >= IID_TARGET else ", iid < 0.99")
    if depth < DEPTH_TARGET[0]:
        return "depth too low" + ("" if iid >= IID_TARGET else ", iid < 0.99")
    return "**in target**" if iid >= IID_TARGET else "depth in range, iid < 0.99"


class Budget:
    """Stops the training in progress cleanly (SIGINT to this process, which the trainer turns into a
    checkpoint and an interrupted result) once ``seconds`` have passed since the script started."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.fired = False

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __call__(self, progress: Any) -> None:
        if not self.fired and self.expired():
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def run_candidate(name: str, why: str, changes: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]],
                  out: Path, *, device: str, budget: Budget, log: Any) -> dict[str, Any] | None:
    """Train (or reuse, or resume) one candidate; its result, or None when the budget stopped it."""
    from illusions.config import read_json
    from illusions.io import atomic_write_json
    from illusions.models import load_model
    from illusions.training import is_run_dir, train

    recipe = resolved_recipe(changes, extra)
    folder = out / name
    run_dir = folder / "run"
    result_file = folder / "result.json"
    identity = recipe.to_dict()
    if result_file.is_file():
        saved = read_json(result_file)
        if saved.get("recipe") == identity:
            log(f"{name}: reused ({result_file})")
            return saved
        raise SystemExit(f"error: {folder} holds a result of another recipe; move it away or choose another --out")
    resume = is_run_dir(run_dir)
    task = recipe.make_task()
    log(f"{name}: {'resuming' if resume else 'training'} {recipe['train'].steps} steps ({why})")
    t0 = time.perf_counter()
    result = train(task, recipe["model"], recipe["train"], run_dir, resume=resume, device=device,
                   recipe={**identity, "source": f"{BASE.relative_to(REPO)} + {name}"},
                   progress=budget if budget.deadline is not None else None)
    if result.interrupted:
        log(f"{name}: stopped at step {result.step}/{recipe['train'].steps} by the time budget; "
            "run the same command again to continue")
        return None
    model, meta = load_model(run_dir, device=device)
    groups = deep_accuracy(task, model)
    params = sum(p.numel() for p in model.parameters())
    timing = meta.get("timing", {})
    record = {
        "candidate": name, "why": why, "changes": changes, "smoke": extra, "recipe": identity,
        "parameters": params, "steps": result.step, "accuracies": result.accuracies, "groups": groups,
        "train_seconds": timing.get("train_seconds"), "wall_seconds": timing.get("wall_seconds"),
        "this_call_seconds": round(time.perf_counter() - t0, 1), "device": timing.get("device", device),
    }
    atomic_write_json(result_file, record)
    log(f"{name}: iid {result.accuracies['iid']['accuracy']:.4f}, unseen_depth "
        f"{result.accuracies['unseen_depth']['accuracy']:.4f}")
    return record


def table(records: list[dict[str, Any]]) -> str:
    """The Markdown table of finished candidates (the README's format)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in records:
        iid = r["accuracies"]["iid"]["accuracy"]
        depth = r["accuracies"]["unseen_depth"]["accuracy"]
        deep = next(iter(r["groups"].values()), {}).get("accuracy", float("nan"))
        change = r["why"] + (f" (smoke: {json.dumps(r['smoke'], sort_keys=True)})" if r["smoke"] else "")
        cells = [f"`{r['candidate']}`", change, f"{r['parameters']:,}", str(r["steps"]), f"{iid:.4f}",
                 f"{depth:.4f}", f"{deep:.4f}", "smoke test only" if r["smoke"] else verdict(iid, depth),
                 f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "?",
                 f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "?"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "search-paperlike")
    parser.add_argument("--candidates", default="", help="comma-separated names (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds before training stops cleanly")
    parser.add_argument("--steps", type=int, default=None, help="override every candidate's steps (smoke tests)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe setting of every candidate (smoke tests); repeatable")
    args = parser.parse_args(argv)
    if args.list:
        for name, (why, changes) in CANDIDATES.items():
            print(f"{name:20s} {why}  {json.dumps(changes) if changes else ''}")
        return 0
    names = [n.strip() for n in args.candidates.split(",") if n.strip()] or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        print(f"error: unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}", file=sys.stderr)
        return 2
    extra = _parse_set(args.set)
    if args.steps is not None:
        extra.setdefault("train", {})["steps"] = args.steps
    import torch

    from illusions.errors import IllusionsError
    from illusions.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    budget = Budget(args.time_budget)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    records = []
    stopped = False
    for name in names:
        if budget.expired():
            stopped = True
            log(f"time budget spent before {name}; run the same command again to continue")
            break
        why, changes = CANDIDATES[name]
        try:
            record = run_candidate(name, why, changes, extra, args.out, device=args.device, budget=budget, log=log)
        except IllusionsError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        if record is None:
            stopped = True
            break
        records.append(record)
    done = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/result.json"))]
    done.sort(key=lambda r: list(CANDIDATES).index(r["candidate"]) if r["candidate"] in CANDIDATES else 10**6)
    if done:
        atomic_write_text(args.out / "search.md", table(done))
        atomic_write_json(args.out / "search.json", {"base": str(BASE.relative_to(REPO)), "results": done})
        print(table(done), end="")
    return EXIT_BUDGET if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
