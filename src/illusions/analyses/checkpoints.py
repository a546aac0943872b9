"""One analysis per training checkpoint: how the model and its proxies change as the model learns.

A spec with ``checkpoints`` (a training run saved with ``illusions train --save-every N``, or its
``checkpoints/`` folder) stands for one analysis per step checkpoint: the same simplifier, fit and
splits, with ``model`` set to each ``step<k>/`` folder in turn. :func:`run_over_checkpoints` runs
them in step order and writes one directory, atomically:

    step<k>/          the analysis run of each checkpoint (the files of :func:`.run.write_run`)
    checkpoints.csv   tidy, one row per step x split (or position group) x proxy x metric
    checkpoints.json  the same per step: original accuracy per split, and for each proxy its
                      agreement and accuracy change with their gaps to iid
    config.json       the spec, the checkpoints analysed and the package version
    manifest.json     as every directory illusions writes

``metrics`` here are the original accuracy (the model's own, per split), the proxy's accuracy, the
agreement, and the accuracy change (proxy minus original); ``gap_vs_iid`` is the split's value minus
iid's in the same checkpoint: for the accuracy change, below 0 means the proxy *under-states* the
model's generalization there, above 0 that it *over-states* it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from illusions import __version__
from illusions.analyses.spec import AnalysisSpec
from illusions.analyses.summary import POSITION_GROUP, group_label
from illusions.errors import IllusionsError
from illusions.io import (
    OutputKind,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    staged_dir,
)
from illusions.metric_table import OVER_TRAINING_METRICS

CHECKPOINT_SWEEP = OutputKind("checkpoint-sweep", "an analysis over training checkpoints")
SUMMARY_CSV = "checkpoints.csv"
SUMMARY_JSON = "checkpoints.json"
METRICS = OVER_TRAINING_METRICS  # the metric table's rows marked over_training
SUMMARY_FIELDS = ("step", "split", "proxy", "metric", "value", "ci_low", "ci_high", "gap_vs_iid",
                  "gap_vs_iid_low", "gap_vs_iid_high", "n_positions")


def checkpoint_specs(spec: AnalysisSpec) -> list[tuple[int, Path, AnalysisSpec]]:
    """``(step, folder, spec)`` per step checkpoint of ``spec.checkpoints``, in step order: the spec
    with ``model`` the checkpoint and ``checkpoints`` cleared.

    Raises:
        IllusionsError: the checkpoints were trained on another task than ``spec.task``, or on
            different task settings (their splits would differ, so the steps would not compare).
    """
    from illusions.models import list_checkpoints, read_checkpoint_config

    found = list_checkpoints(spec.checkpoints)
    if not found:
        raise IllusionsError(f"{spec.checkpoints} holds no step checkpoints")
    first_task = None
    for _, folder in found:
        _, meta = read_checkpoint_config(folder)
        task = meta.get("task") or {}
        trained_on = task.get("task") if isinstance(task, dict) else None
        if trained_on is not None and trained_on != spec.task:
            raise IllusionsError(f"checkpoint {folder} was trained on task {trained_on!r}, not {spec.task!r}")
        if first_task is None:
            first_task = task
        elif task != first_task:
            raise IllusionsError(f"checkpoint {folder} was trained on other {spec.task} settings than "
                                 f"{found[0][1]}; analyse the checkpoints of one training run")
    return [(step, folder, spec.replace(model=str(folder), checkpoints="")) for step, folder in found]


def summary_rows(step: int, rows: list[dict[str, Any]], reference: str = "iid") -> list[dict[str, Any]]:
    """The rows of one checkpoint's analysis that the sweep keeps: per split (and position group,
    named ``split (group)``) and proxy, each of :data:`METRICS` with its interval and its gap to
    ``reference``."""
    out = []
    for r in rows:
        if r["metric"] not in METRICS or r["group_by"] not in ("all", POSITION_GROUP):
            continue
        split = r["split"] if r["group_by"] == "all" else group_label(r["split"], r["group"])
        out.append({"step": step, "split": split, "proxy": r["proxy"], "metric": r["metric"],
                    "value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                    "gap_vs_iid": r["gap_vs_ref"], "gap_vs_iid_low": r["gap_vs_ref_low"],
                    "gap_vs_iid_high": r["gap_vs_ref_high"], "n_positions": int(r["n_positions"])})
    return out


@dataclasses.dataclass
class CheckpointSweep:
    """The outcome of :func:`run_over_checkpoints`.

    Attributes:
        spec: the spec with ``checkpoints``.
        steps: the training steps analysed, in order.
        models: step -> the checkpoint folder.
        rows: :func:`summary_rows` of every step.
        model_description: the architecture (the same at every step).
    """

    spec: AnalysisSpec
    steps: list[int]
    models: dict[int, str]
    rows: list[dict[str, Any]]
    model_description: str = ""

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(r["split"] for r in self.rows))

    @property
    def proxies(self) -> list[str]:
        return list(dict.fromkeys(r["proxy"] for r in self.rows))

    def value(self, step: int, split: str, proxy: str, metric: str, field: str = "value") -> float:
        for r in self.rows:
            if (r["step"], r["split"], r["proxy"], r["metric"]) == (step, split, proxy, metric):
                return float(r[field])
        return float("nan")

    def document(self) -> dict[str, Any]:
        """``checkpoints.json``: per step, the original accuracy per split and each proxy's agreement
        and accuracy change (value, interval, gap to iid with its interval) per split."""
        def num(x: Any) -> float | None:
            return float(x) if isinstance(x, int | float) and x == x else None

        entries = []
        first = self.proxies[0] if self.proxies else None
        for step in self.steps:
            mine = [r for r in self.rows if r["step"] == step]
            original = {r["split"]: {"value": num(r["value"]), "ci": [num(r["ci_low"]), num(r["ci_high"])],
                                     "n_positions": r["n_positions"]}
                        for r in mine if r["proxy"] == first and r["metric"] == "original_accuracy"}
            proxies: dict[str, Any] = {}
            for r in mine:
                if r["metric"] == "original_accuracy":
                    continue
                cell = proxies.setdefault(r["proxy"], {}).setdefault(r["split"], {})
                cell[r["metric"]] = {"value": num(r["value"]), "ci": [num(r["ci_low"]), num(r["ci_high"])],
                                     "gap_vs_iid": {"value": num(r["gap_vs_iid"]),
                                                    "ci": [num(r["gap_vs_iid_low"]), num(r["gap_vs_iid_high"])]}}
            entries.append({"step": step, "model": self.models[step], "run": f"step{step}",
                            "original_accuracy": original, "proxies": proxies})
        return {"task": self.spec.task, "simplifier": self.spec.simplifier, "checkpoints": self.spec.checkpoints,
                "architecture": self.model_description, "steps": self.steps, "by_step": entries}


def read_sweep(folder: Path | str) -> CheckpointSweep:
    """A finished sweep directory read back (``config.json`` and ``checkpoints.csv``), for documents
    built from earlier runs (``docs/RESULTS.md``).

    Raises:
        IllusionsError: the folder holds no readable sweep.
    """
    import json

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        spec = AnalysisSpec.from_dict(config["spec"])
        models = {int(k.removeprefix("step")): str(v) for k, v in config["checkpoints"].items()}
        with open(folder / SUMMARY_CSV, newline="") as fh:
            raw = list(csv.DictReader(fh))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IllusionsError(f"{folder} holds no readable analysis over checkpoints ({exc})") from None
    rows = []
    for r in raw:
        row: dict[str, Any] = {"step": int(r["step"]), "split": r["split"], "proxy": r["proxy"],
                               "metric": r["metric"], "n_positions": int(r["n_positions"])}
        for key in SUMMARY_FIELDS[4:-1]:
            row[key] = float(r[key]) if r[key] != "" else float("nan")
        rows.append(row)
    return CheckpointSweep(spec, sorted(models), models, rows, str(config.get("architecture", "")))


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    import math

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and not math.isfinite(row[k])
                             else repr(round(row[k], 10)) if isinstance(row[k], float) else row[k])
                         for k in SUMMARY_FIELDS})
    return buf.getvalue()


def check_sweep_out(spec: AnalysisSpec, out: Path, *, overwrite: bool = False, option: str = "output location",
                    overwrite_option: str = "overwrite=True") -> None:
    """Fail before any work unless ``out`` can receive the sweep: new, empty or (with ``overwrite``)
    an earlier sweep of ours, and neither the checkpoints' folder, inside it, nor the bundled models.

    Raises:
        IllusionsError: naming what is in the way.
    """
    from illusions.bundled import ASSETS

    out = Path(out)
    resolved = out.resolve()
    for guarded, what in ((Path(spec.checkpoints).resolve(), f"the checkpoints folder {spec.checkpoints}"),
                          (ASSETS, "the bundled models")):
        if resolved == guarded or guarded in resolved.parents or resolved in guarded.parents:
            relation = "is" if resolved == guarded else "is inside" if guarded in resolved.parents else "contains"
            raise IllusionsError(f"{option} {out} {relation} {what}; choose a folder of its own")
    check_output_dir(out, CHECKPOINT_SWEEP, overwrite=overwrite, option=option, overwrite_option=overwrite_option)


Progress = Callable[[int, int, int], None]


def run_over_checkpoints(
    spec: AnalysisSpec,
    out: Path,
    *,
    overwrite: bool = False,
    run_files: Callable[[Any, Path], None] | None = None,
    sweep_files: Callable[[CheckpointSweep, Path], None] | None = None,
    progress: Progress | None = None,
    device: Any = "cpu",
    allow_tf32: bool = False,
) -> CheckpointSweep:
    """Run the spec's analysis on every step checkpoint and write the sweep directory ``out``.

    Args:
        spec: a spec with ``checkpoints`` set.
        out: the directory to write (replaced only with ``overwrite`` when it holds an earlier sweep).
        run_files: ``run_files(run, stage)`` adds files to each checkpoint's run directory (e.g. its
            report); the run is a :class:`~illusions.analyses.run.RunResult`.
        sweep_files: ``sweep_files(sweep, stage)`` adds files to the sweep directory (e.g. the
            report with the figure over training steps).
        progress: called as ``progress(i, n, step)`` before checkpoint ``i`` of ``n``.
        device, allow_tf32: as for :func:`~illusions.analyses.run.run_analysis`.

    Returns:
        The :class:`CheckpointSweep` (the rows also written to ``checkpoints.csv``).
    """
    from illusions.analyses.run import run_analysis, write_run

    if not spec.checkpoints:
        raise IllusionsError("the spec names no checkpoints to analyse")
    specs = checkpoint_specs(spec)
    rows: list[dict[str, Any]] = []
    models: dict[int, str] = {}
    description = ""
    out = Path(out)
    try:
        with staged_dir(out, kind=CHECKPOINT_SWEEP, replace=overwrite) as stage:
            for i, (step, folder, sub) in enumerate(specs):
                if progress is not None:
                    progress(i, len(specs), step)
                run = run_analysis(sub, device=device, allow_tf32=allow_tf32)
                extra = (lambda st, run=run: run_files(run, st)) if run_files is not None else None
                write_run(run, stage / f"step{step}", extra_files=extra)
                rows += summary_rows(step, run.rows)
                models[step] = str(folder)
                description = run.model_description
                del run
            sweep = CheckpointSweep(spec, [s for s, _, _ in specs], models, rows, description)
            atomic_write_json(stage / "config.json", {
                "illusions_version": __version__, "spec": spec.to_dict(), "architecture": description,
                "checkpoints": {f"step{s}": models[s] for s in sweep.steps}})
            atomic_write_text(stage / SUMMARY_CSV, rows_to_csv(rows))
            atomic_write_json(stage / SUMMARY_JSON, sweep.document())
            if sweep_files is not None:
                sweep_files(sweep, stage)
    except PermissionError as exc:
        raise IllusionsError(f"cannot write {out}: {exc.strerror}") from None
    return sweep
