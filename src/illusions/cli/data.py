"""`illusions data TASK`: generate a task's splits (once, then cached) and print their statistics.

Options shared by every task map onto fields of the task's config (``--seed``, ``--n-train``,
``--n-eval``) or its constructor (``--cache-dir``). Task-specific options are declared by the tasks
themselves (:attr:`illusions.tasks.base.DataSupport.data_options`): each sits in its task's own help
panel and is refused for other tasks; the command names no task. They are read when the ``data``
command itself is parsed or asked for help, so ``illusions --help`` imports no task. What a task offers
beyond its splits (its own statistics, ``--check``, depths under ``--show``, its caption) comes through
:class:`~illusions.tasks.base.DataSupport`, whose defaults say "not offered".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from illusions.cli.app import command
from illusions.errors import IllusionsError

# Where _DataCommand hands the task-declared options' values to `data` (ctx.meta).
TASK_OPTIONS = "illusions.data.task_options"


def _task_classes() -> list[Any]:
    """Every registered task class that is built, in the registry's order."""
    from illusions.registry import TASKS, get_task

    found = []
    for name in TASKS:
        try:
            found.append(get_task(name))
        except ModuleNotFoundError:
            continue
    return found


def _task_params(task_classes: list[Any]) -> list[Any]:
    """Click options for every task's ``data_options``, each in its task's help panel, built by Typer
    from an annotated signature exactly as a declared ``typer.Option`` would be."""
    import inspect

    params = [
        inspect.Parameter(
            opt.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[opt.type | None, typer.Option(help=opt.help,
                                                                rich_help_panel=f"{cls.name.capitalize()} options")],
        )
        for cls in task_classes for opt in cls.data_options
    ]

    def options(**values: Any) -> None:  # pragma: no cover - never called, only read for its signature
        """Task options."""

    options.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    options.__annotations__ = {p.name: p.annotation for p in params}
    holder = typer.Typer(add_completion=False)
    holder.command()(options)
    return list(typer.main.get_command(holder).params)


class _DataCommand(TyperCommand):
    """The ``data`` command with the tasks' own options added after the shared ones (before --help);
    their values reach the command body through ``ctx.meta[TASK_OPTIONS]``."""

    _extra: list[Any] | None = None

    def _task_options(self) -> list[Any]:
        if self._extra is None:
            self._extra = _task_params(_task_classes())
        return self._extra

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        shared = len(self.params)
        return [*params[:shared], *self._task_options(), *params[shared:]]

    def invoke(self, ctx: Any) -> Any:
        names = {param.name for param in self._task_options()}
        ctx.meta[TASK_OPTIONS] = {name: ctx.params.pop(name) for name in list(ctx.params) if name in names}
        return super().invoke(ctx)


def _config(task_cls: Any, overrides: dict[str, Any]) -> Any:
    """The task's default config with the given fields replaced (None values skipped)."""
    base = task_cls.Config().to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in base:
            raise IllusionsError(f"task {task_cls.name!r} has no setting {key!r}")
        base[key] = value
    return task_cls.Config.from_dict(base, source="the command line")


def _show(console: Any, task: Any, name: str, split: Any, n: int) -> None:
    """Print the first ``n`` rows of a split, with the depth under every token when the task has one."""
    from rich.text import Text

    console.print(Text(f"{name}: first {min(n, len(split))} of {len(split)}", style="bold"))
    per_line = 24
    for i in range(min(n, len(split))):
        ids = split.tokens[i, : split.lengths[i]]
        depths = task.depths(ids)
        if depths is None:
            console.print(Text(f"  [{i}] {task.decode(ids)!r}"))
            continue
        words = [task.vocab.tokens[int(t)] for t in ids]
        console.print(Text(f"  [{i}] {len(ids) - 2} brackets, max depth {int(depths.max())}"))
        width = max(len(w) for w in words) + 1
        for start in range(0, len(words), per_line):
            chunk = slice(start, start + per_line)
            console.print(
                Text("    " + "".join(w.rjust(width) for w in words[chunk])), soft_wrap=True
            )
            console.print(
                Text(
                    "    " + "".join(str(int(d)).rjust(width) for d in depths[chunk]), style="dim"
                ),
                soft_wrap=True,
            )


def _check(task: Any, text: str, as_json: bool, progress: Any) -> None:
    result = task.check(text, progress)  # raises IllusionsError with the first problem
    typer.echo(json.dumps(result) if as_json else task.check_summary(result))


