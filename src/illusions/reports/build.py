"""Assemble a run's report from a live :class:`RunResult` or from a saved run directory.

Both paths go through :class:`ReportInputs` built from the same saved forms (rows as they read back
from ``metrics.csv``, records as stored in ``records.npz``, ``config.json``), so rebuilding a
report from disk gives the bytes ``analyze`` wrote, and the same run always gives the same report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.io import atomic_write_bytes, atomic_write_text

REPORT_FILE = "report.html"
# Sequences per split used for the query/key scatter, and heads drawn there.
PCA_SEQS = 200
PCA_HEADS = 4


@dataclasses.dataclass
class ReportInputs:
    """What a report is drawn from.

    Attributes:
        spec: the run's :class:`illusions.analyses.run.AnalysisSpec`.
        config: the resolved configuration (``config.json``).
        rows: tidy rows (fields of ``summary.ROW_FIELDS``).
        proxies: fitted proxies, in label order.
        labels: proxy labels.
        split_rows: evaluated split rows per split, in evaluation order.
        records: ``(split, proxy_index) -> Records``.
        fit_rows: rows of the fitting split the proxies were fitted on.
        task: the task (``splits()``, ``vocab``).
        model: the original HookedTransformer.
    """

    spec: Any
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    proxies: list[Any]
    labels: list[str]
    split_rows: dict[str, np.ndarray]
    records: dict[tuple[str, int], Any]
    fit_rows: np.ndarray
    task: Any
    model: Any


def inputs_from_run(run: Any, directory: Path | None = None) -> ReportInputs:
    """Report inputs of a live run; rows pass through their CSV form so a rebuild matches exactly."""
    from illusions.analyses.run import rows_from_csv, rows_to_csv, run_config

    config_path = Path(directory) / "config.json" if directory is not None else None
    config = read_json(config_path) if config_path is not None and config_path.is_file() else run_config(run)
    result = run.analysis
    return ReportInputs(
        spec=run.spec, config=config, rows=rows_from_csv(rows_to_csv(run.rows)), proxies=list(result.proxies),
        labels=list(result.labels), split_rows=dict(result.split_rows), records=dict(result.records),
        fit_rows=result.fit_rows, task=run.task, model=run.model,
    )


def read_records(path: Path) -> tuple[dict[tuple[str, int], Any], dict[str, np.ndarray], np.ndarray, list[str]]:
    """``records.npz`` back as ``(records, split_rows, fit_rows, labels)`` (no pickle involved)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise IllusionsError(f"{path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        # numpy's own message for a file that is not an .npz suggests allow_pickle, which is wrong here.
        raise IllusionsError(f"{path} is not a readable records file (not an intact .npz archive)") from None
    if "fit_rows" not in arrays or "labels" not in arrays:
        raise IllusionsError(f"{path} is not an illusions records file (no fit_rows/labels)")
    try:
        return _records_of(arrays)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise IllusionsError(f"{path} is not an intact illusions records file ({type(exc).__name__}: {exc})") from None


def _records_of(arrays: dict[str, np.ndarray]) -> tuple[dict[tuple[str, int], Any], dict[str, np.ndarray],
                                                         np.ndarray, list[str]]:
    from illusions.analyses.faithfulness import Records
    from illusions.analyses.sparse import SparseStats

    labels = json.loads(str(arrays["labels"]))
    split_rows: dict[str, np.ndarray] = {}
    fields: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == "evaluated_rows":
            split_rows[parts[0]] = value
        elif len(parts) >= 3:
            fields.setdefault((parts[0], int(parts[1])), {})["/".join(parts[2:])] = value
    records = {}
    for (split, j), f in fields.items():
        evaluated = split_rows[split]
        order = np.argsort(evaluated, kind="stable")
        seq = order[np.searchsorted(evaluated, f["rows"], sorter=order)] if len(f["rows"]) else f["rows"]
        records[(split, j)] = Records(
            rows=f["rows"], seq=seq, pos=f["pos"], target=f["target"], original_pred=f["original_pred"],
            proxy_pred=f["proxy_pred"], attention_jsd=f["attention_jsd"], kl=f["kl"],
            meta={k.removeprefix("meta/"): v for k, v in f.items() if k.startswith("meta/")},
            sparse=SparseStats.from_arrays({k.removeprefix("sparse/"): v for k, v in f.items()
                                            if k.startswith("sparse/")}) if "sparse/err" in f else None,
        )
    # npz keys come back sorted; the evaluation order is the one metrics.json lists.
    return records, split_rows, arrays["fit_rows"], labels


def inputs_from_dir(run_dir: Path, task: Any = None, model: Any = None) -> ReportInputs:
    """Report inputs from a saved run directory; the task and model are loaded unless given."""
    from illusions.analyses.run import RESULT_FILES, AnalysisSpec, read_rows

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IllusionsError(f"{run_dir} is not a directory")
    missing = [f for f in RESULT_FILES if not (run_dir / f).is_file()]
    if missing:
        raise IllusionsError(f"{run_dir} is not an analysis run directory (missing {', '.join(missing)})")
    config = read_json(run_dir / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise IllusionsError(f"{run_dir / 'config.json'} has no analysis spec")
    spec = AnalysisSpec.from_dict(config["spec"], source=str(run_dir / "config.json"))
    rows = read_rows(run_dir)
    records, split_rows, fit_rows, labels = read_records(run_dir / "records.npz")
    metrics = read_json(run_dir / "metrics.json")
    order = list(config.get("evaluated_sequences") or metrics.get("splits") or split_rows)
    split_rows = {s: split_rows[s] for s in order if s in split_rows}
    proxies = _load_proxies(run_dir / "proxies", len(labels))
    if task is None or model is None:
        from illusions.analyses.run import load_task_and_model

        task, model, _, _ = load_task_and_model(spec)
    saved = (config.get("task") or {}).get("fingerprint")
    if saved is not None and task.meta().get("fingerprint") != saved:
        raise IllusionsError(f"the data of {run_dir} changed since the run (its files' fingerprint differs); "
                             "run the analysis again instead")
    return ReportInputs(spec=spec, config=config, rows=rows, proxies=proxies, labels=labels,
                        split_rows=split_rows, records=records, fit_rows=fit_rows, task=task, model=model)


def _load_proxies(directory: Path, n: int) -> list[Any]:
    from illusions.simplifiers.base import Proxy

    found = sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
    if len(found) != n:
        raise IllusionsError(f"{directory} holds {len(found)} proxies but the run has {n}")
    return [Proxy.load(p) for p in found]


def focus_proxy(rows: list[dict[str, Any]], labels: list[str]) -> int:
    """The proxy drawn in detail: for a sweep, the one whose agreement varies most across splits."""
    if len(labels) == 1:
        return 0
    spread = []
    for label in labels:
        values = [r["value"] for r in rows if r["group_by"] == "all" and r["proxy"] == label
                  and r["metric"] == "agreement" and math.isfinite(r["value"])]
        spread.append(max(values) - min(values) if values else -1.0)
    return int(np.argmax(spread))


def build_report(inputs: ReportInputs) -> tuple[str, list[Any]]:
    """The report page and its static figures.

    Returns:
        ``(html, figures)``; each figure also goes beside the page as ``<name>.png``.
    """
    from illusions.reports import attention, geometry, html, plots

    spec = inputs.spec
    splits = list(inputs.split_rows)
    all_splits = inputs.task.splits()
    j = focus_proxy(inputs.rows, inputs.labels)
    label = inputs.labels[j]
    proxy = inputs.proxies[j]
    figures: list[Any] = []
    sections: list[Any] = []

    model_cfg = inputs.config.get("model", {})
    sections.append(html.Section("configuration", "Configuration", (
        "<p>The fully resolved run configuration (<code>config.json</code>).</p>"
        + html.config_block(inputs.config))))

    acc = plots.accuracy_figure(inputs.rows, label, splits)
    figures.append(acc)
    defs = "".join(f"<li><b>{html.esc(s)}</b>: {html.esc(all_splits[s].description or 'no description')}</li>"
                   for s in splits if s in all_splits)
    sections.append(html.Section("summary", "Per-split summary", (
        html.summary_tables(inputs.rows, splits, inputs.labels)
        + html.figure(acc, f"Original accuracy, proxy accuracy and agreement of {html.esc(label)} per split.")
        + (f"<h3>Split definitions</h3><ul>{defs}</ul>" if defs else ""))))

    if len(inputs.labels) > 1:
        sweep = plots.sweep_figure(inputs.rows, splits)
        figures.append(sweep)
        sections.append(html.Section("sweep", "Sweep", html.figure(
            sweep, "Agreement, attention JSD and accuracy per proxy (against the swept parameter when the "
                   "proxies form a sweep), one colour per split (bars: 95% intervals).")))

    examples = attention.build_examples(
        inputs.model, all_splits, {s: inputs.records[(s, j)] for s in splits}, proxy, inputs.task.vocab.tokens)
    worst = max(range(len(examples)), key=lambda i: (examples[i].choice.disagreements,
                                                     _nan_low(examples[i].choice.mean_jsd), -i), default=None)
    intro = (f"<p>Attention of the simplified heads of <b>{html.esc(label)}</b>, original model (left) beside "
             "the proxy (right), for the sequence of each split where they disagree most (most changed "
             "predictions, then highest attention JSD). Hover a head to zoom, click to lock.")
    if worst is not None:
        c = examples[worst].choice
        intro += (f" The example with most disagreement overall is from <b>{html.esc(c.split)}</b> "
                  f"(row {c.row}, {c.disagreements} changed predictions).")
    intro += "</p>"
    if not examples:
        intro += "<p class=note>This proxy changes no attention head directly, so there is nothing to draw.</p>"
    attn_html, attn_data = html.attention_section(examples, intro)
    sections.append(html.Section("attention", "Attention patterns", attn_html))

    agreement = {s: next((r["value"] for r in inputs.rows if r["group_by"] == "all" and r["proxy"] == label
                          and r["split"] == s and r["metric"] == "agreement"), float("nan")) for s in splits}
    ood = geometry.pick_ood_split(agreement)
    heads = [tuple(h) for h in proxy.heads][:PCA_HEADS]
    if ood is not None and heads and spec.fit_split in all_splits:
        fit = geometry.sample_rows(all_splits[spec.fit_split], inputs.fit_rows, PCA_SEQS)
        far = geometry.sample_rows(all_splits[ood], inputs.split_rows[ood], PCA_SEQS)
        panels = geometry.qk_panels(inputs.model, fit, far, heads, seed=spec.seed)
        pca = plots.scatter_figure(panels, spec.fit_split, ood)
        figures.append(pca)
        body = html.figure(pca, (
            f"Queries (at scored positions) and keys (at the attended position) of {len(heads)} simplified "
            f"head(s), projected on the first two principal directions of the {len(fit)} "
            f"{html.esc(spec.fit_split)} sequences' vectors. Circles: {html.esc(spec.fit_split)} "
            f"(in distribution); triangles: {html.esc(ood)} ({len(far)} sequences; the split where the proxy "
            "agrees least). At most 200 points per split and panel."))
    else:
        body = "<p class=note>No simplified attention head or no out-of-distribution split to project.</p>"
    sections.append(html.Section("qk-pca", "Queries and keys (2-D PCA)", body))

    breakdown = plots.breakdown_figure(inputs.rows, label, splits, by="key_depth")
    if breakdown is not None:
        figures.append(breakdown)
        body = html.figure(breakdown, (
            f"Agreement and accuracy of {html.esc(label)} by the depth of the attended bracket "
            "(key_depth), one line per split (bars: 95% intervals)."))
    else:
        body = "<p class=note>This task records no key_depth column, so there is no key-depth breakdown.</p>"
    sections.append(html.Section("key-depth", "Agreement by key depth", body))
    # Tasks without key depths (code) are broken down by character category and nesting depth.
    if breakdown is None:
        for by, what in (("category", "character category"), ("depth", "nesting depth")):
            extra = plots.breakdown_figure(inputs.rows, label, splits, by=by)
            if extra is not None:
                figures.append(extra)
                sections.append(html.Section(by, f"Agreement by {what}", html.figure(extra, (
                    f"Agreement and accuracy of {html.esc(label)} by {what}, one line per split "
                    "(bars: 95% intervals)."))))
    # Data you bring (task custom) is broken down by each of its meta columns.
    drawn = {"key_depth"} if breakdown is not None else {"key_depth", "category", "depth"}
    for by in inputs.config.get("task", {}).get("meta_columns", []):
        extra = None if by in drawn else plots.breakdown_figure(inputs.rows, label, splits, by=by)
        if extra is not None:
            extra = dataclasses.replace(extra, name=f"fig_meta_{by}")  # never a built-in figure's name
            figures.append(extra)
            sections.append(html.Section(f"by-{by}", f"Agreement by {by}", html.figure(extra, (
                f"Agreement and accuracy of {html.esc(label)} by the meta column {html.esc(by)} of your data, "
                "one line per split (bars: 95% intervals)."))))

    title = f"{spec.task}: how faithful is {label.split('(')[0]} out of distribution?"
    subtitle = [
        f"model: {html.esc(model_cfg.get('source', ''))} ({html.esc(model_cfg.get('architecture', ''))})",
        f"proxies: {html.esc(', '.join(inputs.labels))}; fitted on {len(inputs.fit_rows)} "
        f"{html.esc(spec.fit_split)} sequences; seed {spec.seed}"
        + (f"; detailed figures show {html.esc(label)} (agreement varies most across splits)"
           if len(inputs.labels) > 1 else ""),
    ]
    page = html.render_page(title=title, subtitle=subtitle, sections=sections, attention_data=attn_data)
    return page, figures


def _nan_low(x: float) -> float:
    return x if math.isfinite(x) else -1.0


def write_files(inputs: ReportInputs, directory: Path) -> Path:
    """Write ``report.html`` and the figures' PNGs into ``directory`` (each file atomically)."""
    return Path(directory) / _write_files(inputs, directory)[-1]


def _write_files(inputs: ReportInputs, directory: Path, written: list[str] | None = None) -> list[str]:
    """Write the report's files; ``written`` collects the names of those written so far (each file
    is whole or absent), so that a caller can record them when a later one fails (a full disk)."""
    page, figures = build_report(inputs)
    directory = Path(directory)
    written = [] if written is None else written
    names = [f"{fig.name}.png" for fig in figures] + [REPORT_FILE]
    for fig, name in zip(figures, names, strict=False):
        atomic_write_bytes(directory / name, fig.png)
        written.append(name)
    atomic_write_text(directory / REPORT_FILE, page)
    written.append(REPORT_FILE)
    return names


def write_report_files(run: Any, directory: Path) -> None:
    """Write ``report.html`` and ``fig_*.png`` for a finished run into ``directory``.

    Args:
        run: an :class:`illusions.analyses.run.RunResult` (with its task and model).
        directory: the run's (staging) directory.
    """
    write_files(inputs_from_run(run, directory), directory)


def _is_report_file(name: str) -> bool:
    return name == REPORT_FILE or (fnmatch.fnmatchcase(name, "fig_*.png") and "/" not in name)


def check_report_dir(run_dir: Path, *, overwrite: bool = False, overwrite_option: str = "overwrite=True") -> None:
    """Fail before any work unless a report can be rebuilt in ``run_dir``.

    It must be an analysis run of ours whose result files are as illusions wrote them, and a
    ``report.html`` or ``fig_*.png`` there that illusions did not write (or that changed since) is
    replaced only with ``overwrite`` (named ``overwrite_option`` in the message); the folder must be
    writable.

    Raises:
        IllusionsError: naming the folder or file in the way.
    """
    from illusions.analyses.run import ANALYSIS_RUN, RESULT_FILES
    from illusions.io import MANIFEST_FILE, check_creatable, kind_noun, ownership

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IllusionsError(f"{run_dir} is not a directory")
    missing = [f for f in RESULT_FILES if not (run_dir / f).is_file()]
    if missing:
        raise IllusionsError(f"{run_dir} is not an analysis run directory (missing {', '.join(missing)})")
    own = ownership(run_dir, ANALYSIS_RUN)
    if own.state != "ours":
        raise IllusionsError(f"{run_dir} holds {kind_noun(own.kind)}, not an analysis run")
    damaged = [f for f in own.changed if not _is_report_file(f)]
    if damaged:
        raise IllusionsError(f"{run_dir / damaged[0]} does not match the sha256 recorded in "
                             f"{run_dir / MANIFEST_FILE}: it is damaged or was changed, so a report would not "
                             "show this run; run the analysis again")
    in_way = [f for f in own.foreign if _is_report_file(f)]
    if in_way and not overwrite:
        raise IllusionsError(f"{run_dir / in_way[0]} was not written by illusions or was changed since; "
                             f"pass {overwrite_option} to replace it")
    check_creatable(run_dir)


def rebuild_report(run_dir: Path, *, task: Any = None, model: Any = None, overwrite: bool = False) -> Path:
    """Rebuild ``report.html`` (and its PNGs) from a saved run directory.

    Args:
        run_dir: a directory written by ``illusions analyze`` / ``sweep``.
        task: the task, when the caller has it (default: loaded as the run's spec says).
        model: the original model, likewise.
        overwrite: replace a report file there that illusions did not write (or that changed).

    Returns:
        The path of the rewritten report.
    """
    from illusions.io import disk_full_message, is_disk_full, record_written

    check_report_dir(run_dir, overwrite=overwrite)
    inputs = inputs_from_dir(run_dir, task=task, model=model)
    written: list[str] = []
    try:
        _write_files(inputs, run_dir, written)
    except BaseException as exc:
        # Even when a write fails halfway (a full disk), the manifest lists the files that were
        # replaced, so the run stays one illusions recognises as its own, unchanged.
        if written:
            with contextlib.suppress(OSError):
                record_written(run_dir, written)
        if is_disk_full(exc):
            raise IllusionsError(disk_full_message(
                exc, writing=f"the report into {run_dir} (the run's results are untouched)")) from None
        raise
    record_written(run_dir, written)
    return Path(run_dir) / REPORT_FILE
