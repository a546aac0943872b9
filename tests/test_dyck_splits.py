"""The Dyck sampler and splits: validity, the sampling law, split definitions, seeds and the cache."""

from __future__ import annotations

import dataclasses
import mmap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illusions.tasks.dyck import SPLIT_NAMES, DyckConfig, DyckTask, score
from illusions.tasks.dyck_sampler import sample

# Small enough to build in a fraction of a second, big enough that every split is non-trivial.
SMALL = DyckConfig(n_train=3000, n_eval=60, max_len=64, short_max_brackets=20, ood_depth_max=13)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_types=st.integers(1, 5),
    max_depth=st.integers(1, 6),
    max_len=st.integers(8, 48),
    min_brackets=st.sampled_from([0, 2, 4, 6]),
)
def test_every_sampled_string_is_balanced_within_depth_and_length(
    seed, n_types, max_depth, max_len, min_brackets
):
    s = sample(
        np.random.default_rng(seed),
        40,
        n_types=n_types,
        max_depth=max_depth,
        max_len=max_len,
        min_brackets=min_brackets,
    )
    tokens, lengths = s.tokens.astype(np.int64), s.lengths
    assert tokens.shape == (40, max_len) and s.accepted >= 40 and s.drawn >= s.accepted
    rows = np.arange(40)
    assert np.all(tokens[:, 0] == 1) and np.all(tokens[rows, lengths - 1] == 2)
    assert np.all(lengths <= max_len) and np.all(lengths - 2 >= min_brackets)
    sc = score(
        tokens, lengths, min_distance=1, n_types=n_types
    )  # raises unless balanced and matching
    assert len(sc) * 2 == (lengths - 2).sum()
    assert np.all(sc.meta["max_depth"] <= max_depth)


def test_sampling_law_of_short_strings():
    # Depth limit 2 makes strings near the length cap astronomically rare, so there are no
    # rejections in effect and the probabilities are the process's own: END 1/2 on an empty stack,
    # each opener 1/(2k), close 1/2 below the limit, forced close at the limit.
    k, n = 2, 40_000
    s = sample(np.random.default_rng(1), n, n_types=k, max_depth=2, max_len=200, min_brackets=0)
    assert s.drawn == s.accepted
    texts = [tuple(r[:ln].tolist()) for r, ln in zip(s.tokens, s.lengths, strict=True)]
    for string, p in [
        ((1, 2), 1 / 2),  # END at once
        ((1, 3, 5, 2), 1 / 4 * 1 / 2 * 1 / 2),  # (a a)
        ((1, 4, 6, 2), 1 / 4 * 1 / 2 * 1 / 2),  # (b b)
        (
            (1, 3, 4, 6, 5, 2),
            1 / 4 * 1 / 4 * 1 * 1 / 2 * 1 / 2,
        ),  # (a (b b) a): forced close at depth 2
        ((1, 3, 5, 3, 5, 2), (1 / 4 * 1 / 2) ** 2 * 1 / 2),  # (a a) (a a)
    ]:
        freq = texts.count(string) / n
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (string, freq, p)


def test_short_strings_are_redrawn():
    s = sample(np.random.default_rng(3), 2000, n_types=2, max_depth=2, max_len=200, min_brackets=4)
    assert s.lengths.min() == 6  # 4 brackets plus START and END occur, fewer never
    # About 5/8 of draws have fewer than 4 brackets (0: 1/2, 2: 1/8) and are re-drawn.
    assert s.accepted / s.drawn == pytest.approx(3 / 8, abs=0.03)


def test_depth_limit_forces_a_close():
    s = sample(np.random.default_rng(2), 500, n_types=3, max_depth=1, max_len=30, min_brackets=4)
    assert np.all(score(s.tokens, s.lengths, min_distance=1, n_types=3).meta["distance"] == 1)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[DyckTask, dict]:
    task = DyckTask(SMALL, cache_dir=tmp_path_factory.mktemp("dyck"))
    return task, task.splits()


def _strings(task: DyckTask, split) -> list[str]:
    return [task.decode(split.tokens[i, : split.lengths[i]]) for i in range(len(split))]


