"""The reference models shipped inside the package, under ``illusions/assets/<task>/``.

Each task's folder holds fixed files:

    recipe.toml         the recipe that trained it (a copy of the repository's tasks/<task>.toml)
    config.json         model config + meta (task meta, recipe, final accuracies), as written by
    model.safetensors   ``illusions.models.save_model``
    metrics.json        per-split accuracies on the full splits and on the fixed evaluation subsets
    training_log.json   the loss curve and the evaluations made during training
    manifest.json       the sha256 of each of these files, checked when the model is loaded

Commands that need a model default to :func:`bundled_model_dir` of their task.

**Bundled models by name** (:func:`catalogue`): every folder ``assets/<name>/`` is the model
``<name>`` (training seed 0; the folder named after a task is that task's reference model, e.g.
``dyck``), and every ``assets/seeds/<name>-seed<N>/`` is ``<name>:seed<N>`` (``dyck:seed1``,
``dyck-paperlike:seed2``). Wherever a model is taken (``--model``, an analysis recipe's ``model``),
:func:`resolve_model` reads the value as a folder when one exists there, else, when it is a bare
word (no ``/``), as a bundled model's name; ``<name>:seed0`` is ``<name>``. So a folder keeps
priority over a name only if it exists; ``./dyck`` always means the folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
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


SEEDS_DIR = "seeds"
# Step checkpoints along one training run of a family: assets/checkpoints/<family>-seed<N>/step<k>/.
TRAINING_DIR = "checkpoints"
_SEED_FOLDER = re.compile(r"^(?P<name>.+)-seed(?P<seed>[0-9]+)$")


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """One shipped checkpoint, addressed by name.

    Attributes:
        name: ``<family>`` for seed 0, ``<family>:seed<N>`` for the others.
        family: the folder name under ``assets/`` (``dyck``, ``dyck-paperlike``).
        seed: the training seed: 0 for ``assets/<family>/``, N for ``assets/seeds/<family>-seed<N>/``.
        path: its folder (what :func:`illusions.models.load_model` reads).
    """

    name: str
    family: str
    seed: int
    path: Path

    def meta(self) -> dict[str, Any]:
        """The checkpoint's meta (task, recipe, accuracies) from its ``config.json``."""
        data = read_json(self.path / CONFIG_FILE)
        return dict(data.get("meta") or {}) if isinstance(data, dict) else {}

    def task(self) -> str:
        """The task it was trained on (``?`` when its config does not say)."""
        task = self.meta().get("task")
        return str(task.get("task", "?")) if isinstance(task, dict) else "?"

    def metrics(self) -> dict[str, Any]:
        """Its ``metrics.json`` (full-split accuracies); empty when it ships none."""
        path = self.path / METRICS_FILE
        return read_json(path) if path.is_file() else {}

    def size(self) -> tuple[int, int]:
        """``(parameters, bytes of model.safetensors)``, read from the file's header (no torch)."""
        weights = self.path / WEIGHTS_FILE
        return safetensors_parameters(weights), weights.stat().st_size


# TransformerLens buffers saved in a state dict beside the parameters (not counted as parameters).
_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")


def safetensors_parameters(path: Path) -> int:
    """The number of parameters in a saved HookedTransformer state dict (buffers such as the attention
    ``IGNORE`` scalar excluded), from the safetensors file's JSON header alone.

    Raises:
        IllusionsError: the file is not a readable safetensors file.
    """
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        total = 0
        for key, entry in header.items():
            if key != "__metadata__" and key.rsplit(".", 1)[-1] not in _BUFFERS:
                n = 1
                for dim in entry["shape"]:
                    n *= int(dim)
                total += n
        return total
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise IllusionsError(f"{path} is not a readable safetensors file") from None


def _is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def catalogue(assets: Path | None = None) -> dict[str, BundledModel]:
    """Every bundled model by name, ordered by family then seed (see the module docstring);
    ``assets`` defaults to the package's :data:`ASSETS` (read when called)."""
    assets = Path(ASSETS if assets is None else assets)
    found: list[BundledModel] = []
    if assets.is_dir():
        for folder in assets.iterdir():
            if folder.name != SEEDS_DIR and _is_checkpoint(folder):
                found.append(BundledModel(folder.name, folder.name, 0, folder))
        seeds = assets / SEEDS_DIR
        for folder in seeds.iterdir() if seeds.is_dir() else ():
            match = _SEED_FOLDER.match(folder.name)
            if match and int(match["seed"]) > 0 and _is_checkpoint(folder):
                family, seed = match["name"], int(match["seed"])
                found.append(BundledModel(f"{family}:seed{seed}", family, seed, folder))
    return {m.name: m for m in sorted(found, key=lambda m: (m.family, m.seed))}


