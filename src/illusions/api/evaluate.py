"""``illusions.evaluate``: any model, any hypothesis, any splits, in one call, and its result.

    import illusions as il
    res = il.evaluate(model, [("blocks.0.attn.hook_k", mean_keys)], {"train": a, "iid": b, "long": c})
    res                        # in Jupyter: a per-split table with intervals, significant gaps marked
    res.to_pandas()            # tidy rows, the metrics.csv columns; res.table() the wide view
    res.by("position")         # a breakdown
    res.disagreements("long")  # seq, pos, target, original and proxy predictions, KL
    res.show("long", row=3)    # CircuitsVis: original | proxy attention
    res.save("runs/mine")      # the usual run directory (config, metrics, report.html), atomically

The work is :func:`illusions.analyses.engine.measure`, the function ``illusions analyze`` runs too.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.api.data import LoadedModel, as_model, as_splits, check_candidates, token_names
from illusions.api.proxies import HookProxy, as_proxies
from illusions.errors import IllusionsError

if TYPE_CHECKING:
    import pandas as pd

    from illusions.analyses.engine import Measurement
    from illusions.tasks.base import Split

# The per-split columns of the displayed table (metric keys of illusions.metric_table).
SHOWN = ("original_accuracy", "proxy_accuracy", "agreement")
TASK_NAME = "python"  # how a run directory written by Evaluation.save names its task


def evaluate(
    model: Any, proxy: Any, splits: Mapping[str, Any], *, reference: str | None = "iid", fit: Any = None,
    score: Any = None, targets: Any = None, candidates: Any = None, pad: int | None = None, fit_n: int = 1000,
    max_seqs: int | None = None, n_boot: int = 1000, match: Sequence[str] = ("length",), seed: int = 0,
    batch_size: int = 64, device: Any = None, progress: bool = True,
) -> Evaluation:
    """How faithful is a proxy of ``model`` on each split, compared with the model itself?

    Runs the original model and every proxy on every split (each split but the fitting data), and
    measures per scored position whether the proxy predicts what the model predicts (agreement),
    both accuracies, the KL divergence of their next-token distributions and the attention JSD of
    the heads the proxy changes, with 95% bootstrap intervals over sequences and gaps to
    ``reference`` (also against a length-matched ``reference``).

    Args:
        model: a ``HookedTransformer`` in memory (``from_pretrained`` ones and SAELens'
            ``HookedSAETransformer`` included), a model folder (illusions checkpoint or Hugging
            Face), or a bundled model's name (``"dyck"``).
        proxy: a list of ``(hook_name, fn)`` pairs (your hypothesis as TransformerLens hooks, at any
            hook point); a built-in simplifier (``il.svd(rank=4)``, ``il.onehot()``, ...), fitted here
            on ``fit`` or the ``train`` split; a SAELens ``SAE``, spliced in at its hook; a fitted
            ``Proxy``; or a list of these (one table), or a dict naming them.
        splits: split name -> data: token ids as a ``[batch, pos]`` tensor or array, a
            ``(tokens, lengths)`` pair, a list of token lists of any lengths, a JSONL file (as
            ``illusions analyze custom`` reads it) or an :class:`illusions.Split`.
        reference: the split gaps are measured against (None: no gaps); it must be one of
            ``splits``.
        fit: the data built-in simplifiers are fitted on (any form a split takes), or the name of
            one of ``splits``. Default: the split ``train`` when there is one; data-free proxies
            need none. The fitting split is not evaluated.
        score: which positions are scored: a function of one sequence's token ids returning
            positions or a boolean mask, or a dict split -> that function or one list of positions
            per sequence. Default: every position but the last.
        targets: the expected token at each scored position: a function ``(tokens, positions) ->
            ids``, or a dict split -> that function or one list per sequence. Default: the next token.
        candidates: token ids a prediction ranges over (default: the whole vocabulary), e.g. the
            closing brackets of a Dyck model.
        pad: the token id right-padding a token array (default: rows are full length, or the given
            lengths).
        fit_n: fitting sequences (drawn with ``seed``).
        max_seqs: evaluate at most this many sequences per split (None: all).
        n_boot: bootstrap resamples for the intervals.
        match: the meta columns the matched control of ``reference`` is stratified on (default
            ``("length",)``; e.g. ``("length", "distance", "key_depth")`` for the strict control, whose
            gap and coverage then appear as ``gap_vs_control`` / ``control_coverage``).
        seed: seeds the choice of sequences, k-means and the bootstrap.
        batch_size: sequences per forward pass.
        device: where a model loaded from a folder goes (a model in memory stays where it is).
        progress: show a progress bar (``tqdm.auto``: a widget in Jupyter when ipywidgets is
            installed, plain text otherwise).

    Returns:
        The :class:`Evaluation`.

    Raises:
        IllusionsError: bad input, in one line, before any forward pass: an unknown hook name (with the
            nearest valid ones), a missing reference split, token ids outside the vocabulary, a
            simplifier to fit without fitting data, a hook that never fires...
    """
    from illusions.analyses.engine import measure

    loaded, items, labels, data, info = _inputs(model, proxy, splits, reference=reference, fit=fit, score=score,
                                                targets=targets, pad=pad, device=device)
    net = loaded.model
    cands = check_candidates(candidates, int(net.cfg.d_vocab))
    bar = _progress_bar(progress, len(info["eval_splits"]))
    try:
        measured = measure(
            net, data, items, candidates=cands, reference=reference, fit_split=info["fit_split"], fit_n=fit_n,
            eval_splits=info["eval_splits"], max_seqs=max_seqs, seed=seed, batch_size=batch_size,
            breakdowns=("length", *info["meta_columns"]), n_boot=n_boot, group_names=info["group_names"],
            discrete=info["discrete"], match=tuple(match), labels=labels, progress=bar)
    finally:
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]
    settings = {"reference": reference, "fit_split": info["fit_split"], "fit_n": fit_n, "max_seqs": max_seqs,
                "n_boot": n_boot, "match": list(match), "seed": seed, "batch_size": batch_size,
                "candidates": None if cands is None else cands.tolist()}
    return Evaluation(measured, data, loaded, settings, info)


def _inputs(model: Any, proxy: Any, splits: Mapping[str, Any], *, reference: str | None, fit: Any, score: Any,
            targets: Any, pad: int | None, device: Any) -> tuple[LoadedModel, list[Any], list[str | None], Any,
                                                                  dict[str, Any]]:
    """:func:`evaluate`'s model, proxies (with their labels) and splits, checked: ``(loaded, proxies,
    labels, splits, info)``."""
    _tqdm()  # before anything (TransformerLens, SAELens) imports tqdm.auto and warns
    loaded = as_model(model, device=device)
    net = loaded.model
    items, names = as_proxies(proxy)
    items = [p.for_model(net) if isinstance(p, HookProxy) else p for p in items]
    labels = [name if name is not None else p.name if isinstance(p, HookProxy) else None
              for p, name in zip(items, names, strict=True)]
    data, info = as_splits(splits, net, score=score, targets=targets, pad=pad, fit=fit)
    if reference is not None and reference not in info["eval_splits"]:
        raise IllusionsError(f"reference split {reference!r} is not among the evaluated splits "
                             f"({', '.join(info['eval_splits'])}); pass reference='NAME' for one of them, or "
                             "reference=None for no gaps")
    return loaded, items, labels, data, info


def _tqdm() -> Any:
    """``tqdm.auto.tqdm``, imported without its "IProgress not found" warning.

    In Jupyter ``tqdm.auto`` picks the widget, which needs ipywidgets; without them it warns once, on
    first import, and falls back to the text bar. Importing it here first, with that warning off,
    also keeps it from the bars of libraries the fit uses (SAELens' trainer)."""
    import importlib.util
    import warnings

    with warnings.catch_warnings():
        if importlib.util.find_spec("ipywidgets") is None:
            from tqdm.std import TqdmWarning

            warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm
    return tqdm


def _progress_bar(enabled: bool, total: int) -> Callable[[str, int, int], None] | None:
    """A ``progress(stage, done, total)`` callback drawing a ``tqdm.auto`` bar over splits (with
    ``close``)."""
    tqdm = _tqdm()
    if not enabled:
        return None
    bar = tqdm(total=total, desc="fitting", unit="split", leave=False)

    def update(stage: str, done: int, n: int) -> None:
        bar.set_description("summarising" if stage == "done" else f"evaluating {stage}")
        bar.n = done
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


@dataclasses.dataclass
class _Spec:
    """What a run directory's ``config.json`` and report read of a run made in Python."""

    settings: dict[str, Any]
    task: str = TASK_NAME

    @property
    def fit_split(self) -> str:
        return self.settings["fit_split"]

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "api": "illusions.evaluate", **self.settings}


