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
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.io import atomic_write_bytes, atomic_write_text

REPORT_FILE = "report.html"
# Sequences per split drawn in the geometry panels and read for the latent table.
GEOMETRY_SEQS = 200


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
    """``records.npz`` back as ``(records, split_rows, fit_rows, labels)`` (no pickle involved).

    Each array's header is checked against the bytes its member holds before numpy reads it, so a
    header claiming 2^40 elements is refused instead of allocated.
    """
    unreadable = f"{path} is not a readable records file (not an intact .npz archive)"
    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise IllusionsError(f"{path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError):
        # numpy's own message for a file that is not an .npz suggests allow_pickle, which is wrong here.
        raise IllusionsError(unreadable) from None
    if "fit_rows" not in arrays or "labels" not in arrays:
        raise IllusionsError(f"{path} is not an illusions records file (no fit_rows/labels)")
    try:
        return _records_of(arrays)
    except (KeyError, ValueError, IndexError, TypeError, RecursionError) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise IllusionsError(f"{path} is not an intact illusions records file ({detail})") from None


def _check_npz_sizes(path: Path) -> None:
    """Refuse an ``.npz`` member whose ``.npy`` header claims another size than the member holds."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as fh:
                major, _ = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
                claimed = fh.tell() + math.prod(shape) * dtype.itemsize
            if dtype.hasobject or claimed != info.file_size:
                raise IllusionsError(f"{path} is not an intact records file: {info.filename} claims shape "
                                     f"{_shape(shape)} of {dtype} ({claimed:,} bytes) but holds {info.file_size:,} bytes")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(f"{n:,}" if n < 10**15 else "~10^15+" for n in shape) + ")"


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
            # Stored as float32 where that is exact (analyses/run._compact); float64 as the run had them.
            warnings={k.removeprefix("warn/"): v.astype(np.float64) for k, v in f.items() if k.startswith("warn/")},
            downstream={k.removeprefix("down/"): v for k, v in f.items() if k.startswith("down/")},
        )
    # npz keys come back sorted; the evaluation order is the one metrics.json lists.
    return records, split_rows, arrays["fit_rows"], labels


def run_folder(run_dir: Path) -> Path:
    """The analysis run directory ``run_dir`` names, a symbolic link to one followed: the one check of
    "is this a run directory" (a folder holding every result file).

    Raises:
        IllusionsError: naming what ``run_dir`` is instead.
    """
    from illusions.analyses.run import RESULT_FILES

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.is_symlink():
            raise IllusionsError(f"{run_dir} is a symbolic link to {os.readlink(run_dir)}, which is not a directory")
        raise IllusionsError(f"{run_dir} is not a directory ({'a file' if run_dir.exists() else 'it does not exist'})")
    missing = [f for f in RESULT_FILES if not (run_dir / f).is_file()]
    if missing:
        raise IllusionsError(f"{run_dir} is not an analysis run directory (missing {', '.join(missing)})")
    return run_dir.resolve() if run_dir.is_symlink() else run_dir


def _run_config(run_dir: Path) -> dict[str, Any]:
    config = read_json(run_dir / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise IllusionsError(f"{run_dir / 'config.json'} has no analysis spec")
    return config


def check_model_unchanged(run_dir: Path, config: dict[str, Any], model: Any) -> None:
    """Refuse a model whose weight files differ from the ones the run recorded (``model.weights_sha256``
    in its ``config.json``): a report would show another model's attention beside this run's numbers.
    Runs from before the record, and models built in this process, pass."""
    from illusions.weights import weights_sha256

    entry = config.get("model")
    recorded = entry.get("weights_sha256") if isinstance(entry, dict) else None
    if recorded is None:
        return
    where = Path(run_dir) / "config.json"
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise IllusionsError(f"{where}: model.weights_sha256 is not a table of weight files and their sha256")
    loaded = weights_sha256(model)
    if loaded is None:
        return
    for name in sorted(set(recorded) | set(loaded)):
        if recorded.get(name) != loaded.get(name):
            raise IllusionsError(f"the weights of model {entry.get('source', '')} ({name}) are not those run "
                                 f"{run_dir} analysed: their sha256 differs from the one {where} records; "
                                 "restore the model or run the analysis again")


def inputs_from_dir(run_dir: Path, task: Any = None, model: Any = None) -> ReportInputs:
    """Report inputs from a saved run directory; the task and model are loaded unless given."""
    from illusions.analyses.run import AnalysisSpec, read_rows

    run_dir = run_folder(run_dir)
    config = _run_config(run_dir)
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
    check_model_unchanged(run_dir, config, model)
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
    from illusions.reports import attention, html, interactive, plots, signals

    spec = inputs.spec
    splits = list(inputs.split_rows)
    all_splits = inputs.task.splits()
    j = focus_proxy(inputs.rows, inputs.labels)
    label = inputs.labels[j]
    proxy = inputs.proxies[j]
    colours = {spec.fit_split: interactive.FIT_COLOUR, **plots.split_colors(splits)}

    examples, example_data = _examples_section(inputs, j, label, proxy, splits, all_splits)
    row_ids, drawn = _drawn_rows(inputs, splits, all_splits)
    geometry_section, geo_data = _geometry_section(inputs, label, proxy, row_ids, drawn, all_splits)
    latents_sections = _latents_sections(inputs, label, proxy, row_ids, drawn)
    signals_figure = _signals_figure(inputs, j, label, proxy, splits)
    figures: list[Any] = []
    # The verdict in words first, then the tables it is read from.
    sections: list[Any] = [_summary_section(inputs, label, splits, all_splits, figures)]
    if len(inputs.labels) > 1:
        sections.append(_sweep_section(inputs, splits, figures))
    sections += [examples, geometry_section, *latents_sections]
    if signals.warning_cells(inputs.rows):
        sections += _warning_sections(inputs, label, splits, figures, signals_figure)
    sections += _breakdown_sections(inputs, label, splits, figures)
    sections.append(html.Section("configuration", "Configuration", (
        "<p>The fully resolved run configuration (<code>config.json</code>), collapsed.</p>"
        + html.config_block(inputs.config))))

    title = f"{spec.task}: how faithful is {label.split('(')[0]} out of distribution?"
    data = interactive.payload(example_data, geo_data, colours, attention.PACK_SCALE)
    page = html.render_page(title=title, subtitle=_subtitle(inputs, label), sections=sections, data=data)
    return page, figures


def _summary_section(inputs: ReportInputs, label: str, splits: list[str], all_splits: dict[str, Any],
                     figures: list[Any]) -> Any:
    """The verdict in words, the summary tables, the accuracy figure (added to ``figures``), the splits."""
    from illusions.reports import html, interactive, plots, verdict

    acc = plots.accuracy_figure(inputs.rows, label, splits)
    figures.append(acc)
    defs = "".join(f"<li><b>{html.esc(s)}</b>: {html.esc(all_splits[s].description or 'no description')}</li>"
                   for s in splits if s in all_splits)
    words = verdict.sentences(inputs.rows, label, splits)
    down = verdict.downstream_sentences(inputs.rows, label, splits)
    return html.Section("summary", "Summary", (
        interactive.verdict_list(words)
        + "<p class=note>Agreement: share of scored positions where the proxy predicts what the model predicts; "
        "length-matched: the gap to iid re-weighted to the split's lengths. A proxy counts as faithful in "
        f"distribution when its iid agreement is at least {verdict.FAITHFUL}; only then does a significant "
        "change of accuracy against iid say whether it under- or over-states the model's generalization.</p>"
        + html.summary_tables(inputs.rows, splits, inputs.labels)
        + html.downstream_tables(inputs.rows, splits, inputs.labels, interactive.verdict_list(down) if down else "")
        + html.figure(acc, f"Original accuracy, proxy accuracy and agreement of {html.esc(label)} per split.")
        + (f"<h3>Split definitions</h3><ul>{defs}</ul>" if defs else "")))


def _sweep_section(inputs: ReportInputs, splits: list[str], figures: list[Any]) -> Any:
    """The sweep figure (added to ``figures``) of a run with several proxies."""
    from illusions.reports import html, plots

    sweep = plots.sweep_figure(inputs.rows, splits)
    figures.append(sweep)
    return html.Section("sweep", "Sweep", html.figure(
        sweep, "Agreement, attention JSD and accuracy per proxy (against the swept parameter when the "
               "proxies form a sweep), one colour per split (bars: 95% intervals)."))


def _examples_section(inputs: ReportInputs, j: int, label: str, proxy: Any, splits: list[str],
                      all_splits: dict[str, Any]) -> tuple[Any, Any]:
    """The example browser of proxy ``j`` and its data for the page's payload."""
    from illusions.reports import attention, html, interactive

    examples = attention.build_examples(
        inputs.model, all_splits, {s: inputs.records[(s, j)] for s in splits}, proxy, inputs.task.vocab.tokens)
    browser, example_data = interactive.examples_section(examples, splits)
    return html.Section("examples", "Examples", (
        f"<p>Per split, the sequences where <b>{html.esc(label)}</b> changes the most, a median number and the "
        "fewest of the model's predictions (then highest attention JSD). Filter by split or by a range of any "
        "column, click a header to sort, click a row to open its card: the tokens, every scored position's "
        "target and both predictions with KL(original || proxy) and attention JSD, and the attention of the "
        "simplified heads, original model (left) beside the proxy (right); hover a head to zoom, click to lock."
        " Each split's first card is open; the others draw when opened.</p>" + browser)), example_data


def _drawn_rows(inputs: ReportInputs, splits: list[str],
                all_splits: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The leading sequences (at most :data:`GEOMETRY_SEQS`) of the fitting data and of each split that
    the geometry and latents sections draw: ``(row_ids, drawn)``."""
    from illusions.reports import geometry

    fit_name = inputs.spec.fit_split
    row_ids = {fit_name: inputs.fit_rows[:GEOMETRY_SEQS],
               **{s: inputs.split_rows[s][:GEOMETRY_SEQS] for s in splits if s != fit_name}}
    drawn = {s: geometry.sample_rows(all_splits[s], rows, GEOMETRY_SEQS) for s, rows in row_ids.items()
             if s in all_splits}
    return row_ids, drawn


def _geometry_section(inputs: ReportInputs, label: str, proxy: Any, row_ids: dict[str, Any],
                      drawn: dict[str, Any], all_splits: dict[str, Any]) -> tuple[Any, list[Any]]:
    """What the proxy keeps and throws away, and the panels' data (none when it keeps no subspace)."""
    from illusions.reports import geometry, html, interactive

    fit_name = inputs.spec.fit_split
    geo_data: list[Any] = []
    if geometry.supported(proxy) and fit_name in drawn:
        # The leading sequences holding enough scored positions for the points drawn, not all of them.
        geo_n = {s: geometry.rows_needed(split) for s, split in drawn.items()}
        geo_ids = {s: row_ids[s][: geo_n[s]] for s in drawn}
        geo = {s: split if geo_n[s] == len(split) else geometry.sample_rows(all_splits[s], geo_ids[s], geo_n[s])
               for s, split in drawn.items()}
        found = geometry.panels(inputs.model, proxy, geo[fit_name], geo, fit_name=fit_name, row_ids=geo_ids,
                                seed=inputs.spec.seed)
        geo_data = geometry.panel_payload(found, list(geo))
        centroid = found and found[0].kind == "centroid"
        body = (f"<p>What <b>{html.esc(label)}</b> keeps and what it throws away, on the {len(geo[fit_name])} "
                f"{html.esc(fit_name)} sequences it was fitted on (grey) and on each split (at most "
                f"{GEOMETRY_SEQS} sequences, fewer once they hold {geometry.ENOUGH_POSITIONS} scored positions; "
                f"{geometry.MAX_POINTS} points per panel and split). Horizontal: the "
                "proxy's output on its first kept direction (the top principal direction of its outputs on the "
                "fitting data); vertical: "
                + ("the distance to the nearest centroid" if centroid else "the norm of the part the proxy "
                   "removes (off its kept subspace)")
                + ", |x − proxy(x)|. Queries at scored positions, keys at the attended position. Vectors that "
                "leave what was fitted sit higher. Hover a point for its values, drag to zoom (double-click "
                "resets), click a legend entry to hide a split.</p>"
                + interactive.geometry_section(found, fit_name, list(geo)))
    else:
        body = ("<p class=note>This proxy replaces no query, key or residual vector by a projection or a "
                "centroid, so there is no kept subspace to draw.</p>")
    return html.Section("geometry", "Geometry: leaving the fitted subspace", body), geo_data


def _latents_sections(inputs: ReportInputs, label: str, proxy: Any, row_ids: dict[str, Any],
                      drawn: dict[str, Any]) -> list[Any]:
    """The latents section of a proxy with a dictionary (none otherwise)."""
    from illusions.reports import html, interactive, latents

    fit_name = inputs.spec.fit_split
    found_latents = latents.latents(inputs.model, proxy, drawn.get(fit_name), drawn, inputs.task.vocab.tokens,
                                    fit_name=fit_name, row_ids=row_ids) if fit_name in drawn else []
    if not found_latents:
        return []
    groups = list(drawn)
    return [html.Section("latents", "Latents", (
        f"<p>Latents of <b>{html.esc(label)}</b>: the share of token positions where each is active on the "
        f"fitting data and on each split (at most {GEOMETRY_SEQS} sequences each), <i>new</i> when it never "
        "fired on the data the dictionary was fitted on, and the OOD score (largest rise of frequency from "
        "the fitting data to a split other than iid). For the top latents, their strongest activations out "
        "of distribution and the tokens their decoder direction promotes directly (W_dec · W_U, final layer "
        f"norm ignored). At most {latents.MAX_ROWS} latents listed.</p>"
        + interactive.latents_section(found_latents, groups, fit_name)))]


def _signals_figure(inputs: ReportInputs, j: int, label: str, proxy: Any, splits: list[str]) -> Any:
    """The figure of proxy ``j``'s per-position warning signals, from its records (None without any)."""
    from illusions.analyses.warning_signals import THRESHOLDS
    from illusions.reports import signals

    records = {s: inputs.records[(s, j)] for s in splits if (s, j) in inputs.records}
    return signals.figure(records, label, splits, (getattr(proxy, "info", None) or {}).get(THRESHOLDS, {}))


def _warning_sections(inputs: ReportInputs, label: str, splits: list[str], figures: list[Any], fig: Any) -> list[Any]:
    """The warning signals of the run's proxies (the caller checked that some proxy has any): sentences
    and table from the rows, ``fig`` (:func:`_signals_figure`, added to ``figures``) beside them."""
    from illusions.reports import html, signals

    if fig is not None:
        figures.append(fig)
    return [html.Section("warnings", "Warning signals: do the activations flag the failures?",
                         signals.section_body(inputs.rows, splits, inputs.labels, label, fig))]


def _breakdown_sections(inputs: ReportInputs, label: str, splits: list[str], figures: list[Any]) -> list[Any]:
    """Agreement by key depth; for tasks without it (code), by character category and nesting depth; and
    by each meta column of data you bring. Their figures are added to ``figures``."""
    from illusions.reports import html, plots

    sections: list[Any] = []
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
    drawn_by = {"key_depth"} if breakdown is not None else {"key_depth", "category", "depth"}
    for by in inputs.config.get("task", {}).get("meta_columns", []):
        extra = None if by in drawn_by else plots.breakdown_figure(inputs.rows, label, splits, by=by)
        if extra is not None:
            extra = dataclasses.replace(extra, name=f"fig_meta_{by}")  # never a built-in figure's name
            figures.append(extra)
            sections.append(html.Section(f"by-{by}", f"Agreement by {by}", html.figure(extra, (
                f"Agreement and accuracy of {html.esc(label)} by the meta column {html.esc(by)} of your data, "
                "one line per split (bars: 95% intervals)."))))
    return sections


def _subtitle(inputs: ReportInputs, label: str) -> list[str]:
    """The page's subtitle lines: the model, the proxies and how they were fitted."""
    from illusions.reports import html

    spec = inputs.spec
    model_cfg = inputs.config.get("model", {})
    return [
        f"model: {html.esc(model_cfg.get('source', ''))} ({html.esc(model_cfg.get('architecture', ''))})",
        f"proxies: {html.esc(', '.join(inputs.labels))}; fitted on {len(inputs.fit_rows)} "
        f"{html.esc(spec.fit_split)} sequences; seed {spec.seed}"
        + (f"; detailed figures show {html.esc(label)} (agreement varies most across splits)"
           if len(inputs.labels) > 1 else ""),
    ]


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


def write_run_with_report(run: Any, out: Path, *, report: bool = True, overwrite: bool = False) -> None:
    """Write a finished run's directory (:func:`illusions.analyses.run.write_run`), with
    ``report.html`` and its figures inside when ``report``, all in one atomic step.

    Args:
        run: an :class:`illusions.analyses.run.RunResult`.
        out: the run directory.
        report: also write the report files.
        overwrite: replace an earlier run of ours in ``out`` (the caller checked the location).
    """
    from illusions.analyses.run import write_run

    extra = None
    if report:

        def extra(stage: Path) -> None:
            write_report_files(run, stage)

    write_run(run, Path(out), extra_files=extra, overwrite=overwrite)


def _is_report_file(name: str) -> bool:
    return name == REPORT_FILE or (fnmatch.fnmatchcase(name, "fig_*.png") and "/" not in name)


def check_report_dir(run_dir: Path, *, overwrite: bool = False, overwrite_option: str = "overwrite=True") -> None:
    """Fail before any work unless a report can be rebuilt in ``run_dir``.

    It must be an analysis run of ours whose result files are as illusions wrote them, and a
    ``report.html`` or ``fig_*.png`` there that illusions did not write (or that changed since; in a
    run without a manifest, which cannot tell, any of them) is replaced only with ``overwrite`` (named
    ``overwrite_option`` in the message); the folder must be writable.

    Raises:
        IllusionsError: naming the folder or file in the way.
    """
    from illusions.analyses.run import ANALYSIS_RUN
    from illusions.io import MANIFEST_FILE, check_creatable, check_manifest, kind_noun, ownership

    run_dir = run_folder(run_dir)
    check_manifest(run_dir)  # a garbled manifest must not pass for a run from before manifests
    own = ownership(run_dir, ANALYSIS_RUN)
    if own.state != "ours":
        _run_config(run_dir)  # an unreadable config.json is named as such, not as another kind of output
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
    if own.kind is None and not overwrite:
        # A run without a manifest (from before manifests, or the manifest was removed): nothing
        # records which report files illusions wrote, so any there may be the user's.
        unknown = sorted(p.name for p in run_dir.iterdir()
                         if (p.is_file() or p.is_symlink()) and _is_report_file(p.name))
        if unknown:
            raise IllusionsError(f"{run_dir / unknown[0]} may not have been written by illusions (the run has no "
                                 f"{MANIFEST_FILE} to tell); pass {overwrite_option} to replace it")
    _run_config(run_dir)
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
    run_dir = run_folder(run_dir)
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
