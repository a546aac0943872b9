"""TOML recipes: a ``[task]`` table plus named sections, each parsed into a typed :class:`Config`.

A recipe looks like::

    description = "why these settings"      # optional, kept with the results
    [task]
    name = "dyck"                           # a registered task; the other keys are its Config's
    n_train = 200000
    [model]                                 # one table per section the caller asks for
    d_model = 128

The caller says which sections exist and which :class:`Config` class each one is
(``{"model": ModelConfig, "train": TrainConfig}`` for training; an analysis passes its own). Unknown
sections and unknown keys raise :class:`IllusionsError` naming the file; a missing section takes its
class's defaults. This module imports no heavy library: task configs are resolved through
:mod:`illusions.registry`, which imports only the task module (numpy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from illusions import registry
from illusions.config import Config, read_toml
from illusions.errors import IllusionsError

TOP_LEVEL_KEYS = ("description",)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed recipe.

    Attributes:
        source: where it came from (a path, or a description of built-in defaults).
        task_name: the registered task name from ``[task] name``.
        task: the task's typed config (an instance of the task class's ``Config``).
        sections: section name -> typed config, one per section the caller declared.
        description: the optional top-level ``description`` string.
    """

    source: str
    task_name: str
    task: Config
    sections: Mapping[str, Config]
    description: str = ""

    def __getitem__(self, name: str) -> Any:
        try:
            return self.sections[name]
        except KeyError:
            known = ", ".join(self.sections) or "none"
            raise IllusionsError(f"recipe {self.source} has no [{name}] section; sections: {known}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON data that :func:`parse_recipe` turns back into an equal recipe."""
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        out["task"] = {"name": self.task_name, **self.task.to_dict()}
        for name, cfg in self.sections.items():
            out[name] = cfg.to_dict()
        return out

    def replace(self, section: str, **changes: Any) -> Recipe:
        """A copy with some fields of one section (or ``task``) changed, validated like a file."""
        if section == "task":
            new = _from_dict(type(self.task), {**self.task.to_dict(), **changes}, f"{self.source} (overridden)")
            return dataclasses.replace(self, task=new)
        cfg = self[section]
        new = _from_dict(type(cfg), {**cfg.to_dict(), **changes}, f"{self.source} (overridden)")
        return dataclasses.replace(self, sections={**self.sections, section: new})

    def make_task(self, **kwargs: Any) -> Any:
        """An instance of the recipe's task: ``TaskClass(recipe.task, **kwargs)``."""
        return registry.get_task(self.task_name)(self.task, **kwargs)


def _from_dict(cls: type[Config], data: Any, source: str) -> Config:
    return cls.from_dict(data, source=source)


def task_config_class(name: str) -> type[Config]:
    """The ``Config`` class of the task registered as ``name``."""
    cls = registry.get_task(name)
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        raise IllusionsError(f"task {name!r} declares no Config class, so recipes cannot configure it")
    return config_cls


def parse_recipe(
    data: Mapping[str, Any], sections: Mapping[str, type[Config]], *, source: str = "recipe"
) -> Recipe:
    """Build a :class:`Recipe` from parsed TOML (or :meth:`Recipe.to_dict`) data.

    Args:
        data: the recipe's top-level table.
        sections: the sections this kind of recipe may hold, each with its config class.
        source: named in error messages (usually the file path).

    Returns:
        The recipe; sections absent from ``data`` take their class's defaults.
    """
    if not isinstance(data, Mapping):
        raise IllusionsError(f"recipe {source} must be a table of sections")
    allowed = ("task", *sections)
    unknown = sorted(k for k in data if k not in allowed and k not in TOP_LEVEL_KEYS)
    if unknown:
        raise IllusionsError(
            f"unknown section(s) or key(s) {', '.join(unknown)} in recipe {source}; "
            f"known: {', '.join((*TOP_LEVEL_KEYS, *allowed))}"
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise IllusionsError(f"description in recipe {source} must be a string")
    task_table = data.get("task")
    if not isinstance(task_table, Mapping) or not isinstance(task_table.get("name"), str):
        raise IllusionsError(f"recipe {source} needs a [task] table with a name, e.g. name = \"dyck\"")
    task_data = dict(task_table)
    task_name = task_data.pop("name")
    if task_name not in registry.TASKS:
        known = ", ".join(sorted(registry.TASKS))
        raise IllusionsError(f"unknown task {task_name!r} in recipe {source}; known tasks: {known}")
    task_cfg = _from_dict(task_config_class(task_name), task_data, f"{source} [task]")
    typed: dict[str, Config] = {}
    for name, cls in sections.items():
        table = data.get(name, {})
        typed[name] = _from_dict(cls, dict(table) if isinstance(table, Mapping) else table, f"{source} [{name}]")
    return Recipe(source=source, task_name=task_name, task=task_cfg, sections=typed, description=description)


def load_recipe(path: Path | str, sections: Mapping[str, type[Config]]) -> Recipe:
    """Read and parse a TOML recipe file (see :func:`parse_recipe`)."""
    path = Path(path)
    return parse_recipe(read_toml(path), sections, source=str(path))


def resolve_recipe(spec: str, sections: Mapping[str, type[Config]]) -> Recipe:
    """A recipe from a path (``tasks/dyck.toml``) or a task name (``dyck``: its bundled recipe).

    A name resolves to the recipe shipped with the package beside the task's bundled model, which is
    a byte-for-byte copy of the repository's ``tasks/<name>.toml``.
    """
    from illusions.bundled import bundled_recipe_path

    if spec.endswith(".toml") or "/" in spec or Path(spec).is_file():
        return load_recipe(spec, sections)
    if spec not in registry.TASKS:
        known = ", ".join(sorted(registry.TASKS))
        raise IllusionsError(f"{spec!r} is neither a recipe file nor a task name; tasks: {known}")
    return load_recipe(bundled_recipe_path(spec), sections)
