"""`illusions analyze` and `illusions sweep`: faithfulness of a simplified proxy per split.

Both commands share one options definition (:data:`OPTIONS`); they differ only in how the swept
parameter's values are given (``--rank 4`` / ``--ranks 1,2,4``, ``--clusters``, ``--width`` / ``--widths``:
one option per row of :data:`illusions.analyses.spec.SWEEPS`). Each option maps to one
:class:`~illusions.analyses.run.AnalysisSpec` field, the spec checks every value, and its errors name
parameters, which :func:`_spec` turns back into the flags the user typed. ``--device`` and
``--allow-tf32`` (both commands) and ``--engine`` with its Slurm options (``sweep``) say where the
run happens, not what it computes, so they are not spec fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from illusions.analyses.spec import BREAKDOWNS, CUSTOM_TASK, SWEEPS, SWEPT_FIELDS, AnalysisSpec
from illusions.cli.app import AUTO_THREADS_HELP, MAX_AUTO_THREADS, command, fail, set_threads
from illusions.cli.scale import (
    CpusOpt,
    DeviceOpt,
    EngineOpt,
    GpusOpt,
    PartitionOpt,
    RetriesOpt,
    SlurmLogsOpt,
    SlurmOptOpt,
    TF32Opt,
    TimeOpt,
)

BY_CHOICES = BREAKDOWNS
# The spec's field defaults are the options' defaults: one owner for each.
SPEC = {f.name: f.default for f in dataclasses.fields(AnalysisSpec)}


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option: its parameter name, Typer annotation, default and spec field."""

    name: str
    flag: str
    annotation: Any
    default: Any
    field: str | None = None  # the AnalysisSpec field it sets (None: how the run is shown or written)


def _opt(name: str, kind: Any, default: Any, flag: str, help: str, field: str | None = None) -> Option:
    return Option(name, flag, Annotated[kind, typer.Option(flag, help=help)], default, field)


def _methods(sweep: Any) -> str:
    """``svd, resid-svd and weight-svd``: the simplifiers that sweep a parameter, for help text."""
    *rest, last = sweep.methods
    return f"{', '.join(rest)} and {last}" if rest else last


