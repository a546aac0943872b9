"""Which training rows a run draws, in which order: length-grouped batches that resume exactly, the
rows ``wall_keep`` leaves in, and the fixed evaluation subsets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    from illusions.training_setup import TrainConfig

# The evaluation subset depends only on the split's size, never on the training seed, so runs with
# different seeds (and the bundled model's test) are scored on the same rows.
EVAL_SUBSET_SEED = 20240101
# Second seed word of the generator that picks the wall-reaching strings training keeps (wall_keep).
WALL_KEEP_STREAM = 0x57A11


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, bucket_width: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of batches in which rows of similar length travel together.

    Rows are shuffled, stably sorted by length bucket (``length // bucket_width``), cut into batches
    of ``batch_size`` consecutive rows, and the batches are shuffled; every row appears exactly once.

    Args:
        lengths: ``[n]`` true length of every training row.
        batch_size: rows per batch (the last batch of the epoch may be smaller).
        bucket_width: width of the length bins.
        rng: the generator that decides the order (consumed: two permutations).

    Returns:
        The batches, each an array of row indices.
    """
    perm = rng.permutation(lengths.shape[0])
    perm = perm[np.argsort(lengths[perm] // bucket_width, kind="stable")]
    batches = [perm[i : i + batch_size] for i in range(0, perm.shape[0], batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """Endless length-grouped batches whose position can be saved and restored exactly.

    The state is the generator state at the start of the current epoch plus the batch index within
    it, so resuming regenerates the same epoch and skips to the same batch.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, bucket_width: int, seed: int) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.bucket_width = bucket_width
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.index = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_state = self.rng.bit_generator.state
        self.batches = length_grouped_batches(self.lengths, self.batch_size, self.bucket_width, self.rng)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.index == len(self.batches):
            self.epoch += 1
            self.index = 0
            self._start_epoch()
        batch = self.batches[self.index]
        self.index += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "rng_state": self.epoch_state}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state["rng_state"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._start_epoch()


def training_rows(task: Any, split: Any, cfg: TrainConfig) -> np.ndarray:
    """The rows of the train split that training draws its batches from: all of them, or with
    ``cfg.wall_keep < 1`` only that share of the strings reaching the split's deepest nesting (chosen
    with a generator of its own, seeded by ``cfg.seed``), beside every other string."""
    from illusions.tasks.base import DataSupport

    n = len(split)
    if cfg.wall_keep == 1.0:
        return np.arange(n)
    refusal = f"wall_keep needs a task that reports nesting depths; task {task.name!r} does not"
    if not isinstance(task, DataSupport):
        raise IllusionsError(refusal)
    deepest = np.empty(n, dtype=np.int64)
    for start in range(0, n, 8192):
        depths = task.depths(split.tokens[start : start + 8192])  # [rows, pos]
        if depths is None:
            raise IllusionsError(refusal)
        deepest[start : start + 8192] = np.asarray(depths).max(axis=-1)
    wall = deepest.max()
    rng = np.random.default_rng([cfg.seed, WALL_KEEP_STREAM])
    keep = (deepest < wall) | (rng.random(n) < cfg.wall_keep)
    return np.flatnonzero(keep)


def eval_subset_rows(n_rows: int, k: int) -> np.ndarray:
    """The fixed evaluation subset of a split with ``n_rows`` rows: ``min(k, n_rows)`` sorted rows."""
    if k >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(EVAL_SUBSET_SEED).choice(n_rows, size=k, replace=False))
