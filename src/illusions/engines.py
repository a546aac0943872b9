"""Where independent runs execute: here, in local worker processes, or as Slurm jobs.

An engine takes work with :meth:`submit` (a key, a picklable top-level function and its arguments)
and :meth:`wait` runs or awaits all of it, reporting :class:`Event` s as it goes, and returns an
:class:`Outcome`: what each function returned, and which keys are missing and why.

:class:`LocalEngine` is what ``reproduce --jobs N`` always did: the work in this process one after the
other, or in ``workers`` spawned processes of ``threads`` torch threads each; a failure raises, as it
would in a plain loop.

:class:`SlurmEngine` submits each piece of work as its own Slurm job through ``submitit`` (the optional
extra ``illusions[slurm]``). A job runs the same function on a cluster node, so what it writes (a
run directory, written atomically) is byte for byte what the local engine writes for the same
inputs. :meth:`SlurmEngine.wait` polls the queue; a job that fails, is cancelled, times out, runs
out of memory or loses its node is submitted again, at most ``retries`` times, and then reported
missing. A preempted job is requeued by submitit itself (Slurm keeps its id) and simply waited for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import io
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from illusions.devices import set_cpu_threads
from illusions.errors import IllusionsError


@dataclasses.dataclass(frozen=True)
class Event:
    """Progress of one piece of work.

    ``kind`` is ``start`` (runs now, in this process), ``submitted`` (queued as a Slurm job),
    ``done`` (finished), ``retry`` (failed and submitted again) or ``failed`` (given up on);
    ``finished`` counts the pieces done or given up on so far, this one included; ``detail`` says
    why for ``retry`` and ``failed``, and names the Slurm job otherwise.
    """

    key: str
    kind: str
    finished: int
    total: int
    detail: str = ""


@dataclasses.dataclass
class Outcome:
    """What :meth:`wait` returns: each finished key's return value, and each missing key's reason."""

    results: dict[str, Any]
    missing: dict[str, str]


class JobsFailed(Exception):
    """Some work is still missing after every retry: ``missing`` maps each key to the last reason.

    Not an :class:`IllusionsError`: the input was fine, the cluster failed it (the CLI exits 1).
    """

    def __init__(self, missing: Mapping[str, str], retries: int) -> None:
        self.missing = dict(missing)
        self.retries = retries
        tries = f"after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else "(no retries)"
        super().__init__(f"{len(self.missing)} run(s) missing {tries}: "
                         + "; ".join(f"{k} ({why})" for k, why in self.missing.items()))


Progress = Callable[[Event], None]


class LocalEngine:
    """This process (``workers <= 1``) or ``workers`` spawned processes of ``threads`` torch threads.

    Work runs in submission order in this process; in worker processes it finishes in any order. Any
    exception a piece raises propagates out of :meth:`wait`, as from a plain loop.
    """

    name = "local"

    def __init__(self, *, workers: int = 1, threads: int = 1) -> None:
        if workers < 1:
            raise IllusionsError(f"workers must be at least 1, got {workers}")
        if threads < 1:
            raise IllusionsError(f"threads must be at least 1, got {threads}")
        self.workers = workers
        self.threads = threads
        self._work: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workers": self.workers, "threads": self.threads}

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._work.append((key, fn, args))

    def wait(self, progress: Progress | None = None) -> Outcome:
        """Run every piece of work; one that raises is reported ``failed`` and left ``missing`` (with
        its one-line reason) while the others go on, as on Slurm. Ctrl-C still stops everything."""
        work, self._work = self._work, []
        results: dict[str, Any] = {}
        missing: dict[str, str] = {}
        emit = progress or (lambda event: None)

        def finish(key: str, get: Callable[[], Any], i: int) -> None:
            try:
                results[key] = get()
            except Exception as exc:  # noqa: BLE001 - reported as missing, the rest of the work goes on
                missing[key] = error_line(exc)
                emit(Event(key, "failed", i, len(work), missing[key]))
                return
            emit(Event(key, "done", i, len(work)))

        if self.workers <= 1 or len(work) <= 1:
            for i, (key, fn, args) in enumerate(work):
                emit(Event(key, "start", i, len(work)))
                finish(key, lambda fn=fn, args=args: fn(*args), i + 1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=set_cpu_threads,
                                     initargs=(self.threads,)) as pool:
                futures = {pool.submit(fn, *args): key for key, fn, args in work}
                for i, future in enumerate(as_completed(futures)):
                    finish(futures[future], future.result, i + 1)
        return Outcome({key: results[key] for key, _, _ in work if key in results},
                       {key: missing[key] for key, _, _ in work if key in missing})

    def cancel(self) -> None:
        """Nothing outlives :meth:`wait` here (the pool shuts down with it)."""


def error_line(exc: BaseException) -> str:
    """``Type: last line of the message``: why a piece of work failed, in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def run_in_job(threads: int, fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """What a Slurm job runs: ``fn(*args)`` with ``threads`` CPU threads (:func:`~illusions.devices.set_cpu_threads`).

    Returns ``("ok", value)``, or ``("error", "Type: message")`` for an exception raised by ``fn``, so
    that the reason a run failed reaches the submitting side as one line.
    """
    set_cpu_threads(threads)
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported, and the work retried, by the submitting side
        return "error", error_line(exc)


def _failure_line(exc: BaseException) -> str:
    """The line that says why from a submitit error: the last line of the job's traceback, if any."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    rules = [i for i, ln in enumerate(lines) if set(ln) == {"-"}]
    if len(rules) >= 2 and rules[1] > rules[0] + 1:
        return lines[rules[1] - 1]
    return lines[0] if lines else type(exc).__name__


# Slurm job states (squeue %T / sacct State) after which a job without a result has failed.
FAILED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                           "PREEMPTED", "REVOKED", "TIMEOUT"})
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_OPTION_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# sbatch options the engine sets itself: given through their own parameters, or not at all.
_OWN_OPTIONS = {"partition": "partition", "time": "time", "cpus-per-task": "cpus_per_task",
                "gpus-per-task": "gpus_per_task"}
_SUBMITIT_OPTIONS = ("output", "error", "open-mode", "signal", "array", "job-name", "wckey")


def slurm_minutes(text: str) -> int:
    """Minutes of a Slurm time limit: ``MINUTES``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise IllusionsError(f"slurm time {text!r} is not a Slurm time limit (MINUTES, HH:MM:SS or D-HH:MM)")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:
        total = parts[0] + (1 if parts[1] else 0)  # MM:SS
    else:
        total = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    if total < 1:
        raise IllusionsError(f"slurm time {text!r} must be at least one minute")
    return total


def parse_slurm_options(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["mem=8G", "account=lab"]`` -> ``{"mem": "8G", "account": "lab"}`` (sbatch long options).

    Options the engine sets itself are refused with the parameter to use instead, and those submitit
    needs for its own bookkeeping (output, error, signal, ...) are refused outright.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not _OPTION_KEY.match(key) or not value.strip():
            raise IllusionsError(f"slurm option {item!r} is not KEY=VALUE (e.g. mem=8G, account=mylab)")
        flag = key.replace("_", "-")
        if flag in _OWN_OPTIONS:
            raise IllusionsError(f"slurm option {flag} has its own parameter ({_OWN_OPTIONS[flag]})")
        if flag in _SUBMITIT_OPTIONS:
            raise IllusionsError(f"slurm option {flag} is set by the engine and cannot be changed")
        if flag in out:
            raise IllusionsError(f"slurm option {flag} is given twice")
        out[flag] = value.strip()
    return out


@dataclasses.dataclass
class _Attempt:
    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    tries: int = 0  # submissions so far
    job: Any = None  # submitit SlurmJob of the latest submission
    ended_at: float | None = None  # when the queue first showed the job ended without a result
    last_error: str = ""


class SlurmEngine:
    """Each piece of work as its own Slurm job (via submitit); :meth:`wait` polls, retries, reports.

    Args:
        folder: where submitit keeps each job's pickled function, result and logs (``<folder>/<job
            id>/``); it must be on a file system the nodes share.
        partition: the partition (None: the cluster's default).
        time: each job's time limit, as Slurm writes it (``60``, ``2:00:00``, ``1-00:00``).
        cpus_per_task: CPUs per job (None: ``threads``).
        gpus_per_task: GPUs per job (None or 0: none asked for).
        options: further sbatch options, ``{"mem": "8G", "account": "lab"}``.
        retries: how many times a failed job is submitted again before its work is reported missing.
        threads: torch threads in each job.
        poll_s: seconds between looks at the queue.
        settle_s: how long a job the queue shows ended (or no longer shows) without a result file is
            given for the file to appear (shared file systems lag) before it counts as failed; long
            enough also for a preempted job that submitit requeues to show as pending again.
        job_name: the Slurm job name (``squeue`` shows it).
    """

    name = "slurm"

    def __init__(self, folder: Path | str, *, partition: str | None = None, time: str | None = "60",
                 cpus_per_task: int | None = None, gpus_per_task: int | None = None,
                 options: Mapping[str, str] | None = None, retries: int = 1, threads: int = 1,
                 poll_s: float = 2.0, settle_s: float = 15.0, job_name: str = "illusions") -> None:
        try:
            import submitit
        except ImportError:
            raise IllusionsError("the slurm engine needs submitit: pip install 'illusions[slurm]'") from None
        if any(shutil.which(tool) is None for tool in ("sbatch", "squeue", "srun")):
            raise IllusionsError("the slurm engine needs Slurm's sbatch, squeue and srun on PATH; not found here")
        if retries < 0:
            raise IllusionsError(f"retries must be 0 or more, got {retries}")
        if threads < 1:
            raise IllusionsError(f"threads must be at least 1, got {threads}")
        if cpus_per_task is not None and cpus_per_task < 1:
            raise IllusionsError(f"cpus_per_task must be at least 1, got {cpus_per_task}")
        if gpus_per_task is not None and gpus_per_task < 0:
            raise IllusionsError(f"gpus_per_task must be 0 or more, got {gpus_per_task}")
        extra = parse_slurm_options([f"{k}={v}" for k, v in (options or {}).items()])
        self.folder = Path(folder).absolute()
        # The outermost folder this engine creates, removed again if the very first submission is
        # refused (bad input leaves nothing behind).
        self._creates = next((p for p in reversed([self.folder, *self.folder.parents]) if not p.exists()), None)
        self.retries = retries
        self.threads = threads
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.params: dict[str, Any] = {
            "job_name": job_name,
            "time": slurm_minutes(time) if time is not None else 60,
            "cpus_per_task": cpus_per_task or threads,
        }
        if partition:
            self.params["partition"] = partition
        if gpus_per_task:
            self.params["gpus_per_task"] = gpus_per_task
        if extra:
            self.params["additional_parameters"] = extra
        self._executor = submitit.SlurmExecutor(folder=self.folder / "%j")
        self._executor.update_parameters(**self.params)
        self._todo: list[_Attempt] = []
        self._active: dict[str, _Attempt] = {}

    def describe(self) -> dict[str, Any]:
        out = {"engine": self.name, "threads": self.threads, "cpus_per_task": self.params["cpus_per_task"],
               "time_min": self.params["time"], "retries": self.retries}
        for key in ("partition", "gpus_per_task"):
            if key in self.params:
                out[key] = self.params[key]
        return out

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` as a job; the first submission that sbatch refuses is an error here."""
        attempt = _Attempt(key, fn, args)
        first = not self._active and not self._todo
        try:
            self._sbatch(attempt)
        except IllusionsError:
            if first:
                if self._creates is not None:
                    shutil.rmtree(self._creates, ignore_errors=True)
                raise
            self._todo.append(attempt)  # submitted again (and counted as a try) by wait()
            return
        self._active[key] = attempt

    def _sbatch(self, attempt: _Attempt) -> None:
        from submitit.core.utils import FailedJobError

        attempt.tries += 1
        attempt.ended_at = None
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):  # submitit echoes sbatch's stderr there
                attempt.job = self._executor.submit(run_in_job, self.threads, attempt.fn, *attempt.args)
        except (FailedJobError, OSError, subprocess.SubprocessError) as exc:
            lines = [ln for ln in (str(exc) or captured.getvalue()).strip().splitlines() if ln.strip()]
            attempt.last_error = f"sbatch failed: {lines[-1].strip() if lines else type(exc).__name__}"
            raise IllusionsError(f"{attempt.last_error} (slurm parameters: {self._shown_params()})") from None

    def _shown_params(self) -> str:
        shown = {k: v for k, v in self.params.items() if k != "additional_parameters"}
        shown.update(self.params.get("additional_parameters", {}))
        return ", ".join(f"{k}={v}" for k, v in shown.items())

    def wait(self, progress: Progress | None = None) -> Outcome:
        """Poll until every job has a result or has failed ``retries + 1`` times.

        On any exception (Ctrl-C included) the jobs still queued or running are cancelled first, so
        that none goes on writing after the command has returned.
        """
        emit = progress or (lambda event: None)
        total = len(self._active) + len(self._todo)
        results: dict[str, Any] = {}
        missing: dict[str, str] = {}
        for attempt in self._active.values():
            emit(Event(attempt.key, "submitted", 0, total, f"job {attempt.job.job_id}"))
        try:
            while self._active or self._todo:
                for attempt in list(self._todo):
                    self._todo.remove(attempt)
                    self._resubmit(attempt, results, missing, total, emit)
                states = self._queue_states([a.job.job_id for a in self._active.values()])
                for key, attempt in list(self._active.items()):
                    verdict = self._verdict(attempt, states.get(attempt.job.job_id))
                    if verdict is None:
                        continue
                    del self._active[key]
                    ok, value = verdict
                    if ok:
                        results[key] = value
                        emit(Event(key, "done", len(results) + len(missing), total,
                                   f"job {attempt.job.job_id}"))
                    else:
                        attempt.last_error = value
                        self._resubmit(attempt, results, missing, total, emit)
                if self._active or self._todo:
                    time.sleep(self.poll_s)
        except BaseException:
            self.cancel()
            raise
        return Outcome(results, missing)

    def _resubmit(self, attempt: _Attempt, results: dict[str, Any], missing: dict[str, str], total: int,
                  emit: Progress) -> None:
        """Submit a failed attempt again if it has tries left, else record it missing."""
        while attempt.tries <= self.retries:
            reason = attempt.last_error
            try:
                self._sbatch(attempt)
            except IllusionsError:
                continue  # counted as a try; the loop gives up once they are spent
            self._active[attempt.key] = attempt
            emit(Event(attempt.key, "retry", len(results) + len(missing), total,
                       f"{reason}; resubmitted as job {attempt.job.job_id}"))
            return
        missing[attempt.key] = attempt.last_error
        emit(Event(attempt.key, "failed", len(results) + len(missing), total, attempt.last_error))

    def _verdict(self, attempt: _Attempt, state: str | None) -> tuple[bool, Any] | None:
        """``(True, value)``, ``(False, reason)``, or None while the job is still on its way."""
        job = attempt.job
        if job.paths.result_pickle.exists():
            try:
                status, value = job.result()
            except Exception as exc:  # noqa: BLE001 - submitit's own failure (e.g. a timeout it caught)
                return False, f"job {job.job_id}: {_failure_line(exc)}"
            return (True, value) if status == "ok" else (False, f"job {job.job_id}: {value}")
        if state is None:
            state = self._accounting_state(job)
        if state is not None and state not in FAILED_STATES and state != "COMPLETED":
            attempt.ended_at = None  # pending, running, requeued, suspended...
            return None
        now = time.monotonic()
        if attempt.ended_at is None:
            attempt.ended_at = now
        if now - attempt.ended_at < self.settle_s:
            return None
        if state is None:
            return False, f"job {job.job_id} left the queue without a result"
        return False, f"job {job.job_id} ended {state} without a result (log: {job.paths.stderr})"

    @staticmethod
    def _accounting_state(job: Any) -> str | None:
        """The state sacct records for a job no longer in the queue; None without accounting."""
        state = str(job.watcher.get_state(job.job_id, mode="force")).split()[0].upper()
        return None if state in ("", "UNKNOWN") else state

    @staticmethod
    def _queue_states(job_ids: list[str]) -> dict[str, str]:
        """``{job id: state}`` of those jobs the queue still knows (finished ones stay a few minutes)."""
        if not job_ids:
            return {}
        cmd = ["squeue", "--noheader", "--states=all", "--format=%i|%T", "--user", getpass.getuser(),
               "--jobs", ",".join(job_ids)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return {jid: "UNREACHABLE" for jid in job_ids}  # not a failure: look again next time
        if out.returncode != 0:
            if "invalid job id" in out.stderr.lower():
                return {}  # none of them is known any more
            return {jid: "UNREACHABLE" for jid in job_ids}
        states = {}
        for line in out.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid:
                states[jid] = state.strip().split()[0].upper() if state.strip() else "UNKNOWN"
        return states

    def cancel(self) -> None:
        """Cancel every job still queued or running (best effort; a finished job is left alone)."""
        ids = [a.job.job_id for a in self._active.values() if a.job is not None]
        self._active.clear()
        self._todo.clear()
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)
