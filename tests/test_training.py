"""The training loop on a toy copy task: loss falls, batches are length-grouped, resume is exact."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from illusions.config import Config
from illusions.errors import IllusionsError
from illusions.models import ModelConfig, load_model
from illusions.tasks.base import Scored, Split, Task, Vocab
from illusions.training import (
    OPTIMIZER_FILE,
    TRAINER_FILE,
    BatchStream,
    TrainConfig,
    eval_subset_rows,
    length_grouped_batches,
    lr_at,
    next_token_loss,
    train,
)

SYMBOLS = 10


@dataclasses.dataclass(frozen=True)
class CopyConfig(Config):
    n_train: int = 400
    n_eval: int = 40
    min_len: int = 1
    max_len: int = 5
    seed: int = 0


class CopyTask:
    """``BOS a1..ak SEP a1..ak``: the second half copies the first; scored on the copied symbols.

    Token ids: PAD 0, BOS 1, SEP 2, symbols 3..12 (13 tokens, the size of the tiny test model).
    Splits: ``train``, ``iid`` (same lengths) and ``long`` (k from max_len + 1 to max_len + 3).
    """

    name: ClassVar[str] = "copy"
    Config = CopyConfig

    def __init__(self, config: CopyConfig | None = None) -> None:
        self.config = config or CopyConfig()
        self.vocab = Vocab(("<pad>", "<s>", "|") + tuple(f"s{i}" for i in range(SYMBOLS)), pad_id=0, bos_id=1)
        self._splits: dict[str, Split] | None = None

    @property
    def candidates(self) -> np.ndarray:
        return np.arange(3, 3 + SYMBOLS)

    def _split(self, name: str, n: int, lo: int, hi: int, rng: np.random.Generator) -> Split:
        ks = rng.integers(lo, hi + 1, size=n)
        width = 2 * hi + 2
        tokens = np.zeros((n, width), dtype=np.int64)
        seq, pos, target = [], [], []
        for r, k in enumerate(ks):
            body = rng.integers(3, 3 + SYMBOLS, size=k)
            row = np.concatenate([[1], body, [2], body])
            tokens[r, : row.shape[0]] = row
            for j in range(k):
                seq.append(r)
                pos.append(k + 1 + j)  # query at SEP or a copied symbol, predicting body[j]
                target.append(body[j])
        scored = Scored(np.array(seq), np.array(pos), np.array(target), {})
        return Split(name, tokens, 2 * ks + 2, scored, f"copy {lo}..{hi} symbols")

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            c = self.config
            rng = np.random.default_rng(c.seed)
            self._splits = {
                "train": self._split("train", c.n_train, c.min_len, c.max_len, rng),
                "iid": self._split("iid", c.n_eval, c.min_len, c.max_len, rng),
                "long": self._split("long", c.n_eval, c.max_len + 1, c.max_len + 3, rng),
            }
        return self._splits

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "vocab": list(self.vocab.tokens)}


MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=13)
FAST = TrainConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=3, log_every=2, eval_every=4,
                   eval_rows=16, checkpoint_every=5, seed=1)


def test_copy_task_satisfies_the_protocol():
    assert isinstance(CopyTask(), Task)


def test_loss_falls_and_run_dir_is_a_loadable_checkpoint(tmp_path):
    task = CopyTask()
    cfg = FAST.replace(steps=60, lr=1e-2, eval_every=30, checkpoint_every=0, log_every=10)
    result = train(task, MODEL, cfg, tmp_path / "run", recipe={"note": "toy"})
    losses = [loss for _, loss, _ in result.history["loss"]]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.step == 60 and not result.interrupted
    assert set(result.accuracies) == {"iid", "long"}
    assert result.accuracies["iid"]["n_positions"] == task.splits()["iid"].scored.seq.shape[0]
    assert [e["step"] for e in result.history["eval"]] == [30, 60]

    model, meta = load_model(tmp_path / "run")
    assert meta["step"] == 60 and meta["finished"] and meta["recipe"] == {"note": "toy"}
    assert meta["accuracies"] == result.accuracies
    assert meta["task"]["name"] == "copy"
    trainer = json.loads((tmp_path / "run" / TRAINER_FILE).read_text())
    assert trainer["step"] == 60 and trainer["history"] == result.history
    # The recorded final accuracies are those of the saved weights.
    from illusions.training import evaluate

    again = evaluate(model, task.splits(), task.candidates, {"iid": None, "long": None})
    assert again == result.accuracies


def _interrupt_at(step: int):
    def progress(p):
        if p.step == step and p.event == "step":
            os.kill(os.getpid(), signal.SIGINT)

    return progress


def _state(path):
    return load_file(str(path / "model.safetensors")), load_file(str(path / OPTIMIZER_FILE))


def test_ctrl_c_then_resume_equals_uninterrupted_run_bit_exactly(tmp_path):
    task = CopyTask()
    full = train(task, MODEL, FAST, tmp_path / "full")

    # Ctrl-C after step 7: between the checkpoint at 5 and the one at 10, off the loss-log grid.
    part = train(task, MODEL, FAST, tmp_path / "part", progress=_interrupt_at(7))
    assert part.interrupted and part.step == 7 and part.accuracies == {}
    assert json.loads((tmp_path / "part" / TRAINER_FILE).read_text())["step"] == 7
    _, meta = load_model(tmp_path / "part")
    assert meta["step"] == 7 and not meta["finished"]

    resumed = train(task, MODEL, FAST, tmp_path / "part", resume=True)
    assert resumed.step == FAST.steps and not resumed.interrupted

    w_full, o_full = _state(tmp_path / "full")
    w_res, o_res = _state(tmp_path / "part")
    assert w_full.keys() == w_res.keys() and o_full.keys() == o_res.keys() and w_full and o_full
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for k in o_full:
        assert torch.equal(o_full[k], o_res[k]), k
    assert resumed.history == full.history
    assert resumed.accuracies == full.accuracies


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    task = CopyTask()
    cfg = FAST.replace(steps=4, eval_every=0, checkpoint_every=0)
    train(task, MODEL, cfg, tmp_path / "a")
    train(task, MODEL, cfg, tmp_path / "b")
    train(task, MODEL, cfg.replace(seed=2), tmp_path / "c")
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.W_E"], c["embed.W_E"])


def test_refuses_to_overwrite_or_resume_nothing_or_resume_other_settings(tmp_path):
    task = CopyTask()
    cfg = FAST.replace(steps=2, eval_every=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(IllusionsError, match="other files"):
        train(task, MODEL, cfg, tmp_path / "busy")
    with pytest.raises(IllusionsError, match="no training run"):
        train(task, MODEL, cfg, tmp_path / "none", resume=True)
    train(task, MODEL, cfg, tmp_path / "run")
    with pytest.raises(IllusionsError, match="already holds a training run"):
        train(task, MODEL, cfg, tmp_path / "run")
    with pytest.raises(IllusionsError, match="differ in lr"):
        train(task, MODEL, cfg.replace(lr=1e-2), tmp_path / "run", resume=True)
    with pytest.raises(IllusionsError, match="d_vocab"):
        train(task, MODEL.replace(d_vocab=20), cfg, tmp_path / "v")
    with pytest.raises(IllusionsError, match="n_ctx"):
        train(task, MODEL.replace(n_ctx=8), cfg, tmp_path / "c")


def test_resume_keeps_a_users_files_and_refuses_damaged_state_and_export_replaces_its_own(tmp_path):
    from illusions.bundled import export_run
    from illusions.io import MANIFEST_FILE, read_manifest

    task = CopyTask()
    cfg = FAST.replace(steps=4, eval_every=0, checkpoint_every=0)
    train(task, MODEL, cfg.replace(steps=2), tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = train(task, MODEL, cfg.replace(steps=2), tmp_path / "run", resume=True)
    assert result.step == 2 and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in read_manifest(tmp_path / "run")["files"]
    # A changed byte in the optimizer state would resume a different run: refused, nothing replaced.
    opt = tmp_path / "run" / OPTIMIZER_FILE
    data = bytearray(opt.read_bytes())
    data[-8] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(IllusionsError, match=f"{OPTIMIZER_FILE} does not match the sha256"):
        train(task, MODEL, cfg.replace(steps=2), tmp_path / "run", resume=True)
    assert opt.read_bytes() == bytes(data)
    # A bundled-model folder (with its manifest) is replaced by a new export of a finished run.
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("# toy\n")
    train(task, MODEL, cfg, tmp_path / "done")
    for _ in range(2):
        folder = export_run(tmp_path / "done", "copy", recipe_file=recipe, assets=tmp_path / "assets")
    assert read_manifest(folder)["kind"] == "model" and (folder / MANIFEST_FILE).is_file()
    load_model(folder)


def test_next_token_loss_ignores_pad_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 13, generator=gen)
    tokens = torch.tensor([[1, 4, 5, 0, 0], [1, 6, 7, 8, 9]])
    changed = logits.clone()
    changed[0, 2:] += 100 * torch.randn(3, 13, generator=gen)  # predictions of PAD targets only
    assert torch.equal(next_token_loss(logits, tokens, 0), next_token_loss(changed, tokens, 0))
    manual = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, :2], logits[1, :4]]), torch.tensor([4, 5, 6, 7, 8, 9])
    )
    torch.testing.assert_close(next_token_loss(logits, tokens, 0), manual)


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 120, size=1000)
    batches = length_grouped_batches(lengths, 32, 8, np.random.default_rng(1))
    rows = np.concatenate(batches)
    assert np.array_equal(np.sort(rows), np.arange(1000))
    grouped = sum(int(lengths[b].max()) * len(b) for b in batches)
    shuffled = sum(int(lengths[b].max()) * len(b) for b in np.array_split(rng.permutation(1000), 32))
    assert grouped < 0.7 * shuffled
    assert grouped <= lengths.sum() * 1.25


def test_batch_stream_restores_mid_epoch_across_epochs():
    lengths = np.arange(50) % 13 + 2
    a = BatchStream(lengths, 8, 4, seed=3)
    for _ in range(9):  # 7 batches per epoch: stop inside the second epoch
        next(a)
    state = json.loads(json.dumps(a.state()))  # must survive JSON
    b = BatchStream(lengths, 8, 4, seed=3)
    b.restore(state)
    for _ in range(10):
        assert np.array_equal(next(a), next(b))


def test_schedule_warms_up_peaks_and_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4)
    lin = cfg.replace(decay="linear")
    assert lr_at(10 + 89 // 2, lin) < lr_at(10 + 89 // 2, cfg) + 1e-4


def test_eval_subset_is_fixed_and_independent_of_training_seed():
    a = eval_subset_rows(1000, 50)
    assert np.array_equal(a, eval_subset_rows(1000, 50)) and np.all(np.diff(a) > 0)
    assert np.array_equal(eval_subset_rows(30, 50), np.arange(30))


def test_train_config_rejects_bad_values():
    with pytest.raises(IllusionsError, match="decay"):
        TrainConfig.from_dict({"decay": "step"})
    with pytest.raises(IllusionsError, match="betas"):
        TrainConfig.from_dict({"betas": [0.9]})
    with pytest.raises(IllusionsError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    assert TrainConfig.from_dict({"betas": [0.8, 0.9]}).betas == (0.8, 0.9)


SMALL_DYCK = """
[task]
name = "dyck"
n_train = 300
n_eval = 20
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_head = 8
d_mlp = 32
[train]
steps = 50
batch_size = 8
eval_every = 2
eval_rows = 8
"""


def test_train_command_end_to_end_on_a_small_dyck_recipe(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from illusions.cli import app

    monkeypatch.setenv("ILLUSIONS_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "small.toml"
    recipe.write_text(SMALL_DYCK)
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["train", str(recipe), "--out", str(out), "--steps", "4", "--seed", "5", "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {out}" in result.stdout and "unseen_depth" in result.stdout
    _, meta = load_model(out)
    assert meta["step"] == 4 and meta["recipe"]["train"]["steps"] == 4 and meta["recipe"]["train"]["seed"] == 5
    assert meta["recipe"]["task"]["n_train"] == 300 and meta["task"]["config"]["n_train"] == 300
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already holds a training run" in again.output
    # --resume takes the run's own --steps/--seed, so they need not be repeated.
    resumed = runner.invoke(app, ["train", str(recipe), "--out", str(out), "--resume", "--threads", "1"])
    assert resumed.exit_code == 0, resumed.output


def test_wall_keep_leaves_out_a_share_of_the_deepest_training_strings_only():
    from illusions.tasks.dyck import DyckConfig, DyckTask
    from illusions.training import training_rows

    task = DyckTask(DyckConfig(n_train=3000, n_eval=20, max_len=64, short_max_brackets=16, seed=3))
    split = task.splits()["train"]
    deepest = task.depths(split.tokens).max(axis=-1)
    wall = deepest.max()
    everything = training_rows(task, split, TrainConfig())
    assert np.array_equal(everything, np.arange(len(split)))
    cfg = TrainConfig(wall_keep=0.25, seed=4)
    kept = training_rows(task, split, cfg)
    assert np.array_equal(kept, training_rows(task, split, cfg))  # seeded, not global
    assert set(np.flatnonzero(deepest < wall)) <= set(kept)  # every shallower string stays
    at_wall = np.flatnonzero(deepest == wall)
    share = np.isin(at_wall, kept).mean()
    assert len(at_wall) >= 40 and 0.1 < share < 0.45
    other_seed = training_rows(task, split, TrainConfig(wall_keep=0.25, seed=5))
    assert not np.array_equal(kept, other_seed)
    with pytest.raises(IllusionsError, match="reports nesting depths"):
        training_rows(CopyTask(), CopyTask().splits()["train"], cfg)


def test_wall_keep_is_checked_and_left_out_of_the_recipe_at_its_default():
    assert "wall_keep" not in TrainConfig().to_dict()
    assert TrainConfig(wall_keep=0.5).to_dict()["wall_keep"] == 0.5
    assert TrainConfig.from_dict(TrainConfig(wall_keep=0.5).to_dict()) == TrainConfig(wall_keep=0.5)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(IllusionsError, match="wall_keep must lie in"):
            TrainConfig.from_dict({"wall_keep": bad})
