"""collect(): batched activations with PAD positions dropped, on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from illusions.activations import as_mask, collect, hook_layer, mask_from_lengths, stop_layer
from illusions.errors import IllusionsError

LENGTHS = torch.tensor([16, 10, 12, 5, 16, 8])
NAMES = ["blocks.0.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.hook_resid_pre"]


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


def test_shapes_per_head_and_whole(tiny_model, tiny_tokens, tiny_config):
    acts = collect(tiny_model, tiny_tokens, NAMES, LENGTHS)
    n = int(LENGTHS.sum())
    assert acts["blocks.0.attn.hook_q"].shape == (n, tiny_config.n_heads, tiny_config.d_head)
    assert acts["blocks.1.attn.hook_k"].shape == (n, tiny_config.n_heads, tiny_config.d_head)
    assert acts["blocks.1.hook_resid_pre"].shape == (n, tiny_config.d_model)


def test_values_are_the_cache_at_kept_positions_in_row_major_order(tiny_model, tiny_tokens):
    acts = collect(tiny_model, tiny_tokens, NAMES, LENGTHS, batch_size=4)
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    mask = mask_from_lengths(LENGTHS, tiny_tokens.shape[1])
    for name in NAMES:
        torch.testing.assert_close(acts[name], cache[name][mask])
    # row-major: the first LENGTHS[0] rows are sequence 0, positions 0..15 in order
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"][:16], cache["blocks.1.hook_resid_pre"][0])


def test_pad_positions_are_dropped_and_cannot_leak(tiny_model, tiny_tokens):
    before = collect(tiny_model, tiny_tokens, NAMES, LENGTHS)
    scrambled = tiny_tokens.clone()
    mask = mask_from_lengths(LENGTHS, tiny_tokens.shape[1])
    scrambled[~mask] = (scrambled[~mask] + 5) % 13
    after = collect(tiny_model, scrambled, NAMES, LENGTHS)
    for name in NAMES:
        torch.testing.assert_close(after[name], before[name])


def test_batch_size_does_not_change_the_result(tiny_model, tiny_tokens):
    one = collect(tiny_model, tiny_tokens, NAMES, LENGTHS, batch_size=1)
    all_ = collect(tiny_model, tiny_tokens, NAMES, LENGTHS, batch_size=64)
    for name in NAMES:
        torch.testing.assert_close(one[name], all_[name])


def test_mask_and_lengths_agree_and_numpy_is_accepted(tiny_model, tiny_tokens):
    mask = mask_from_lengths(LENGTHS, tiny_tokens.shape[1])
    a = collect(tiny_model, tiny_tokens.numpy(), NAMES[:1], LENGTHS.numpy())
    b = collect(tiny_model, tiny_tokens, NAMES[:1], mask)
    torch.testing.assert_close(a[NAMES[0]], b[NAMES[0]])


def test_stops_after_the_deepest_hooked_block_and_leaves_no_hooks(tiny_model, tiny_tokens):
    def forbidden(activation, hook):
        raise AssertionError("block 1 ran although only block-0 hooks were asked for")

    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", forbidden)]):
        acts = collect(tiny_model, tiny_tokens, ["blocks.0.attn.hook_q", "blocks.0.hook_resid_post"], LENGTHS)
    assert set(acts) == {"blocks.0.attn.hook_q", "blocks.0.hook_resid_post"}
    assert _no_hooks_left(tiny_model)
    assert stop_layer(tiny_model, ["hook_embed"]) == 0
    assert stop_layer(tiny_model, ["blocks.1.attn.hook_q", "blocks.0.hook_resid_pre"]) == 2
    assert stop_layer(tiny_model, ["ln_final.hook_normalized"]) is None
    assert hook_layer("blocks.12.attn.hook_k") == 12 and hook_layer("hook_embed") is None


def test_forward_ends_once_every_requested_hook_fired(tiny_model, tiny_tokens):
    def forbidden(activation, hook):
        raise AssertionError("the forward pass went on after the last requested hook")

    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", forbidden)]):
        acts = collect(tiny_model, tiny_tokens, ["blocks.1.attn.hook_k", "blocks.0.attn.hook_q"], LENGTHS)
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    mask = mask_from_lengths(LENGTHS, tiny_tokens.shape[1])
    torch.testing.assert_close(acts["blocks.1.attn.hook_k"], cache["blocks.1.attn.hook_k"][mask])
    assert _no_hooks_left(tiny_model)


def test_rows_in_any_length_order_come_back_in_input_order(tiny_model, tiny_tokens):
    """Batches run shortest first; the result is still row-major in the order given."""
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = collect(tiny_model, tiny_tokens[order], NAMES, LENGTHS[order], batch_size=2)
    _, cache = tiny_model.run_with_cache(tiny_tokens[order])
    mask = mask_from_lengths(LENGTHS[order], tiny_tokens.shape[1])
    for name in NAMES:
        torch.testing.assert_close(shuffled[name], cache[name][mask])
    # A row with nothing kept contributes nothing and shifts nobody.
    lengths = LENGTHS.clone()
    lengths[2] = 0
    partial = collect(tiny_model, tiny_tokens, NAMES[:1], lengths, batch_size=2)
    _, plain = tiny_model.run_with_cache(tiny_tokens)
    torch.testing.assert_close(partial[NAMES[0]], plain[NAMES[0]][mask_from_lengths(lengths, tiny_tokens.shape[1])])


def test_max_positions_cuts_wide_batches_and_keeps_the_values(tiny_model, tiny_tokens):
    plain = collect(tiny_model, tiny_tokens, NAMES, LENGTHS)
    # 20 positions: the two shortest rows (5 and 8) share a pass, every other row goes alone.
    capped = collect(tiny_model, tiny_tokens, NAMES, LENGTHS, max_positions=20)
    for name in NAMES:
        torch.testing.assert_close(capped[name], plain[name])
    with pytest.raises(IllusionsError, match="max_positions must be at least 1"):
        collect(tiny_model, tiny_tokens, NAMES, LENGTHS, max_positions=0)


def test_bad_input_raises_one_clear_error(tiny_model, tiny_tokens):
    with pytest.raises(IllusionsError, match=r"unknown hook 'blocks.1.attn.hook_query'.*layers 0..1.*hook_q"):
        collect(tiny_model, tiny_tokens, ["blocks.1.attn.hook_query"], LENGTHS)
    with pytest.raises(IllusionsError, match="attention patterns"):
        collect(tiny_model, tiny_tokens, ["blocks.1.attn.hook_pattern"], LENGTHS)
    with pytest.raises(IllusionsError, match=r"lengths must lie in 0..16"):
        collect(tiny_model, tiny_tokens, NAMES, LENGTHS + 1)
    with pytest.raises(IllusionsError, match="mask covers"):
        as_mask(tiny_tokens, torch.ones(6, 15, dtype=torch.bool))
    with pytest.raises(IllusionsError, match="no positions"):
        collect(tiny_model, tiny_tokens, NAMES, torch.zeros(6, dtype=torch.long))
