"""One analysis run, end to end: spec -> model and splits -> engine -> summary -> run directory.

An :class:`AnalysisSpec` is what an analysis recipe (``analyses/*.toml``) or the ``analyze`` /
``sweep`` commands hold. :func:`run_analysis` does the work and :func:`write_run` writes the fixed
files of ``runs/<name>/`` atomically (a failed run leaves no directory behind):

    config.json     the fully resolved spec, model description, package version, seed
    metrics.json    per split: metrics with intervals and gaps; breakdowns; every proxy
    metrics.csv     tidy: one row per split x proxy x parameter x group x metric
    proxies/        each fitted proxy (safetensors + JSON), so a report can be rebuilt
    records.npz     per-position records (predictions, JSD, KL, meta, warning signals, a dictionary's
                    downstream losses) for reports and re-analysis
    manifest.json   the sha256 of every file written, marking the folder as a run of ours

An existing run directory is replaced only on request (``overwrite``), never a folder illusions did
not write, and files a user added to a run directory are kept.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from illusions import __version__, registry
from illusions.analyses.spec import (  # noqa: F401  (re-exported: the spec is part of this module's API)
    BREAKDOWNS,
    CUSTOM_TASK,
    AnalysisRecipe,
    AnalysisSpec,
    build_simplifiers,
    load_analysis_recipe,
    per_head_simplifiers,
)
from illusions.analyses.summary import CONTROL_FIELDS, DISCRETE, ROW_FIELDS, to_json
from illusions.errors import IllusionsError
from illusions.io import (
    OutputKind,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    staged_dir,
)
from illusions.tasks.base import DataSupport

RESULT_FILES = ("config.json", "metrics.json", "metrics.csv", "records.npz")
ANALYSIS_RUN = OutputKind(
    "analysis-run", "an analysis run", legacy_required=RESULT_FILES,
    legacy_files=(*RESULT_FILES, "report.html", "fig_*.png", "proxies/*/proxy.json", "proxies/*/proxy.safetensors"),
    legacy_marker=("config.json", "illusions_version", None),
)
# metrics.csv columns read back as integers / as text (the others are floats, empty = NaN).
_INT_FIELDS = ("n_positions", "n_sequences")
_TEXT_FIELDS = ("split", "proxy", "simplifier", "param", "group_by", "group", "metric")
# The split a CLI run's gaps are measured against, when it is evaluated.
REFERENCE = "iid"


@dataclasses.dataclass
class RunResult:
    spec: AnalysisSpec
    model_description: str
    model_source: str
    rows: list[dict[str, Any]]
    document: dict[str, Any]
    analysis: Any  # AnalysisResult: proxies, evaluated rows per split, per-position records
    task_meta: dict[str, Any]
    task: Any = None  # the Task (its splits are cached, so task.splits() is cheap again)
    model: Any = None  # the original HookedTransformer
    runtime: dict[str, Any] = dataclasses.field(default_factory=lambda: {"device": "cpu", "allow_tf32": False})

    def warnings(self, proxy: str | None = None) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """The unsupervised warning signals of one proxy (default: the first), as metrics.json holds
        them: ``{split or "overall": {signal: {metric: {"value", "ci", "n_positions"}}}}`` with the
        metrics of :data:`illusions.metric_table.WARNING_METRICS`; empty for a proxy without signals.
        """
        docs = self.document.get("proxies", [])
        doc = next((d for d in docs if proxy is None or d["label"] == proxy), None)
        if doc is None:
            raise IllusionsError(f"no proxy {proxy!r}; proxies: {', '.join(d['label'] for d in docs)}")
        return doc.get("warnings", {})


def load_task_and_model(spec: AnalysisSpec, *, device: Any = "cpu") -> tuple[Any, Any, str, str]:
    """The task (configured as the model was trained) and the model on ``device``:
    ``(task, model, source, desc)``."""
    from illusions.models import describe, load_model

    task_cls = registry.get_task(spec.task)
    if spec.task == CUSTOM_TASK:
        return _custom_task_and_model(spec, task_cls, device)
    model_dir, name = model_folder(spec)
    shown = f"bundled model {name}" if name else f"model {model_dir}"
    model, meta = load_model(model_dir, device=device)
    task_meta = meta.get("task") or {}
    trained_on = task_meta.get("task")
    if trained_on is not None and trained_on != spec.task:
        raise IllusionsError(f"{shown} was trained on task {trained_on!r}, not {spec.task!r}")
    # Splits are defined relative to the training set, so the task is rebuilt exactly as trained.
    if hasattr(task_cls, "from_meta"):
        task = task_cls.from_meta(task_meta)
    else:
        config = task_cls.Config.from_dict(task_meta.get("config", {}), source=str(model_dir / "config.json"))
        task = task_cls(config)
    saved_vocab = task_meta.get("vocab")
    if saved_vocab is not None and list(saved_vocab) != list(task.vocab.tokens):
        raise IllusionsError(f"{shown} was trained with a different {spec.task} vocabulary")
    if len(task.vocab) != model.cfg.d_vocab:
        raise IllusionsError(
            f"{shown} has a vocabulary of {model.cfg.d_vocab} tokens but task {spec.task!r} "
            f"has {len(task.vocab)}"
        )
    source = "bundled" if not spec.model else f"bundled {name}" if name else str(model_dir)
    return task, model, source, describe(model)


def model_folder(spec: AnalysisSpec) -> tuple[Path, str | None]:
    """The folder of the spec's model and the bundled model's name when it names one: the task's
    reference model when ``model`` is empty, else :func:`illusions.bundled.resolve_model`."""
    from illusions.bundled import bundled_model_dir, resolve_model

    if not spec.model:
        return bundled_model_dir(spec.task), None
    return resolve_model(spec.model)


def model_n_layers(spec: AnalysisSpec) -> int:
    """How many layers the spec's model has, read from its ``config.json`` alone (no weight is
    loaded): the model folder, the bundled model, or the first of ``checkpoints``."""
    from illusions.model_folders import ILLUSIONS, inspect_model_folder
    from illusions.models import list_checkpoints, read_checkpoint_config

    if spec.checkpoints:
        path = list_checkpoints(spec.checkpoints)[0][1]
    else:
        path = model_folder(spec)[0]
    folder = inspect_model_folder(path)
    if folder.kind == ILLUSIONS:
        return int(read_checkpoint_config(path)[0].n_layers)
    return int(folder.hooked.n_layers)


def resolve_spec_layers(spec: AnalysisSpec) -> AnalysisSpec:
    """The spec with its layers checked against its model and given as indices (``-1``: the last
    layer becomes ``n_layers - 1``), before any weight is loaded: what the run prints, names its
    folder after and records in ``config.json``. The spec itself when it names no layer.

    Raises:
        InvalidOption: a layer the model does not have, naming the valid range.
    """
    if not spec.layers:
        return spec
    return spec.resolve_layers(model_n_layers(spec))


def _custom_task_and_model(spec: AnalysisSpec, task_cls: Any, device: Any = "cpu") -> tuple[Any, Any, str, str]:
    """Task ``custom``: the spec's data read and checked against the model folder's vocabulary,
    context and tokenizer, all before any weight is loaded; then the model."""
    from illusions.model_folders import folder_tokens, inspect_model_folder, load_model_folder
    from illusions.models import describe

    path, name = model_folder(spec)
    folder = inspect_model_folder(path, device=device)
    tokens = folder_tokens(folder)
    config = task_cls.Config(data=spec.data, candidates=spec.candidates, window=spec.window, stride=spec.stride)
    task = task_cls(config, d_vocab=folder.d_vocab, n_ctx=folder.n_ctx, encode=tokens.encode,
                    vocab_tokens=tokens.tokens, pad_id=tokens.pad_id, bos_id=tokens.bos_id,
                    model_name=f"model {folder.path}", encode_parts=tokens.encode_parts)
    missing = [b for b in spec.breakdowns if b not in BREAKDOWNS and b not in task.meta_columns]
    if missing:
        raise IllusionsError(f"no meta column {', '.join(missing)} in {spec.data} to break down by; "
                             f"its columns: {', '.join(task.meta_columns) or 'none'}")
    unknown = [s for s in (*spec.splits, spec.fit_split) if s not in task.splits()]
    if unknown:
        raise IllusionsError(f"unknown split(s) {', '.join(unknown)}; {spec.data} holds {', '.join(task.splits())}")
    model = load_model_folder(folder, device=device)
    return task, model, f"bundled {name}" if name else spec.model, describe(model)


def run_analysis(spec: AnalysisSpec, *, progress: Callable[[str, int, int], None] | None = None,
                 device: Any = "cpu", allow_tf32: bool = False,
                 evaluated: Callable[[Any], None] | None = None, by: Sequence[str] = ()) -> RunResult:
    """Load, fit, evaluate and summarise: the whole analysis for one spec.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto`` or a ``torch.device``) is where the
    model, the activations, the fits and the metrics live; only the per-position records come back to
    the CPU for the summary. It is not part of the spec: the run records it in ``runtime``.
    ``allow_tf32`` lets CUDA run float32 matmuls in TF32 (see :mod:`illusions.devices`).
    ``evaluated(result)`` is called once every split is evaluated, before the summary, with the
    :class:`~illusions.analyses.faithfulness.AnalysisResult`. ``by`` names meta columns the caller will
    show a breakdown by (the CLI's ``--by``; not part of the spec): like ``spec.match``'s, each must be a
    column of the evaluated splits' scored positions, checked once the splits are read, before the fit.
    """
    from illusions.devices import describe_device, matmul_precision, resolve_device

    if spec.checkpoints:
        raise IllusionsError("this spec analyses training checkpoints; run it with "
                             "illusions.analyses.checkpoints.run_over_checkpoints (`illusions sweep --over-checkpoints`)")
    where = resolve_device(device)
    with matmul_precision(where, allow_tf32):
        run = _run_on(spec, where, progress, evaluated, by)
    run.runtime = {"device": describe_device(where), "allow_tf32": bool(allow_tf32) and where.type == "cuda"}
    return run


@contextlib.contextmanager
def out_of_memory_as_error(spec: AnalysisSpec) -> Iterator[None]:
    """An allocation that fails inside the block becomes one :class:`IllusionsError` naming what to
    reduce (torch's ``OutOfMemoryError`` on a GPU, ``RuntimeError: ... can't allocate`` on the CPU)."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError | MemoryError) and not any(
                words in text for words in ("can't allocate", "out of memory", "Cannot allocate memory")):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise IllusionsError(
            f"out of memory ({first[:120]}); pass a smaller --token-budget (now {spec.token_budget}) or "
            f"--batch-size (now {spec.batch_size}), fewer --fit-n (now {spec.fit_n}) or --max-seqs sequences"
        ) from None


