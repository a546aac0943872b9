"""`illusions train TASK|RECIPE`: train a HookedTransformer on a task."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from illusions.cli.app import command, fail, set_threads
from illusions.cli.scale import DeviceOpt, TF32Opt
from illusions.errors import IllusionsError


def _saved_state(out: Path) -> dict[str, Any]:
    """The trainer state of the run in ``out`` (empty when there is none)."""
    from illusions.config import read_json
    from illusions.training_setup import TRAINER_FILE

    state = read_json(out / TRAINER_FILE) if (out / TRAINER_FILE).is_file() else {}
    return state if isinstance(state, dict) else {}


def _saved_train_settings(out: Path) -> dict[str, Any]:
    """The [train] settings a run in ``out`` started with (empty when there is none)."""
    return dict(_saved_state(out).get("train", {}))


@command("train")
def train(
    task: Annotated[str, typer.Argument(help="A task name (its bundled recipe, e.g. dyck) or a recipe file (tasks/dyck.toml).")],
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/train-<task>).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Override the recipe's step budget.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the recipe's training seed (init and batch order).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out.")] = False,
    save_every: Annotated[int | None, typer.Option(
        "--save-every", help="Also save a loadable checkpoint every N steps in <out>/checkpoints/step<k>/ "
        "(for `illusions sweep --over-checkpoints`); a resumed run keeps its interval.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch CPU threads (results are exact for a fixed count).")] = 2,
    device: DeviceOpt = "cpu",
    allow_tf32: TF32Opt = False,
) -> None:
    """Train a model on a task or a TOML recipe; Ctrl-C saves a checkpoint that --resume continues."""
    set_threads(threads)
    if save_every is not None and save_every < 1:
        fail(f"--save-every must be at least 1, got {save_every}")
    from illusions.cli.scale import local_device

    device = local_device(device)
    from rich.console import Console

    err = Console(stderr=True)
    plan = _plan(task, out, steps=steps, seed=seed, resume=resume, save_every=save_every, device=device)
    _build_splits(err, plan)
    result = _train_with_progress(err, plan, device=device, allow_tf32=allow_tf32)
    if result.interrupted:
        where = ("in the final evaluation, after the last step" if result.step >= plan.train_cfg.steps
                 else f"at step {result.step}/{plan.train_cfg.steps}")
        err.print(
            f"interrupted {where}; checkpoint saved in {plan.out}. "
            f"Continue with: illusions train {task} --out {plan.out} --resume"
        )
        raise typer.Exit(130)
    _print_result(Console(), plan, result)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one `illusions train` call trains: the recipe with the command line's changes, where to, and how."""

    recipe: Any  # illusions.recipes.Recipe
    model_cfg: Any  # illusions.models.ModelConfig
    train_cfg: Any  # illusions.training_setup.TrainConfig
    task: Any  # the task object the recipe makes
    out: Path
    resume: bool
    save_every: int  # 0: no step checkpoints


def _plan(task: str, out: Path | None, *, steps: int | None, seed: int | None, resume: bool,
          save_every: int | None, device: Any = "cpu") -> _Plan:
    """The recipe named by ``task`` with --steps/--seed (or, resuming, the run's own settings) applied,
    checked as far as it can be without data."""
    from illusions.models import ModelConfig
    from illusions.recipes import resolve_recipe
    from illusions.training_setup import (
        TrainConfig,
        check_model_size,
        check_out_dir,
        read_trainer_state,
    )

    recipe = resolve_recipe(task, {"model": ModelConfig, "train": TrainConfig})
    out = out if out is not None else Path("runs") / f"train-{recipe.task_name}"
    # Everything that can be checked without data is checked before the first line of progress.
    check_out_dir(out, resume)
    changes: dict[str, Any] = {}
    if resume:
        # Resuming continues the run as it started, so its --steps/--seed need not be repeated.
        saved = _saved_train_settings(out)
        changes.update({k: saved[k] for k in ("steps", "seed") if k in saved})
    if save_every is None:
        saved_every = _saved_state(out).get("save_every", 0) if resume else 0
        save_every = saved_every if isinstance(saved_every, int) and saved_every > 0 else 0
    if steps is not None:
        changes["steps"] = steps
    if seed is not None:
        changes["seed"] = seed
    if changes:
        recipe = recipe.replace("train", **changes)
    model_cfg: ModelConfig = recipe["model"]
    train_cfg: TrainConfig = recipe["train"]
    check_model_size(model_cfg, device)
    if resume:
        read_trainer_state(out, model_cfg, train_cfg)
    task_obj = recipe.make_task()
    if not isinstance(getattr(type(task_obj), "vocab", None), property) and model_cfg.d_vocab != len(task_obj.vocab):
        # A task whose vocabulary is fixed (not read from its data) is checked here already.
        raise IllusionsError(
            f"model d_vocab is {model_cfg.d_vocab} but task {task_obj.name!r} has {len(task_obj.vocab)} tokens; "
            f"set d_vocab = {len(task_obj.vocab)} in the recipe's [model]"
        )
    return _Plan(recipe, model_cfg, train_cfg, task_obj, out, resume, save_every)


