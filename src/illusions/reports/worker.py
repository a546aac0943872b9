"""A run's report built in a forked process beside the summary, for a command given two or more cores.

``illusions analyze`` spends about half its time after the TransformerLens import outside torch's
threads: the summary's bootstrap intervals and warning-signal AUROCs, then the report (matplotlib and
CircuitsVis, a few forward passes for the geometry panels and examples). :func:`start` forks once every
split is evaluated; the child imports matplotlib and draws what needs only the model, the proxies and
the records (:func:`illusions.reports.build.build_report` with ``later``) while the parent summarises.
The parent then sends the rows and ``config.json`` (:meth:`ReportWorker.send`) and, inside the staged
run folder, takes the page and figures back and writes them itself (:meth:`ReportWorker.write`), so
the child never touches the output folder and the files are those the serial path writes, byte for byte.

Messages are length-prefixed JSON and raw bytes on two pipes; nothing is pickled. A child that fails
sends its error as one line, which the parent raises as :class:`~illusions.errors.IllusionsError`.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from illusions.errors import IllusionsError

_LENGTH = struct.Struct("<Q")


def available(model: Any) -> bool:
    """Whether a report can be built in a forked process: a Linux CPU run (CUDA cannot be used after
    a fork, and other platforms' fork is unsafe with their system libraries)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and str(model.cfg.device).startswith("cpu")


class ReportWorker:
    """The parent's handle on the forked report process."""

    def __init__(self, pid: int, to_child: int, from_child: int) -> None:
        self.pid = pid
        self._to = to_child
        self._from = from_child
        self._sender: threading.Thread | None = None

    def send(self, run: Any) -> None:
        """Send the run's rows (as ``metrics.csv`` holds them) and ``config.json``, in a thread: the
        child reads them once its first part is drawn, and the parent goes on writing the run."""
        from illusions.analyses.run import rows_to_csv, run_config

        body = json.dumps({"rows_csv": rows_to_csv(run.rows), "config": json.dumps(run_config(run))}).encode()
        self._sender = threading.Thread(target=_send_quietly, args=(self._to, body), daemon=True)
        self._sender.start()

    def write(self, directory: Path) -> list[str]:
        """Wait for the child and write its page and figures into ``directory`` (each file atomically);
        returns the names written, figures first, as :func:`illusions.reports.build.write_files` does."""
        from illusions.io import atomic_write_bytes, atomic_write_text
        from illusions.reports.build import REPORT_FILE

        try:
            head = json.loads(_read(self._from))
            if "error" in head:
                raise IllusionsError(head["error"] if head.get("ours") else f"building the report failed: {head['error']}")
            page = _read(self._from).decode()
            pngs = [(name, _read(self._from)) for name in head["figures"]]
        except (EOFError, ValueError, KeyError) as exc:
            raise IllusionsError(f"building the report failed: its process ended without a report ({exc})") from None
        except BaseException:
            self.close(kill=True)
            raise
        self.close()
        for name, png in pngs:
            atomic_write_bytes(Path(directory) / f"{name}.png", png)
        atomic_write_text(Path(directory) / REPORT_FILE, page)
        return [f"{name}.png" for name, _ in pngs] + [REPORT_FILE]

    def close(self, kill: bool = False) -> None:
        """Close the pipes and reap the child, stopping it first with ``kill`` (the run failed or was
        interrupted before its report was taken); safe to call twice."""
        if kill and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in (self._to, self._from):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to = self._from = -1
        if self.pid:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0


def start(spec: Any, task: Any, model: Any, result: Any) -> ReportWorker | None:
    """Fork the report process for an evaluated run (None where :func:`available` says no).

    Args:
        spec: the run's spec (layers resolved).
        task: its task; model: the original model (on the CPU).
        result: the engine's :class:`~illusions.analyses.faithfulness.AnalysisResult`.
    """
    if not available(model):
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the child's collections then never touch (and copy) the parent's objects
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build the report, send it, exit without running the parent's exit handlers
        code = 1
        try:
            os.close(to_child_w)
            os.close(from_child_r)
            _child(spec, task, model, result, to_child_r, from_child_w)
            code = 0
        except BaseException as exc:  # every failure goes back to the parent as one line
            ours = isinstance(exc, IllusionsError)
            line = " ".join((str(exc) if ours else f"{type(exc).__name__}: {exc}").split())[:500]
            try:
                _send(from_child_w, json.dumps({"error": line, "ours": ours}).encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(from_child_w)
    return ReportWorker(pid, to_child_w, from_child_r)


def _child(spec: Any, task: Any, model: Any, result: Any, rfd: int, wfd: int) -> None:
    import torch

    from illusions.analyses.run import rows_from_csv
    from illusions.reports.build import ReportInputs, build_report

    torch.set_num_threads(1)  # the parent has the other core
    inputs = ReportInputs(spec=spec, config={}, rows=[], proxies=list(result.proxies), labels=list(result.labels),
                          split_rows=dict(result.split_rows), records=dict(result.records),
                          fit_rows=result.fit_rows, task=task, model=model)

    def later() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        message = json.loads(_read(rfd))
        return rows_from_csv(message["rows_csv"]), json.loads(message["config"])

    page, figures = build_report(inputs, later)
    _send(wfd, json.dumps({"figures": [fig.name for fig in figures]}).encode())
    _send(wfd, page.encode())
    for fig in figures:
        _send(wfd, fig.png)


def _send(fd: int, body: bytes) -> None:
    data = memoryview(_LENGTH.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data):]


def _send_quietly(fd: int, body: bytes) -> None:
    try:
        _send(fd, body)
    except OSError:  # the child is gone: write() says why
        pass


def _read(fd: int) -> bytes:
    (n,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
    return _read_exactly(fd, n)


def _read_exactly(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"pipe closed {n - left} of {n} bytes into a message")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
