"""Shared fixtures: seeded generators and a tiny random HookedTransformer.

Only fixtures seed anything; library code takes generators or seeds as arguments.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Generated data goes to a fresh folder per test session, never the user's ~/.cache/illusions.
os.environ["ILLUSIONS_CACHE"] = tempfile.mkdtemp(prefix="illusions-test-cache-")

import numpy as np
import pytest
import torch

from illusions.models import ModelConfig, build_model
from illusions.tasks.dyck import DyckConfig, DyckTask

torch.set_num_threads(1)

TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=13)
SMALL_DYCK = DyckConfig(n_train=3000, n_eval=40, max_len=40, ood_depth_max=13, short_max_brackets=12)


def small_dyck(root: Path, mp: pytest.MonkeyPatch) -> tuple[DyckTask, ModelConfig]:
    """A small Dyck task with its splits built and cached under ``root``, and a tiny model config for it.

    For CLI tests that need a checkpoint whose saved task meta the commands can rebuild in seconds;
    ``mp`` points ``$ILLUSIONS_CACHE`` at ``root/cache`` until the caller undoes it.
    """
    mp.setenv("ILLUSIONS_CACHE", str(root / "cache"))
    task = DyckTask(SMALL_DYCK)
    task.splits()
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=SMALL_DYCK.max_len,
                      d_vocab=len(task.vocab))
    return task, cfg


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
