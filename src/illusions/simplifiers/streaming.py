"""What fits that stream their activations share: a seeded uniform sample of the rows given batch by
batch (:class:`Reservoir`) and the byte budget it may hold (:data:`SAMPLE_BYTES`).

The engine streams a fit only when its collected activations would be too large to hold
(:data:`illusions.analyses.faithfulness.STREAM_FIT_BYTES`); each streaming simplifier then gets the
activations batch by batch (``add``) and fits at the end (``fit_sweep``). ``svd`` and ``resid-svd``
need no sample (:class:`illusions.simplifiers.svd.ScatterStats`); ``kmeans`` and ``resid-kmeans``
measure their clusters' spread and inertia on one, and ``sae`` and ``transcoder`` train on one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    from illusions.simplifiers.base import Proxy

# Bytes a stream's sample may hold (all its hook points together): 256 MiB is 87,381 positions of a
# 768-wide residual stream, about SAELens' default buffer (20 batches of 32 prompts of 128 tokens).
SAMPLE_BYTES = 2**28


class Reservoir:
    """A uniform random sample, without replacement, of at most ``capacity`` rows of everything
    given to :meth:`add` (Vitter's algorithm R), seeded by ``seed``.

    Each :meth:`add` takes aligned tensors ``{name: [n, ...]}`` (row i of every tensor is one position),
    so the sample keeps the rows of every name at the same positions (a transcoder's input beside its
    target). ``capacity`` is ``min(max_rows, budget_bytes // bytes of one row of all names)``, at least 1,
    fixed by the first batch. The first ``capacity`` rows are kept; the row with 0-based index ``t``
    after them replaces slot ``j`` when ``j = floor(u (t + 1)) < capacity``, ``u`` uniform in [0, 1) drawn
    in row order from a CPU generator seeded by ``seed``. So every row is in the sample with the same
    probability ``capacity / seen``, and the same batches in the same order give the same sample on any
    device. Memory: the sample (at most ``budget_bytes``) on the batches' device.
    """

    def __init__(self, budget_bytes: int, seed: int, *, max_rows: int | None = None) -> None:
        self.budget_bytes = int(budget_bytes)
        self.max_rows = max_rows
        self.capacity = 0
        self.seen = 0
        self.gen = torch.Generator().manual_seed(int(seed))
        self.parts: dict[str, list[Tensor]] = {}  # while filling: the batches' leading rows
        self.rows: dict[str, Tensor] | None = None  # once full: [capacity, ...] per name

    def add(self, batch: dict[str, Tensor]) -> None:
        if not batch:
            return
        n = int(next(iter(batch.values())).shape[0])
        if n == 0:
            return
        if not self.capacity:
            per_row = sum(t[0].numel() * t.element_size() for t in batch.values())
            self.capacity = max(1, self.budget_bytes // max(1, per_row))
            if self.max_rows is not None:
                self.capacity = max(1, min(self.capacity, int(self.max_rows)))
            self.parts = {name: [] for name in batch}
        take = min(n, self.capacity - min(self.seen, self.capacity))
        if take:
            for name, t in batch.items():
                self.parts[name].append(t[:take].clone())
            if self.seen + take == self.capacity:
                self.rows = {name: torch.cat(parts) for name, parts in self.parts.items()}
                self.parts = {}
        rest = n - take
        if rest:
            assert self.rows is not None
            index = torch.arange(self.seen + take, self.seen + n, dtype=torch.float64)  # 0-based t
            slot = (torch.rand(rest, generator=self.gen, dtype=torch.float64) * (index + 1)).floor().long()
            keep = slot < self.capacity
            slots, src = slot[keep], torch.arange(take, n)[keep]
            if slots.numel():
                # Later rows overwrite earlier ones in the same slot: keep each slot's last writer.
                rev_slots, rev_src = slots.flip(0), src.flip(0)
                unique, inverse = torch.unique(rev_slots, return_inverse=True)
                first = torch.full((unique.numel(),), rev_slots.numel(), dtype=torch.long)
                first.scatter_reduce_(0, inverse, torch.arange(rev_slots.numel()), reduce="amin")
                for name, t in batch.items():
                    self.rows[name][unique.to(t.device)] = t[rev_src[first].to(t.device)]
        self.seen += n

    def sample(self) -> dict[str, Tensor]:
        """The sampled rows, ``{name: [min(seen, capacity), ...]}`` (slot order)."""
        if self.rows is not None:
            return dict(self.rows)
        return {name: torch.cat(parts) for name, parts in self.parts.items()}

    @property
    def size(self) -> int:
        return min(self.seen, self.capacity)


def fit_own_value(config: Any, values: list[int], sample: Reservoir, fit: Callable[[dict[str, Tensor]], Proxy],
                  **streamed: Any) -> dict[int, Proxy]:
    """``fit_sweep`` of a stream that fits at the end on its ``sample`` (``kmeans``, ``resid-kmeans``,
    ``sae``, ``transcoder``): one proxy, at ``config``'s own value of its sweep parameter (the stream
    was made for that one config; any other ``values`` is an error). ``fit`` makes the proxy from the
    sampled rows; ``info["streamed"]`` adds the positions seen and the sample's size, then ``streamed``."""
    value = getattr(config, config.sweep_param)
    if list(values) != [value]:
        raise IllusionsError(f"a {config.name} stream fits {config.sweep_param}={value}, not {values}")
    proxy = fit(sample.sample())
    info = {**proxy.info, "streamed": {"positions": sample.seen, "sample": sample.size, **streamed}}
    return {value: dataclasses.replace(proxy, info=info)}
