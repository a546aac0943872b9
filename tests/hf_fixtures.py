"""Small random Hugging Face models and tokenizers written with ``save_pretrained``, for the tests of
``--model`` folders and task ``custom``. Nothing is downloaded: configs, weights and a word-level
tokenizer are all built here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 40
N_CTX = 32
WORDS = ["<pad>", "<bos>", *[f"w{i}" for i in range(VOCAB - 2)]]
# The Llama-like kinds whose conversion TransformerLens writes for Mistral, Qwen2, Gemma and Gemma 2.
GATED_KINDS = ("mistral", "qwen2", "gemma", "gemma2")


def hf_model(kind: str, *, seed: int = 0) -> Any:
    """A 2-layer random model of ``kind`` (gpt2, neox, llama-gqa, mistral, qwen2, gemma, gemma2),
    initialised with a wide enough range that attention is far from uniform (so a low-rank proxy
    visibly changes it). The Mistral/Qwen2/Gemma ones have what sets their conversion apart in play:
    a sliding window shorter than the sequences tested, Qwen2's query/key/value biases and the norm
    weights moved away from their initial ones and zeros (so a bias or Gemma's ``1 + weight`` left out
    changes the logits), a head width that is not width / heads, Gemma 2's query scale and soft caps."""
    import transformers as tf

    common = {"vocab_size": VOCAB, "initializer_range": 0.3, "bos_token_id": 1, "eos_token_id": 1,
              "pad_token_id": 0}
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=N_CTX, **common)
        cls = tf.GPT2LMHeadModel
    elif kind == "neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=N_CTX, rotary_pct=0.5, **common)
        cls = tf.GPTNeoXForCausalLM
    elif kind == "llama-gqa":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=N_CTX, **common)
        cls = tf.LlamaForCausalLM
    elif kind in GATED_KINDS:
        sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                 "max_position_embeddings": N_CTX, **common}
        cfg, cls = {
            # every query head with its own key/value head, every layer in a window of 5 positions
            "mistral": lambda: (tf.MistralConfig(**sizes, num_key_value_heads=4, sliding_window=5),
                                tf.MistralForCausalLM),
            # grouped-query attention; the window on the second layer only (layers from max_window_layers)
            "qwen2": lambda: (tf.Qwen2Config(**sizes, num_key_value_heads=2, use_sliding_window=True,
                                             sliding_window=5, max_window_layers=1), tf.Qwen2ForCausalLM),
            "gemma": lambda: (tf.GemmaConfig(**sizes, num_key_value_heads=2, head_dim=16), tf.GemmaForCausalLM),
            "gemma2": lambda: (tf.Gemma2Config(**sizes, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                               query_pre_attn_scalar=12, attn_logit_softcapping=4.0,
                                               final_logit_softcapping=3.0), tf.Gemma2ForCausalLM),
        }[kind]()
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
        if kind in GATED_KINDS:
            with torch.no_grad():
                for name, value in model.named_parameters():
                    if name.endswith(("norm.weight", "bias")):
                        value.add_(0.3 * torch.randn_like(value))
    return model.eval()


def word_tokenizer(*, bos: bool = False) -> Any:
    """A whitespace word-level tokenizer over :data:`WORDS` (``<pad>`` = 0, ``<bos>`` = 1); with
    ``bos`` its post-processor puts ``<bos>`` before every text it encodes with special tokens (as
    Llama's tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>")


def save_hf(kind: str, path: Path, *, tokenizer: bool = False, bos: bool = False) -> Path:
    """``save_pretrained`` a model of ``kind`` (and the word tokenizer, adding a BOS with ``bos``)
    into ``path``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_model(kind).save_pretrained(path)
    if tokenizer:
        word_tokenizer(bos=bos).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    """One line per row (a dict as JSON, a string as it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def random_rows(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int = VOCAB) -> list[dict[str, Any]]:
    """``n`` sequences of ``lo..hi`` tokens (BOS first) with a string and an integer meta column."""
    rows = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        tokens = [1, *rng.integers(2, vocab, length - 1).tolist()]
        rows.append({"tokens": tokens, "meta": {"parity": ["even" if p % 2 == 0 else "odd" for p in range(length - 1)],
                                                 "position": list(range(length - 1))}})
    return rows


def write_splits(data: Path, *, seed: int = 0, vocab: int = VOCAB, long_max: int = N_CTX) -> Path:
    """``train`` (fitting), ``iid`` (reference) and ``long`` splits of random sequences."""
    rng = np.random.default_rng(seed)
    write_jsonl(data / "train.jsonl", random_rows(rng, 80, 6, 14, vocab))
    write_jsonl(data / "iid.jsonl", random_rows(rng, 30, 6, 14, vocab))
    write_jsonl(data / "long.jsonl", random_rows(rng, 30, 15, long_max, vocab))
    return data