@dataclasses.dataclass
class _Task:
    """The splits and token names, as a report reads them from a task."""

    data: dict[str, Split]
    tokens: Any

    def splits(self, progress: Any = None) -> dict[str, Split]:
        return dict(self.data)

    @property
    def vocab(self) -> Any:
        return self

    @property
    def candidates(self) -> None:
        return None


class Evaluation:
    """The result of :func:`illusions.evaluate`: per split and proxy, estimates with intervals and gaps.

    Attributes:
        rows: tidy rows (the columns of ``metrics.csv``), see :meth:`to_pandas`.
        labels: the proxies' names, in the order given.
        splits: the evaluated splits' names.
        reference: the split gaps are measured against (None: no gaps).
        proxies: the proxies as run (built-in simplifiers fitted).
        records: ``(split, proxy index) -> Records``, the per-position outcomes.
        model: the original model.
    """

    def __init__(self, measured: Measurement, data: dict[str, Split], loaded: LoadedModel,
                 settings: dict[str, Any], info: dict[str, Any]) -> None:
        self._measured = measured
        self._data = data
        self._loaded = loaded
        self._settings = settings
        self._info = info
        self.rows: list[dict[str, Any]] = measured.rows
        self.labels: list[str] = list(measured.result.labels)
        self.splits: list[str] = list(measured.result.split_rows)
        self.reference: str | None = measured.reference
        self.proxies: list[Any] = list(measured.result.proxies)
        self.records = measured.result.records
        self.model = loaded.model

    # --- tables ----------------------------------------------------------------------------------

    def to_pandas(self) -> pd.DataFrame:
        """Every row as ``metrics.csv`` holds it: split x proxy x group x metric, with ``value``,
        ``ci_low``/``ci_high`` (95%), ``gap_vs_ref`` (and its interval), ``gap_vs_matched`` (against
        the length-matched reference) and the counts."""
        import pandas as pd

        from illusions.analyses.summary import ROW_FIELDS

        return pd.DataFrame(self.rows, columns=list(ROW_FIELDS))

    def table(self, metric: str | None = None) -> pd.DataFrame:
        """The wide per-split view: one row per (proxy, split), one column per metric (its value).

        Args:
            metric: one metric's estimate, interval and gaps only (e.g. ``"agreement"``).
        """
        frame = self.to_pandas()
        frame = frame[frame["group_by"] == "all"]
        if metric is not None:
            self._check_metric(metric, frame)
            cols = ["value", "ci_low", "ci_high", "gap_vs_ref", "gap_vs_ref_low", "gap_vs_ref_high",
                    "gap_vs_matched", "gap_vs_matched_low", "gap_vs_matched_high"]
            return frame[frame["metric"] == metric].set_index(["proxy", "split"])[cols]
        wide = frame.pivot_table(index=["proxy", "split"], columns="metric", values="value", sort=False)
        wide.columns.name = None
        return wide

    def by(self, column: str, metric: str | None = None) -> pd.DataFrame:
        """A breakdown: estimates within each group of a meta column (``position``, ``length``, or a
        column of your JSONL data), per split and proxy.

        Args:
            column: the meta column.
            metric: one metric only (default: all).
        """
        frame = self.to_pandas()
        kinds = sorted(set(frame["group_by"]) - {"all", "position_group"})
        if column not in kinds:
            raise IllusionsError(f"no breakdown by {column!r}; this evaluation has {', '.join(kinds) or 'none'}")
        frame = frame[frame["group_by"] == column]
        if metric is not None:
            self._check_metric(metric, frame)
            frame = frame[frame["metric"] == metric]
        return frame[["proxy", "split", "group", "metric", "value", "ci_low", "ci_high", "n_positions",
                      "n_sequences"]].reset_index(drop=True)

    def disagreements(self, split: str, proxy: int | str = 0) -> pd.DataFrame:
        """The scored positions of ``split`` where the proxy predicts differently from the model.

        Args:
            split: an evaluated split.
            proxy: the proxy's index or label.

        Returns:
            Columns ``seq`` (row of the split), ``pos``, ``target``, ``original`` and ``proxy``
            (predicted token ids), their token strings, and ``kl`` (original || proxy, nats), most
            divergent first.
        """
        import pandas as pd

        rec = self.records[(self._split(split), self._proxy(proxy))]
        changed = rec.original_pred != rec.proxy_pred
        names = token_names(self.model, self._vocab())
        frame = pd.DataFrame({
            "seq": rec.rows[changed], "pos": rec.pos[changed], "target": rec.target[changed],
            "original": rec.original_pred[changed], "proxy": rec.proxy_pred[changed], "kl": rec.kl[changed]})
        for col in ("target", "original", "proxy"):
            frame[f"{col}_token"] = [names[int(t)] for t in frame[col]]
        return frame.sort_values(["kl", "seq", "pos"], ascending=[False, True, True], kind="stable").reset_index(drop=True)

    # --- views -----------------------------------------------------------------------------------

    def show(self, split: str, row: int = 0, proxy: int | str = 0) -> Any:
        """Attention of the heads the proxy changes on one sequence, original beside proxy
        (CircuitsVis, inline in Jupyter).

        Args:
            split: a split name.
            row: the sequence (row of the split, as ``disagreements`` gives in ``seq``).
            proxy: the proxy's index or label.
        """
        import torch
        from circuitsvis.attention import attention_heads

        from illusions.reports.attention import head_patterns

        j = self._proxy(proxy)
        data = self._data[self._split(split)]
        if not 0 <= row < len(data):
            raise IllusionsError(f"row {row} is out of range: split {split!r} has rows 0..{len(data) - 1}")
        heads = [tuple(h) for h in self.proxies[j].heads]
        if not heads:
            raise IllusionsError(f"proxy {self.labels[j]!r} changes no attention pattern directly; there is nothing "
                                 "to show")
        tokens = data.tokens[row, : int(data.lengths[row])]
        original = head_patterns(self.model, tokens, heads)
        simplified = head_patterns(self.model, tokens, heads, self.proxies[j].fwd_hooks)
        names = token_names(self.model, self._vocab())
        return attention_heads(
            attention=torch.cat([original, simplified]),  # [2 * heads, pos, key_pos]
            tokens=[names[int(t)] for t in tokens],
            attention_head_names=[f"L{layer}H{head} {kind}" for kind in ("original", "proxy")
                                  for layer, head in heads])

    def __repr__(self) -> str:
        lines = [f"Evaluation of {len(self.labels)} prox{'y' if len(self.labels) == 1 else 'ies'} on "
                 f"{len(self.splits)} split(s); gaps vs {self.reference or 'none'}"]
        for label in self.labels:
            lines.append(f"  {label}:")
            for split in self.splits:
                agree = self._row(label, split, "agreement")
                acc = self._row(label, split, "original_accuracy")
                gap = "" if agree is None or not _finite(agree["gap_vs_ref"]) else \
                    f"  gap {agree['gap_vs_ref']:+.3f} [{agree['gap_vs_ref_low']:+.3f}, {agree['gap_vs_ref_high']:+.3f}]" \
                    + ("*" if _significant(agree) else "")
                lines.append(f"    {split:<16} agreement {_fmt(agree)}  original accuracy {_fmt(acc)}{gap}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from illusions.metric_table import metric

        head = "".join(f"<th>{html.escape(metric(m).header)}</th>" for m in SHOWN)
        gap = f"<th>agreement gap vs {html.escape(self.reference)}</th><th>vs length-matched</th>" if self.reference else ""
        parts = []
        for label in self.labels:
            body = []
            for split in self.splits:
                cells = "".join(f"<td>{_fmt(self._row(label, split, m))}</td>" for m in SHOWN)
                agree = self._row(label, split, "agreement")
                if self.reference:
                    cells += f"<td>{_gap_cell(agree, 'gap_vs_ref')}</td><td>{_gap_cell(agree, 'gap_vs_matched')}</td>"
                n = agree["n_positions"] if agree else 0
                body.append(f"<tr><td>{html.escape(split)}</td><td>{n}</td>{cells}</tr>")
            parts.append(f"<p><b>{html.escape(label)}</b></p><table><thead><tr><th>split</th><th>positions</th>"
                         f"{head}{gap}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        note = ("<p><small>[95% bootstrap interval over sequences]; a gap in bold, marked *, has an interval that "
                "excludes 0.</small></p>")
        return "<div>" + "".join(parts) + note + "</div>"

    # --- the run directory ----------------------------------------------------------------------

    def save(self, directory: str | Path, *, overwrite: bool = False, report: bool = True) -> Path:
        """Write the usual run directory: ``config.json``, ``metrics.json``, ``metrics.csv``,
        ``records.npz``, ``proxies/`` and (with ``report``) ``report.html`` with its figures, all in
        one atomic step, under the guards of ``illusions analyze --out``.

        Args:
            directory: the run directory: new, empty, or an earlier run (with ``overwrite``); never
                inside the model's folder or the bundled models.
            overwrite: replace an earlier run there (files illusions did not write are kept).
            report: also write ``report.html``.

        Returns:
            The directory.
        """
        from illusions.analyses.run import RunResult, check_out, write_run
        from illusions.analyses.summary import to_json

        out = Path(directory)
        check_out(out, self._loaded.folder, overwrite=overwrite, option="directory",
                  overwrite_option="overwrite=True")
        result = self._measured.result
        proxies = [{"label": label, "simplifier": p.simplifier, "params": p.params}
                   for label, p in zip(result.labels, result.proxies, strict=True)]
        doc = to_json(self.rows, task=TASK_NAME, model=self._loaded.source, proxies=proxies)
        task = _Task(self._data, token_names(self.model, self._vocab()))
        task_meta = {"task": TASK_NAME, "meta_columns": self._info["meta_columns"],
                     "splits": {n: {"sequences": len(s), "scored_positions": len(s.scored)}
                                for n, s in self._data.items()}}
        run = RunResult(_Spec(self._settings), _describe(self.model), self._loaded.source, self.rows, doc, result,
                        task_meta, task=task, model=self.model,
                        runtime={"device": str(self.model.cfg.device), "allow_tf32": False})
        extra = None
        if report:
            from illusions.reports import write_report_files

            def extra(stage: Path) -> None:
                write_report_files(run, stage)

        return write_run(run, out, extra_files=extra, overwrite=overwrite)

    # --- helpers --------------------------------------------------------------------------------

    def _vocab(self) -> Any:
        return None

    def _split(self, split: str) -> str:
        if split not in self._data:
            raise IllusionsError(f"no split {split!r}; splits: {', '.join(self._data)}")
        if split not in self.splits:
            raise IllusionsError(f"split {split!r} is the fitting data, not evaluated; evaluated: "
                                 f"{', '.join(self.splits)}")
        return split

    def _proxy(self, proxy: int | str) -> int:
        if isinstance(proxy, str):
            if proxy not in self.labels:
                raise IllusionsError(f"no proxy {proxy!r}; proxies: {', '.join(self.labels)}")
            return self.labels.index(proxy)
        if not 0 <= int(proxy) < len(self.labels):
            raise IllusionsError(f"proxy {proxy} is out of range 0..{len(self.labels) - 1}")
        return int(proxy)

    def _row(self, label: str, split: str, metric: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["proxy"] == label and r["split"] == split
                     and r["group_by"] == "all" and r["metric"] == metric), None)

    def _check_metric(self, metric: str, frame: Any) -> None:
        known = list(dict.fromkeys(frame["metric"]))
        if metric not in known:
            raise IllusionsError(f"no metric {metric!r}; metrics: {', '.join(known)}")


def _describe(model: Any) -> str:
    from illusions.models import describe

    try:
        return describe(model)
    except Exception:  # noqa: BLE001 - a model describe() does not know: its class name
        return type(model).__name__


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _fmt(row: dict[str, Any] | None) -> str:
    if row is None or not _finite(row["value"]):
        return "-"
    interval = f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if _finite(row["ci_low"]) else ""
    return f"{row['value']:.3f}{interval}"


def _significant(row: dict[str, Any], key: str = "gap_vs_ref") -> bool:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return _finite(low) and _finite(high) and (low > 0 or high < 0)


def _gap_cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None or not _finite(row.get(key)):
        return "-"
    text = f"{row[key]:+.3f} [{row[f'{key}_low']:+.3f}, {row[f'{key}_high']:+.3f}]"
    return f"<b>{text}*</b>" if _significant(row, key) else text