def _run_on(spec: AnalysisSpec, device: Any, progress: Callable[[str, int, int], None] | None,
            evaluated: Callable[[Any], None] | None = None, by: Sequence[str] = ()) -> RunResult:
    from illusions.analyses.engine import measure
    from illusions.analyses.faithfulness import record_meta_columns
    from illusions.analyses.summary import check_meta_columns

    spec = resolve_spec_layers(spec)  # -1 -> the last layer's index, checked before any weight loads
    task, model, source, desc = load_task_and_model(spec, device=device)
    spec = spec.resolve_layers(model.cfg.n_layers)  # the model loaded is the one whose config was read
    # The spec's simplifiers (built and checked when the spec was made), placed per head if asked.
    simplifiers = per_head_simplifiers(spec, model.cfg.n_layers, model.cfg.n_heads)
    splits = task.splits()
    eval_splits = list(spec.splits) or [s for s in splits if s != spec.fit_split]
    unknown = [s for s in eval_splits if s not in splits]
    if unknown:
        raise IllusionsError(f"unknown split(s) {', '.join(unknown)}; {spec.task} splits: {', '.join(splits)}")
    # A column the positions lack is refused now, not after the fit and the evaluation.
    have = [record_meta_columns(splits[s]) for s in eval_splits]
    check_meta_columns(spec.match, have, "match on")
    check_meta_columns(by, have, "break down by")
    task_meta = task.meta()
    names = {"category": task_meta["categories"]} if "categories" in task_meta else {}
    names.update(task_meta.get("group_names") or {})
    # Data you bring (task custom) is broken down by every meta column it has.
    breakdowns = tuple(dict.fromkeys((*spec.breakdowns, *task_meta.get("meta_columns", ()))))
    # The engine the Python API calls too (illusions.evaluate). Gaps are measured against iid when
    # it is evaluated (a run of other splits alone has none).
    with out_of_memory_as_error(spec):
        measured = measure(
            model, splits, simplifiers, candidates=task.candidates, fit_split=spec.fit_split,
            fit_n=spec.fit_n, eval_splits=eval_splits, max_seqs=spec.max_seqs, seed=spec.seed,
            batch_size=spec.batch_size, token_budget=spec.token_budget, progress=progress,
            reference=REFERENCE if REFERENCE in eval_splits else None, breakdowns=breakdowns, n_boot=spec.n_boot,
            group_names=names, discrete=task_meta.get("discrete", DISCRETE),
            position_groups=task.position_groups() if isinstance(task, DataSupport) else None, match=spec.match,
            evaluated=evaluated,
        )
    result, rows = measured.result, measured.rows
    proxies = [{"label": label, "simplifier": p.simplifier, "params": p.params}
               for label, p in zip(result.labels, result.proxies, strict=True)]
    doc = to_json(rows, task=spec.task, model=source, proxies=proxies, match=spec.match)
    return RunResult(spec, desc, source, rows, doc, result, task_meta, task=task, model=model)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The tidy rows as CSV: :data:`ROW_FIELDS`, then the ``--match`` control's fields when rows have them."""
    fields = list(ROW_FIELDS) + [f for f in CONTROL_FIELDS if rows and f in rows[0]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row[k]) for k in fields})
    return buf.getvalue()


