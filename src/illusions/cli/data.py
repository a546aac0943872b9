"""`illusions data TASK`: generate a task's splits (once, then cached) and print their statistics.

Options shared by every task map onto fields of the task's config (``--seed``, ``--n-train``,
``--n-eval``) or its constructor (``--cache-dir``); task-specific options sit in their own help panel
and are refused for other tasks. What a task offers beyond its splits (its own statistics, ``--check``,
depths under ``--show``) comes through :class:`illusions.tasks.base.DataSupport`, whose defaults say
"not offered".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from illusions.cli.app import command
from illusions.errors import IllusionsError

DYCK = "Dyck options"
CODE = "Code options"


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
    if as_json:
        typer.echo(json.dumps(result))
        return
    if "brackets" not in result:
        typer.echo(f"valid: {result['tokens']} tokens")
        return
    md = task.config.min_distance
    typer.echo(
        f"valid: {result['brackets']} brackets, max depth {result['max_depth']}, "
        f"{len(result['segments'])} segment(s), {result['scored']} closer(s) at distance >= {md}; "
        f"relative to the training set it belongs to: {result['split']}"
    )


@command("data")
def data(
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
    check: Annotated[
        str | None,
        typer.Option(
            help='Validate one string, e.g. "(a (b b) a)": exit 0 if valid, 2 with the reason.',
            rich_help_panel=DYCK,
        ),
    ] = None,
    min_distance: Annotated[
        int | None,
        typer.Option(
            help="Score closers at least this far from their opener (1: every closer).",
            rich_help_panel=DYCK,
        ),
    ] = None,
    corpus: Annotated[
        str | None,
        typer.Option(
            help="'machine' (this machine's Python stdlib, JDK src.zip, npm) or a CodeSearchNet JSONL "
            "file or folder (.jsonl / .jsonl.gz); default: the pinned corpus shipped with illusions.",
            rich_help_panel=CODE,
        ),
    ] = None,
) -> None:
    """Generate a task's splits (cached after the first run) and print their statistics."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from illusions.registry import get_task

    try:
        task_cls = get_task(task)
    except ModuleNotFoundError:
        raise IllusionsError(f"task {task!r} is registered but not built yet") from None
    specific = {"dyck": {"--check": check, "--min-distance": min_distance}, "code": {"--corpus": corpus}}
    for owner, flags in specific.items():
        given = [flag for flag, value in flags.items() if value is not None]
        if given and task_cls.name != owner:
            raise IllusionsError(f"{', '.join(given)} can only be used with the {owner} task")
    overrides = {"seed": seed, "n_train": n_train, "n_eval": n_eval, "min_distance": min_distance,
                 "corpus": corpus}
    config = _config(task_cls, overrides)
    t = task_cls(config, cache_dir=cache_dir) if cache_dir is not None else task_cls(config)

    err = Console(stderr=True)
    out = Console(highlight=False)
    cached = t.is_cached()
    if not cached and getattr(t, "cache_dir", None) is not None:
        from illusions.io import check_creatable

        check_creatable(t.cache_dir)  # the cache is what this command makes: refuse before building
    with err.status(
        f"{task}: {'loading cached splits' if cached else 'generating splits'}"
    ) as status:

        def progress(message: str) -> None:
            status.update(f"{task}: {message}")

        if check is not None:
            _check(t, check, as_json, progress)
            return
        splits = t.splits(progress=progress)

    stats = {name: t.split_stats(s) for name, s in splits.items()}
    sampling = t.sampling_stats()
    for name, s in stats.items():
        if name in sampling:
            s["acceptance"] = sampling[name]["acceptance"]
    cache = str(t.cache_path) if t.cache_path is not None else None
    meta = t.meta()
    corpus_facts = {
        k: meta[k] for k in ("corpus_source", "corpus_fingerprint", "corpus_languages", "deep_depth") if k in meta
    }
    if as_json:
        typer.echo(
            json.dumps(
                {"task": task, "config": config.to_dict(), "cache": cache, **corpus_facts, "splits": stats},
                indent=2,
            )
        )
        return

    unit = "len: length in brackets" if task_cls.name == "dyck" else "len: length in tokens"
    has_depth = all("depth_mean" in s for s in stats.values())
    caption = f"{unit}; depth: maximum nesting depth of each string"
    if task_cls.name == "dyck":
        caption += f"; scored: closers at distance >= {config.min_distance} from their opener"
    if sampling:
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
    columns += ["scored"] + (["kept"] if sampling else [])
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
        if sampling:
            row.append(f"{100 * s['acceptance']:.1f}%" if "acceptance" in s else "")
        table.add_row(*row)
    out.print(table)
    for name, split in splits.items():
        if show:
            _show(out, t, name, split, show)
    for key, value in corpus_facts.items():
        out.print(f"{key.replace('_', ' ')}: {value}")
    if cache and Path(cache).is_file():
        out.print(f"cache: {cache}")