# Options of both commands, in the order --help lists them (after the swept values).
OPTIONS = (
    _opt("simplify", str, SPEC["simplifier"], "--simplify", "Simplifier name (see `illusions list`).", "simplifier"),
    _opt("layer", list[int] | None, None, "--layer", "Layer(s) to simplify (default: the last).", "layers"),
    _opt("heads", str, "all", "--heads", "Comma-separated heads of those layers, or 'all'.", "heads"),
    _opt("target", str, SPEC["target"], "--target", "Which of queries/keys to simplify: q, k or qk.", "target"),
    _opt("resid", str, SPEC["resid"], "--resid",
         "Residual hook of resid-* methods: resid_pre, resid_mid or resid_post.", "resid"),
    _opt("fit_n", int, SPEC["fit_n"], "--fit-n", "Training sequences the proxy is fitted on.", "fit_n"),
    _opt("split", list[str] | None, None, "--split", "Split(s) to evaluate (default: all).", "splits"),
    _opt("max_seqs", int, SPEC["max_seqs"], "--max-seqs", "Sequences evaluated per split (0: all).", "max_seqs"),
    _opt("seed", int, SPEC["seed"], "--seed", "Seeds fitting/evaluation sampling, k-means and bootstrap.", "seed"),
    _opt("model", str | None, None, "--model",
         "illusions checkpoint or Hugging Face model folder, or a bundled model's name such as dyck:seed1 "
         "(see `illusions list`; an existing folder wins); default: the task's bundled model.", "model"),
    _opt("data", Path | None, None, "--data",
         "custom: directory of JSONL splits (train.jsonl, iid.jsonl, NAME.jsonl).", "data"),
    _opt("candidates", Path | None, None, "--candidates",
         "custom: file of token ids (one per line) predictions range over (default: all).", "candidates"),
    _opt("window", int, SPEC["window"], "--window",
         "custom: cut text lines longer than this many tokens into windows (0: the model's context).", "window"),
    _opt("stride", int, SPEC["stride"], "--stride",
         "custom: tokens between the starts of two windows of a text line (0: side by side, no overlap).",
         "stride"),
    _opt("uncentered", bool, False, "--uncentered", "svd: plain SVD instead of PCA (no centring).", "centered"),
    _opt("basis", str, SPEC["basis"], "--basis", "svd: 'separate' bases for q and k, or one 'joint' basis.", "basis"),
    _opt("n_boot", int, SPEC["n_boot"], "--n-boot", "Bootstrap resamples for the 95% intervals.", "n_boot"),
    _opt("batch_size", int, SPEC["batch_size"], "--batch-size", "Sequences per forward pass at most.", "batch_size"),
    _opt("token_budget", int, SPEC["token_budget"], "--token-budget",
         "Padded tokens (rows x length) per forward pass (fit, calibration, evaluation) at most; lower it when memory runs out.", "token_budget"),
    _opt("out", Path | None, None, "--out", "Run directory (default: runs/<name>)."),
    _opt("as_json", bool, False, "--json", "Print one JSON object to stdout instead of tables."),
    _opt("by", str | None, None, "--by",
         "Also print a breakdown: key_depth, depth, distance, length, category (custom: a meta name)."),
    _opt("match", str, ",".join(SPEC["match"]), "--match",
         "Comma-separated meta columns of a matched iid control, e.g. length,distance,key_depth (default: "
         "length, the length-matched control every run has; others add a control beside it).", "match"),
    _opt("threads", int | None, None, "--threads", AUTO_THREADS_HELP),
    _opt("overwrite", bool, False, "--overwrite", "Replace an earlier run in --out (files illusions did not write are kept)."),
    Option("report", "--report", Annotated[bool, typer.Option("--report/--no-report", help="Write report.html into the run directory.")],
           True),
    Option("device", "--device", DeviceOpt, "cpu"),
    Option("allow_tf32", "--allow-tf32", TF32Opt, False),
    _opt("site", str, SPEC["site"], "--site",
         "sae: the residual stream ('resid', see --resid) or the targeted heads' attention output ('z').", "site"),
    _opt("architecture", str, SPEC["architecture"], "--architecture",
         "sae/transcoder: standard, topk or jumprelu (SAELens).", "architecture"),
    Option("top_k", "--top-k", Annotated[int, typer.Option(
        "--top-k", "--k", help="sae/transcoder topk: active latents per position (--k: deprecated alias).")],
        SPEC["top_k"], "top_k"),
    _opt("l1", float, SPEC["l1"], "--l1", "sae/transcoder standard and jumprelu: sparsity coefficient.", "l1"),
    _opt("sae_steps", int, SPEC["sae_steps"], "--sae-steps", "sae/transcoder: training steps.", "sae_steps"),
    _opt("sae_from", Path | None, None, "--sae-from",
         "sae/transcoder: a dictionary saved by SAELens (cfg.json + safetensors) instead of training one.",
         "sae_from"),
    _opt("keep", str | None, None, "--keep",
         "circuit: comma-separated components kept (heads L1H0, MLPs mlp0), or 'all' / 'none'; the others "
         "are ablated.", "keep"),
    _opt("ablation", str, SPEC["ablation"], "--ablation",
         "circuit: how ablated components are replaced: mean (over the fitting data), resample or zero.",
         "ablation"),
    _opt("find_circuit", float, SPEC["find_circuit"], "--find-circuit",
         "circuit: find the circuit by greedy pruning on the fitting data, keeping agreement >= this "
         "(e.g. 0.95); starts from --keep (default: every component), and says so when that start is below "
         "it and no removal reaches it.", "find_circuit"),
)

