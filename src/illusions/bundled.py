"""The reference models shipped inside the package, under ``illusions/assets/<task>/``.

Each task's folder holds fixed files:

    recipe.toml         the recipe that trained it (a copy of the repository's tasks/<task>.toml)
    config.json         model config + meta (task meta, recipe, final accuracies), as written by
    model.safetensors   ``illusions.models.save_model``
    metrics.json        per-split accuracies on the full splits and on the fixed evaluation subsets
    training_log.json   the loss curve and the evaluations made during training
    manifest.json       the sha256 of each of these files, checked when the model is loaded

Commands that need a model default to :func:`bundled_model_dir` of their task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.models import CONFIG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ASSETS = Path(__file__).resolve().parent / "assets"
RECIPE_FILE = "recipe.toml"
METRICS_FILE = "metrics.json"
LOG_FILE = "training_log.json"


def bundled_tasks() -> list[str]:
    """Names of the tasks that ship a trained reference model."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def bundled_model_dir(task: str) -> Path:
    """The checkpoint folder of the reference model bundled for ``task``.

    Args:
        task: a task name, e.g. ``dyck``.

    Returns:
        A folder that :func:`illusions.models.load_model` reads.

    Raises:
        IllusionsError: no model is bundled for ``task``.
    """
    directory = ASSETS / task
    if not ((directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()):
        have = ", ".join(bundled_tasks()) or "none"
        raise IllusionsError(
            f"no bundled model for task {task!r} (bundled: {have}); train one with `illusions train {task}` "
            "and pass its folder with --model"
        )
    return directory


def bundled_recipe_path(task: str) -> Path:
    """The recipe shipped for ``task`` (what ``illusions train <task>`` runs)."""
    path = ASSETS / task / RECIPE_FILE
    if not path.is_file():
        raise IllusionsError(f"no bundled recipe for task {task!r}; pass a recipe file such as tasks/{task}.toml")
    return path


def bundled_metrics(task: str) -> dict[str, Any]:
    """The recorded accuracies of the bundled model of ``task`` (its ``metrics.json``)."""
    return read_json(bundled_model_dir(task) / METRICS_FILE)


def load_bundled(task: str, *, device: str = "cpu") -> tuple[HookedTransformer, dict[str, Any]]:
    """Load the bundled reference model of ``task``: ``(model, meta)``."""
    from illusions.models import load_model

    return load_model(bundled_model_dir(task), device=device)


def export_run(run_dir: Path, task: str, *, recipe_file: Path, assets: Path = ASSETS) -> Path:
    """Copy a finished training run into ``assets/<task>/`` as the bundled reference model.

    Writes the model's ``config.json`` and ``model.safetensors`` (no optimizer state), the recipe,
    ``metrics.json`` (full-split and subset accuracies, timing) and ``training_log.json`` (loss curve
    and evaluations), all at once: the folder is replaced only when everything is written.

    Args:
        run_dir: a run directory written by :func:`illusions.training.train`, finished.
        task: the task name, i.e. the folder under ``assets``.
        recipe_file: the TOML recipe that trained it, copied byte for byte.
        assets: the assets root (the package's by default).

    Returns:
        The bundled model's folder.
    """
    import shutil

    from illusions.io import atomic_write_json, staged_dir
    from illusions.models import CHECKPOINT, read_checkpoint_config
    from illusions.training import load_history

    run_dir = Path(run_dir)
    _, meta = read_checkpoint_config(run_dir)
    if not meta.get("finished") or "accuracies" not in meta:
        raise IllusionsError(f"{run_dir} is not a finished training run; finish it with --resume first")
    metrics = {
        "task": task,
        "step": meta["step"],
        "accuracies": meta["accuracies"],
        "subset_accuracies": meta["subset_accuracies"],
        "eval_rows": meta["eval_rows"],
        **meta.get("timing", {}),
    }
    with staged_dir(Path(assets) / task, kind=CHECKPOINT) as stage:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(run_dir / name, stage / name)
        shutil.copyfile(recipe_file, stage / RECIPE_FILE)
        atomic_write_json(stage / METRICS_FILE, metrics)
        atomic_write_json(stage / LOG_FILE, load_history(run_dir))
    return Path(assets) / task
