"""Which torch device a command runs on, and the float32 matmul precision it runs with.

Every command and the Python API take a device name: ``cpu``, ``cuda`` (the current CUDA device),
``cuda:N``, ``mps`` or ``auto`` (the current CUDA device when torch sees one, else the CPU).
:func:`resolve_device` turns the name into a ``torch.device`` or raises one clear
:class:`~illusions.errors.IllusionsError` when that device is not there.

The device is where the work happens, not what is computed: it is not a field of
:class:`~illusions.analyses.run.AnalysisSpec` (a run reused across machines stays the same run), and a
run directory records it beside the spec, in ``config.json``'s ``runtime``. On the CPU the numbers are
exactly those of a CPU-only build; on a GPU they agree to float rounding (another summation order),
which can flip a prediction whose two best logits are within that rounding of each other.

TF32: on Ampere and later GPUs, float32 matrix products may run in TF32 (a 10-bit mantissa), several
times faster and about 1e-3 relative error. It is off unless asked for (``allow_tf32=True``,
``--allow-tf32``), so GPU numbers stay comparable with CPU ones; :func:`matmul_precision` sets it for
the duration of a run and restores the previous setting afterwards.

CPU threads: :func:`set_cpu_threads` gives every thread pool of the process one count (torch's and
the OpenMP pools of libraries loaded later, such as scikit-learn's k-means), except numpy's BLAS, which
runs single-threaded: the package's numpy products are small (bootstrap replicate weights times
per-sequence sums), where BLAS threads cost more than they save. :func:`other_cores` measures how many
of this process's cores other processes kept busy since a :func:`cpu_use` reading (Linux), which the
command line's default thread count subtracts.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"
_NAME = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")


# numpy's BLAS threads: the bootstrap's products (replicates x sequences times sequences x a few
# columns) are too small for threads to pay. The main job with --threads 1 left numpy's OpenBLAS at one
# thread per core: the summary took 1.07 s wall and 1.89 CPU s; at one BLAS thread 0.77 s and 0.77 CPU s.
NUMPY_BLAS_THREADS = 1


def set_cpu_threads(threads: int) -> None:
    """Give this process's CPU thread pools ``threads`` threads: torch's intra-op pool, and through
    ``OMP_NUM_THREADS`` the OpenMP pools of libraries loaded from now on (scikit-learn's k-means;
    worker processes inherit it); numpy's BLAS gets :data:`NUMPY_BLAS_THREADS`.

    Left alone, numpy's OpenBLAS and scikit-learn's OpenMP start a thread per core whatever torch was
    given, which on a shared machine puts threads on cores other processes hold.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch
    from threadpoolctl import ThreadpoolController

    torch.set_num_threads(threads)
    # numpy's own BLAS only (its wheel's library, or one inside its folder): torch's BLAS, and a BLAS
    # another package shares with numpy (conda's MKL), keep what torch set.
    where = os.path.dirname(np.__file__)
    pools = ThreadpoolController()
    numpy_blas = [lib["filepath"] for lib in pools.select(user_api="blas").info()
                  if lib["filepath"].startswith((where + os.sep, where + ".libs" + os.sep))]
    if numpy_blas:
        pools.select(filepath=numpy_blas).limit(limits=NUMPY_BLAS_THREADS)


class CpuUse(NamedTuple):
    """One reading of CPU time: :func:`cpu_use`."""

    wall: float  # time.monotonic()
    busy: float | None  # seconds the cores this process may run on were busy since boot (None: unknown)
    own: float  # this process's CPU seconds, every thread, user and system


# /proc/stat's per-core fields: user nice system idle iowait irq softirq steal (guest time is inside user).
_PROC_STAT = Path("/proc/stat")
_IDLE_FIELDS = (3, 4)
# Shorter readings are too coarse (the kernel counts in ticks of 10 ms) to say how busy the cores are.
MIN_WINDOW = 0.2


def cpu_use() -> CpuUse:
    """The busy seconds of the cores this process may run on (Linux ``/proc/stat``) and its own CPU
    seconds, now; ``busy`` is None where that file or the affinity is not there."""
    return CpuUse(time.monotonic(), _busy_seconds(), time.process_time())


