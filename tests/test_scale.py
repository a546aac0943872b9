"""`--device` and `--engine`: device names and checks, CPU results unchanged, engine options.

The Slurm engine against a real Slurm is in test_slurm.py; the GPU comparison runs where torch sees
a CUDA device and skips elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from illusions import engines
from illusions.analyses.run import AnalysisSpec, run_analysis
from illusions.cli import app
from illusions.devices import check_device_name, matmul_precision, resolve_device
from illusions.errors import IllusionsError

runner = CliRunner()
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def env(tiny_dyck):
    return tiny_dyck.root


def _analyze(root, out, *extra):
    return runner.invoke(app, ["analyze", "dyck", "--simplify", "svd", "--rank", "2", "--model", str(root / "model"),
                               "--fit-n", "40", "--n-boot", "20", "--max-seqs", "20", "--threads", "1",
                               "--no-report", "--out", str(out), *extra])


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu"))
    assert check_device_name("cuda:3") == "cuda:3"  # spelling only: the machine need not have it
    for bad in ("tpu", "cuda:", "cuda:x", "gpu", ""):
        with pytest.raises(IllusionsError, match="expected cpu, cuda, cuda:N, mps or auto"):
            resolve_device(bad)
    with pytest.raises(IllusionsError, match=r"cuda:99 (is not available|does not exist)"):
        resolve_device("cuda:99")
    if not torch.backends.mps.is_available():
        with pytest.raises(IllusionsError, match="mps is not available"):
            resolve_device("mps")


def test_tf32_is_set_for_the_block_and_restored():
    before = torch.get_float32_matmul_precision()
    with matmul_precision(torch.device("cpu"), allow_tf32=True):
        assert torch.get_float32_matmul_precision() == before  # only CUDA reads it: left alone
    if CUDA:
        with matmul_precision(torch.device("cuda"), allow_tf32=True):
            assert torch.get_float32_matmul_precision() == "high"
        with matmul_precision(torch.device("cuda"), allow_tf32=False):
            assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == before


def test_device_cpu_changes_no_result_file(env, tmp_path):
    plain = _analyze(env, tmp_path / "plain")
    cpu = _analyze(env, tmp_path / "cpu", "--device", "cpu")
    auto = _analyze(env, tmp_path / "auto", "--device", "auto")
    assert plain.exit_code == cpu.exit_code == auto.exit_code == 0, plain.output + cpu.output + auto.output
    for name in ("metrics.csv", "metrics.json", "records.npz", "proxies/00/proxy.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name
        if not CUDA:
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes(), name
    config = json.loads((tmp_path / "cpu" / "config.json").read_text())
    # Recorded apart from the spec, so a run's identity (and reproduce's reuse) ignores it.
    assert config["runtime"] == {"device": "cpu", "allow_tf32": False} and "device" not in config["spec"]


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", [
    ["analyze", "dyck", "--rank", "2"],
    ["sweep", "dyck", "--ranks", "1,2"],
    ["train", "dyck", "--steps", "1"],
    ["reproduce", "--seeds", "0"],
])
def test_a_device_that_is_not_there_is_one_line(env, tmp_path, command):
    extra = ["--out", str(tmp_path / "out")] + (["--model", str(env / "model")] if command[0] in ("analyze", "sweep") else [])
    if command[0] == "reproduce":
        extra += ["--recipes", str(_recipe_folder(env, tmp_path)), "--results", str(tmp_path / "docs" / "R.md")]
    result = runner.invoke(app, [*command, *extra, "--device", "cuda", "--threads", "1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: device cuda is not available: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "docs").exists()


def _recipe_folder(root, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.toml").write_text(f'name = "r"\n[analysis]\ntask = "dyck"\nmodel = "{root / "model"}"\n'
                                   'simplifier = "svd"\nranks = [2]\nfit_n = 40\nn_boot = 20\nmax_seqs = 20\n')
    return folder


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition is only for --engine slurm"),
    (["--time", "10", "--retries", "3"], "--time, --retries are only for --engine slurm"),
    (["--engine", "pbs"], "--engine must be local or slurm, got 'pbs'"),
])
def test_slurm_options_need_the_slurm_engine(env, tmp_path, args, message):
    result = runner.invoke(app, ["sweep", "dyck", "--ranks", "1,2", "--model", str(env / "model"),
                                 "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.output
    assert not (tmp_path / "out").exists()


def test_slurm_engine_says_what_is_missing(env, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    result = runner.invoke(app, ["reproduce", "--engine", "slurm", "--recipes", str(_recipe_folder(env, tmp_path)),
                                 "--out", str(tmp_path / "out"), "--results", str(tmp_path / "docs" / "R.md")])
    assert result.exit_code == 2, result.output
    assert "needs Slurm's sbatch, squeue and srun on PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_slurm_times_and_options():
    assert [engines.slurm_minutes(t) for t in ("45", "30:00", "30:01", "2:00:00", "1-00", "1-02:30", "0-0:0:1")] == [
        45, 30, 31, 120, 1440, 1590, 1]
    for bad in ("1h", "", "0", "1:2:3:4", "-5"):
        with pytest.raises(IllusionsError, match="slurm time"):
            engines.slurm_minutes(bad)
    assert engines.parse_slurm_options(["mem=8G", "--account=lab", "qos = high"]) == {
        "mem": "8G", "account": "lab", "qos": "high"}
    for bad, message in [("mem", "not KEY=VALUE"), ("=3", "not KEY=VALUE"), ("mem=", "not KEY=VALUE"),
                         ("partition=gpu", r"own parameter \(partition\)"), ("cpus_per_task=4", "own parameter"),
                         ("output=x.log", "set by the engine"), ("signal=USR1", "set by the engine")]:
        with pytest.raises(IllusionsError, match=message):
            engines.parse_slurm_options([bad])
    with pytest.raises(IllusionsError, match="given twice"):
        engines.parse_slurm_options(["mem=1G", "mem=2G"])


def test_local_engine_runs_in_order_and_reports():
    engine = engines.LocalEngine()
    for i in range(3):
        engine.submit(f"k{i}", pow, 2, i)
    events = []
    outcome = engine.wait(events.append)
    assert outcome.results == {"k0": 1, "k1": 2, "k2": 4} and outcome.missing == {}
    assert [(e.key, e.kind, e.finished) for e in events] == [
        ("k0", "start", 0), ("k0", "done", 1), ("k1", "start", 1), ("k1", "done", 2), ("k2", "start", 2),
        ("k2", "done", 3)]


def test_local_engine_reports_a_failing_piece_and_runs_the_rest():
    engine = engines.LocalEngine()
    engine.submit("ok", pow, 2, 3)
    engine.submit("bad", resolve_device, "tpu")
    engine.submit("after", pow, 3, 2)
    events = []
    outcome = engine.wait(events.append)
    assert outcome.results == {"ok": 8, "after": 9}
    assert outcome.missing == {"bad": "IllusionsError: unknown device 'tpu'; expected cpu, cuda, cuda:N, mps or auto"}
    assert ("bad", "failed", 2) in [(e.key, e.kind, e.finished) for e in events]


def test_a_job_error_comes_back_as_one_line():
    status, reason = engines.run_in_job(1, resolve_device, "tpu")
    assert status == "error" and reason == "IllusionsError: unknown device 'tpu'; expected cpu, cuda, cuda:N, mps or auto"
    assert engines.run_in_job(1, pow, 3, 2) == ("ok", 9)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch sees none)")
@pytest.mark.parametrize("simplifier, params", [("svd", {"ranks": (1, 4)}), ("kmeans", {"clusters": (4,)}),
                                                ("onehot", {})])
def test_cuda_agrees_with_cpu(env, simplifier, params):
    spec = AnalysisSpec(task="dyck", model=str(env / "model"), simplifier=simplifier, fit_n=200, max_seqs=200,
                        n_boot=20, **params)
    cpu = run_analysis(spec, device="cpu")
    gpu = run_analysis(spec, device="cuda")
    assert gpu.runtime["device"].startswith("cuda:") and not gpu.runtime["allow_tf32"]
    assert next(iter(gpu.analysis.proxies[0].hooks or [None])) is None or all(
        t.device.type == "cuda" for h in gpu.analysis.proxies[0].hooks for t in h.tensors().values())
    key = ("split", "proxy", "group_by", "group", "metric")
    a = {tuple(r[k] for k in key): r["value"] for r in cpu.rows}
    b = {tuple(r[k] for k in key): r["value"] for r in gpu.rows}
    assert a.keys() == b.keys()
    for k, value in a.items():
        if k[-1] in ("original_accuracy", "proxy_accuracy", "agreement", "accuracy_change"):
            assert b[k] == pytest.approx(value, abs=0.02), k  # a rare near-tie argmax may flip
        elif value == value:  # not NaN
            assert b[k] == pytest.approx(value, rel=1e-3, abs=1e-5), k
