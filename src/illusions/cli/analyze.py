"""`illusions analyze` and `illusions sweep`: faithfulness of a simplified proxy per split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from illusions.cli.app import command, fail, set_threads

BY_CHOICES = ("key_depth", "depth", "distance", "length", "category")

TaskArg = Annotated[
    str, typer.Argument(help="Task name (see `illusions list`), or an analysis recipe (analyses/*.toml).")
]
SimplifyOpt = Annotated[str, typer.Option("--simplify", "-s", help="Simplifier name (see `illusions list`).")]
LayerOpt = Annotated[list[int] | None, typer.Option("--layer", help="Layer(s) to simplify (default: the last).")]
HeadsOpt = Annotated[
    str, typer.Option("--heads", help="Comma-separated heads of those layers, or 'all' (default: all).")
]
TargetOpt = Annotated[str, typer.Option("--target", help="Which of queries/keys to simplify: q, k or qk.")]
ResidOpt = Annotated[str, typer.Option("--resid", help="Residual hook for resid-* methods: resid_pre|resid_mid|resid_post.")]
FitNOpt = Annotated[int, typer.Option("--fit-n", help="Training sequences the proxy is fitted on.")]
SplitOpt = Annotated[list[str] | None, typer.Option("--split", help="Split(s) to evaluate (default: all).")]
MaxSeqsOpt = Annotated[int, typer.Option("--max-seqs", help="Sequences evaluated per split (0: all).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seeds fitting/evaluation sampling, k-means and bootstrap.")]
ModelOpt = Annotated[Path | None, typer.Option("--model", help="Checkpoint directory (default: the bundled model).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/<name>).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout instead of tables.")]
ByOpt = Annotated[str | None, typer.Option("--by", help="Also print a breakdown: key_depth, depth, distance, length or category.")]
UncenteredOpt = Annotated[bool, typer.Option("--uncentered", help="svd: plain SVD instead of PCA (no centring).")]
BasisOpt = Annotated[str, typer.Option("--basis", help="svd: 'separate' bases for q and k, or one 'joint' basis.")]
BootOpt = Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the 95% intervals.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads for torch.")]
ReportOpt = Annotated[bool, typer.Option("--report/--no-report", help="Write report.html into the run directory.")]


def _heads(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "all"):
        return ()
    try:
        return tuple(int(h) for h in text.split(","))
    except ValueError:
        fail(f"--heads must be comma-separated integers or 'all', got {text!r}")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{option} must be comma-separated integers, got {text!r}")
    if not values:
        fail(f"{option} needs at least one value")
    return values


def _spec(**kw: Any) -> Any:
    from illusions import registry
    from illusions.analyses.run import AnalysisSpec

    if kw["task"] not in registry.TASKS:
        fail(f"unknown task {kw['task']!r}; known tasks: {', '.join(sorted(registry.TASKS))}")
    if kw["simplifier"] not in registry.SIMPLIFIERS:
        fail(f"unknown simplifier {kw['simplifier']!r}; known simplifiers: {', '.join(sorted(registry.SIMPLIFIERS))}")
    if kw["by"] is not None and kw["by"] not in BY_CHOICES:
        fail(f"--by must be one of {', '.join(BY_CHOICES)}, got {kw['by']!r}")
    if kw["target"] not in ("q", "k", "qk"):
        fail(f"--target must be q, k or qk, got {kw['target']!r}")
    if kw["max_seqs"] < 0:
        fail(f"--max-seqs must be 0 (all) or positive, got {kw['max_seqs']}")
    if kw["n_boot"] < 10:
        fail(f"--n-boot must be at least 10, got {kw['n_boot']}")
    return AnalysisSpec(
        task=kw["task"], model=str(kw["model"]) if kw["model"] else "", simplifier=kw["simplifier"],
        ranks=kw["ranks"], clusters=kw["clusters"], layers=tuple(kw["layer"] or ()),
        heads=_heads(kw["heads"]), target=kw["target"], resid=kw["resid"], centered=not kw["uncentered"],
        basis=kw["basis"], fit_n=kw["fit_n"], splits=tuple(kw["split"] or ()),
        max_seqs=kw["max_seqs"] or 10**9, seed=kw["seed"], n_boot=kw["n_boot"],
    )


def _recipe(task: str, given: dict[str, Any]) -> tuple[Any, str] | None:
    """``(spec, name)`` when TASK is a recipe file; other analysis options are then refused."""
    if not task.endswith(".toml"):
        return None
    from illusions.analyses.run import load_analysis_recipe

    extra = [flag for flag, value in given.items() if value]
    if extra:
        fail(f"{', '.join(extra)} cannot be combined with a recipe; edit {task} instead")
    recipe = load_analysis_recipe(task)
    return recipe.spec, recipe.name


def _run(spec: Any, out: Path | None, as_json: bool, by: str | None, threads: int, report: bool,
         name: str | None = None) -> None:
    from illusions.analyses.run import check_writable, write_run

    if by is not None and by not in BY_CHOICES:
        fail(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    out = out or Path("runs") / (name or spec.default_name())
    check_writable(out)
    set_threads(threads)
    run = _with_progress(spec, as_json)
    extra = None
    if report:
        from illusions.reports import write_report_files

        def extra(stage: Path) -> None:
            write_report_files(run, stage)

    write_run(run, out, extra_files=extra)
    if as_json:
        typer.echo(json.dumps(run.document))
        return
    from illusions.cli.tables import print_breakdown, print_summary

    print_summary(run)
    if by:
        print_breakdown(run, by)
    typer.echo(f"wrote {out}/ (config.json, metrics.json, metrics.csv{', report.html' if report else ''})")


def _with_progress(spec: Any, quiet: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from illusions.analyses.run import run_analysis

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return run_analysis(spec)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} splits"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tid = bar.add_task("fitting", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(tid, description=f"evaluating {stage}" if stage != "done" else "summarising",
                       completed=done, total=total)

        return run_analysis(spec, progress=progress)


@command("analyze")
def analyze(
    task: TaskArg,
    simplify: SimplifyOpt = "svd",
    rank: Annotated[int | None, typer.Option("--rank", help="Rank for svd, resid-svd and weight-svd.")] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", help="k for kmeans and resid-kmeans.")] = None,
    layer: LayerOpt = None,
    heads: HeadsOpt = "all",
    target: TargetOpt = "qk",
    resid: ResidOpt = "resid_pre",
    fit_n: FitNOpt = 1000,
    split: SplitOpt = None,
    max_seqs: MaxSeqsOpt = 500,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    by: ByOpt = None,
    uncentered: UncenteredOpt = False,
    basis: BasisOpt = "separate",
    n_boot: BootOpt = 1000,
    threads: ThreadsOpt = 2,
    report: ReportOpt = True,
) -> None:
    """Fit a simplifier on training data and measure its faithfulness on every split."""
    recipe = _recipe(task, {"--rank": rank is not None, "--clusters": clusters is not None, "--layer": layer,
                            "--split": split, "--model": model})
    if recipe is not None:
        _run(recipe[0], out, as_json, by, threads, report, name=recipe[1])
        return
    if rank is not None and clusters is not None:
        fail("give --rank or --clusters, not both")
    spec = _spec(task=task, model=model, simplifier=simplify, ranks=(rank,) if rank is not None else (),
                 clusters=(clusters,) if clusters is not None else (), layer=layer, heads=heads,
                 target=target, resid=resid, uncentered=uncentered, basis=basis, fit_n=fit_n,
                 split=split, max_seqs=max_seqs, seed=seed, n_boot=n_boot, by=by)
    _run(spec, out, as_json, by, threads, report)


@command("sweep")
def sweep(
    task: TaskArg,
    simplify: SimplifyOpt = "svd",
    ranks: Annotated[str | None, typer.Option("--ranks", help="Comma-separated ranks, e.g. 1,2,4,8,16.")] = None,
    clusters: Annotated[str | None, typer.Option("--clusters", help="Comma-separated k, e.g. 2,4,8,16,32,64.")] = None,
    layer: LayerOpt = None,
    heads: HeadsOpt = "all",
    target: TargetOpt = "qk",
    resid: ResidOpt = "resid_pre",
    fit_n: FitNOpt = 1000,
    split: SplitOpt = None,
    max_seqs: MaxSeqsOpt = 500,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    by: ByOpt = None,
    uncentered: UncenteredOpt = False,
    basis: BasisOpt = "separate",
    n_boot: BootOpt = 1000,
    threads: ThreadsOpt = 2,
    report: ReportOpt = True,
) -> None:
    """Run one simplifier over several ranks or cluster counts: one table, one tidy CSV."""
    recipe = _recipe(task, {"--ranks": ranks is not None, "--clusters": clusters is not None, "--layer": layer,
                            "--split": split, "--model": model})
    if recipe is not None:
        _run(recipe[0], out, as_json, by, threads, report, name=recipe[1])
        return
    if (ranks is None) == (clusters is None):
        fail("give exactly one of --ranks or --clusters")
    spec = _spec(task=task, model=model, simplifier=simplify,
                 ranks=_int_list(ranks, "--ranks") if ranks is not None else (),
                 clusters=_int_list(clusters, "--clusters") if clusters is not None else (),
                 layer=layer, heads=heads, target=target, resid=resid, uncentered=uncentered, basis=basis,
                 fit_n=fit_n, split=split, max_seqs=max_seqs, seed=seed, n_boot=n_boot, by=by)
    _run(spec, out, as_json, by, threads, report)
