"""The HTML report: built by the real engine on a tiny model and a small bracket task, checked in bytes,
in content and in a real headless browser (skipped, with the reason, where no Chromium is installed)."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from illusions.analyses.faithfulness import analyze
from illusions.analyses.run import AnalysisSpec, RunResult, write_run
from illusions.analyses.summary import summarize, to_json
from illusions.errors import IllusionsError
from illusions.models import ModelConfig, build_model, describe
from illusions.reports import rebuild_report, write_report_files
from illusions.reports.attention import PACK_SCALE, choose_example, choose_examples, unpack_patterns
from illusions.reports.html import BUNDLE_MARK, CSP
from illusions.simplifiers.base import Targets
from illusions.simplifiers.svd import SVD
from illusions.tasks.base import Scored, Split, Vocab

# A 5-bracket language small enough for a 2-layer model of width 32; 13 tokens like conftest's TINY.
TOKENS = ("PAD", "START", "END", "(", ")", "[", "]", "{", "}", "<", ">", "a", "A")
OPENERS = np.array([3, 5, 7, 9, 11])
MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=13)


def bracket_split(name: str, rng: np.random.Generator, n: int, max_depth: int, min_depth: int = 1,
                  max_len: int = 60) -> Split:
    """Random bracket strings; scored positions are those before a closer, with depth meta."""
    seqs, metas = [], []
    while len(seqs) < n:
        toks, stack, meta = [1], [], []
        deepest = 0
        while len(toks) < max_len - len(stack) - 1:
            if stack and (len(stack) >= max_depth or rng.random() < 0.45):
                opener_pos = stack.pop()
                meta.append((len(toks) - 1, opener_pos, len(stack) + 1))
                toks.append(toks[opener_pos] + 1)
            elif not stack and len(toks) > 6 and rng.random() < 0.3:
                break
            else:
                stack.append(len(toks))
                toks.append(int(rng.choice(OPENERS)))
                deepest = max(deepest, len(stack))
        while stack:
            opener_pos = stack.pop()
            meta.append((len(toks) - 1, opener_pos, len(stack) + 1))
            toks.append(toks[opener_pos] + 1)
        toks.append(2)
        if deepest >= min_depth:
            seqs.append(toks)
            metas.append(meta)
    width = max(len(s) for s in seqs)
    tokens = np.zeros((n, width), dtype=np.int64)
    lengths = np.array([len(s) for s in seqs])
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    seq = np.array([i for i, m in enumerate(metas) for _ in m])
    pos, key_pos, depth = (np.array([e[k] for m in metas for e in m]) for k in range(3))
    scored = Scored(seq, pos, tokens[seq, pos + 1], {
        "depth": depth, "key_depth": depth, "key_pos": key_pos, "distance": pos + 1 - key_pos,
        "length": lengths[seq]})
    return Split(name, tokens, lengths, scored, f"brackets nested at most {max_depth} deep")


@dataclasses.dataclass
class BracketTask:
    name: ClassVar[str] = "brackets"
    splits_: dict[str, Split]
    vocab: Vocab = Vocab(TOKENS, pad_id=0, bos_id=1)
    config: Any = None

    @property
    def candidates(self) -> np.ndarray:
        return OPENERS + 1

    def splits(self) -> dict[str, Split]:
        return self.splits_

    def meta(self) -> dict[str, Any]:
        return {"name": self.name}


def make_task() -> BracketTask:
    rng = np.random.default_rng(0)
    return BracketTask({"train": bracket_split("train", rng, 80, 4), "iid": bracket_split("iid", rng, 30, 4),
                        "deep": bracket_split("deep", rng, 30, 8, min_depth=6)})


def make_run(ranks: tuple[int, ...] = (2,), simplifiers: list[Any] | None = None,
             spec_fields: dict[str, Any] | None = None) -> RunResult:
    task = make_task()
    model = build_model(MODEL, seed=0)
    spec = AnalysisSpec(task="dyck", model="tiny", fit_n=60, max_seqs=25, n_boot=50, seed=0,
                        **(spec_fields or {"simplifier": "svd", "ranks": ranks}))
    simplifiers = simplifiers or [SVD(rank=r, targets=Targets()) for r in ranks]
    result = analyze(model, task.splits(), simplifiers, candidates=task.candidates, fit_n=spec.fit_n,
                     max_seqs=spec.max_seqs, seed=spec.seed)
    rows = summarize(result, n_boot=spec.n_boot, seed=spec.seed)
    proxies = [{"label": label, "simplifier": p.simplifier, "params": p.params}
               for label, p in zip(result.labels, result.proxies, strict=True)]
    doc = to_json(rows, task=spec.task, model="tiny", proxies=proxies)
    return RunResult(spec, describe(model), "tiny", rows, doc, result, task.meta(), task=task, model=model)


@pytest.fixture(scope="module")
def run() -> RunResult:
    return make_run()


@pytest.fixture(scope="module")
def run_dir(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "brackets-svd"
    write_run(run, out, extra_files=lambda stage: write_report_files(run, stage))
    return out


def script_free(page: str) -> str:
    """The page without the inlined bundle (whose source quotes namespace and error-page URLs)."""
    start = page.index(BUNDLE_MARK)
    return page[:start] + page[page.index("</script>", start):]


def examples_of(page: str) -> list[tuple[str, int]]:
    """``(split, row)`` of each example card in the page."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(
        r'<details class="example" id="ex-\d+" data-i="\d+"(?: open)?><summary>(\w+): row (\d+) ', page)]