# Where a sweep runs (sweep only): this machine, or one Slurm job for the whole sweep.
SLURM_OPTIONS = (
    Option("engine", "--engine", EngineOpt, "local"),
    Option("partition", "--partition", PartitionOpt, None),
    Option("time", "--time", TimeOpt, None),
    Option("cpus_per_task", "--cpus-per-task", CpusOpt, None),
    Option("gpus_per_task", "--gpus-per-task", GpusOpt, None),
    Option("slurm_opt", "--slurm-opt", SlurmOptOpt, None),
    Option("retries", "--retries", RetriesOpt, 1),
    Option("slurm_logs", "--slurm-logs", SlurmLogsOpt, None),
)

# The swept parameter's values, one option per row of SWEEPS: one value per analysis, a list per sweep.
ANALYZE_VALUES = tuple(
    _opt(s.flag.removeprefix("--"), int | None, None, s.flag, f"{s.what.capitalize()} for {_methods(s)}.", s.field)
    for s in SWEEPS)
SWEEP_VALUES = (
    *(_opt(s.sweep_flag.removeprefix("--"), str | None, None, s.sweep_flag,
           f"Comma-separated {s.plural} for {_methods(s)}, e.g. {s.example}.", s.field) for s in SWEEPS),
    _opt("over_checkpoints", str | None, None, "--over-checkpoints",
         "Run the analysis on every step checkpoint of a training run saved with `illusions train "
         "--save-every N` (the run folder or its checkpoints/); writes one run per step and a summary "
         "over training steps.", "checkpoints"),
)

TASK_ARG = Annotated[
    str, typer.Argument(help="Task name (see `illusions list`), or an analysis recipe (analyses/*.toml).")
]


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{flag} must be comma-separated integers, got {text!r}")
    if not values:
        fail(f"{flag} needs at least one value")
    return values


def _heads(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "all"):
        return ()
    return _int_list(text, "--heads")


def _field_value(option: Option, value: Any, sweep: bool) -> Any:
    """The spec value of an option as typed on the command line."""
    if option.field in SWEPT_FIELDS:
        if value is None:
            return ()
        return _int_list(value, option.flag) if sweep else (value,)
    if option.name == "heads":
        return _heads(value)
    if option.name == "keep":
        return tuple(k.strip() for k in value.split(",") if k.strip()) if value else ()
    if option.name == "uncentered":
        return not value
    if option.name in ("model", "data", "candidates", "over_checkpoints", "sae_from"):
        return str(value) if value else ""
    if option.name == "match":
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if option.field in ("layers", "splits"):
        return tuple(value or ())
    return value


def _spec(task: str, given: dict[str, Any], values: tuple[Option, ...], sweep: bool, args: tuple[str, ...]) -> Any:
    """The AnalysisSpec of the options; its errors are rewritten with the flags the user typed (``args``: the
    command's arguments)."""
    from illusions.errors import InvalidOption

    options = values + OPTIONS
    fields = {o.field: _field_value(o, given[o.name], sweep) for o in options if o.field}
    if sweep and not (any(fields[name] for name in SWEPT_FIELDS) or fields["checkpoints"]):
        flags = [s.sweep_flag for s in SWEEPS]
        fail(f"give {', '.join(flags[:-1])} or {flags[-1]} (the values to sweep) or --over-checkpoints")
    flags = {o.field: o.flag for o in options if o.field} | {"task": "TASK"}
    try:
        return AnalysisSpec(task=task, **fields)
    except InvalidOption as exc:
        if exc.whole:
            fail(exc.detail)
        fail(f"{_typed(flags.get(exc.option, exc.option), args)} {exc.detail}")


# Deprecated spellings a user may still type (the message names the flag as typed).
ALIASES = {"--top-k": ("--k",)}
# Where :class:`_Command` keeps the arguments the command received (the context's meta).
ARGS_KEY = "illusions.analyze.args"


