"""The bundled reference models (Dyck and code completion), the same checks for each: it loads as a plain
HookedTransformer, was trained by exactly the shipped recipe, reproduces its recorded accuracies and
meets its targets. The code model also reproduces golden figures on a fixed snippet, was trained on the
pinned corpus shipped with the package (so its accuracies reproduce on any machine), and refuses a
corpus whose fingerprint differs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from illusions.bundled import (
    LOG_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    bundled_metrics,
    bundled_model_dir,
    bundled_recipe_path,
    load_bundled,
)
from illusions.cli import app
from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.io import write_manifest
from illusions.models import (
    CHECKPOINT,
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    build_model,
    read_checkpoint_config,
)
from illusions.recipes import load_recipe, resolve_recipe
from illusions.tasks.code import CodeTask
from illusions.tasks.code_corpus import pinned_corpus
from illusions.training import TrainConfig, eval_subset_rows, evaluate

RECIPES = Path(__file__).parents[1] / "tasks"
SECTIONS = {"model": ModelConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class Bundled:
    """What differs between the bundled models' checks."""

    task: str
    sample: Callable[[dict[str, Any]], torch.Tensor]  # a short [1, pos] input, from the checkpoint's meta
    make_task: Callable[[dict[str, Any]], Any]  # the task it was trained on, from the checkpoint's meta
    eval_splits: tuple[str, ...] | None  # splits whose recorded subset accuracy is recomputed (None: all)
    targets: dict[str, float]  # split -> the accuracy the model must reach there

    @property
    def recipe(self) -> Path:
        return RECIPES / f"{self.task}.toml"

    def __str__(self) -> str:
        return self.task


DYCK = Bundled(
    "dyck",
    sample=lambda meta: torch.tensor([[1, 3, 4, 24, 23, 2]]),  # START (a (b b) a) END
    make_task=lambda meta: load_recipe(RECIPES / "dyck.toml", SECTIONS).make_task(),
    eval_splits=None,
    targets={"iid": 0.99, "seen_struct": 0.99},
)
CODE = Bundled(
    "code",
    sample=lambda meta: torch.tensor([[1] + [meta["task"]["vocab"].index(c) for c in "def f(x):\n    return x"]]),
    # Strict: the corpus is the one it was trained on. One split in distribution and one language out of
    # it keep the test within seconds; building the splits (~10 s on a fresh cache) is most of its time.
    make_task=lambda meta: CodeTask.from_meta(meta["task"]),
    eval_splits=("iid", "java"),
    # A unigram guess (always a space) scores ~0.2; the trained model must be far beyond that.
    targets={"iid": 0.5},
)
MODELS = pytest.mark.parametrize("bundled", [DYCK, CODE], ids=str)


@MODELS
def test_bundled_folder_has_the_fixed_files_and_is_small(bundled):
    folder = bundled_model_dir(bundled.task)
    for name in (CONFIG_FILE, WEIGHTS_FILE, RECIPE_FILE, METRICS_FILE, LOG_FILE):
        assert (folder / name).is_file(), name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20


def test_a_task_without_a_bundled_model_is_refused():
    with pytest.raises(IllusionsError, match="no bundled model for task 'nope'"):
        bundled_model_dir("nope")


@MODELS
def test_trained_by_exactly_the_repository_recipe(bundled):
    assert bundled_recipe_path(bundled.task).read_bytes() == bundled.recipe.read_bytes()
    recipe = load_recipe(bundled.recipe, SECTIONS)
    assert resolve_recipe(bundled.task, SECTIONS).to_dict() == recipe.to_dict()
    cfg, meta = read_checkpoint_config(bundled_model_dir(bundled.task))
    assert cfg == recipe["model"]
    saved = dict(meta["recipe"])
    saved.pop("source")
    assert saved == recipe.to_dict()
    assert meta["finished"] and meta["step"] == recipe["train"].steps
    assert meta["task"]["config"] == recipe.task.to_dict()
    assert len(meta["task"]["vocab"]) == cfg.d_vocab


@pytest.mark.tl3
@MODELS
def test_loads_into_a_plain_hooked_transformer_with_identical_logits(bundled):
    from transformer_lens import HookedTransformer

    model, meta = load_bundled(bundled.task)
    assert type(model) is HookedTransformer
    fresh = build_model(read_checkpoint_config(bundled_model_dir(bundled.task))[0], seed=123)
    fresh.load_state_dict(load_file(str(bundled_model_dir(bundled.task) / WEIGHTS_FILE)), strict=True)
    tokens = bundled.sample(meta)
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))


@MODELS
def test_recorded_accuracies_meet_the_targets(bundled):
    metrics = bundled_metrics(bundled.task)
    for split, target in bundled.targets.items():
        assert metrics["accuracies"][split]["accuracy"] >= target, split