def _busy_seconds() -> float | None:
    try:
        cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        lines = _PROC_STAT.read_text().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0
    seen = 0
    for line in lines:
        name, *fields = line.split()
        if name in cores and len(fields) >= 8:
            ticks = [int(f) for f in fields[:8]]
            busy += sum(ticks) - sum(ticks[i] for i in _IDLE_FIELDS)
            seen += 1
    return busy / tick if seen == len(cores) and tick > 0 else None


def other_cores(since: CpuUse, now: CpuUse | None = None) -> float | None:
    """How many of this process's cores other processes kept busy, on average, from ``since`` to
    ``now`` (default: now): the cores' busy time less this process's own, over the wall time between.
    None when it cannot be told: no ``/proc/stat`` (not Linux), or under :data:`MIN_WINDOW` apart.

    Unlike the load average (a one-minute moving average of runnable processes), it sees a process
    that started a second ago and forgets one that ended a second ago.
    """
    now = cpu_use() if now is None else now
    window = now.wall - since.wall
    if since.busy is None or now.busy is None or window < MIN_WINDOW:
        return None
    return max(0.0, (now.busy - since.busy - (now.own - since.own)) / window)


def free_cores(since: CpuUse | None, cap: int) -> int:
    """Threads that fit the free cores: the cores this process may run on (``os.sched_getaffinity``)
    less those other processes kept busy since ``since`` (:func:`other_cores`), rounded, at least 1 and
    at most ``cap``. Without that reading (``since`` None, not Linux, too short a window), the 1-minute
    load average stands in for the busy cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = other_cores(since) if since is not None else None
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cap, cores, int(cores - busy + 0.5)))


def check_device_name(name: str) -> str:
    """The normalised device name, checked for spelling only (not whether this machine has it).

    For work that runs elsewhere (a Slurm job), whose machine is the one that must have the device.
    """
    text = str(name).strip().lower()
    if not _NAME.match(text):
        raise IllusionsError(f"unknown device {name!r}; expected {DEVICE_CHOICES}")
    return text


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``name``, or an :class:`IllusionsError` saying why it is not there.

    ``cuda`` resolves to the current CUDA device's index (``cuda:0``), so what a run records names one
    device; ``auto`` picks that device when torch sees a GPU and the CPU otherwise (never MPS, whose
    lack of float64 makes it a choice to make on purpose).
    """
    import torch

    text = check_device_name(str(name))
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise IllusionsError("device mps is not available: torch sees no Apple GPU (MPS) on this machine")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise IllusionsError(f"device {text} is not available: {build} (torch {torch.__version__})")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if text == "cuda" else int(text.split(":")[1])
    if index >= count:
        raise IllusionsError(f"device {text} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """``cpu``, ``mps`` or ``cuda:0 (NVIDIA H200)``: for logs and the runtime record."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


@contextmanager
def matmul_precision(device: torch.device, allow_tf32: bool = False) -> Iterator[None]:
    """Run the block with TF32 matmuls on CUDA allowed or not (off by default), then restore.

    Only CUDA reads the setting; on the CPU and MPS the block runs unchanged.
    """
    import torch

    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work (PCA scatter matrices, weight SVDs, KL and JSD) runs for tensors on
    ``device``: that device, except MPS, which has no float64, where it is the CPU."""
    import torch

    return torch.device("cpu") if device.type == "mps" else device


def memory_bytes(device: str | torch.device = "cpu") -> int | None:
    """The most memory tensors on ``device`` can ever use: a CUDA device's total memory, else this
    machine's physical memory (lowered to the cgroup's ``memory.max`` when a container sets one).

    A bound for refusing sizes that cannot fit (a model, a dictionary, collected activations) before
    allocating them; it is the total, not what is free now, so the same input is refused or accepted
    the same way whatever else runs. None when the platform does not say.
    """
    import torch

    where = torch.device(device)
    if where.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(where).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    return min(total, int(limit)) if limit.isdigit() else total


def gigabytes(n_bytes: float) -> str:
    """``n_bytes`` for a message: ``12.3 GB`` (decimal units), ``1.2e+03 GB`` beyond 100,000 GB."""
    value = n_bytes / 1e9
    return f"{value:,.1f} GB" if value < 1e5 else f"{value:.1e} GB"