class _Command(TyperCommand):
    """A Typer command that keeps the arguments it received, so :func:`_typed` can name a deprecated alias:
    click parses ``--top-k`` and ``--k`` into one value and does not say which was typed. These are the
    command's own arguments, also under CliRunner or an in-process call (``sys.argv`` is the caller's)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGS_KEY] = tuple(args)
        return super().parse_args(ctx, args)


def _typed(flag: str, args: tuple[str, ...]) -> str:
    """``flag`` as the user typed it in ``args``: a deprecated alias when that is what the command received."""
    typed = [a for a in ALIASES.get(flag, ()) if any(x == a or x.startswith(a + "=") for x in args)]
    return typed[0] if typed and not any(x == flag or x.startswith(flag + "=") for x in args) else flag


def _recipe(path: str, given: dict[str, Any], values: tuple[Option, ...]) -> tuple[Any, str]:
    """``(spec, name)`` of a recipe file; analysis options besides it are refused."""
    from illusions.analyses.run import load_analysis_recipe

    extra = [o.flag for o in values + OPTIONS if o.field and given[o.name] != o.default]
    if extra:
        fail(f"{', '.join(extra)} cannot be combined with a recipe; edit {path} instead")
    recipe = load_analysis_recipe(path)
    return recipe.spec, recipe.name


def _analysis(sweep: bool, given: dict[str, Any], args: tuple[str, ...]) -> None:
    """The body both commands share: build the spec, run it, write the run directory, print (``args``: the
    command's arguments, for messages)."""
    values = SWEEP_VALUES if sweep else ANALYZE_VALUES
    task = given["task"]
    if task.endswith(".toml"):
        spec, name = _recipe(task, given, values)
    else:
        spec, name = _spec(task, given, values, sweep, args), None
    by = given["by"]
    if by is not None and by not in BY_CHOICES:
        if spec.task != CUSTOM_TASK:
            fail(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
        # A meta column of the data: the spec insists on it, so a missing one fails before the fit.
        spec = _replace(spec, breakdowns=(*spec.breakdowns, by))
    spec = _resolved_layers(spec, "layers" if name is not None else "--layer")
    slurm = {o.name: given[o.name] for o in SLURM_OPTIONS} if sweep else None
    _run(spec, given["out"], given["as_json"], given["by"], given["threads"], given["report"], name=name,
         device=given["device"], allow_tf32=given["allow_tf32"], slurm=slurm, overwrite=given["overwrite"])


def _resolved_layers(spec: Any, flag: str) -> Any:
    """The spec with layers given from the end (``--layer -1``) as the model's indices, checked against
    its config before any weight loads; says which index a negative layer became."""
    from illusions.analyses.run import resolve_spec_layers
    from illusions.errors import InvalidOption

    try:
        resolved = resolve_spec_layers(spec)
    except InvalidOption as exc:
        fail(exc.detail if exc.whole else f"{flag} {exc.detail}")
    if resolved.layers != spec.layers:
        given = ", ".join(str(x) for x in spec.layers)
        typer.echo(f"note: {flag} {given} is layer{'s' if len(spec.layers) > 1 else ''} "
                   f"{', '.join(str(x) for x in resolved.layers)} of this model", err=True)
    return resolved


def _replace(spec: Any, **changes: Any) -> Any:
    from illusions.errors import InvalidOption

    try:
        return spec.replace(**changes)
    except InvalidOption as exc:
        fail(exc.detail if exc.whole else f"--by {exc.detail}")


def _run(spec: Any, out: Path | None, as_json: bool, by: str | None, threads: int | None, report: bool,
         name: str | None = None, device: str = "cpu", allow_tf32: bool = False,
         slurm: dict[str, Any] | None = None, overwrite: bool = False) -> None:
    from illusions.analyses.run import check_run_out, write_run
    from illusions.cli.scale import local_device

    if threads is None and slurm is not None and slurm["engine"] != "local":
        threads = MAX_AUTO_THREADS  # the jobs run elsewhere: this machine's load says nothing about theirs

    if out is None:
        # No folder chosen: a rerun replaces the same spec's run, or goes to a new numbered folder.
        from illusions.analyses.run import default_run_dir

        out, replace, note = default_run_dir(spec, name, overwrite=overwrite)
        overwrite = overwrite or replace
        if note:
            typer.echo(f"note: {note}", err=True)
    if spec.checkpoints:
        if slurm is not None and slurm["engine"] != "local":
            fail("--over-checkpoints runs on this machine; --engine slurm does not apply to it")
        _over_checkpoints(spec, out, as_json, threads, report, device, allow_tf32, overwrite)
        return
    check_run_out(spec, out, overwrite=overwrite, option="--out", overwrite_option="--overwrite")
    threads = set_threads(threads)
    if slurm is not None and slurm["engine"] != "local":
        _print_run(_on_slurm(spec, out, report, threads, device, allow_tf32, slurm, overwrite), out, as_json, by,
                   report)
        return
    if slurm is not None:
        _local_only(slurm)

    def evaluated(result: Any) -> None:
        import gc

        # What the imports, the model and the records hold lives until the command ends: the collector
        # stops walking it (a full collection took 0.3-0.4 s here).
        gc.freeze()

    run = _with_progress(spec, as_json, local_device(device), allow_tf32, evaluated=evaluated, by=by)
    extra = None
    if report:
        from illusions.reports import write_report_files

        def extra(stage: Path) -> None:
            write_report_files(run, stage)

    write_run(run, out, extra_files=extra, overwrite=overwrite)
    _print_run(run, out, as_json, by, report)


def _over_checkpoints(spec: Any, out: Path, as_json: bool, threads: int | None, report: bool, device: str,
                      allow_tf32: bool, overwrite: bool) -> None:
    """One analysis per step checkpoint into ``out``: a run directory per step, the summary over
    steps (checkpoints.csv/.json) and, with ``report``, report.html with the figure over steps."""
    from rich.console import Console

    from illusions.analyses.checkpoints import (
        SUMMARY_CSV,
        SUMMARY_JSON,
        check_sweep_out,
        run_over_checkpoints,
    )
    from illusions.cli.scale import local_device

    check_sweep_out(spec, out, overwrite=overwrite, option="--out", overwrite_option="--overwrite")
    set_threads(threads)
    err = Console(stderr=True)
    run_files = sweep_files = None
    if report:
        from illusions.reports.checkpoints import report_writers

        run_files, sweep_files = report_writers()

    def progress(i: int, n: int, step: int) -> None:
        if not as_json:
            err.print(f"[dim]checkpoint {i + 1}/{n} (step {step})[/]")

    sweep = run_over_checkpoints(spec, out, overwrite=overwrite, run_files=run_files, sweep_files=sweep_files,
                                 progress=progress, device=local_device(device), allow_tf32=allow_tf32)
    if as_json:
        typer.echo(json.dumps(sweep.document()))
        return
    from illusions.cli.tables import print_checkpoints

    print_checkpoints(sweep)
    typer.echo(f"wrote {out}/ (step<k>/ runs, {SUMMARY_CSV}, {SUMMARY_JSON}{', report.html' if report else ''})")


def _print_run(run: Any, out: Path, as_json: bool, by: str | None, report: bool) -> None:
    if as_json:
        typer.echo(json.dumps(run.document))
        return
    from illusions.cli.tables import print_breakdown, print_circuits, print_summary, print_warnings

    print_summary(run)
    print_circuits(run)
    print_warnings(run)
    if by:
        print_breakdown(run, by)
    typer.echo(f"wrote {out}/ (config.json, metrics.json, metrics.csv{', report.html' if report else ''})")


def _slurm_engine(slurm: dict[str, Any], *, threads: int, logs: Path, device: str) -> tuple[Any, str]:
    from illusions.cli.scale import make_engine

    return make_engine(slurm["engine"], threads=threads, logs=slurm["slurm_logs"] or logs,
                       partition=slurm["partition"], time=slurm["time"], cpus_per_task=slurm["cpus_per_task"],
                       gpus_per_task=slurm["gpus_per_task"], slurm_opt=slurm["slurm_opt"],
                       retries=slurm["retries"], device=device, logs_given=slurm["slurm_logs"] is not None)


def _local_only(slurm: dict[str, Any]) -> None:
    """Refuse Slurm options given with ``--engine local``."""
    _slurm_engine(slurm, threads=1, logs=Path("."), device="cpu")


def _on_slurm(spec: Any, out: Path, report: bool, threads: int, device: str, allow_tf32: bool,
              slurm: dict[str, Any], overwrite: bool = False) -> Any:
    """The whole sweep as one Slurm job (one process fits once and runs each split's clean pass once
    for every swept value); waits, retries, and returns the run's summary."""
    from illusions.cli.scale import JobDisplay
    from illusions.engines import JobsFailed
    from illusions.reproduction.run import analyze_into

    engine, device = _slurm_engine(slurm, threads=threads, logs=out.parent / "slurm-logs", device=device)
    key = out.name
    with JobDisplay(1, "sweep") as display:
        try:
            engine.submit(key, analyze_into, spec, str(out.absolute()), report, device, allow_tf32, overwrite)
            outcome = engine.wait(lambda e: display.show(e.key, e.finished, e.total, e.kind, e.detail))
        except BaseException:
            engine.cancel()
            raise
    if outcome.missing:
        exc = JobsFailed(outcome.missing, engine.retries)
        typer.echo(f"error: {exc}; nothing written to {out} (job logs in {engine.folder}/)", err=True)
        raise typer.Exit(1)
    return outcome.results[key]


def _with_progress(spec: Any, quiet: bool, device: str = "cpu", allow_tf32: bool = False,
                   evaluated: Any = None, by: str | None = None) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from illusions.analyses.run import run_analysis

    console = Console(stderr=True)
    shown = (by,) if by else ()  # --by: a column the positions lack is refused before the fit
    if quiet or not console.is_terminal:
        return run_analysis(spec, device=device, allow_tf32=allow_tf32, evaluated=evaluated, by=shown)
    # The split count joins the description once it is known, so the bar never reads "0/None".
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        tid = bar.add_task("fitting", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            text = f"evaluating {stage} ({done}/{total} splits)" if stage != "done" else "summarising"
            bar.update(tid, description=text, completed=done, total=total)

        return run_analysis(spec, progress=progress, device=device, allow_tf32=allow_tf32, evaluated=evaluated,
                            by=shown)


def _define(name: str, sweep: bool, doc: str) -> None:
    """Register one of the two commands from the shared options (Typer reads ``__signature__``)."""
    values = SWEEP_VALUES if sweep else ANALYZE_VALUES
    ordered = (OPTIONS[0], *values, *OPTIONS[1:], *(SLURM_OPTIONS if sweep else ()))
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("task", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=TASK_ARG)]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                 annotation=o.annotation) for o in ordered]

    def body(ctx: typer.Context, **given: Any) -> None:
        _analysis(sweep, given, ctx.meta[ARGS_KEY])

    body.__name__ = name
    body.__doc__ = doc
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command(name, cls=_Command)(body)


_define("analyze", False, "Fit a simplifier on training data and measure its faithfulness on every split.")
_define("sweep", True, f"Run one simplifier over several {', '.join(s.plural for s in SWEEPS[:-1])} or "
        f"{SWEEPS[-1].plural}: one table, one tidy CSV.\n\n"
        "With --engine slurm the whole sweep runs as one Slurm job (one process fits once and shares each "
        "split's clean pass among the swept values, about twice as fast as a job per value); the command "
        "waits for it and prints the same tables.")
