"""The splits load in a thread while the model loads, when torch may use two threads: the same task
and data as loading them after the model, and nothing started for a model of another task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from illusions.analyses import run as run_module
from illusions.analyses.spec import AnalysisSpec
from illusions.errors import IllusionsError


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def prefetches(monkeypatch):
    made = []
    real = run_module._prefetch_splits

    def spy(*args):
        got = real(*args)
        made.append(got)
        return got

    monkeypatch.setattr(run_module, "_prefetch_splits", spy)
    return made


def _splits_equal(a, b) -> None:
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name].tokens, b[name].tokens) and np.array_equal(a[name].lengths, b[name].lengths)
        assert np.array_equal(a[name].scored.pos, b[name].scored.pos)


def test_two_threads_load_the_splits_beside_the_model_and_get_the_same_data(tiny_dyck, threads, prefetches):
    spec = AnalysisSpec(task="dyck", model=str(tiny_dyck.root / "model"), ranks=(2,))
    threads(2)
    task, model, _, _ = run_module.load_task_and_model(spec)
    (got,) = prefetches
    assert got is not None and got[1] is task and not got[2].is_alive()
    assert task._splits is not None  # loaded by the thread, before anyone asked
    threads(1)
    plain, _, _, _ = run_module.load_task_and_model(spec)
    assert prefetches[1] is None  # one thread: nothing beside the model
    _splits_equal(task.splits(), plain.splits())
    assert task.meta() == plain.meta()


def test_a_model_of_another_task_starts_nothing_and_says_so(threads, prefetches):
    threads(2)
    with pytest.raises(IllusionsError, match="was trained on task 'dyck', not 'code'"):
        run_module.load_task_and_model(AnalysisSpec(task="code", model="dyck:seed1", ranks=(2,)))
    assert prefetches == [None]
