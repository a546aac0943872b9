"""The Typer app object and the error boundary every command goes through."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from illusions import __version__
from illusions.devices import CpuUse, cpu_use, free_cores
from illusions.errors import IllusionsError

app = typer.Typer(
    name="illusions",
    help="Does a simplified explanation of a transformer still describe it out of distribution?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """Print a one-line error to stderr and exit with code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


class _NoticeHandler(logging.Handler):
    """The library's warnings (a damaged cache being rebuilt, ...) as one ``notice:`` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        typer.echo(f"notice: {message}", err=True)


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register a Typer command whose user-facing errors become one line and exit code 2."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            logger = logging.getLogger("illusions")
            handler = _NoticeHandler(logging.WARNING)
            logger.addHandler(handler)
            try:
                return fn(*args, **kw)
            except IllusionsError as exc:
                fail(str(exc))
            except Exception as exc:
                from illusions.io import disk_full_message, is_disk_full

                if not is_disk_full(exc):
                    raise
                fail(disk_full_message(exc))
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None
            finally:
                logger.removeHandler(handler)

        app.command(name, **kwargs)(wrapper)
        return fn

    return decorate


def _version(value: bool) -> None:
    if value:
        typer.echo(f"illusions {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Does a simplified explanation of a transformer still describe it out of distribution?"""


# --threads may ask for at most this many threads per CPU of this machine: more only oversubscribe
# the cores (OpenMP slows down, and at tens of thousands of threads fails to start them).
THREADS_PER_CPU = 4


def max_threads() -> int:
    """The most ``--threads`` accepted: :data:`THREADS_PER_CPU` times this machine's CPU count."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


# The most threads the automatic choice takes (the earlier fixed default); --threads N asks for more.
MAX_AUTO_THREADS = 2
AUTO_THREADS_HELP = (f"CPU threads for torch (default: the free cores, at most {MAX_AUTO_THREADS}: the cores this "
                     "process may use less those other processes kept busy since it started).")

# The CPU reading taken when the process started (illusions.cli.run), which auto_threads measures from.
_started: CpuUse | None = None


def mark_process_start() -> None:
    """Take the CPU reading :func:`auto_threads` measures other processes' use from (the entry point
    calls it first; in-process callers, which started long before, fall back to the load average)."""
    global _started
    _started = cpu_use()


def auto_threads(cap: int = MAX_AUTO_THREADS) -> int:
    """Threads that fit the free cores: the cores this process may run on (``os.sched_getaffinity``)
    less those other processes kept busy since the process started (:func:`illusions.devices.other_cores`,
    Linux, over the imports and checks before the first thread is needed, seconds), rounded, at least 1
    and at most ``cap``. Without that reading, or where it cannot be taken, the 1-minute load average
    stands in for the busy cores.

    OpenMP's threads wait for each other at every operation; one of them on a core another process
    holds makes every step wait for the scheduler (on 2 busy cores, 2 threads took 3x the CPU time and
    2.5x the wall time of 1 thread for the main job), so a busy machine gets fewer threads. The load
    average lags by about a minute both ways: a job started right after another saw a load of 1 on
    idle cores, and a job started beside a process that had just begun saw none.
    """
    return free_cores(_started, cap)


def set_threads(threads: int | None) -> int:
    """Set the process's CPU thread count (None: :func:`auto_threads`; see
    :func:`illusions.devices.set_cpu_threads`) and return it; OpenMP collapses when threads outnumber
    free cores."""
    if threads is None:
        threads = auto_threads()
    if not 1 <= threads <= max_threads():
        fail(f"--threads must be in 1..{max_threads()} ({THREADS_PER_CPU} per CPU of this machine's "
             f"{os.cpu_count() or 1}), got {threads}")
    from illusions.devices import set_cpu_threads

    set_cpu_threads(threads)
    return threads