def test_report_is_written_with_png_figures_and_every_section(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    idents = re.findall(r'<section id="([\w-]+)">', page)
    # The verdict first, the configuration last.
    assert idents == ["summary", "examples", "geometry", "warnings", "key-depth", "configuration"]
    pngs = sorted(p.name for p in run_dir.glob("fig_*.png"))
    assert pngs == ["fig_accuracy.png", "fig_key_depth.png", "fig_warnings.png"]
    assert "Sparse dictionary" not in page  # neither dictionary table for a proxy without one
    for name in pngs:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'<figure id="{name[:-4]}"><svg' in page
    # The resolved configuration is the run's config.json, verbatim, collapsed.
    config = json.loads((run_dir / "config.json").read_text())
    assert f"<details class=config><summary>config.json</summary><pre class=config>{html.escape(json.dumps(config, indent=2))}" in page
    # Each evaluated split has its sentence, its summary row and at least five examples.
    sentences = re.findall(r'<li data-split="(\w+)">On <b>\1</b>, svd\(rank=2\) agrees with the model at \d\.\d{3} \[', page)
    assert sentences == ["iid", "deep"]
    found = examples_of(page)
    for split in ("iid", "deep"):
        assert f"<td class=l>{split}</td>" in page
        assert sum(s == split for s, _ in found) >= 5
    assert len(set(found)) == len(found)


def test_summary_sentences_follow_the_numbers(run):
    """Under/over-states is said only for a proxy faithful in distribution and a gap that excludes 0."""
    from illusions.reports.verdict import FAITHFUL, sentences

    rows = [dict(r) for r in run.rows]
    label = run.analysis.labels[0]

    def cell(split, metric):
        return next(r for r in rows if r["group_by"] == "all" and r["split"] == split and r["metric"] == metric)

    iid, deep = cell("iid", "agreement"), cell("deep", "agreement")
    iid["value"] = FAITHFUL - 0.01
    text = dict(sentences(rows, label, ["iid", "deep"]))
    assert "not a faithful proxy in distribution" in text["iid"]
    assert "no verdict" in text["deep"] and "states" not in text["deep"]
    assert f"{deep['value']:.3f} [{deep['ci_low']:.3f}, {deep['ci_high']:.3f}]" in text["deep"]
    iid["value"] = FAITHFUL
    change = cell("deep", "accuracy_change")
    for (v, lo, hi), verdict in (((-0.2, -0.3, -0.1), "under-states"), ((0.2, 0.1, 0.3), "over-states"),
                                 ((-0.2, -0.3, 0.1), "within noise")):
        for key in ("gap_vs_matched", "gap_vs_ref"):
            change.update({key: v, f"{key}_low": lo, f"{key}_high": hi})
        text = dict(sentences(rows, label, ["iid", "deep"]))
        assert verdict in text["deep"], (verdict, text["deep"])
        assert "a faithful proxy in distribution" in text["iid"]


def test_bundle_inlined_once_no_network_references_and_strict_csp(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count(BUNDLE_MARK) == 1
    assert page.count("var CircuitsVis=") == 1
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page.split("</head>")[0]
    assert CSP.startswith("default-src 'none'; script-src 'unsafe-inline';")
    assert "sourceMappingURL" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page, flags=re.I)
    markup = script_free(page)
    assert not re.search(r"<link\b|<img\b|<iframe\b|<object\b|url\((?!#)", markup, flags=re.I)
    assert not re.search(r"https?://", markup), "URL outside the CircuitsVis bundle"
    assert "CircuitsVis.render(id, CircuitsVis.AttentionHeads" in page
    assert "type=\"module\"" not in page


def test_same_run_gives_byte_identical_report_and_rebuild_matches(run, run_dir, tmp_path):
    first = (run_dir / "report.html").read_bytes()
    write_report_files(run, tmp_path)
    assert (tmp_path / "report.html").read_bytes() == first
    for png in run_dir.glob("fig_*.png"):
        assert (tmp_path / png.name).read_bytes() == png.read_bytes()
    # From disk (metrics.csv, records.npz, proxies/): the same bytes again.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    path = rebuild_report(copy, task=run.task, model=run.model)
    assert path == copy / "report.html"
    assert path.read_bytes() == first


def _section(page: str, ident: str) -> str:
    start = page.index(f'<section id="{ident}">')
    return page[start:page.index("</section>", start)]


def test_warning_section_states_every_signal_per_split_and_pooled_as_the_rows_say(run, run_dir):
    """Sentences, table and figure of the warning signals: the numbers are the rows', the best signal
    is the one with the highest AUROC, the agreement over all positions is the split's agreement row."""
    from illusions.analyses.warning_signals import POOLED, WARNING_GROUP

    body = _section((run_dir / "report.html").read_text(encoding="utf-8"), "warnings")
    label = run.analysis.labels[0]
    warn = {(r["split"], r["group"], r["metric"]): r for r in run.rows if r["group_by"] == WARNING_GROUP}
    signals = sorted({g for _, g, _ in warn})
    assert signals == ["offspace_k", "offspace_q"]
    said = dict(re.findall(r'<li data-split="(\w+)">(.*?)</li>', body))
    assert list(said) == ["iid", "deep", POOLED]
    for split, text in said.items():
        best = max(signals, key=lambda g: (warn[(split, g, "warning_auroc")]["value"], g))
        auroc = warn[(split, best, "warning_auroc")]
        assert f"<code>{best}</code>, ranks the positions where {label} disagrees" in text
        assert f"AUROC {auroc['value']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]" in text
        chance = "better than chance" if auroc["ci_low"] > 0.5 else "worse than chance" \
            if auroc["ci_high"] < 0.5 else "no better than chance"
        assert chance in text
    agree = {r["split"]: r for r in run.rows if r["group_by"] == "all" and r["metric"] == "agreement"}
    assert f"against {agree['deep']['value']:.3f} over all positions" in said["deep"]
    pooled = sum(agree[s]["value"] * agree[s]["n_positions"] for s in ("iid", "deep")) / sum(
        agree[s]["n_positions"] for s in ("iid", "deep"))
    assert f"against {pooled:.3f} over all positions" in said[POOLED]
    # The table: one row per split (and overall) and signal, AUROC and share as the rows hold them.
    cells = re.findall(r"<tr><td class=l>(\w+)</td><td class=l><code>(\w+)</code></td><td>(\d+)</td><td>(.*?)</td>"
                       r"<td>(.*?)</td><td>(\d+)</td>", body)
    assert [(c[0], c[1]) for c in cells] == [(s, g) for s in ("iid", "deep", POOLED) for g in signals]
    for split, signal, n, auroc, share, flagged in cells:
        assert int(n) == warn[(split, signal, "warning_auroc")]["n_positions"]
        assert f"{warn[(split, signal, 'warning_auroc')]['value']:.3f}" in auroc
        assert f"{warn[(split, signal, 'warning_flagged_share')]['value']:.3f}" in share
        assert int(flagged) == warn[(split, signal, "warning_flagged_agreement")]["n_positions"]
    assert '<figure id="fig_warnings"><svg' in body


def test_warning_figure_draws_each_signal_on_agreeing_and_disagreeing_positions(run, monkeypatch):
    from illusions.analyses.warning_signals import THRESHOLDS
    from illusions.reports import plots, signals

    monkeypatch.setattr(plots, "render", lambda fig, name: fig)
    records = {s: run.analysis.records[(s, 0)] for s in ("iid", "deep")}
    thresholds = run.analysis.proxies[0].info[THRESHOLDS]
    fig = signals.figure(records, run.analysis.labels[0], ["iid", "deep"], thresholds)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["offspace_k", "offspace_q"]
    for ax in axes:
        signal = ax.get_title()
        (lines,) = [c for c in ax.collections if c.get_gid() == "medians"]
        medians = sorted(float(seg[0][1]) for seg in lines.get_segments())
        want = sorted(float(np.median(rec.warnings[signal][mask])) for rec in records.values()
                      for mask in (rec.proxy_pred == rec.original_pred, rec.proxy_pred != rec.original_pred)
                      if mask.any())
        assert np.allclose(medians, want), (signal, medians, want)
        assert any(np.allclose(line.get_ydata(), thresholds[signal]) for line in ax.lines
                   if line.get_linestyle() == "--")
    # No per-position signals (a run from before records.npz held them): no figure, and the page says why.
    bare = {s: dataclasses.replace(r, warnings={}) for s, r in records.items()}
    assert signals.figure(bare, "p", ["iid", "deep"], thresholds) is None
    note = signals.section_body(run.rows, ["iid", "deep"], run.analysis.labels, run.analysis.labels[0], None)
    assert "not in this run's records" in note and "<figure" not in note


def test_records_keep_the_warning_signals_exactly(run, run_dir):
    from illusions.reports.build import read_records

    records, _, _, _ = read_records(run_dir / "records.npz")
    for key, rec in run.analysis.records.items():
        assert set(records[key].warnings) == set(rec.warnings) == {"offspace_k", "offspace_q"}
        for name, values in rec.warnings.items():
            assert records[key].warnings[name].dtype == np.float64
            assert np.array_equal(records[key].warnings[name], values)


def test_a_run_without_signals_has_no_warning_section(tmp_path):
    from illusions.simplifiers.circuit import Circuit

    circuit = make_run(simplifiers=[Circuit(keep=("L1H0", "mlp1"))],
                       spec_fields={"simplifier": "circuit", "keep": ("L1H0", "mlp1")})
    write_report_files(circuit, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<section id="warnings">' not in page and not (tmp_path / "fig_warnings.png").exists()


def test_attention_example_is_the_most_disagreeing_sequence(run):
    rec = run.analysis.records[("deep", 0)]
    choice = choose_example("deep", rec)
    changed = rec.original_pred != rec.proxy_pred
    per_row = {int(r): int(changed[rec.rows == r].sum()) for r in np.unique(rec.rows)}
    assert choice.disagreements == max(per_row.values()) == per_row[choice.row]
    assert choice.n_scored == int((rec.rows == choice.row).sum())
    assert choice.disagreements > 0, "rank-2 SVD on a random model should change some prediction"
    # Most, median and fewest: two each, distinct, in that order of disagreements.
    picked = choose_examples("deep", rec, n_each=2)
    assert [c.kind for c in picked] == ["most", "most", "median", "median", "fewest", "fewest"]
    counts = sorted(per_row.values(), reverse=True)
    assert [c.disagreements for c in picked[:2]] == counts[:2]
    assert [c.disagreements for c in picked[-2:]] == counts[-2:]
    mid = (len(counts) - 2) // 2
    assert [c.disagreements for c in picked[2:4]] == counts[mid:mid + 2]
    assert len({c.row for c in picked}) == 6


def test_patterns_and_predictions_in_the_page_are_the_models(run, run_dir):
    import torch

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    data = json.loads(blob.group(1))
    assert data["scale"] == PACK_SCALE
    examples = examples_of(page)
    assert len(data["examples"]) == len(examples)
    ex = data["examples"][0]
    split, row = examples[0]
    tokens = run.task.splits()[split].tokens[int(row)]
    tokens = tokens[: run.task.splits()[split].lengths[int(row)]]
    assert ex["tokens"] == [TOKENS[t] for t in tokens]
    assert ex["heads"] == ["L1H0", "L1H1", "L1H2", "L1H3"]
    _, cache = run.model.run_with_cache(torch.as_tensor(tokens)[None])
    want = cache["blocks.1.attn.hook_pattern"][0].numpy()
    got = unpack_patterns(ex["original"], 4, len(tokens))
    assert np.abs(got - want).max() <= 0.5 / PACK_SCALE + 1e-6
    assert ex["proxy"] != ex["original"]
    # The card lists every scored position with the target and both predictions, as recorded.
    rec = run.analysis.records[(split, 0)]
    card = page[page.index('<details class="example" id="ex-0"'):page.index("</details>")]
    mine = np.flatnonzero(rec.rows == row)
    cells = re.findall(r"<tr(?: class=chg)?><td data-v=\"(\d+)\">\d+</td><td[^>]*>[^<]*</td>"
                       r"<td data-v=\"([^\"]*)\">[^<]*</td><td data-v=\"([^\"]*)\">.*?</td><td data-v=\"([^\"]*)\">", card)
    assert len(cells) == mine.size > 0
    for i in mine:
        want_cells = (str(rec.pos[i]), TOKENS[rec.target[i]], TOKENS[rec.original_pred[i]], TOKENS[rec.proxy_pred[i]])
        assert tuple(html.unescape(c) for c in next(c for c in cells if c[0] == want_cells[0])) == want_cells


def test_sweep_report_has_curves_and_focuses_one_proxy(tmp_path):
    sweep = make_run(ranks=(1, 2, 4))
    write_report_files(sweep, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert (tmp_path / "fig_sweep.png").is_file()
    assert '<section id="sweep">' in page
    for rank in (1, 2, 4):
        assert f"<td class=l>svd(rank={rank})</td>" in page
    assert "detailed figures show svd(rank=" in page


def _relabelled(rows, labels, values):
    """The run's overall rows copied once per proxy label, with that proxy's parameter value."""
    out = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        out += [{**r, "proxy": label, "param": "rank" if value == value else "",
                 "param_value": value, "value": r["value"] * (1 - 0.1 * i)}
                for r in rows if r["group_by"] == "all"]
    return out


@pytest.mark.parametrize(("values", "numeric"), [((1.0, 2.0, 4.0), True),
                                                 ((float("nan"),) * 3, False), ((2.0, 2.0, 2.0), False)])
def test_sweep_figure_places_every_proxy(run, monkeypatch, values, numeric):
    """A sweep is drawn against its parameter; per-head or data-free proxies against their labels."""
    import warnings

    from illusions.reports import plots

    labels = ["p@L1H0", "p@L1H1", "p@L1H2"]
    splits = list(dict.fromkeys(r["split"] for r in run.rows if r["group_by"] == "all"))
    monkeypatch.setattr(plots, "render", lambda fig, name: fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels found to put in legend"
        fig = plots.sweep_figure(_relabelled(run.rows, labels, values), splits)
    want_x = list(values) if numeric else [0.0, 1.0, 2.0]
    for ax in fig.axes:
        assert len(ax.containers) == len(splits)  # one errorbar series per split, every proxy on it
        for container in ax.containers:  # against labels, each split is shifted by less than half a slot
            xs = np.asarray(container.lines[0].get_xdata(), dtype=np.float64)
            assert np.allclose(np.round(xs), want_x) and np.ptp(xs - want_x) < 1e-9
            assert numeric or np.abs(xs - want_x).max() < 0.5
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == (["1", "2", "4"] if numeric else labels)
    assert fig.axes[0].get_legend() is not None


def test_report_of_full_length_examples_stays_small():
    """The main job's worst case: 6 examples in each of 5 splits, 128 tokens, 4 noisy patterns each."""
    from illusions.reports.attention import Example, ExampleChoice, pack_patterns
    from illusions.reports.html import render_page
    from illusions.reports.interactive import examples_section, payload

    n = 128
    causal = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # [pos, key_pos]
    rng = np.random.default_rng(0)
    examples = []
    for i in range(30):
        noisy = causal * rng.uniform(0.5, 1.5, size=(4, n, n))
        noisy /= noisy.sum(-1, keepdims=True)
        packed = pack_patterns(noisy)
        positions = tuple({"pos": p, "target": "(", "original": "(", "proxy": ")", "kl": 0.5, "jsd": 0.1,
                           "depth": 3, "key_depth": 2} for p in range(0, n, 2))
        examples.append(Example(ExampleChoice(f"split{i // 6}", i, 64, 3, 0.1, (5, 9)), tuple("(" for _ in range(n)),
                                positions, ("a", "b", "c", "d"), packed, packed))
    body, data = examples_section(examples, [f"split{k}" for k in range(5)])
    page = render_page(title="t", subtitle=[], sections=[], data=payload(data, [], {}, PACK_SCALE))
    assert len(page.encode()) + len(body.encode()) < 5_000_000, len(page.encode()) + len(body.encode())


def test_geometry_of_a_full_rank_projection_removes_nothing(run):
    """Invariance: full-rank SVD is the identity, so every point's removed norm is 0; rank 2 removes some."""
    from illusions.analyses.faithfulness import fit_proxies
    from illusions.reports.geometry import panels, sample_rows

    splits = run.task.splits()
    fit = sample_rows(splits["train"], run.analysis.fit_rows, 40)
    drawn = {"train": fit, "deep": sample_rows(splits["deep"], run.analysis.split_rows["deep"], 20)}
    (full,) = fit_proxies(run.model, splits["train"], run.analysis.fit_rows, [SVD(rank=8, targets=Targets())])
    found = panels(run.model, full, fit, drawn, max_points=50)
    assert [p.title for p in found] == [f"L1H{h} {side}" for side in ("queries", "keys") for h in range(4)]
    assert all(pt[2] <= 1e-3 for p in found for pts in p.points.values() for pt in pts)
    low = panels(run.model, run.analysis.proxies[0], fit, drawn, max_points=50)
    assert all(p.median_removed["deep"] > 0.01 for p in low)
    assert {len(p.points["deep"]) for p in low} <= {50} and set(low[0].points) == {"train", "deep"}


def test_geometry_draws_residual_proxies_which_have_no_head(run):
    """resid-svd and resid-kmeans replace whole residual vectors (no head): their panels are drawn
    (the report of `analyze --simplify resid-svd` used to stop with a traceback from numpy's seeding)."""
    from illusions.analyses.faithfulness import fit_proxies
    from illusions.reports.geometry import panels, sample_rows
    from illusions.simplifiers.resid import ResidKMeans, ResidSVD

    splits = run.task.splits()
    fit = sample_rows(splits["train"], run.analysis.fit_rows, 40)
    drawn = {"train": fit, "deep": sample_rows(splits["deep"], run.analysis.split_rows["deep"], 20)}
    for simplifier, kind in ((ResidSVD(rank=4), "subspace"), (ResidKMeans(k=4), "centroid")):
        (proxy,) = fit_proxies(run.model, splits["train"], run.analysis.fit_rows, [simplifier])
        found = panels(run.model, proxy, fit, drawn, max_points=50)
        assert [(p.title, p.kind) for p in found] == [("L1 resid_pre", kind)]
        assert {len(p.points["deep"]) for p in found} == {50}  # sampled down to max_points


@pytest.mark.parametrize(("name", "params", "spec_fields"), [
    ("kmeans", {"k": 3}, {"clusters": (3,)}),
    ("onehot", {}, {}),
    ("resid-svd", {"rank": 4}, {"ranks": (4,)}),
    ("resid-kmeans", {"k": 4}, {"clusters": (4,)}),
    ("weight-svd", {"rank": 2}, {"ranks": (2,)}),
])
def test_every_query_key_and_residual_method_gets_its_report(name, params, spec_fields, tmp_path):
    """The whole report, geometry included, for the methods the other report tests do not draw
    (svd, sae, the circuit and sweeps have their own)."""
    from illusions.registry import make_simplifier

    run = make_run(simplifiers=[make_simplifier(name, **params)], spec_fields={"simplifier": name, **spec_fields})
    write_report_files(run, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<section id="([\w-]+)">', page)[:3] == ["summary", "examples", "geometry"]


def test_rebuild_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(IllusionsError, match="not an analysis run directory"):
        rebuild_report(tmp_path)
    with pytest.raises(IllusionsError, match="is not a directory"):
        rebuild_report(tmp_path / "missing")


def test_cli_report_on_a_non_run_is_one_line_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from illusions.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "not an analysis run directory" in result.stderr


# --- the real browser ------------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
                  "--force-device-scale-factor=1", "--hide-scrollbars")
# Log lines that mean the page tried the network: a request, or one the CSP blocked.
NETWORK_LOG = re.compile(r"NotifyBeforeURLRequest: https?://|URLRequest.*https?://|Content Security Policy",
                         re.I)
# A console message at error level (Chromium logs them as CONSOLE(...) with the level in the line).
CONSOLE_ERROR = re.compile(r"CONSOLE\(\d+\)\] \"(?:Uncaught|Error)|:ERROR:CONSOLE|\"Uncaught ", re.I)


def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    for path in ("/usr/lib/chromium/chromium-headless-shell", "/usr/lib/chromium/chromium"):
        if Path(path).is_file():
            return path
    return None


def render_in_browser(page: Path, workdir: Path, fragment: str = "", height: int = 1400) -> dict[str, Any]:
    """Screenshot ``page`` headless; return the PNG as an array, the render status and the log."""
    from PIL import Image

    binary = chromium()
    if binary is None:
        pytest.skip("no headless Chromium installed (.ci/run installs chromium-headless-shell as root)")
    shot = workdir / "shot.png"
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}", f"--screenshot={shot}",
           "--dump-dom", f"--window-size=1200,{height}", "--enable-logging=stderr", "--v=1",
           page.resolve().as_uri() + fragment]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = re.search(r'<pre id="render-status" hidden="">(.*?)</pre>', proc.stdout, re.S)
    assert status is not None and status.group(1), "the page's drawing script never reported"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)  # [height, width, 3]
    return {"status": json.loads(status.group(1)), "pixels": pixels, "log": proc.stderr, "dom": proc.stdout}


def canvas_pixels(result: dict[str, Any], canvas: dict[str, float]) -> np.ndarray:
    x, y = int(round(canvas["x"])), int(round(canvas["y"]))
    w, h = int(canvas["width"]), int(canvas["height"])
    return result["pixels"][y + 2 : y + h - 2, x + 2 : x + w - 2].reshape(-1, 3)


@pytest.mark.browser
def test_attention_panel_draws_in_a_real_browser_with_no_network(run_dir, tmp_path):
    result = render_in_browser(run_dir / "report.html", tmp_path, fragment="#only-attention", height=2400)
    status = result["status"]
    assert status["errors"] == []
    n_examples = len(examples_of((run_dir / "report.html").read_text()))
    assert status["examples"] == n_examples >= 10
    assert len(status["figures"]) == 2 * n_examples
    first = [c for c in status["canvases"] if c["figure"] == "ex-0-original"]
    # Four head thumbnails and the zoomed pattern.
    assert len(first) == 5
    zoomed = max(first, key=lambda c: c["width"] * c["height"])
    height = result["pixels"].shape[0]
    assert zoomed["y"] + zoomed["height"] <= height, "the zoomed pattern is below the screenshot"
    for canvas in first:
        px = canvas_pixels(result, canvas)
        assert px.size, canvas
        drawn = (np.abs(px - 255).max(axis=1) > 24).mean()
        assert drawn > 0.2, (canvas, drawn)
    # Attention cells are shades of blue (grey marks the masked upper triangle): strongly blue pixels
    # in the zoomed pattern mean the data was drawn, not just an empty frame.
    px = canvas_pixels(result, zoomed)
    assert ((px[:, 2] - px[:, 0]) > 60).sum() >= 50
    assert not NETWORK_LOG.search(result["log"]), NETWORK_LOG.search(result["log"]).group(0)
    assert "FileURLLoader::Start: file://" in result["log"], "logging is off, so the network check saw nothing"


@pytest.mark.browser
def test_every_section_is_present_and_drawn_in_a_real_browser(run_dir, tmp_path):
    """As a reader opens it: sentences, >= 5 examples per split with predictions, the geometry drawn."""
    result = render_in_browser(run_dir / "report.html", tmp_path)
    status, dom = result["status"], result["dom"]
    assert status["errors"] == [] and not CONSOLE_ERROR.search(result["log"]), CONSOLE_ERROR.search(result["log"])
    assert not NETWORK_LOG.search(result["log"])
    assert len(re.findall(r'<li data-split="(iid|deep)">On <b>\1</b>, svd\(rank=2\) agrees with the model at', dom)) == 2
    # Each split's first card is drawn on opening (two figures each); every card lists its predictions.
    assert len(status["figures"]) == 4
    cards = re.findall(r'<details class="example" id="ex-\d+" data-i="\d+"(?: open="")?><summary>(\w+): row.*?</details>',
                       dom, re.S)
    assert {split: cards.count(split) >= 5 for split in ("iid", "deep")} == {"iid": True, "deep": True}
    for card in re.findall(r'<details class="example".*?</details>', dom, re.S):
        assert len(re.findall(r"<span class=\"pred\">[^<]+</span>", card)) >= 2
    # The example table: one row per card, filterable.
    assert len(re.findall(r'<tr data-ex="ex-\d+"', dom)) == len(cards)
    assert re.search(r'<span id="ex-count" class="note">\d+ shown</span>', dom)
    # Geometry: eight panels (4 heads x queries/keys), every one with points of both splits and the fit data.
    assert len(re.findall(r'<svg [^>]*class="geo"', dom)) == 8
    assert len(status["svg_points"]) == 8 and min(status["svg_points"].values()) > 50
    assert len(re.findall(r"<circle ", dom)) == sum(status["svg_points"].values())
    # Summary tables sort on click (the script marks each header).
    assert '<th title="click to sort">' in dom


@pytest.mark.browser
def test_warning_section_is_drawn_in_a_real_browser(run_dir, tmp_path):
    """Shown alone, the warning section's sentences, sortable table and figure draw: the boxes of agreeing
    (grey) and disagreeing (red) positions are on screen, with no script error and no request."""
    result = render_in_browser(run_dir / "report.html", tmp_path, fragment="#only-warnings")
    status, dom = result["status"], result["dom"]
    assert status["errors"] == [] and not CONSOLE_ERROR.search(result["log"])
    assert not NETWORK_LOG.search(result["log"])
    section = re.search(r'<section id="warnings">.*?</section>', dom, re.S).group(0)
    assert len(re.findall(r'<li data-split="(?:iid|deep|overall)">', section)) == 3
    assert '<th title="click to sort">' in section and '<figure id="fig_warnings"><svg' in section
    px = result["pixels"]
    red = (np.abs(px - np.array([0xD6, 0x27, 0x28])).max(axis=2) < 8).sum()
    grey = (np.abs(px - 0x9A).max(axis=2) < 6).sum()
    assert red > 2000 and grey > 2000, (red, grey)


@pytest.fixture(scope="module")
def sae_run() -> RunResult:
    pytest.importorskip("sae_lens", reason="the sae simplifier needs sae-lens (pip install '.[sae]')")
    from illusions.simplifiers import SAE

    return make_run(simplifiers=[SAE(width=16, top_k=2, sae_steps=30, sae_batch=256)],
                    spec_fields={"simplifier": "sae", "widths": (16,)})


@pytest.fixture(scope="module")
def sae_dir(sae_run, tmp_path_factory) -> Path:
    sae = sae_run
    out = tmp_path_factory.mktemp("runs") / "brackets-sae"
    write_run(sae, out, extra_files=lambda stage: write_report_files(sae, stage))
    return out


def test_sae_report_has_a_latent_table_and_no_subspace(sae_dir):
    page = (sae_dir / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<section id="([\w-]+)">', page) == [
        "summary", "examples", "geometry", "latents", "warnings", "key-depth", "configuration"]
    table = page[page.index('id="latent-table"'):page.index("</table>", page.index('id="latent-table"'))]
    assert len(re.findall(r"<tr", table)) == 1 + 16  # header and every latent
    assert "frequency train</th><th>frequency iid</th><th>frequency deep</th>" in table
    assert "there is no kept subspace to draw" in page
    details = re.findall(r'<div class="latent"><h4>(blocks\.1\.hook_resid_pre#\d+)', page)
    assert 1 <= len(details) <= 6
    assert "Top promoted tokens (W_dec · W_U): <code>" in page


def _downstream_part(page: str) -> str:
    """The downstream block of the summary section: from its heading to the end of its note."""
    start = page.index("<h3>Sparse dictionary downstream")
    return page[start:page.index("</p>", page.index("<p class=note>", start))]


def test_sae_report_shows_downstream_loss_as_metrics_csv_says(sae_dir):
    """The downstream table's estimates and gaps are metrics.csv's, in the summary section after the
    sparse dictionary table, with one sentence per split but iid."""
    from illusions.analyses.run import read_rows
    from illusions.metric_table import DOWNSTREAM_METRICS, DOWNSTREAM_TABLE, metric
    from illusions.reports.html import fmt_ci, fmt_gap

    page = (sae_dir / "report.html").read_text(encoding="utf-8")
    summary = _section(page, "summary")
    assert summary.index("<h3>Sparse dictionary on each split") < summary.index("<h3>Sparse dictionary downstream")
    part = _downstream_part(summary)
    rows = {(r["split"], r["metric"]): r for r in read_rows(sae_dir) if r["group_by"] == "all"}
    for split in ("iid", "deep"):
        row = [m.group(0) for m in re.finditer(rf"<tr><td class=l>{split}</td>.*?</tr>", part)]
        assert len(row) == 1 + (split != "iid")  # its estimates, and its gaps but on iid
        cells = [fmt_ci(rows[(split, k)], metric(k).decimals) for k in DOWNSTREAM_TABLE]
        assert row[0] == (f"<tr><td class=l>{split}</td><td>{int(rows[(split, 'loss_recovered')]['n_positions'])}"
                          "</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        for k in DOWNSTREAM_METRICS:  # the engine's gaps: split minus iid, none on iid itself
            gap = rows[(split, k)]["gap_vs_ref"]
            assert np.isnan(gap) if split == "iid" else gap == pytest.approx(
                rows[(split, k)]["value"] - rows[("iid", k)]["value"], abs=1e-9)  # CSV: 10 places
    gaps = [fmt_gap(rows[("deep", k)], "gap_vs_ref") for k in ("loss_recovered", "kl_div_score", "agreement")]
    assert "<tr><td class=l>deep</td>" + "".join(f"<td>{c}</td>" for c in gaps) + "</tr>" in part
    lr = rows[("deep", "loss_recovered")]
    sentence = re.findall(r'<li data-split="(\w+)">(.*?)</li>', part)
    assert [s for s, _ in sentence] == ["deep"]
    assert (f"the loss recovered (CE score) of sae(width=16) is {lr['value']:.3f} [{lr['ci_low']:.3f}, "
            f"{lr['ci_high']:.3f}] against {rows[('iid', 'loss_recovered')]['value']:.3f} on iid (gap "
            f"{lr['gap_vs_ref']:+.3f} [{lr['gap_vs_ref_low']:+.3f}, {lr['gap_vs_ref_high']:+.3f}])") in sentence[0][1]


def test_downstream_sentences_follow_the_numbers(sae_run, run):
    """Loss recovered 'falls alongside agreement' only when both gaps' intervals exclude 0 below it; a gap
    whose interval holds 0 is said to be within noise."""
    from illusions.reports.verdict import downstream_sentences

    rows = [dict(r) for r in sae_run.rows]
    label = sae_run.analysis.labels[0]

    def cell(metric):
        return next(r for r in rows if r["group_by"] == "all" and r["split"] == "deep" and r["metric"] == metric)

    down, noise, up = (-0.2, -0.3, -0.1), (-0.02, -0.05, 0.01), (0.1, 0.05, 0.2)
    for lr, agree, words in ((down, down, "<b>falls</b> out of distribution alongside agreement"),
                             (up, up, "<b>rises</b> out of distribution alongside agreement"),
                             (noise, noise, "neither changes beyond noise"),
                             (noise, down, "agreement falls but the loss recovered's gap is within noise, "
                                           "so no evidence that it falls with agreement"),
                             (down, noise, "<b>falls</b> while agreement's gap is within noise"),
                             (up, down, "<b>rises</b> while agreement falls")):
        for metric, (v, lo, hi) in (("loss_recovered", lr), ("agreement", agree)):
            cell(metric).update(gap_vs_ref=v, gap_vs_ref_low=lo, gap_vs_ref_high=hi)
        (split, text), = downstream_sentences(rows, label, ["iid", "deep"])
        assert split == "deep" and text.endswith(words + "."), (words, text)
        assert f"(gap {lr[0]:+.3f} [{lr[1]:+.3f}, {lr[2]:+.3f}]), agreement's gap {agree[0]:+.3f}" in text
    cell("loss_recovered")["gap_vs_ref_low"] = float("nan")
    (_, text), = downstream_sentences(rows, label, ["iid", "deep"])
    assert "no comparison with agreement" in text and "alongside" not in text
    # Only dictionary proxies have the rows: none for an svd run.
    assert downstream_sentences(run.rows, run.analysis.labels[0], ["iid", "deep"]) == []


def test_sae_report_rebuilds_from_its_folder_to_the_same_bytes(sae_run, sae_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sae_dir, copy)
    (copy / "report.html").unlink()
    assert rebuild_report(copy, task=sae_run.task, model=sae_run.model).read_bytes() == (
        sae_dir / "report.html").read_bytes()


@pytest.mark.browser
def test_sae_latent_table_in_a_real_browser(sae_dir, tmp_path):
    result = render_in_browser(sae_dir / "report.html", tmp_path, fragment="#only-latents")
    status, dom = result["status"], result["dom"]
    assert status["errors"] == [] and not CONSOLE_ERROR.search(result["log"])
    table = re.search(r'<table class="sortable latents" id="latent-table">.*?</table>', dom, re.S).group(0)
    assert len(re.findall(r"<tr", table)) == 17 and '<th title="click to sort">' in table
    # Shown alone at the top: the table's cells are drawn (dark text pixels in the first 600 rows).
    assert (result["pixels"][:600].sum(axis=2) < 200).sum() > 500


@pytest.mark.browser
def test_browser_check_catches_a_network_request_and_a_blank_panel(run_dir, tmp_path):
    """The browser test's two detectors fire on a page that fetches and on one that never draws."""
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    fetching = tmp_path / "fetching.html"
    fetching.write_text(page.replace("<body>", '<body><img src="https://example.invalid/x.png">', 1))
    (tmp_path / "a").mkdir()
    assert NETWORK_LOG.search(render_in_browser(fetching, tmp_path / "a")["log"])
    blank = tmp_path / "blank.html"
    blank.write_text(page.replace("CircuitsVis.render(id,", "(function(){})(id,", 1))
    (tmp_path / "b").mkdir()
    status = render_in_browser(blank, tmp_path / "b", fragment="#only-attention")["status"]
    assert status["canvases"] == []
    # Script errors are caught too: one inside a figure (caught and noted), one uncaught (in the console).
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("function scatter(box, panel, index) {", "function scatter(box, panel, index) {"
                                   " undefinedName(); ", 1).replace("<body>", "<body><script>alsoUndefined();</script>", 1))
    (tmp_path / "c").mkdir()
    result = render_in_browser(broken, tmp_path / "c")
    errors = result["status"]["errors"]
    assert any("alsoUndefined" in e for e in errors) and sum(e.startswith("geometry ") for e in errors) == 8
    assert CONSOLE_ERROR.search(result["log"])
