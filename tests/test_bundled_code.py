"""The bundled code-completion model: it loads as a plain HookedTransformer, was trained by exactly the
shipped recipe on the pinned corpus, reproduces its recorded accuracies (on any machine: the corpus
ships with the package), and refuses a corpus whose fingerprint differs."""

from __future__ import annotations

import json
import shutil
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

REPO_RECIPE = Path(__file__).parents[1] / "tasks" / "code.toml"
SECTIONS = {"model": ModelConfig, "train": TrainConfig}

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


def test_bundled_folder_has_the_fixed_files_and_is_small():
    folder = bundled_model_dir("code")
    for name in (CONFIG_FILE, WEIGHTS_FILE, RECIPE_FILE, METRICS_FILE, LOG_FILE):
        assert (folder / name).is_file(), name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20


def test_trained_by_exactly_the_repository_recipe():
    assert bundled_recipe_path("code").read_bytes() == REPO_RECIPE.read_bytes()
    recipe = load_recipe(REPO_RECIPE, SECTIONS)
    assert resolve_recipe("code", SECTIONS).to_dict() == recipe.to_dict()
    cfg, meta = read_checkpoint_config(bundled_model_dir("code"))
    assert cfg == recipe["model"]
    saved = dict(meta["recipe"])
    saved.pop("source")
    assert saved == recipe.to_dict()
    assert meta["finished"] and meta["step"] == recipe["train"].steps
    assert meta["task"]["config"] == recipe.task.to_dict()
    assert len(meta["task"]["vocab"]) == cfg.d_vocab


@pytest.mark.tl3
def test_loads_into_a_plain_hooked_transformer_with_identical_logits():
    from transformer_lens import HookedTransformer

    model, meta = load_bundled("code")
    assert type(model) is HookedTransformer
    fresh = build_model(read_checkpoint_config(bundled_model_dir("code"))[0], seed=123)
    fresh.load_state_dict(load_file(str(bundled_model_dir("code") / WEIGHTS_FILE)), strict=True)
    tokens = torch.tensor([[1] + [meta["task"]["vocab"].index(c) for c in "def f(x):\n    return x"]])
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))


def test_reproduces_golden_figures_on_a_fixed_snippet():
    model, meta = load_bundled("code")
    correct, loss = _snippet_figures(model, meta["task"]["vocab"])
    assert correct == SNIPPET_CORRECT
    assert loss == pytest.approx(SNIPPET_LOSS, abs=1e-4)


def test_trained_on_the_pinned_corpus_shipped_with_the_package():
    _, meta = read_checkpoint_config(bundled_model_dir("code"))
    assert meta["task"]["config"]["corpus"] == "" and meta["task"]["corpus_source"] == "pinned"
    assert meta["task"]["corpus_fingerprint"] == pinned_corpus().fingerprint
    assert meta["task"]["corpus_languages"] == pinned_corpus().languages()


@pytest.mark.slow
def test_reproduces_recorded_subset_accuracies_on_the_pinned_corpus():
    metrics = bundled_metrics("code")
    model, meta = load_bundled("code")
    assert meta["accuracies"] == metrics["accuracies"]
    splits = CodeTask.from_meta(meta["task"]).splits()  # strict: the corpus is the one it was trained on
    assert meta["task"]["split_functions"] == {name: len(s) for name, s in splits.items()}
    # One split in distribution and one language out of it keep the test within seconds; building the
    # splits (~10 s on a fresh cache) is most of its time.
    rows = {name: eval_subset_rows(len(splits[name]), metrics["eval_rows"]) for name in ("iid", "java")}
    got = evaluate(model, splits, None, rows)
    assert got == {name: metrics["subset_accuracies"][name] for name in rows}
    log = read_json(bundled_model_dir("code") / LOG_FILE)
    assert log["eval"][-1]["accuracies"] == metrics["subset_accuracies"]


def test_recorded_accuracies_are_those_of_a_trained_model():
    metrics = bundled_metrics("code")
    acc = {name: entry["accuracy"] for name, entry in metrics["accuracies"].items()}
    assert set(acc) == {"iid", "deep_nesting", "java", "javascript"}
    # A unigram guess (always a space) scores ~0.2; the trained model must be far beyond that in
    # distribution, and the other languages must be harder than held-out Python.
    assert acc["iid"] >= 0.5
    assert acc["java"] < acc["iid"] and acc["javascript"] < acc["iid"]
    log = read_json(bundled_model_dir("code") / LOG_FILE)
    assert log["loss"][-1][1] < log["loss"][0][1] / 2


@pytest.mark.slow
def test_a_different_corpus_is_refused_in_one_line(tmp_path):
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
