from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from illusions import __version__
from illusions.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_list_runs():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "tasks" in result.stdout and "simplifiers" in result.stdout


def test_help_and_list_do_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from illusions.cli import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['--help']).exit_code == 0\n"
        "assert r.invoke(app, ['list']).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'transformer_lens', 'sklearn', 'circuitsvis', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at start-up: {out.stdout.strip()}"


def test_python_m_and_shim_run_the_same_app():
    for argv in ([sys.executable, "-m", "illusions", "--version"], [sys.executable, str(Path(__file__).parents[1] / "cli.py"), "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert __version__ in out.stdout


def test_process_entry_point_runs_the_app_and_freezes_the_heap():
    # The console script must be `run` (it skips the ~2 s final collection at exit); `run` must still exit
    # with the app's status, and leave the heap frozen.
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["illusions"] == "illusions.cli:run"
    code = (
        "import gc, sys\n"
        "from illusions.cli import run\n"
        "sys.argv = ['illusions', 'list']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["0", "True"], out.stdout


def test_default_threads_fit_the_free_cores(monkeypatch):
    import os

    from illusions.cli.app import MAX_AUTO_THREADS, auto_threads

    def machine(cores: int, load: float | None) -> int:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)

        def loadavg() -> tuple[float, float, float]:
            if load is None:
                raise OSError("no load average here")
            return (load, load, load)

        monkeypatch.setattr(os, "getloadavg", loadavg)
        return auto_threads()

    assert machine(2, 0.1) == 2  # idle: the old default
    assert machine(2, 1.1) == 1  # another process holds one of the two cores
    assert machine(2, 9.0) == 1  # never fewer than one
    assert machine(1, 0.0) == 1  # affinity limits it
    assert machine(16, 0.0) == MAX_AUTO_THREADS  # capped; --threads N asks for more
    assert machine(16, 15.2) == 1
    assert machine(2, None) == 2  # no load average: the cores we may use


def test_other_cores_is_the_cores_busy_time_less_this_process_own_over_the_wall_time():
    from illusions.devices import MIN_WINDOW, CpuUse, other_cores

    start = CpuUse(wall=100.0, busy=50.0, own=3.0)
    # 2 s: the cores were busy 3.5 s, 1.5 s of it this process's: others held 1 core on average.
    assert other_cores(start, CpuUse(102.0, 53.5, 4.5)) == 1.0
    assert other_cores(start, CpuUse(102.0, 51.0, 5.0)) == 0.0  # never below 0 (ticks vs process clock)
    assert other_cores(start, CpuUse(100.0 + MIN_WINDOW / 2, 50.1, 3.0)) is None  # too short to tell
    assert other_cores(CpuUse(100.0, None, 3.0), CpuUse(102.0, None, 4.0)) is None  # no /proc/stat


def test_default_threads_see_a_process_that_started_seconds_ago_which_the_load_average_does_not(monkeypatch):
    """A CPU-bound process started just before the command holds one of its two cores: the default
    takes one thread, though the load average (a one-minute mean, here forced to 0) has not risen."""
    import importlib
    import os
    import time

    from illusions.devices import cpu_use

    cli_app = importlib.import_module("illusions.cli.app")  # the module (illusions.cli.app is the Typer app)

    if cpu_use().busy is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux /proc/stat and two cores")
    two = sorted(os.sched_getaffinity(0))[:2]
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{two[0]}}})\nwhile True: pass"])
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(two))
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        monkeypatch.setattr(cli_app, "_started", None)
        assert cli_app.auto_threads() == 2  # no reading from the start: the load average decides
        time.sleep(0.5)  # the busy process is running
        cli_app.mark_process_start()
        time.sleep(1.0)  # a command's imports
        assert cli_app.auto_threads() == 1
    finally:
        busy.kill()
        busy.wait()


def test_threads_govern_every_cpu_pool_and_numpy_blas_runs_single_threaded():
    """--threads reaches the OpenMP pools of libraries loaded later (scikit-learn's k-means), not only
    torch's; numpy's BLAS runs on one thread (left alone, both start a thread per core)."""
    import json
    import os

    code = (
        "import json, sys, torch\n"
        "from illusions.cli.app import set_threads\n"
        "assert set_threads(3) == 3\n"
        "import numpy, sklearn.cluster\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps({'torch': torch.get_num_threads(), 'numpy': numpy.__file__, 'pools': threadpool_info()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=env).stdout)
    assert got["torch"] == 3
    openmp = [p for p in got["pools"] if p["user_api"] == "openmp"]  # torch's and scikit-learn's
    assert len(openmp) >= 2 and all(p["num_threads"] == 3 for p in openmp), got["pools"]
    numpy_dir = os.path.dirname(got["numpy"])
    blas = [p for p in got["pools"] if p["user_api"] == "blas" and p["filepath"].startswith(numpy_dir)]
    assert blas and all(p["num_threads"] == 1 for p in blas), got["pools"]


def test_process_entry_point_lets_idle_openmp_threads_sleep_unless_told_otherwise():
    import os

    code = (
        "import os, sys\n"
        "from illusions.cli import run\n"
        "sys.argv = ['illusions', 'list']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit:\n"
        "    print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == "PASSIVE", out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split()[-1] == "ACTIVE", out.stdout