def family_seeds(family: str, assets: Path | None = None) -> dict[int, Path]:
    """The checkpoints of one family by training seed (0 is ``assets/<family>/``)."""
    return {m.seed: m.path for m in catalogue(assets).values() if m.family == family}


def family_checkpoints(family: str, assets: Path | None = None) -> dict[int, Path]:
    """The step-checkpoint folders shipped for a family, by training seed:
    ``assets/checkpoints/<family>-seed<N>/`` (each holding ``step<k>/`` checkpoints)."""
    from illusions.models import list_checkpoints

    root = Path(ASSETS if assets is None else assets) / TRAINING_DIR
    out = {}
    for folder in root.iterdir() if root.is_dir() else ():
        match = _SEED_FOLDER.match(folder.name)
        if match and match["name"] == family and list_checkpoints(folder):
            out[int(match["seed"])] = folder
    return dict(sorted(out.items()))


def family_description(family: str, assets: Path | None = None) -> str:
    """The ``description`` of the recipe shipped with a family's seed-0 model ("" when it has none)."""
    import tomllib

    path = Path(ASSETS if assets is None else assets) / family / RECIPE_FILE
    try:
        description = tomllib.loads(path.read_text(encoding="utf-8")).get("description", "")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    return description if isinstance(description, str) else ""


def model_names(assets: Path | None = None) -> list[str]:
    return list(catalogue(assets))


def _known(assets: Path | None) -> str:
    names = model_names(assets)
    return (f"bundled models: {', '.join(names)} (see `illusions list`)" if names
            else "no model is bundled")


def is_model_name(value: str) -> bool:
    """Whether ``value`` reads as a bundled model's name rather than a path: a bare word, no ``/``."""
    return bool(value) and "/" not in value and "\\" not in value and value not in (".", "..") \
        and not value.startswith("~")


def resolve_model(value: str, assets: Path | None = None) -> tuple[Path, str | None]:
    """The folder a ``--model`` value names, and the bundled model's name when it is one.

    A folder that exists at ``value`` wins; otherwise a bare word is looked up in :func:`catalogue`
    (``<name>:seed0`` meaning ``<name>``); a path that does not exist is returned as it is, for the
    loader to refuse naming what it expected.

    Raises:
        IllusionsError: a bare word that is neither a folder nor a bundled model, in one line listing
            the known names.
    """
    path = Path(value)
    if path.exists() or not is_model_name(value):
        return path, None
    known = catalogue(assets)
    name = value.removesuffix(":seed0") if value.endswith(":seed0") else value
    if name in known:
        return known[name].path, name
    raise IllusionsError(f"model {value!r} is neither a folder nor a bundled model; {_known(assets)}")



def bundled_tasks() -> list[str]:
    """Names of the tasks that ship a trained reference model (a folder named after its own task)."""
    return sorted(m.name for m in catalogue().values() if m.seed == 0 and m.task() == m.name)


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
    from illusions.training_setup import load_history

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


def export_checkpoints(run_dir: Path, family: str, seed: int, *, assets: Path = ASSETS) -> Path:
    """Copy a training run's step checkpoints (``train --save-every``) into
    ``assets/checkpoints/<family>-seed<seed>/step<k>/`` (weights and config, each step folder written
    whole with its manifest), for the ``over_training`` analyses of ``illusions reproduce``.

    Returns:
        The folder holding the ``step<k>/`` checkpoints.

    Raises:
        IllusionsError: the run holds no step checkpoints.
    """
    import shutil

    from illusions.io import staged_dir
    from illusions.models import CHECKPOINT, list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        raise IllusionsError(f"{run_dir} holds no step checkpoints (train with --save-every N)")
    target = Path(assets) / TRAINING_DIR / f"{family}-seed{seed}"
    for step, folder in found:
        with staged_dir(target / f"step{step}", kind=CHECKPOINT) as stage:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(folder / name, stage / name)
    return target
