"""Hugging Face model folders as ``--model``: TransformerLens' conversion of a locally saved model gives
the ``transformers`` model's logits, offline; other folders are refused with one line."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from typer.testing import CliRunner

from hf_fixtures import VOCAB, hf_model, save_hf, write_splits
from illusions.cli import app
from illusions.errors import IllusionsError
from illusions.models import (
    HUGGINGFACE,
    ILLUSIONS,
    describe,
    inspect_model_folder,
    load_model_folder,
    load_tokenizer,
    save_model,
)

runner = CliRunner()
KINDS = ("gpt2", "neox", "llama-gqa")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_hf(kind, root / kind, tokenizer=kind == "gpt2") for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_converted_model_gives_the_transformers_logits(folders, kind):
    folder = inspect_model_folder(folders[kind])
    assert folder.kind == HUGGINGFACE and folder.d_vocab == VOCAB and folder.n_ctx == 32
    model = load_model_folder(folder)
    reference = hf_model(kind)  # the same seed: the weights that were saved
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, expected)
    assert describe(model).startswith(folder.architecture)
    # Weights are unprocessed: the residual stream is the Hugging Face model's own.
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        hidden = reference(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hidden[1])


def test_grouped_query_attention_is_ungrouped_per_query_head(folders):
    model = load_model_folder(inspect_model_folder(folders["llama-gqa"]))
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 7, 9]]))
    assert cache["blocks.0.attn.hook_k"].shape[2] == model.cfg.n_heads == 4


def test_loading_never_touches_the_network(folders, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = inspect_model_folder(folders["gpt2"])
    load_model_folder(folder)
    tokenizer = load_tokenizer(folder)
    assert tokenizer is not None and tokenizer("w0 w1")["input_ids"] == [2, 3]


def test_illusions_checkpoint_is_read_as_before(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt", meta={"task": {"task": "toy"}})
    folder = inspect_model_folder(tmp_path / "ckpt")
    assert folder.kind == ILLUSIONS and folder.d_vocab == tiny_model.cfg.d_vocab
    tokens = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(load_model_folder(folder)(tokens), tiny_model(tokens))
    assert load_tokenizer(folder) is None


def _analyze(model, tmp_path):
    data = write_splits(tmp_path / "data")
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "custom", "--data", str(data), "--model", str(model), "--rank", "2",
                                 "--threads", "1", "--no-report", "--out", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()
    return lines[0]


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "convert it to safetensors" in _analyze(folder, tmp_path)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "does not exist or is not a directory; expected an illusions checkpoint"),
    ("empty", "has no config.json; expected an illusions checkpoint"),
    ("junk-config", "is neither an illusions model config"),
    ("no-weights", "has a Hugging Face config.json but no model.safetensors"),
    ("unsupported", "illusions converts GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM"),
])
def test_other_folders_are_refused_naming_what_was_expected(tmp_path, setup, message):
    folder = tmp_path / "model"
    if setup != "missing":
        folder.mkdir()
    if setup == "junk-config":
        (folder / "config.json").write_text(json.dumps({"hello": 1}))
    if setup in ("no-weights", "unsupported"):
        arch, kind = ("GPT2LMHeadModel", "gpt2") if setup == "no-weights" else ("BertForMaskedLM", "bert")
        (folder / "config.json").write_text(json.dumps({"model_type": kind, "architectures": [arch]}))
    if setup == "unsupported":
        (folder / "model.safetensors").write_bytes(b"")
    assert message in _analyze(folder, tmp_path)


def test_rope_scaling_is_refused(tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, max_position_embeddings=32,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(IllusionsError, match="rope scaling 'linear'"):
        inspect_model_folder(tmp_path / "m")


def test_hugging_face_model_for_a_bundled_task_is_refused(folders, tmp_path):
    result = runner.invoke(app, ["analyze", "dyck", "--model", str(folders["gpt2"]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Hugging Face model config, not an illusions checkpoint" in result.stderr
    assert not (tmp_path / "r").exists()

