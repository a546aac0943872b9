"""`--engine slurm` against a real single-node Slurm started for these tests (.ci/slurm.sh).

The fixture installs Debian's slurm-wlm and munge if they are missing (as root, through apt-get),
starts munged, slurmctld and slurmd with all their state in a temp folder, and stops them by their
pids when the module ends, whatever happened. Where that cannot be done (not root, no apt-get, no
submitit) the tests skip and say why. Marked ``slurm``: `make test` and `.ci/run` run them, `make test-fast`
does not.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from illusions import engines
from illusions.cli import app

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "slurm.sh"
pytestmark = pytest.mark.slurm

runner = CliRunner()
COMMON = 'fit_n = 40\nn_boot = 20\nmax_seqs = 20\nsplits = ["iid", "unseen_depth", "seen_struct"]\n'


def _why_not() -> str | None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'illusions[slurm]')"
    if os.geteuid() != 0:
        return "starting a local Slurm needs root (slurmd runs jobs as any user)"
    if shutil.which("slurmd") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install slurm-wlm and munge"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node Slurm (2 CPUs); ``SLURM_CONF`` points at it while the module runs."""
    why = _why_not()
    if why:
        pytest.skip(why)
    # A short path: munge's socket path must fit in a unix socket address (108 bytes).
    folder = Path(tmp_path_factory.mktemp("slurm"))
    up = subprocess.run(["bash", str(SCRIPT), "up", str(folder)], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "down", str(folder)], capture_output=True, timeout=60)
        lines = (up.stderr or up.stdout).strip().splitlines()
        pytest.skip(f"a local Slurm did not start: {lines[-1] if lines else f'exit {up.returncode}'}")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(folder / "slurm.conf"))
    try:
        yield folder
    finally:
        mp.undo()
        subprocess.run(["bash", str(SCRIPT), "down", str(folder)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, tiny_dyck):
    """Two small recipes on a tiny Dyck checkpoint, and a third whose checkpoint does not exist."""
    root = tmp_path_factory.mktemp("slurm-recipes")
    # The jobs inherit the session's $ILLUSIONS_CACHE, so they reuse the tiny Dyck task's splits.
    shutil.copytree(tiny_dyck.root / "model", root / "model")
    good = root / "good"
    good.mkdir()
    (good / "svd.toml").write_text(
        f'name = "svd"\n[analysis]\ntask = "dyck"\nmodel = "{root / "model"}"\nsimplifier = "svd"\n'
        'ranks = [1, 16]\nlayers = [1]\n' + COMMON)
    (good / "heads.toml").write_text(
        f'name = "heads"\n[analysis]\ntask = "dyck"\nmodel = "{root / "model"}"\nsimplifier = "onehot"\n'
        'layers = [0, 1]\nper_head = true\nbreakdowns = []\n' + COMMON)
    bad = root / "bad"
    shutil.copytree(good, bad)
    (bad / "lost.toml").write_text(
        f'name = "lost"\n[analysis]\ntask = "dyck"\nmodel = "{root / "missing-model"}"\nsimplifier = "svd"\n'
        'ranks = [2]\n' + COMMON)
    return root


def _reproduce(recipes_dir: Path, out: Path, *extra: str):
    return runner.invoke(app, ["reproduce", "--recipes", str(recipes_dir), "--seeds", "0", "--out", str(out),
                               "--results", str(out.parent / f"{out.name}-docs" / "RESULTS.md"), "--threads", "1",
                               "--no-report", *extra])


def test_reproduce_on_slurm_matches_the_local_engine(slurm, recipes, tmp_path):
    local = _reproduce(recipes / "good", tmp_path / "local")
    assert local.exit_code == 0, local.output
    t0 = time.perf_counter()
    on_slurm = _reproduce(recipes / "good", tmp_path / "slurm", "--engine", "slurm", "--slurm-logs",
                          str(tmp_path / "logs"), "--time", "10")
    assert on_slurm.exit_code == 0, on_slurm.output
    print(f"reproduce --engine slurm, 2 recipes x 1 seed: {time.perf_counter() - t0:.1f} s")
    for recipe in ("svd", "heads"):
        a = (tmp_path / "local" / recipe / "seed0" / "metrics.csv").read_bytes()
        b = (tmp_path / "slurm" / recipe / "seed0" / "metrics.csv").read_bytes()
        assert a == b and len(a) > 1000, recipe
    manifest = json.loads((tmp_path / "slurm" / "reproduce.json").read_text())
    assert manifest["engine"] == "slurm" and manifest["full_run"]["runs"] == 2
    assert "submitted as Slurm job" in on_slurm.stderr and "[2/2]" in on_slurm.stderr
    # Each job's files stay in the log folder named by its Slurm id.
    assert len([p for p in (tmp_path / "logs").iterdir() if p.name.isdigit()]) == 2
    assert "as 2 Slurm jobs of 1 torch thread(s) each" in (tmp_path / "slurm-docs" / "RESULTS.md").read_text()


def test_missing_runs_are_retried_reported_and_recomputed_alone(slurm, recipes, tmp_path):
    out = tmp_path / "runs"
    first = _reproduce(recipes / "bad", out, "--engine", "slurm", "--slurm-logs", str(tmp_path / "logs"),
                       "--retries", "1")
    assert first.exit_code == 1, first.output
    assert "lost/seed0: job" in first.stderr and "resubmitted as job" in first.stderr
    assert "error: 1 run(s) missing after 1 retry: lost/seed0 (job" in first.stderr
    assert "does not exist" in first.stderr
    assert not (out.parent / "runs-docs").exists()  # no results document from an incomplete set
    manifest = json.loads((out / "reproduce.json").read_text())
    assert set(manifest["runs"]) == {"heads/seed0", "svd/seed0"} and set(manifest["missing"]) == {"lost/seed0"}
    assert "full_run" not in manifest
    # Run again without the broken recipe: the finished runs are reused, no job is submitted.
    again = _reproduce(recipes / "good", out, "--engine", "slurm", "--slurm-logs", str(tmp_path / "logs"))
    assert again.exit_code == 0, again.output
    assert "submitted" not in again.stderr
    assert all(e["reused"] for e in json.loads((out / "reproduce.json").read_text())["runs"].values())


def test_sweep_on_slurm_is_one_job_with_the_local_files(slurm, recipes, tmp_path):
    args = ["sweep", "dyck", "--ranks", "1,4", "--model", str(recipes / "model"), "--fit-n", "40", "--n-boot", "20",
            "--max-seqs", "20", "--threads", "1", "--no-report"]
    local = runner.invoke(app, [*args, "--out", str(tmp_path / "local" / "sweep")])
    on_slurm = runner.invoke(app, [*args, "--out", str(tmp_path / "slurm" / "sweep"), "--engine", "slurm"])
    assert local.exit_code == 0 and on_slurm.exit_code == 0, local.output + on_slurm.output
    assert (tmp_path / "local" / "sweep" / "metrics.csv").read_bytes() == (
        tmp_path / "slurm" / "sweep" / "metrics.csv").read_bytes()
    # The same tables, printed from what the job sent back.
    assert local.stdout.replace("local", "slurm") == on_slurm.stdout
    assert [p.name.isdigit() for p in (tmp_path / "slurm" / "slurm-logs").iterdir() if not p.name.startswith(".")] == [
        True]  # the default log folder, beside the run, with one job


def test_engine_resubmits_a_cancelled_job_and_gives_up_on_a_failing_one(slurm, tmp_path):
    engine = engines.SlurmEngine(tmp_path / "logs", retries=1, poll_s=0.5, settle_s=2.0, time="5")
    # The first attempt waits (up to 2 min) for a file that appears only once the engine has seen it
    # cancelled and resubmitted it, so it cannot finish before the cancellation however slowly the
    # other sbatch calls go (it once did, under load, with a 3 s sleep); the second attempt ends at once.
    released = tmp_path / "released"
    engine.submit("sleepy", subprocess.check_call,
                  ["sh", "-c", f"for i in $(seq 240); do test -e '{released}' && exit 0; sleep 0.5; done; exit 1"])
    engine.submit("sum", operator.add, 2, 3)
    engine.submit("broken", operator.truediv, 1, 0)
    events = []
    cancelled = []

    def progress(event):
        events.append(event)
        if event.key == "sleepy" and event.kind == "submitted" and not cancelled:
            # A real cancellation of the first attempt: the queue shows it CANCELLED, with no result.
            cancelled.append(event.detail)
            subprocess.run(["scancel", event.detail.removeprefix("job ")], check=True)
        if event.key == "sleepy" and event.kind == "retry":
            released.touch()  # the first attempt is gone; the second may finish

    outcome = engine.wait(progress)
    assert outcome.results == {"sleepy": 0, "sum": 5}
    assert list(outcome.missing) == ["broken"]
    assert "ZeroDivisionError: division by zero" in outcome.missing["broken"]
    retries = {e.key: e.detail for e in events if e.kind == "retry"}
    assert set(retries) == {"sleepy", "broken"}
    assert "CANCELLED" in retries["sleepy"] and "resubmitted as job" in retries["sleepy"]
    assert [e.kind for e in events if e.key == "broken"][-1] == "failed"
    assert events[-1].finished == 3 and events[-1].total == 3


def test_a_job_sbatch_refuses_is_one_line_and_leaves_nothing(slurm, recipes, tmp_path):
    result = _reproduce(recipes / "good", tmp_path / "runs", "--engine", "slurm", "--partition", "no-such-partition")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: sbatch failed: ") and "partition" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "runs-docs").exists()