@pytest.mark.slow
@MODELS
def test_reproduces_recorded_subset_accuracies(bundled):
    metrics = bundled_metrics(bundled.task)
    model, meta = load_bundled(bundled.task)
    assert meta["accuracies"] == metrics["accuracies"]
    task = bundled.make_task(meta)
    splits = task.splits()
    if bundled is CODE:  # the code task records how many functions each split holds
        assert meta["task"]["split_functions"] == {name: len(s) for name, s in splits.items()}
    names = bundled.eval_splits or tuple(splits)
    rows = {name: eval_subset_rows(len(splits[name]), metrics["eval_rows"]) for name in names}
    got = evaluate(model, splits, task.candidates, rows)
    recorded = metrics["subset_accuracies"]
    assert got == (recorded if bundled.eval_splits is None else {name: recorded[name] for name in rows})
    log = read_json(bundled_model_dir(bundled.task) / LOG_FILE)
    assert log["eval"][-1]["accuracies"] == metrics["subset_accuracies"]


def test_every_shipped_checkpoint_has_a_manifest_that_matches_its_files():
    """Shipped files are checked on load: each folder's manifest lists all of them, with their sha256."""
    from illusions.bundled import ASSETS
    from illusions.io import MANIFEST_FILE, file_sha256, read_manifest

    folders = [p.parent for p in ASSETS.rglob(WEIGHTS_FILE)]
    assert {f.name for f in folders} >= {"dyck", "code", "dyck-seed1", "dyck-seed2", "code-seed1", "code-seed2"}
    for folder in folders:
        manifest = read_manifest(folder)
        assert manifest is not None and manifest["kind"] == "model", folder
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE)
        assert sorted(manifest["files"]) == on_disk, folder
        for name, digest in manifest["files"].items():
            assert file_sha256(folder / name) == digest, folder / name


# ---------------------------------------------------------------- the code model only

# A function written for this test (not from any corpus), so the golden figures below hold on any
# machine: they need only the weights and the vocabulary saved in the checkpoint. It fits in n_ctx.
SNIPPET = '''def count_words(lines, min_length=1):
    counts = {}
    for line in lines:
        for word in line.split():
            if len(word) >= min_length:
                counts[word] = counts.get(word, 0) + 1
    return counts'''
# Regenerate (only when the bundled weights change) with:
#   model, meta = load_bundled("code"); print(_snippet_figures(model, meta["task"]["vocab"]))
SNIPPET_CORRECT = 164  # of 223 characters
SNIPPET_LOSS = 0.9723


def _snippet_figures(model: Any, vocab: list[str]) -> tuple[int, float]:
    """Top-1 next-character hits over the whole snippet and its mean loss in nats."""
    index = {t: i for i, t in enumerate(vocab)}
    ids = [index["<bos>"]] + [index.get(c, index["<unk>"]) for c in SNIPPET]
    tokens = torch.tensor([ids])  # [batch=1, pos]
    with torch.no_grad():
        logits = model(tokens)[0, :-1]  # [pos - 1, d_vocab]: position p predicts token p + 1
    target = tokens[0, 1:]
    correct = int((logits.argmax(-1) == target).sum())
    loss = float(torch.nn.functional.cross_entropy(logits, target))
    return correct, loss


def test_code_model_reproduces_golden_figures_on_a_fixed_snippet():
    model, meta = load_bundled("code")
    correct, loss = _snippet_figures(model, meta["task"]["vocab"])
    assert correct == SNIPPET_CORRECT
    assert loss == pytest.approx(SNIPPET_LOSS, abs=1e-4)


def test_code_model_trained_on_the_pinned_corpus_shipped_with_the_package():
    _, meta = read_checkpoint_config(bundled_model_dir("code"))
    assert meta["task"]["config"]["corpus"] == "" and meta["task"]["corpus_source"] == "pinned"
    assert meta["task"]["corpus_fingerprint"] == pinned_corpus().fingerprint
    assert meta["task"]["corpus_languages"] == pinned_corpus().languages()


def test_code_model_accuracies_are_those_of_a_trained_model():
    metrics = bundled_metrics("code")
    acc = {name: entry["accuracy"] for name, entry in metrics["accuracies"].items()}
    assert set(acc) == {"iid", "deep_nesting", "java", "javascript"}
    # The other languages must be harder than held-out Python (the iid target is in CODE.targets).
    assert acc["java"] < acc["iid"] and acc["javascript"] < acc["iid"]
    log = read_json(bundled_model_dir("code") / LOG_FILE)
    assert log["loss"][-1][1] < log["loss"][0][1] / 2


@pytest.mark.slow
def test_code_model_refuses_a_different_corpus_in_one_line(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(bundled_model_dir("code"), model_dir)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    config["meta"]["task"]["corpus_fingerprint"] = "0" * 64
    (model_dir / CONFIG_FILE).write_text(json.dumps(config))
    write_manifest(model_dir, CHECKPOINT)  # as a model trained on another corpus would come, intact
    result = CliRunner().invoke(app, ["analyze", "code", "--model", str(model_dir), "--rank", "2",
                                      "--threads", "1", "--no-report", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fingerprint" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
