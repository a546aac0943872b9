"""Frozen configuration dataclasses with JSON-primitive fields.

Every config in the package subclasses :class:`Config`: ``to_dict`` gives plain JSON data and
``from_dict`` rebuilds the object, rejecting unknown keys with an error that names them (and the file
they came from, when given), so a typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Self

from illusions.errors import IllusionsError


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: a frozen dataclass whose fields are JSON primitives (or tuples of them)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> Self:
        """Build from a mapping; unknown keys and wrong types raise :class:`IllusionsError`."""
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise IllusionsError(f"expected a table of {cls.__name__} settings{where}, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise IllusionsError(
                f"unknown {cls.__name__} key(s) {', '.join(unknown)}{where}; "
                f"known keys: {', '.join(fields)}"
            )
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            default = fields[name].default
            if value is None and "None" in str(fields[name].type):
                kwargs[name] = None  # an optional field (e.g. ``max_seqs = None``: no limit)
                continue
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise IllusionsError(f"{cls.__name__}.{name}{where} must be true or false, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise IllusionsError(f"{cls.__name__}.{name}{where} must be an integer, got {value!r}")
            if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise IllusionsError(f"{cls.__name__}.{name}{where} must be a number, got {value!r}")
            if isinstance(default, float):
                value = float(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise IllusionsError(f"invalid {cls.__name__}{where}: {exc}") from None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into one clear error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IllusionsError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IllusionsError(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise IllusionsError(f"{path} is not JSON illusions reads (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise IllusionsError(f"{path} is not JSON illusions reads ({str(exc)[:120]})") from None
    except IsADirectoryError:
        raise IllusionsError(f"{path} is a directory, not a JSON file") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML recipe, turning a missing or malformed file into one clear error naming it."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise IllusionsError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise IllusionsError(f"recipe {path} is not valid TOML ({exc})") from None
