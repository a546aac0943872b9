"""AnalysisSpec is the one owner of the analysis options: it checks and normalises them itself."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from illusions.analyses.run import AnalysisSpec, build_simplifiers
from illusions.cli import app
from illusions.errors import InvalidOption
from illusions.simplifiers import SVD, KMeans, OneHot, ResidSVD, Targets

runner = CliRunner()


@pytest.mark.parametrize(
    ("fields", "option", "words"),
    [
        ({"task": "nope"}, "task", "unknown task 'nope'; known tasks: code, custom, dyck"),
        ({"simplifier": "pca"}, "simplifier", "unknown simplifier 'pca'"),
        ({"ranks": (0,)}, "ranks", "must be at least 1, got 0"),
        ({"ranks": (2,), "clusters": (3,)}, "clusters", "does not apply to svd (its swept parameter is rank)"),
        ({"simplifier": "onehot", "ranks": (4,)}, "ranks", "does not apply to onehot (it sweeps nothing)"),
        ({"simplifier": "kmeans", "ranks": (4,)}, "ranks", "does not apply to kmeans (its swept parameter is k)"),
        ({"simplifier": "kmeans", "centered": False}, "centered", "does not apply to kmeans"),
        ({"simplifier": "onehot", "basis": "joint"}, "basis", "does not apply to onehot"),
        ({"simplifier": "onehot", "target": "q"}, "target", "does not apply to onehot (it targets layers, heads)"),
        ({"simplifier": "resid-svd", "heads": (1,)}, "heads", "does not apply to resid-svd"),
        ({"simplifier": "svd", "resid": "resid_mid"}, "resid", "does not apply to svd"),
        ({"seed": -1}, "seed", "must be at least 0, got -1"),
        ({"fit_n": 0}, "fit_n", "must be at least 1, got 0"),
        ({"max_seqs": -3}, "max_seqs", "must be at least 0, got -3"),
        ({"n_boot": 5}, "n_boot", "must be at least 10, got 5"),
        ({"batch_size": 0}, "batch_size", "must be at least 1, got 0"),
        ({"token_budget": 0}, "token_budget", "must be at least 1, got 0"),
        ({"layers": (1, 1)}, "layers", "lists a value twice"),
        ({"heads": (-1,)}, "heads", "must be at least 0, got -1"),
        ({"breakdowns": ("colour",)}, "breakdowns", "unknown value(s) colour"),
    ],
)
def test_spec_refuses_bad_options_naming_the_parameter(fields, option, words):
    with pytest.raises(InvalidOption) as info:
        AnalysisSpec(**fields)
    assert info.value.option == option and words in str(info.value)


def test_spec_normalises_what_it_accepts():
    assert AnalysisSpec(max_seqs=0).max_seqs is None
    assert AnalysisSpec(max_seqs=None).max_seqs is None
    assert AnalysisSpec(max_seqs=7).max_seqs == 7
    assert AnalysisSpec(splits=("iid", "unseen_depth", "iid")).splits == ("iid", "unseen_depth")
    assert AnalysisSpec(ranks=[1, 2]).ranks == (1, 2)
    assert AnalysisSpec.from_dict({"max_seqs": None}).max_seqs is None
    spec = AnalysisSpec.from_dict(json.loads(json.dumps(AnalysisSpec(max_seqs=0).to_dict())))
    assert spec == AnalysisSpec(max_seqs=None)


def test_the_swept_parameter_comes_from_the_simplifier():
    assert AnalysisSpec(simplifier="svd", ranks=(1, 4)).sweep_values() == ("rank", (1, 4))
    assert AnalysisSpec(simplifier="kmeans", clusters=(8,)).sweep_values() == ("k", (8,))
    assert AnalysisSpec(simplifier="svd").sweep_values() == ("rank", ())
    assert AnalysisSpec(simplifier="onehot").sweep_values() == ("", ())


def test_each_simplifier_gets_only_the_options_it_takes():
    assert build_simplifiers(AnalysisSpec(simplifier="svd", ranks=(2, 3), layers=(0,), target="q",
                                          centered=False, seed=4)) == [
        SVD(rank=2, centered=False, targets=Targets(layers=(0,), qk="q")),
        SVD(rank=3, centered=False, targets=Targets(layers=(0,), qk="q")),
    ]
    assert build_simplifiers(AnalysisSpec(simplifier="kmeans", clusters=(5,), seed=4)) == [KMeans(k=5, seed=4)]
    assert build_simplifiers(AnalysisSpec(simplifier="onehot", heads=(1,))) == [OneHot(targets=Targets(heads=(1,)))]
    assert build_simplifiers(AnalysisSpec(simplifier="resid-svd", resid="resid_mid")) == [
        ResidSVD(targets=Targets(resid="resid_mid"))]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["analyze", "dyck", "--seed", "-1"], "error: --seed must be at least 0, got -1"),
        (["analyze", "dyck", "--simplify", "onehot", "--rank", "4"], "error: --rank does not apply to onehot"),
        (["analyze", "dyck", "--simplify", "kmeans", "--uncentered"], "error: --uncentered does not apply to kmeans"),
        (["analyze", "dyck", "--max-seqs", "-1"], "error: --max-seqs must be at least 0, got -1"),
        (["sweep", "dyck", "--ranks", "0,2"], "error: --ranks must be at least 1, got 0"),
        (["sweep", "dyck"], "error: give --ranks, --clusters or --widths"),
        (["analyze", "dyck", "--heads", "1,1"], "error: --heads lists a value twice"),
    ],
)
def test_cli_errors_name_the_flags(args, words, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and words in result.stderr
    assert not (tmp_path / "run").exists()


def test_sweeps_list_every_swept_parameter_and_the_cli_takes_its_options_from_them():
    from illusions import registry
    from illusions.analyses.spec import SWEEP_FIELDS, SWEEPS
    from illusions.cli.analyze import ANALYZE_VALUES, SWEEP_VALUES

    for name in registry.SIMPLIFIERS:
        param = registry.get_simplifier(name).sweep_param
        rows = [s for s in SWEEPS if name in s.methods]
        assert [s.param for s in rows] == ([param] if param else []), name
    assert {s.param for s in SWEEPS} == set(SWEEP_FIELDS)
    assert [(o.flag, o.field) for o in ANALYZE_VALUES] == [(s.flag, s.field) for s in SWEEPS]
    assert [(o.flag, o.field) for o in SWEEP_VALUES if o.field != "checkpoints"] == [
        (s.sweep_flag, s.field) for s in SWEEPS]
    for s in SWEEPS:  # every swept field is a spec field holding a tuple of values
        assert AnalysisSpec().to_dict().get(s.field, ()) in ((), [])


def test_layers_from_the_end_resolve_against_the_model():
    """``layers=(-1,)`` (``--layer -1``, ``layers = [-1]`` in a recipe) is the last layer: the spec and
    the simplifiers' targets (the Python API's ``il.svd(layers=[-1])``) resolve it against the model's
    layer count, and a layer outside ``-n..n-1`` names the valid range."""
    from illusions.errors import IllusionsError

    spec = AnalysisSpec(layers=(-1, 0))
    assert spec.resolve_layers(30).layers == (0, 29)
    assert spec.resolve_layers(30).simplifiers[0].targets.layers == (0, 29)
    assert AnalysisSpec(layers=(1,)).resolve_layers(2) == AnalysisSpec(layers=(1,))
    assert Targets(layers=(-1,)).resolve_shape(3, 4).layers == (2,)
    assert Targets(layers=(-3, 1)).resolve_shape(3, 4).layers == (0, 1)
    for layers in ((-99,), (99,), (-4,), (3,)):
        with pytest.raises(InvalidOption, match=r"does not exist; this model has 3 layers: 0\.\.2, or -3\.\.-1"):
            AnalysisSpec(layers=layers).resolve_layers(3)
    with pytest.raises(IllusionsError, match=r"0\.\.2, or -3\.\.-1"):
        Targets(layers=(-4,)).resolve_shape(3, 4)
    with pytest.raises(InvalidOption, match="name layer 2 twice"):
        AnalysisSpec(layers=(-1, 2)).resolve_layers(3)
