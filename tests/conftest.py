"""Shared fixtures: seeded generators, a tiny random HookedTransformer, and (once per session) a small
Dyck task with an untrained tiny model saved for it (``tiny_dyck``).

Only fixtures seed anything; library code takes generators or seeds as arguments.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Generated data goes to a fresh folder per test session, never the user's ~/.cache/illusions.
os.environ["ILLUSIONS_CACHE"] = tempfile.mkdtemp(prefix="illusions-test-cache-")

import numpy as np
import pytest
import torch

from illusions.models import ModelConfig, build_model, save_model
from illusions.tasks.dyck import DyckConfig, DyckTask

torch.set_num_threads(1)
SESSION_CACHE = Path(os.environ["ILLUSIONS_CACHE"])

TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=13)
SMALL_DYCK = DyckConfig(n_train=3000, n_eval=40, max_len=40, ood_depth_max=13, short_max_brackets=12)


def small_dyck(root: Path, mp: pytest.MonkeyPatch) -> tuple[DyckTask, ModelConfig]:
    """A small Dyck task with its splits built and cached under ``root``, and a tiny model config for it.

    For tests that need a cache of their own (they damage it); ``mp`` points ``$ILLUSIONS_CACHE`` at
    ``root/cache`` until the caller undoes it. Other tests share the session's :func:`tiny_dyck`.
    """
    mp.setenv("ILLUSIONS_CACHE", str(root / "cache"))
    task = DyckTask(SMALL_DYCK)
    task.splits()
    return task, _small_dyck_model(task)


def _small_dyck_model(task: DyckTask) -> ModelConfig:
    return ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=SMALL_DYCK.max_len,
                       d_vocab=len(task.vocab))


@dataclasses.dataclass(frozen=True)
class TinyDyck:
    """The small Dyck task with its splits in the session's cache, and an untrained tiny model for it.

    Built once per test session (:func:`tiny_dyck`). CLI commands given ``--model {root}/model`` rebuild
    the task from the saved meta and find its splits in ``$ILLUSIONS_CACHE`` (the session's folder,
    inherited by subprocesses), so nothing is generated twice. Read-only: tests write under their
    own ``tmp_path`` (a test that needs other models saves them there, from ``task`` and ``config``).
    """

    task: DyckTask
    config: ModelConfig  # the tiny model's config (2 layers, d_model 32, 2 heads)
    model: object  # build_model(config, seed=0); tests must not change it
    root: Path  # holds model/: ``model`` saved with the task's meta


@pytest.fixture(scope="session")
def tiny_dyck(tmp_path_factory) -> TinyDyck:
    root = tmp_path_factory.mktemp("tiny-dyck")
    task = DyckTask(SMALL_DYCK, cache_dir=SESSION_CACHE / "dyck")  # where cache_root() / "dyck" points
    task.splits()
    config = _small_dyck_model(task)
    model = build_model(config, seed=0)
    save_model(model, root / "model", meta={"task": task.meta()})
    return TinyDyck(task, config, model, root)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under TransformerLens 4 the tests marked ``tl3`` skip, saying why."""
    from illusions.backends import uses_bridge

    if uses_bridge():
        skip = pytest.mark.skip(reason="needs TransformerLens 3.9 (HookedTransformer); this is TransformerLens 4")
        for item in items:
            if "tl3" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def torch_gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_model():
    return build_model(TINY, seed=0)


@pytest.fixture
def tiny_tokens(torch_gen) -> torch.Tensor:
    """``[batch=6, pos=16]`` random tokens from the tiny vocabulary."""
    return torch.randint(0, TINY.d_vocab, (6, 16), generator=torch_gen)


# Small settings for reproduction recipes in tests (appended to a recipe's [analysis] table).
TINY_RECIPE_SETTINGS = 'fit_n = 40\nn_boot = 20\nmax_seqs = 20\nsplits = ["iid", "unseen_depth", "seen_struct"]\n'


def tiny_reproduction(root: Path, tiny_dyck) -> tuple[Path, Path]:
    """``root/assets`` with a tiny 'bundled' Dyck model (seed 0) and a second training seed, and an
    empty ``root/recipes`` folder: the setting of the reproduction's tests."""
    task, cfg = tiny_dyck.task, tiny_dyck.config
    assets = root / "assets"
    save_model(build_model(cfg, seed=0), assets / "dyck", meta={"task": task.meta()})
    save_model(build_model(cfg, seed=1), assets / "seeds" / "dyck-seed1", meta={"task": task.meta()})
    recipes = root / "recipes"
    recipes.mkdir()
    return assets, recipes
