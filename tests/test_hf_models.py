"""Hugging Face model folders as ``--model``: TransformerLens' conversion of a locally saved model gives
the ``transformers`` model's logits, offline; other folders are refused with one line."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hf_fixtures import GATED_KINDS, VOCAB, hf_model, save_hf, write_splits
from illusions.cli import app
from illusions.errors import IllusionsError
from illusions.model_folders import (
    HUGGINGFACE,
    ILLUSIONS,
    inspect_model_folder,
    load_model_folder,
    load_tokenizer,
)
from illusions.models import describe, save_model

runner = CliRunner()
KINDS = ("gpt2", "neox", "llama-gqa", *GATED_KINDS)


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
    # float32 rounding: the Mistral/Qwen2/Gemma models (norm weights and biases moved, a window, soft
    # caps) are compared to 1e-4, the others to assert_close's float32 default (1e-5 absolute)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if kind in GATED_KINDS else {}
    torch.testing.assert_close(got, expected, **tolerance)
    assert describe(model).startswith(folder.architecture)
    # Weights are unprocessed: the residual stream is the Hugging Face model's own.
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        hidden = reference(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hidden[1], **tolerance)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "gemma", "mistral"])
def test_grouped_query_attention_is_ungrouped_per_query_head(folders, kind):
    model = load_model_folder(inspect_model_folder(folders[kind]))
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 7, 9]]))
    assert cache["blocks.0.attn.hook_k"].shape[2] == cache["blocks.0.attn.hook_v"].shape[2] == model.cfg.n_heads == 4


@pytest.mark.parametrize(("kind", "windows"), [
    ("mistral", ["local", "local"]), ("qwen2", ["global", "local"]), ("gemma2", ["local", "global"]),
    ("gemma", None), ("llama-gqa", None),
])
def test_sliding_window_layers_are_those_the_config_gives(folders, kind, windows):
    """The layers ``transformers`` runs in a sliding window are TransformerLens' local ones, with its
    width (the logits above are compared on sequences longer than the window)."""
    cfg = inspect_model_folder(folders[kind]).hooked  # under TransformerLens 4 only the fields given
    assert getattr(cfg, "attn_types", None) == windows
    assert getattr(cfg, "window_size", None) == (hf_model(kind).config.sliding_window if windows else None)


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
    ("unsupported", "is a BertForMaskedLM model; illusions converts GPT2LMHeadModel, GPTNeoXForCausalLM, "
                    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM"),
    ("gemma3", "is a Gemma3ForCausalLM model; illusions converts GPT2LMHeadModel, GPTNeoXForCausalLM, "),
])
def test_other_folders_are_refused_naming_what_was_expected(tmp_path, setup, message):
    folder = tmp_path / "model"
    if setup != "missing":
        folder.mkdir()
    if setup == "junk-config":
        (folder / "config.json").write_text(json.dumps({"hello": 1}))
    if setup in ("no-weights", "unsupported", "gemma3"):
        arch, kind = {"no-weights": ("GPT2LMHeadModel", "gpt2"), "unsupported": ("BertForMaskedLM", "bert"),
                      "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}[setup]
        (folder / "config.json").write_text(json.dumps({"model_type": kind, "architectures": [arch]}))
    if setup in ("unsupported", "gemma3"):
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


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("gemma", {"attention_bias": True}, "this GemmaForCausalLM model has attention or MLP biases"),
    ("mistral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "MistralForCausalLM model has rope scaling"),
    ("gemma2", {"use_bidirectional_attention": True}, "Gemma2ForCausalLM model has bidirectional attention"),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "Qwen2ForCausalLM model has layer types "
                                                                        "['chunked_attention']"),
])
def test_variants_the_conversion_would_get_wrong_are_refused(folders, tmp_path, kind, change, message):
    """Biases where the conversion writes zeros, non-causal attention, attention types TransformerLens
    has no counterpart for: one line, exit code 2, before any weight is read."""
    import shutil

    folder = tmp_path / kind
    shutil.copytree(folders[kind], folder)
    _edit_config(folder, **change)
    assert message in _analyze(folder, tmp_path)


def test_analyze_custom_on_a_gemma2_folder_end_to_end(folders, tmp_path):
    """``analyze custom`` on the Gemma 2 folder (sliding window, soft caps, post-norms, grouped keys):
    the svd proxy at full rank (the head width) agrees everywhere, at rank 1 it does not."""
    data = write_splits(tmp_path / "data")
    head = inspect_model_folder(folders["gemma2"]).hooked.d_head
    args = ["analyze", "custom", "--data", str(data), "--model", str(folders["gemma2"]), "--layer", "0",
            "--layer", "1", "--no-report", "--json", "--threads", "1", "--n-boot", "50"]
    agreements = {}
    for rank in (head, 1):
        result = runner.invoke(app, [*args, "--rank", str(rank), "--out", str(tmp_path / f"r{rank}")],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        agreements[rank] = {s: e["agreement"]["value"] for s, e in doc["splits"].items()}
    assert agreements[head] == {"iid": 1.0, "long": 1.0}
    assert min(agreements[1].values()) < 1.0


def test_hugging_face_model_for_a_bundled_task_is_refused(folders, tmp_path):
    result = runner.invoke(app, ["analyze", "dyck", "--model", str(folders["gpt2"]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Hugging Face model config, not an illusions checkpoint" in result.stderr
    assert not (tmp_path / "r").exists()



# ------------------------------------------------------------------ no code from a model folder ever runs

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


class EvilConfig(GPT2Config):
    model_type = "evil"


class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _code_folder(root, where):
    """A GPT-2 folder with Python of its own that writes a marker file when imported, named by an
    ``auto_map`` in config.json (with an unknown model_type) or in tokenizer_config.json."""
    folder = save_hf("gpt2", root / "model", tokenizer=True)
    marker = root / "marker"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    name = "config.json" if where == "config" else "tokenizer_config.json"
    data = json.loads((folder / name).read_text())
    if where == "config":
        data.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                 "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        data.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / name).write_text(json.dumps(data))
    return folder, marker


def _run_with_a_terminal(argv, cwd, answer=b"y\n" * 8, timeout=240):
    """``python -m illusions ARGV`` with a pseudo-terminal as stdin and stdout (echo off), answering
    every question with ``answer``; stderr apart. Returns ``(exit code, terminal text, stderr)``."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import termios
    import time

    import illusions

    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    src = str(Path(illusions.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRUST_REMOTE_CODE", None)
    proc = subprocess.Popen([sys.executable, "-m", "illusions", *argv], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
    os.close(slave)
    os.write(master, answer)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, seen.decode(errors="replace"), stderr


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_no_code_in_a_model_folder_ever_runs_with_a_terminal_attached(tmp_path, where):
    folder, marker = _code_folder(tmp_path, where)
    data = write_splits(tmp_path / "data")
    code, terminal, stderr = _run_with_a_terminal(
        ["analyze", "custom", "--data", str(data), "--model", str(folder), "--rank", "2", "--threads", "1",
         "--no-report", "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert not marker.exists(), f"the model folder's code ran\n{terminal}\n{stderr}"
    assert "custom code" not in terminal, terminal  # transformers never asked
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, terminal, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "auto_map" in lines[0], stderr
    assert "never runs code from a model folder" in lines[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------- every parameter from the file, or one line (exit 2)


def _edit_weights(folder, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, **changes):
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))


def _nan(state):
    state["transformer.h.1.attn.c_proj.weight"][3, 5] = float("nan")


def _inf(state):
    state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0, 0] = float("-inf")


def _header(size):
    def write(folder):
        (folder / "model.safetensors").write_bytes(size.to_bytes(8, "little") + b'{"a": 1}')
    return write


BROKEN = {
    # item 3: every parameter must come from the file
    "missing-tensor": ("gpt2", lambda f: _edit_weights(f, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias")),
                       "lacks tensor transformer.h.1.mlp.c_fc.bias that the GPT2LMHeadModel of"),
    "unexpected-tensor": ("gpt2", lambda f: _edit_weights(f, lambda s: s.update(extra=torch.zeros(3))),
                          "holds tensor extra, which the GPT2LMHeadModel of"),
    "wrong-shape": ("gpt2", lambda f: _edit_weights(f, lambda s: s.update(
        {"transformer.wpe.weight": torch.zeros(16, 32)})), "tensor transformer.wpe.weight has shape [16, 32], but"),
    "int8-tensor": ("gpt2", lambda f: _edit_weights(f, lambda s: s.update(
        {"transformer.h.0.attn.c_attn.weight": torch.ones(32, 96, dtype=torch.int8)})),
        "tensor transformer.h.0.attn.c_attn.weight is int8, not a floating-point type"),
    "bool-tensor": ("llama-gqa", lambda f: _edit_weights(f, lambda s: s.update(
        {"model.norm.weight": torch.ones(32, dtype=torch.bool)})), "tensor model.norm.weight is bool"),
    "nan-weight": ("gpt2", lambda f: _edit_weights(f, _nan),
                   "tensor transformer.h.1.attn.c_proj.weight holds 1 NaN or infinite value(s)"),
    "inf-weight": ("neox", lambda f: _edit_weights(f, _inf),
                   "tensor gpt_neox.layers.0.mlp.dense_h_to_4h.weight holds 1 NaN or infinite value(s)"),
    "llama-config-over-gpt2-weights": ("gpt2", lambda f: (f / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": VOCAB, "max_position_embeddings": 32})),
        "lacks tensor model.embed_tokens.weight (and 20 more) that the LlamaForCausalLM of"),
    # item 5: damaged weight files and configs
    "truncated-weights": ("gpt2", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-1000]), "is not a readable safetensors file: tensor"),
    "empty-weights": ("gpt2", lambda f: (f / "model.safetensors").write_bytes(b""), "is empty (0 bytes)"),
    "huge-header": ("gpt2", _header(2**62), "its header claims ~10^18 bytes but the file holds 16"),
    "header-over-safetensors-limit": ("gpt2", _header(200 * 2**20),
                                      "its header claims 209,715,200 bytes but the file holds 16"),
    "n-positions-float": ("gpt2", lambda f: _edit_config(f, n_positions=32.0),
                          "n_positions must be a whole number of at least 1, got 32.0"),
    "gpt2-model-type-neox-architecture": ("gpt2", lambda f: _edit_config(f, architectures=["GPTNeoXForCausalLM"]),
                                          "gives model_type 'gpt2' for architecture GPTNeoXForCausalLM, whose "
                                          "model_type is 'gpt_neox'"),
    "n-positions-1e9": ("gpt2", lambda f: _edit_config(f, n_positions=10**9), "more than this machine's"),
    "n-layer-100000": ("llama-gqa", lambda f: _edit_config(f, num_hidden_layers=100_000),
                       "stores at least 921,601,280; the config does not describe these weights"),
    "heads-do-not-divide": ("gpt2", lambda f: _edit_config(f, n_head=5), "width of 32 that its 5 heads do not divide"),
    "unknown-model-type-with-auto-map": ("gpt2", lambda f: _edit_config(f, model_type="evil", auto_map={
        "AutoConfig": "evil.EvilConfig"}), "config.json names code of the folder's own to run (auto_map)"),
    "config-nested-deeply": ("gpt2", lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                             "config.json is not JSON illusions reads (nested too deeply)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_hugging_face_folder_is_one_line(tmp_path, case):
    kind, breaks, message = BROKEN[case]
    folder = save_hf(kind, tmp_path / "model")
    breaks(folder)
    assert message in _analyze(folder, tmp_path)


def test_weights_named_model_bin_are_named_as_they_are(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.bin").write_bytes(b"not loaded")
    line = _analyze(folder, tmp_path)
    assert "only as model.bin, not safetensors" in line and "pytorch_model.bin" not in line


def test_sharded_folder_loads_every_shard_and_records_their_sha256(folders, tmp_path):
    from illusions.io import file_sha256
    from illusions.models import weights_sha256

    hf_model("gpt2").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model = load_model_folder(inspect_model_folder(tmp_path / "sharded"))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), load_model_folder(inspect_model_folder(folders["gpt2"]))(tokens))
    assert weights_sha256(model) == {name: file_sha256(tmp_path / "sharded" / name)
                                     for name in (*shards, "model.safetensors.index.json")}
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.wte.weight"] = "../outside.safetensors"
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(IllusionsError, match="names '../outside.safetensors', which is not a .safetensors file in"):
        inspect_model_folder(tmp_path / "sharded")


def test_a_tied_unembedding_stored_with_other_values_is_refused(tmp_path):
    folder = save_hf("gpt2", tmp_path / "model")
    _edit_weights(folder, lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"] + 1}))
    with pytest.raises(IllusionsError, match="holds lm_head.weight and transformer.wte.weight, which its config ties"):
        load_model_folder(inspect_model_folder(folder))