def _make_task(task: str, options: dict[str, Any], shared: dict[str, Any], cache_dir: Path | None) -> Any:
    """The task named ``task`` with the command line's settings; another task's option is refused."""
    from illusions.registry import get_task

    try:
        task_cls = get_task(task)
    except ModuleNotFoundError:
        raise IllusionsError(f"task {task!r} is registered but not built yet") from None
    overrides = dict(shared)
    for owner in _task_classes():
        given = [opt.flag for opt in owner.data_options if options.get(opt.name) is not None]
        if given and task_cls.name != owner.name:
            raise IllusionsError(f"{', '.join(given)} can only be used with the {owner.name} task")
        overrides.update({opt.name: options.get(opt.name) for opt in owner.data_options if opt.config_field})
    config = _config(task_cls, overrides)
    if cache_dir is None:
        return task_cls(config)
    if not task_cls.takes_cache_dir:
        raise IllusionsError(f"task {task_cls.name!r} keeps no cache on disk; --cache-dir does not apply to it")
    return task_cls(config, cache_dir=cache_dir)


def _split_stats(t: Any, splits: dict[str, Any], sampling: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``data`` statistics of every split, with the sampling acceptance where the task samples."""
    stats = {name: t.split_stats(s) for name, s in splits.items()}
    for name, s in stats.items():
        if name in sampling:
            s["acceptance"] = sampling[name]["acceptance"]
    return stats


def _stats_table(t: Any, task: str, stats: dict[str, dict[str, Any]], sampled: bool) -> Any:
    """The rich table of split statistics, its caption saying what each column counts."""
    from rich import box
    from rich.table import Table

    has_depth = all("depth_mean" in s for s in stats.values())
    caption = f"len: length in {t.length_unit}; depth: maximum nesting depth of each string"
    note = t.scored_note()
    if note is not None:
        caption += f"; scored: {note}"
    if sampled:
        caption += "; kept: share of sampled candidates meeting the split's definition"
    table = Table(
        title=f"{task} splits",
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    columns = ["split", "n", "len\nmean", "len\nmed", "len\nmax"]
    columns += ["depth\nmean", "depth\nmax"] if has_depth else []
    columns += ["scored"] + (["kept"] if sampled else [])
    for col in columns:
        left = col == "split"
        table.add_column(
            col, justify="left" if left else "right", style="bold" if left else None, no_wrap=True
        )
    for name, s in stats.items():
        row = [
            name,
            f"{s['n']:,}",
            f"{s['length_mean']:.1f}",
            f"{s['length_median']:.0f}",
            str(s["length_max"]),
        ]
        if has_depth:
            row += [f"{s['depth_mean']:.2f}", str(s["depth_max"])]
        row.append(f"{s['scored']:,}")
        if sampled:
            row.append(f"{100 * s['acceptance']:.1f}%" if "acceptance" in s else "")
        table.add_row(*row)
    return table


@command("data", cls=_DataCommand)
def data(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name (see `illusions list`).")],
    seed: Annotated[int | None, typer.Option(help="Seed of every split's generator.")] = None,
    n_train: Annotated[int | None, typer.Option(help="Training strings.")] = None,
    n_eval: Annotated[int | None, typer.Option(help="Strings per evaluation split.")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache folder (default: $ILLUSIONS_CACHE or ~/.cache/illusions)."),
    ] = None,
    show: Annotated[int, typer.Option(help="Print this many examples per split.", min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Generate a task's splits (cached after the first run) and print their statistics."""
    from rich.console import Console

    options = ctx.meta.get(TASK_OPTIONS, {})
    t = _make_task(task, options, {"seed": seed, "n_train": n_train, "n_eval": n_eval}, cache_dir)
    err = Console(stderr=True)
    out = Console(highlight=False)
    cached = t.is_cached()
    if not cached and t.takes_cache_dir:
        from illusions.io import check_creatable

        check_creatable(t.cache_dir)  # the cache is what this command makes: refuse before building
    with err.status(
        f"{task}: {'loading cached splits' if cached else 'generating splits'}"
    ) as status:

        def progress(message: str) -> None:
            status.update(f"{task}: {message}")

        if options.get("check") is not None:
            _check(t, options["check"], as_json, progress)
            return
        splits = t.splits(progress=progress)

    sampling = t.sampling_stats()
    stats = _split_stats(t, splits, sampling)
    cache = str(t.cache_path) if t.cache_path is not None else None
    meta = t.meta()
    corpus_facts = {
        k: meta[k] for k in ("corpus_source", "corpus_fingerprint", "corpus_languages", "deep_depth") if k in meta
    }
    if as_json:
        typer.echo(json.dumps(
            {"task": task, "config": t.config.to_dict(), "cache": cache, **corpus_facts, "splits": stats}, indent=2
        ))
        return
    out.print(_stats_table(t, task, stats, sampled=bool(sampling)))
    for name, split in splits.items():
        if show:
            _show(out, t, name, split, show)
    for key, value in corpus_facts.items():
        out.print(f"{key.replace('_', ' ')}: {value}")
    if cache and Path(cache).is_file():
        out.print(f"cache: {cache}")
