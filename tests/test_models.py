from __future__ import annotations

import json

import pytest
import torch

from illusions.errors import IllusionsError
from illusions.io import MANIFEST_FILE
from illusions.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    build_model,
    load_model,
    model_config_of,
    save_model,
)


def test_round_trip_gives_bit_identical_logits(tiny_model, tiny_tokens, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt", meta={"task": "toy"})
    loaded, meta = load_model(tmp_path / "ckpt")
    assert meta == {"task": "toy"}
    with torch.no_grad():
        assert torch.equal(tiny_model(tiny_tokens), loaded(tiny_tokens))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE]


def test_attention_only_round_trip(tiny_tokens, tmp_path):
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=0, n_ctx=20, d_vocab=13,
                      normalization="none")
    model = build_model(cfg, seed=3)
    assert model_config_of(model) == cfg
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(tiny_tokens), loaded(tiny_tokens))


def test_same_seed_same_weights_and_global_rng_untouched(tiny_config):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(tiny_config, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "build_model must not consume or reseed the global RNG"
    b = build_model(tiny_config, seed=7)
    c = build_model(tiny_config, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.W_E, c.W_E)


def test_missing_directory(tmp_path):
    with pytest.raises(IllusionsError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).unlink()
    with pytest.raises(IllusionsError, match=CONFIG_FILE):
        load_model(tmp_path / "m")


def test_missing_weights(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(IllusionsError, match=WEIGHTS_FILE):
        load_model(tmp_path / "m")


def test_corrupt_config(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(IllusionsError, match=f"{CONFIG_FILE} is not valid JSON"):
        load_model(tmp_path / "m")


def test_corrupt_weights(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IllusionsError, match=f"{WEIGHTS_FILE} does not match the sha256 recorded"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / MANIFEST_FILE).unlink()  # a checkpoint from before manifests: safetensors' own check
    with pytest.raises(IllusionsError, match=f"{WEIGHTS_FILE} is truncated or not a safetensors file: its header "
                                             "claims [0-9,]+ bytes but the file holds 100$"):
        load_model(tmp_path / "m")


def test_random_bytes_inside_the_weights_are_refused(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-200:-100] = bytes(range(100))  # inside the tensor data: safetensors cannot notice
    path.write_bytes(bytes(data))
    with pytest.raises(IllusionsError, match=f"{WEIGHTS_FILE} does not match the sha256 recorded.*damaged"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / MANIFEST_FILE).unlink()
    load_model(tmp_path / "m")  # what happened before: it loads, with changed weights


def test_unknown_config_key_names_key_and_file(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    data = json.loads(path.read_text())
    data["model"]["n_experts"] = 8
    path.write_text(json.dumps(data))
    with pytest.raises(IllusionsError, match=rf"n_experts.*{CONFIG_FILE}"):
        load_model(tmp_path / "m")


def test_weights_that_do_not_match_config(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / MANIFEST_FILE).unlink()  # else the edit itself is refused first
    path = tmp_path / "m" / CONFIG_FILE
    data = json.loads(path.read_text())
    d_mlp = data["model"]["d_mlp"]
    data["model"]["d_mlp"] = 4 * d_mlp
    path.write_text(json.dumps(data))
    with pytest.raises(IllusionsError, match="holds [0-9,]+ values but the model of .* stores at least [0-9,]+; "
                                             "the config does not describe these weights"):
        load_model(tmp_path / "m")
    data["model"]["d_mlp"] = d_mlp // 2  # fewer values than the file holds: the shapes tell
    path.write_text(json.dumps(data))
    with pytest.raises(IllusionsError, match=rf"tensor blocks.0.mlp.W_in has shape \[\d+, {d_mlp}\], but the model "
                                             rf"of .*config.json needs \[\d+, {d_mlp // 2}\]"):
        load_model(tmp_path / "m")


def test_invalid_config_value():
    with pytest.raises(IllusionsError, match="normalization"):
        ModelConfig.from_dict({"normalization": "batchnorm"})
    with pytest.raises(IllusionsError, match="must be an integer"):
        ModelConfig.from_dict({"d_model": "wide"})


def test_save_model_never_replaces_a_hugging_face_folder(tiny_model, tmp_path):
    """Same file names (config.json + model.safetensors), another program's: not a checkpoint of ours."""
    from illusions.io import ownership
    from illusions.models import CHECKPOINT

    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / CONFIG_FILE).write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (hf / WEIGHTS_FILE).write_bytes(b"their weights")
    assert ownership(hf, CHECKPOINT).state == "foreign"
    with pytest.raises(IllusionsError, match="not written by illusions"):
        save_model(tiny_model, hf)
    assert (hf / WEIGHTS_FILE).read_bytes() == b"their weights"
    # A checkpoint from before manifests is recognised by its config's format and may be replaced.
    save_model(tiny_model, tmp_path / "old")
    (tmp_path / "old" / MANIFEST_FILE).unlink()
    assert ownership(tmp_path / "old", CHECKPOINT).state == "ours"
    save_model(tiny_model, tmp_path / "old")


def test_size_check_counts_parameters_and_attention_before_allocating(monkeypatch):
    from illusions import weights

    monkeypatch.setattr(weights, "memory_available", lambda: 10**9)
    cfg = ModelConfig(n_layers=8, d_model=1024, n_heads=8, d_head=128, d_mlp=4096, n_ctx=128, d_vocab=50)
    assert 8 * 12 * 1024**2 < weights.min_parameters(cfg) < 8 * 13 * 1024**2  # 8 layers of 4d^2 + 8d^2
    weights.check_model_size(cfg)  # ~100M parameters: 0.4 GB for inference
    with pytest.raises(IllusionsError, match=r"recipe r.toml \(n_layers=8, .*\) needs about 1.5 GiB for its "
                                             r"[0-9,]+\+ parameters \([0-9,]+ in the blocks\) and their training state .* 0.9 GiB of memory"):
        weights.check_model_size(cfg, what="recipe r.toml", training=True)
    wide = cfg.replace(n_layers=1, d_model=64, d_head=8, d_mlp=64, n_ctx=20_000)  # attention, not parameters
    with pytest.raises(IllusionsError, match="the attention of one 20,000-token sequence"):
        weights.check_model_size(wide)
    absurd = cfg.replace(n_layers=10**5000)  # no int too long to print, no float overflow
    with pytest.raises(IllusionsError, match=r"n_layers=~10\^5000, .* needs about ~10\^50[0-9]+ bytes"):
        weights.check_model_size(absurd)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("blocks.1.attn.W_K"), "lacks tensor blocks.1.attn.W_K that the model of"),
    (lambda s: s.update(extra=torch.zeros(2)), "holds tensor extra, which the model of"),
    (lambda s: s.update({"blocks.0.ln1.w": s["blocks.0.ln1.w"].to(torch.int8)}), "blocks.0.ln1.w is int8"),
    (lambda s: s["unembed.W_U"].view(-1).__setitem__(3, float("inf")), "tensor unembed.W_U holds 1 NaN or infinite"),
    (lambda s: s.update({"blocks.0.attn.IGNORE": torch.tensor(0.0)}), "the fixed buffer blocks.0.attn.IGNORE differs"),
])
def test_every_parameter_of_a_checkpoint_comes_from_its_file(tiny_model, tmp_path, change, message):
    from safetensors.torch import load_file, save_file

    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / MANIFEST_FILE).unlink()  # a checkpoint made by hand: only the contents can tell
    state = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    change(state)
    save_file(state, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(IllusionsError, match=message.replace("(", r"\(")):
        load_model(tmp_path / "m")


def test_loaded_checkpoint_keeps_the_sha256_of_its_weights(tiny_model, tmp_path):
    from illusions.io import file_sha256
    from illusions.models import weights_sha256

    save_model(tiny_model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert weights_sha256(loaded) == {WEIGHTS_FILE: file_sha256(tmp_path / "m" / WEIGHTS_FILE)}
    assert weights_sha256(tiny_model) is None  # built here, not loaded


def test_a_garbled_manifest_does_not_switch_the_check_off(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / MANIFEST_FILE).write_text("{")
    with pytest.raises(IllusionsError, match=f"{MANIFEST_FILE} is damaged"):
        load_model(tmp_path / "m")