def test_split_names_sizes_and_types(small):
    task, splits = small
    assert tuple(splits) == SPLIT_NAMES
    for name, split in splits.items():
        assert len(split) == (SMALL.n_train if name == "train" else SMALL.n_eval)
        assert split.tokens.dtype == np.int64 and split.name == name and split.description
        assert split.tokens.shape[1] == split.lengths.max()
        assert all(v.dtype == np.int64 for v in split.scored.meta.values())


def test_split_membership_matches_its_definition(small):
    # An independent oracle: Python sets of decoded strings and per-string segment tuples.
    task, splits = small
    train = set(_strings(task, splits["train"]))
    train_segments = {seg for s in train for seg in task.structure(task.encode(s))}
    for name in SPLIT_NAMES[1:]:
        split = splits[name]
        assert len(split) > 0, name  # an empty split would pass every check below
        for text in _strings(task, split):
            ids = task.encode(text)
            structure = task.structure(ids)
            brackets = len(ids) - 2
            assert text not in train, name
            assert len(ids) <= SMALL.max_len and brackets >= SMALL.min_brackets
            depth = max(max(s) for s in structure)
            if name == "unseen_depth":
                assert SMALL.ood_depth_min <= depth <= SMALL.ood_depth_max
                continue
            assert depth <= SMALL.max_depth
            unseen = [s for s in structure if s not in train_segments]
            if name == "seen_struct":
                assert not unseen
            elif name == "unseen_struct_short":
                assert unseen and brackets <= SMALL.short_max_brackets
            elif name == "unseen_struct_long":
                assert unseen and brackets > SMALL.short_max_brackets
            assert task.classify(ids) == name if name != "iid" else task.classify(ids) != "train"


def test_scored_positions_use_the_configured_filter(small):
    task, splits = small
    for split in splits.values():
        sc = split.scored
        assert np.all(sc.meta["distance"] >= SMALL.min_distance)
        np.testing.assert_array_equal(split.tokens[sc.seq, sc.pos + 1], sc.target)
        np.testing.assert_array_equal(
            split.tokens[sc.seq, sc.meta["key_pos"]] + SMALL.n_types, sc.target
        )
        np.testing.assert_array_equal(sc.meta["depth"], sc.meta["key_depth"])
        again = score(
            split.tokens, split.lengths, min_distance=SMALL.min_distance, n_types=SMALL.n_types
        )
        np.testing.assert_array_equal(again.pos, sc.pos)


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[n].tokens, b[n].tokens) for n in SPLIT_NAMES)


def test_same_seed_same_splits_and_different_seed_different(small, tmp_path):
    _, splits = small
    again = DyckTask(SMALL, cache_dir=tmp_path / "a").splits()
    assert _same(splits, again)
    other = DyckTask(SMALL.replace(seed=1), cache_dir=tmp_path / "b").splits()
    assert all(not np.array_equal(splits[n].tokens, other[n].tokens) for n in SPLIT_NAMES)


def test_each_split_has_its_own_generator(small, tmp_path):
    # More evaluation strings leave the training set untouched, and vice versa for the depth split.
    _, splits = small
    more = DyckTask(SMALL.replace(n_eval=80), cache_dir=tmp_path).splits()
    np.testing.assert_array_equal(more["train"].tokens, splits["train"].tokens)
    np.testing.assert_array_equal(
        more["unseen_depth"].tokens[:60, : splits["unseen_depth"].tokens.shape[1]],
        splits["unseen_depth"].tokens,
    )


def test_cache_is_reused_and_keyed_by_config(small, tmp_path):
    task, splits = small
    assert task.cache_path.exists() and task.cache_path.suffix == ".npz"
    with np.load(task.cache_path, allow_pickle=False) as z:  # no object arrays inside
        assert "train.tokens" in z.files
    reloaded = DyckTask(SMALL, cache_dir=task.cache_dir)
    assert reloaded.is_cached()
    loaded = reloaded.splits(progress=lambda msg: pytest.fail(f"regenerated: {msg}"))
    assert _same(splits, loaded)
    # Loading maps the stored int64 arrays instead of reading and converting them.
    train = loaded["train"]
    for array in (train.tokens, train.lengths, train.scored.seq, train.scored.meta["key_depth"]):
        assert array.dtype == np.int64 and isinstance(array.base, mmap.mmap)
    for n in SPLIT_NAMES:
        np.testing.assert_array_equal(
            loaded[n].scored.meta["distance"], splits[n].scored.meta["distance"]
        )
    assert (
        DyckTask(SMALL.replace(min_distance=1), cache_dir=task.cache_dir).cache_path
        != task.cache_path
    )