def _csv_value(x: Any) -> Any:
    if isinstance(x, float):
        return "" if not np.isfinite(x) else repr(round(x, 10))
    return x


def rows_from_csv(text: str, source: str = "metrics.csv") -> list[dict[str, Any]]:
    """Tidy rows read back from ``metrics.csv`` text (empty cells become NaN).

    Raises:
        IllusionsError: a missing column, a row of the wrong width or a cell that is not a number,
            naming ``source`` and the line.
    """
    out = []
    reader = csv.DictReader(io.StringIO(text))
    try:
        for raw in reader:
            line = reader.line_num
            missing = [f for f in ROW_FIELDS if f not in raw]
            if missing:
                raise IllusionsError(f"{source} lacks column(s) {', '.join(missing)}")
            if None in raw or any(raw[f] is None for f in ROW_FIELDS):
                raise IllusionsError(f"{source} line {line} has {'more' if None in raw else 'fewer'} cells than its header")
            row: dict[str, Any] = {}
            for field in ROW_FIELDS + tuple(f for f in CONTROL_FIELDS if raw.get(f) is not None):
                value = raw[field]
                try:
                    if field in _TEXT_FIELDS:
                        row[field] = value
                    elif field == "param_value":
                        row[field] = _number(value) if value != "" else ""
                    elif field in _INT_FIELDS:
                        row[field] = int(float(value)) if value != "" else 0
                    else:
                        row[field] = float(value) if value != "" else float("nan")
                except (ValueError, OverflowError):
                    raise IllusionsError(f"{source} line {line}: {field} holds {value[:20]!r}, not a number") from None
            out.append(row)
    except csv.Error as exc:
        raise IllusionsError(f"{source} is not a readable CSV file (line {reader.line_num}: {exc})") from None
    if not out:
        raise IllusionsError(f"{source} holds no rows")
    return out


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run directory's ``metrics.csv`` as rows with numbers parsed (empty cells become NaN).

    Raises:
        IllusionsError: the file is missing, not UTF-8 text (damaged) or not a tidy table.
    """
    path = Path(run_dir) / "metrics.csv"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise IllusionsError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise IllusionsError(f"{path} is not UTF-8 text (byte {exc.start}); it is damaged") from None
    return rows_from_csv(text, source=str(path))


def check_run_out(spec: AnalysisSpec, out: Path, *, overwrite: bool = False, option: str = "output location",
                  overwrite_option: str = "overwrite=True") -> None:
    """Fail early, before any work, unless ``out`` can receive this run.

    ``out`` must be new, empty, or (with ``overwrite``) an earlier analysis run; it may not be, lie
    inside or contain the model's folder or the package's bundled assets; its location must be
    writable. ``option`` and ``overwrite_option`` are how messages name the two (the CLI passes its
    flags).

    Raises:
        IllusionsError: naming what is in the way.
    """
    try:
        model_dir: Path | None = model_folder(spec)[0]
    except IllusionsError:
        model_dir = None  # no such model: loading it says so, after the other checks of the spec
    check_out(out, model_dir, overwrite=overwrite, option=option, overwrite_option=overwrite_option)


def check_out(out: Path, model_dir: Path | None, *, overwrite: bool = False, option: str = "output location",
              overwrite_option: str = "overwrite=True") -> None:
    """:func:`check_run_out` for a model folder given directly (None: a model in memory): the guards
    every run directory gets, from the CLI and from :meth:`illusions.Evaluation.save` alike."""
    from illusions.bundled import ASSETS

    out = Path(out)
    guards = [(ASSETS, "the bundled models")]
    if model_dir is not None:
        guards.insert(0, (Path(model_dir).resolve(), f"the model folder {model_dir}"))
    resolved = out.resolve()
    for guarded, what in guards:
        if resolved == guarded or guarded in resolved.parents:
            raise IllusionsError(f"{option} {out} is {'inside ' if resolved != guarded else ''}{what}; "
                                 "choose a folder of its own")
        if resolved in guarded.parents:
            raise IllusionsError(f"{option} {out} contains {what}; choose a folder of its own")
    check_output_dir(out, ANALYSIS_RUN, overwrite=overwrite, option=option, overwrite_option=overwrite_option)


def default_run_dir(spec: AnalysisSpec, name: str | None = None, *, root: Path = Path("runs"),
                    overwrite: bool = False) -> tuple[Path, bool, str | None]:
    """Where a run goes when no ``--out`` was given: ``<root>/<name>`` (default the spec's
    :meth:`~AnalysisSpec.default_name`), so that running the same command again just works.

    An earlier run there of the same spec (its ``config.json`` records the same resolved spec, its
    files are as illusions wrote them) is replaced; otherwise the run goes to the first free numbered
    folder ``<name>-2``, ``<name>-3``, ... (or the one holding the same spec). With ``overwrite`` it is
    ``<root>/<name>`` whatever it holds (:func:`check_run_out` still refuses a folder not ours).

    Returns:
        ``(folder, replace, note)``: ``replace`` says the folder holds the earlier run to replace;
        ``note`` is a line to show when the run goes elsewhere than ``<root>/<name>`` (else None).

    Raises:
        IllusionsError: the name is not one plain path component.
    """
    from illusions.io import check_inside, check_name, numbered_dir

    base = Path(root) / check_name(name or spec.default_name(), "run name")
    check_inside(base, root, "run folder")
    if overwrite:
        return base, True, None
    kind = ANALYSIS_RUN
    if spec.checkpoints:
        from illusions.analyses.checkpoints import CHECKPOINT_SWEEP

        kind = CHECKPOINT_SWEEP
    folder, replace = numbered_dir(base, kind, lambda d: same_spec(d, spec))
    note = None if folder == base else (f"{base} holds another run (or files that are not an unchanged run of "
                                        f"this spec); this run goes to {folder}")
    return folder, replace, note


def same_spec(folder: Path, spec: AnalysisSpec) -> bool:
    """Whether the run (or analysis over checkpoints) in ``folder`` records ``spec`` in its config.json."""
    try:
        saved = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(saved, dict) and saved.get("spec") == json.loads(json.dumps(spec.to_dict()))


def run_config(run: RunResult) -> dict[str, Any]:
    """The ``config.json`` document of a run: resolved spec, version, model, task, sizes."""
    from illusions.weights import weights_sha256

    # The sha256 of the weight files the model was loaded from, so a later report can refuse another model.
    digests = weights_sha256(run.model) if run.model is not None else None
    return {
        "illusions_version": __version__,
        "spec": run.spec.to_dict(),
        "model": {"source": run.model_source, "architecture": run.model_description,
                  **({"weights_sha256": digests} if digests else {})},
        "task": run.task_meta,
        "fit_rows": int(run.analysis.fit_rows.shape[0]),
        "evaluated_sequences": {k: int(v.shape[0]) for k, v in run.analysis.split_rows.items()},
        # Where it ran, apart from the spec: not what was computed, so not part of a run's identity.
        "runtime": run.runtime,
    }


def write_run(run: RunResult, out: Path, *, extra_files: Callable[[Path], None] | None = None,
              overwrite: bool = False) -> Path:
    """Write the run directory atomically; ``extra_files(stage)`` may add e.g. the report.

    An earlier run in ``out`` is replaced only with ``overwrite`` (files in it that illusions did not
    write are carried over); a folder that holds anything else is never touched.
    """
    out = Path(out)
    config = run_config(run)
    try:
        with staged_dir(out, kind=ANALYSIS_RUN, replace=overwrite) as stage:
            atomic_write_json(stage / "config.json", config)
            atomic_write_json(stage / "metrics.json", run.document)
            atomic_write_text(stage / "metrics.csv", rows_to_csv(run.rows))
            atomic_write_bytes(stage / "records.npz", _records_npz(run.analysis))
            for i, proxy in enumerate(run.analysis.proxies):
                proxy.save(stage / "proxies" / f"{i:02d}")
            if extra_files is not None:
                extra_files(stage)
    except PermissionError as exc:
        raise IllusionsError(f"cannot write {out}: {exc.strerror}") from None
    return out


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What the tables of a run need, without the model, the task or the records: what a job that
    ran an analysis elsewhere (a Slurm job, :func:`illusions.reproduction.run.analyze_into`) sends back."""

    spec: AnalysisSpec
    model_description: str
    model_source: str
    rows: list[dict[str, Any]]
    document: dict[str, Any]


def _compact(values: np.ndarray) -> np.ndarray:
    """``values`` as float32 when that loses nothing (a warning signal of a float32 model), else as
    they are; read back as float64, they are the same numbers."""
    small = values.astype(np.float32)
    return small if np.array_equal(small, values, equal_nan=True) else values


def _records_npz(result: Any) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    for (split, j), rec in result.records.items():
        prefix = f"{split}/{j}/"
        for field in ("rows", "pos", "target", "original_pred", "proxy_pred", "attention_jsd", "kl"):
            arrays[prefix + field] = getattr(rec, field)
        for k, v in rec.meta.items():
            arrays[prefix + "meta/" + k] = v
        if rec.sparse is not None:
            for k, v in rec.sparse.arrays().items():
                arrays[prefix + "sparse/" + k] = v
        for k, v in rec.warnings.items():
            arrays[prefix + "warn/" + k] = _compact(v)
        for k, v in rec.downstream.items():
            arrays[prefix + "down/" + k] = v
    for split, rows in result.split_rows.items():
        arrays[f"{split}/evaluated_rows"] = rows
    arrays["fit_rows"] = result.fit_rows
    arrays["labels"] = np.array(json.dumps(result.labels))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