def _build_splits(err: Any, plan: _Plan) -> None:
    """Build (or load) the task's splits, saying so on stderr, before training starts."""
    import time

    err.print(f"[dim]recipe {plan.recipe.source}; building {plan.recipe.task_name} splits (cached after the first run)[/]")
    t0 = time.perf_counter()
    plan.task.splits()
    err.print(f"[dim]splits ready in {time.perf_counter() - t0:.1f}s; training {plan.train_cfg.steps} steps "
              f"into {plan.out}[/]")


def _train_with_progress(err: Any, plan: _Plan, *, device: Any, allow_tf32: bool) -> Any:
    """Train as planned, with a progress bar on a terminal and a line per evaluation on stderr."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from illusions.training import train as run_training

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[acc]}"),
        TimeRemainingColumn(),
    )
    # Without a terminal the bar would only be drawn once at the end; the per-evaluation lines remain.
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bar:
        handle = bar.add_task("train", total=plan.train_cfg.steps, loss="-", tps="-", acc="")

        def progress(p: Any) -> None:
            acc = " ".join(f"{k} {v:.3f}" for k, v in p.accuracies.items())
            bar.update(handle, completed=p.step, loss=f"{p.loss:.4f}", tps=f"{p.tokens_per_s:,.0f}", acc=acc)
            if p.event == "eval":
                # Also a plain line per evaluation, so logs of non-interactive runs show the curve.
                err.print(f"step {p.step}: loss {p.loss:.4f} lr {p.lr:.2e} {p.tokens_per_s:,.0f} tok/s | {acc}",
                          soft_wrap=True)

        return run_training(
            plan.task,
            plan.model_cfg,
            plan.train_cfg,
            plan.out,
            resume=plan.resume,
            progress=progress,
            device=device,
            allow_tf32=allow_tf32,
            recipe={**plan.recipe.to_dict(), "source": plan.recipe.source},
            save_every=plan.save_every,
        )


def _print_result(console: Any, plan: _Plan, result: Any) -> None:
    """The finished run: accuracy per split, throughput, the checkpoint and any step checkpoints."""
    from rich.table import Table

    out = plan.out
    table = Table(title=f"accuracy at step {result.step} (scored positions)", title_justify="left")
    for col in ("split", "accuracy", "positions", f"subset ({plan.train_cfg.eval_rows} rows)"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, sub in result.subset_accuracies.items():
        full = result.accuracies.get(name)
        table.add_row(
            name,
            f"{full['accuracy']:.4f}" if full else "-",
            f"{full['n_positions']}" if full else "-",
            f"{sub['accuracy']:.4f}" if sub.get("n_positions") else "-",  # no scored position: no accuracy
        )
    console.print(table)
    if result.train_tokens:
        console.print(
            f"{result.train_tokens:,} tokens in {result.train_seconds:.0f}s of training "
            f"({result.tokens_per_s:,.0f} tok/s), {result.wall_seconds:.0f}s in all"
        )
    else:  # a resumed run whose steps were all done: it only evaluated
        console.print(f"no training step was left (all {plan.train_cfg.steps} were done); "
                      f"{result.wall_seconds:.0f}s in all")
    console.print(f"checkpoint: {out}")
    if plan.save_every:
        from illusions.models import CHECKPOINTS_DIR, list_checkpoints

        saved = list_checkpoints(out)
        steps_text = ", ".join(str(k) for k, _ in saved) if len(saved) <= 12 else (
            f"{saved[0][0]}, {saved[1][0]}, ..., {saved[-1][0]}")
        console.print(f"step checkpoints: {out / CHECKPOINTS_DIR}/ ({len(saved)}: steps {steps_text}); "
                      f"analyse them with e.g. `illusions sweep {plan.recipe.task_name} --over-checkpoints {out} "
                      "--simplify onehot`")