def test_corrupt_cache_is_rebuilt(small, tmp_path):
    _, splits = small
    task = DyckTask(SMALL, cache_dir=tmp_path)
    task.cache_path.parent.mkdir(parents=True, exist_ok=True)
    task.cache_path.write_bytes(b"not a zip file")
    assert _same(task.splits(), splits)
    with np.load(task.cache_path, allow_pickle=False) as z:
        assert z["train.tokens"].shape[0] == SMALL.n_train


def _corrupt_array(path, array: np.ndarray, index: int, value: int) -> None:
    """Write ``value`` over element ``index`` of ``array`` where it is stored in the file at ``path``."""
    data = bytearray(path.read_bytes())
    start = data.find(array.tobytes()[:4096])
    assert start >= 0
    offset = start + index * array.itemsize
    data[offset : offset + array.itemsize] = np.array(value, dtype=array.dtype).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("split", "value"), [("iid", 7), ("unseen_depth", 200)])
def test_a_changed_array_in_the_cache_is_noticed_and_rebuilt(small, tmp_path, caplog, split, value):
    # The file stays a valid .npz; before checksums the changed token was used as is (silently
    # different statistics, then an IndexError in the embedding for an id outside the vocabulary).
    task0, splits = small
    task = DyckTask(SMALL, cache_dir=tmp_path)
    task.cache_path.write_bytes(task0.cache_path.read_bytes())
    _corrupt_array(task.cache_path, splits[split].tokens, 3, value)
    with caplog.at_level("WARNING", logger="illusions"):
        rebuilt = task.splits()
    assert _same(rebuilt, splits)
    assert any("damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert DyckTask(SMALL, cache_dir=tmp_path).splits(progress=lambda m: pytest.fail(m)) is not None


def test_token_ids_outside_the_vocabulary_are_refused_on_load(small, tmp_path, caplog):
    # Checksums that match do not make ids valid: a cache written with bad ids is rebuilt too.
    from illusions.tasks import dyck_splits

    task0, splits = small
    bad = dict(splits)
    tokens = splits["iid"].tokens.copy()
    tokens[0, 1] = 43
    bad["iid"] = dataclasses.replace(splits["iid"], tokens=tokens)
    path = tmp_path / task0.cache_path.name
    dyck_splits.save(path, SMALL, bad, task0.sampling_stats())
    with caplog.at_level("WARNING", logger="illusions"):
        assert dyck_splits.load(path, SMALL) is None
    assert any("iid tokens holds token ids 0..43, outside 0..42" in r.getMessage() for r in caplog.records)


def test_sampling_stats_report_acceptance(small):
    task, _ = small
    stats = task.sampling_stats()
    assert set(stats) == set(SPLIT_NAMES)
    for name in SPLIT_NAMES[1:]:
        s = stats[name]
        assert s["kept"] >= SMALL.n_eval and 0 < s["acceptance"] <= 1
        assert s["acceptance"] == pytest.approx(s["kept"] / s["candidates"])


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000))
def test_membership_holds_for_other_seeds(seed, tmp_path):
    cfg = SMALL.replace(seed=seed, n_train=1500, n_eval=30)
    task = DyckTask(cfg, cache_dir=tmp_path / str(seed))
    splits = task.splits()
    train = set(_strings(task, splits["train"]))
    for name in SPLIT_NAMES[1:]:
        assert not train & set(_strings(task, splits[name]))
    for name in ("seen_struct", "unseen_struct_short", "unseen_struct_long"):
        assert {
            task.classify(splits[name].tokens[i, : splits[name].lengths[i]]) for i in range(30)
        } == {name}


def test_an_empty_split_fails_with_a_clear_error(tmp_path, monkeypatch):
    from illusions.errors import IllusionsError
    from illusions.tasks import dyck_splits

    # Every string of at most 4 brackets has segment structures (1, 0) and (1, 2, 1, 0), both in train.
    monkeypatch.setattr(dyck_splits, "MAX_CANDIDATES", 20_000)
    task = DyckTask(SMALL.replace(short_max_brackets=4), cache_dir=tmp_path)
    with pytest.raises(IllusionsError, match="split unseen_struct_short found only 0 of 60"):
        task.splits()
    assert not task.cache_path.exists()
