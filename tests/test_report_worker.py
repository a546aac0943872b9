"""The report built in a forked process beside the summary (:mod:`illusions.reports.worker`): the same
files as the serial path, byte for byte, and a failure in that process is one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from illusions.cli import app
from illusions.errors import IllusionsError
from illusions.reports import worker as report_worker
from illusions.reports import write_report_files
from test_reports import make_run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "fork"),
                                reason="the report process needs os.fork on Linux")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_worker_writes_the_bytes_the_serial_path_writes(tmp_path):
    run = make_run()
    serial, forked = tmp_path / "serial", tmp_path / "forked"
    serial.mkdir()
    forked.mkdir()
    write_report_files(run, serial)
    worker = report_worker.start(run.spec, run.task, run.model, run.analysis)
    assert worker is not None
    worker.send(run)
    names = worker.write(forked)
    assert names[-1] == "report.html" and all(n.startswith("fig_") for n in names[:-1])
    assert _files(forked) == _files(serial)
    assert worker.pid == 0  # reaped


def _broken(inputs, later=None):
    later()  # it got the rows, then failed
    raise RuntimeError("boom\non two lines")


def _refused(inputs, later=None):
    raise IllusionsError("the data changed")


@pytest.mark.parametrize(("build", "words"), [(_broken, r"^building the report failed: RuntimeError: boom on two lines$"),
                                              (_refused, r"^the data changed$")])
def test_a_failure_in_the_report_process_is_one_error_and_writes_nothing(tmp_path, monkeypatch, build, words):
    """Any exception is one line; an IllusionsError keeps its own words."""
    run = make_run()
    monkeypatch.setattr("illusions.reports.build.build_report", build)
    worker = report_worker.start(run.spec, run.task, run.model, run.analysis)
    worker.send(run)
    with pytest.raises(IllusionsError, match=words):
        worker.write(tmp_path)
    assert list(tmp_path.iterdir()) == [] and worker.pid == 0


@pytest.fixture(scope="module")
def model_dir(tiny_dyck) -> Path:
    return tiny_dyck.root / "model"


def _analyze(model_dir: Path, out: Path, threads: int, *values: str):
    command = ["sweep", "dyck", "--simplify", "svd", *values] if values else ["analyze", "dyck", "--simplify", "svd",
                                                                           "--rank", "2"]
    args = [*command, "--model", str(model_dir), "--fit-n", "50", "--max-seqs", "40", "--n-boot", "50",
            "--threads", str(threads), "--out", str(out), "--json"]
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_cli_threads_2_forks_the_report_and_writes_the_files_of_threads_1(model_dir, tmp_path, monkeypatch):
    started = []
    real_start = report_worker.start
    monkeypatch.setattr(report_worker, "start", lambda *a: started.append(1) or real_start(*a))
    one = _analyze(model_dir, tmp_path / "one", 1)
    assert one.exit_code == 0, one.output
    assert started == []  # --threads 1: one process, the report after the summary
    two = _analyze(model_dir, tmp_path / "two", 2)
    assert two.exit_code == 0, two.output
    assert started == [1]
    assert json.loads(two.stdout) == json.loads(one.stdout)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert "report.html" in a and any(n.startswith("fig_") for n in a)
    assert a == b  # metrics, records, report, figures and manifest alike


def test_cli_report_process_failure_is_one_line_exit_2_and_no_run(model_dir, tmp_path, monkeypatch):
    def broken(inputs, later=None):
        raise RuntimeError("boom")

    monkeypatch.setattr("illusions.reports.build.build_report", broken)
    result = _analyze(model_dir, tmp_path / "run", 2)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: building the report failed: RuntimeError: boom"
    assert not (tmp_path / "run").exists()


def test_cli_sweep_report_from_the_worker_is_the_serial_one(model_dir, tmp_path):
    # Several proxies: the worker needs the rows first (the proxy drawn in detail is chosen from them).
    one = _analyze(model_dir, tmp_path / "one", 1, "--ranks", "1,4")
    two = _analyze(model_dir, tmp_path / "two", 2, "--ranks", "1,4")
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert "fig_sweep.png" in a and a == b
