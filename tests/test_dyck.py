"""Tokenizer, parser, structure and scoring of Dyck strings, driven by one hand-checked table."""

from __future__ import annotations

import numpy as np
import pytest

from illusions.errors import IllusionsError
from illusions.tasks.dyck import (
    DyckConfig,
    DyckTask,
    depth_after,
    depth_sequence,
    score,
    segment_keys,
    segments,
    string_keys,
)

K = 20


def closer(letter: str) -> int:
    return 3 + K + ord(letter) - ord("a")


# One example table (DESIGN.md): text, depth after each bracket, segment structures, and every
# closer as (query position, opener position, distance, depth, true closer). Token positions count
# START as 0, so the first bracket is position 1 and a closer at position c has query position c-1.
EXAMPLES = [
    dict(
        text="(a a) (b b)",
        depths=[1, 0, 1, 0],
        segments=[(1, 0), (1, 0)],
        closers=[(1, 1, 1, 1, "a"), (3, 3, 1, 1, "b")],
    ),
    dict(
        text="(a (b b) a)",
        depths=[1, 2, 1, 0],
        segments=[(1, 2, 1, 0)],
        closers=[(2, 2, 1, 2, "b"), (3, 1, 3, 1, "a")],
    ),
    dict(
        # Same length as the next one, different structure: their segment keys must differ.
        text="(a (b (c c) b) a)",
        depths=[1, 2, 3, 2, 1, 0],
        segments=[(1, 2, 3, 2, 1, 0)],
        closers=[(3, 3, 1, 3, "c"), (4, 2, 3, 2, "b"), (5, 1, 5, 1, "a")],
    ),
    dict(
        text="(a (b b) (c c) a)",
        depths=[1, 2, 1, 2, 1, 0],
        segments=[(1, 2, 1, 2, 1, 0)],
        closers=[(2, 2, 1, 2, "b"), (4, 4, 1, 2, "c"), (5, 1, 5, 1, "a")],
    ),
    dict(
        text="(c (a a) (b (d d) b) c) (e e)",
        depths=[1, 2, 1, 2, 3, 2, 1, 0, 1, 0],
        segments=[(1, 2, 1, 2, 3, 2, 1, 0), (1, 0)],
        closers=[
            (2, 2, 1, 2, "a"),
            (5, 5, 1, 3, "d"),
            (6, 4, 3, 2, "b"),
            (7, 1, 7, 1, "c"),
            (9, 9, 1, 1, "e"),
        ],
    ),
    dict(
        text="(a (b b) (c c) (d d) (e e) (f f) a)",
        depths=[1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0],
        segments=[(1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0)],
        closers=[
            (2, 2, 1, 2, "b"),
            (4, 4, 1, 2, "c"),
            (6, 6, 1, 2, "d"),
            (8, 8, 1, 2, "e"),
            (10, 10, 1, 2, "f"),
            (11, 1, 11, 1, "a"),
        ],
    ),
    dict(
        # Ten deep (the training limit): the j-th closer (j=1..10) sits at 10+j, its opener at 11-j.
        text="(t (s (r (q (p (o (n (m (l (k k) l) m) n) o) p) q) r) s) t)",
        depths=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        segments=[(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)],
        closers=[
            (10, 10, 1, 10, "k"),
            (11, 9, 3, 9, "l"),
            (12, 8, 5, 8, "m"),
            (13, 7, 7, 7, "n"),
            (14, 6, 9, 6, "o"),
            (15, 5, 11, 5, "p"),
            (16, 4, 13, 4, "q"),
            (17, 3, 15, 3, "r"),
            (18, 2, 17, 2, "s"),
            (19, 1, 19, 1, "t"),
        ],
    ),
]


@pytest.fixture(scope="module")
def task() -> DyckTask:
    return DyckTask(DyckConfig())


def _batch(task: DyckTask) -> tuple[np.ndarray, np.ndarray]:
    rows = [task.parse(e["text"]) for e in EXAMPLES]
    lengths = np.array([len(r) for r in rows])
    tokens = np.zeros((len(rows), lengths.max() + 3), dtype=np.int64)  # extra PAD on purpose
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, lengths


def test_vocabulary_layout(task):
    v = task.vocab
    assert (v.pad_id, v.bos_id, v.index["START"], v.index["END"]) == (0, 1, 1, 2)
    assert v.tokens[3:5] == ("(a", "(b") and v.tokens[22] == "(t"
    assert v.tokens[23] == "a)" and v.tokens[42] == "t)" and len(v) == 43
    np.testing.assert_array_equal(task.candidates, np.arange(23, 43))


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e["text"])
def test_tokenizer_round_trip(task, ex):
    ids = task.parse(ex["text"])
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(ex["depths"]) + 2
    assert task.decode(ids) == f"START {ex['text']} END"
    np.testing.assert_array_equal(task.encode(task.decode(ids)), ids)
    # Run-together and explicit START/END spellings read the same.
    np.testing.assert_array_equal(task.parse(ex["text"].replace(" ", "")), ids)
    np.testing.assert_array_equal(task.parse(f"START {ex['text']} END"), ids)
    # PAD is dropped by decode.
    assert task.decode(np.r_[ids, 0, 0]) == task.decode(ids)


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e["text"])
def test_depths_and_segments(task, ex):
    ids = task.parse(ex["text"])
    assert depth_sequence(ids[1:-1], K).tolist() == ex["depths"]
    assert task.depths(ids).tolist() == [0, *ex["depths"], 0]
    assert segments(np.array(ex["depths"])) == ex["segments"]
    assert task.structure(ids) == ex["segments"]


def test_segments_rejects_unbalanced_depths():
    with pytest.raises(ValueError):
        segments(np.array([1, 2, 1]))


def test_score_all_closers_matches_table(task):
    tokens, lengths = _batch(task)
    sc = score(tokens, lengths, min_distance=1, n_types=K)
    for i, ex in enumerate(EXAMPLES):
        mine = sc.seq == i
        got = list(
            zip(
                sc.pos[mine].tolist(),
                sc.meta["key_pos"][mine].tolist(),
                sc.meta["distance"][mine].tolist(),
                sc.meta["depth"][mine].tolist(),
                sc.target[mine].tolist(),
                strict=True,
            )
        )
        want = [(q, o, d, dep, closer(c)) for q, o, d, dep, c in ex["closers"]]
        assert got == want
        assert sc.meta["key_depth"][mine].tolist() == [c[3] for c in ex["closers"]]
        assert set(sc.meta["length"][mine].tolist()) == {len(ex["depths"])}
        assert set(sc.meta["max_depth"][mine].tolist()) == {max(ex["depths"])}
    # The model's prediction at the query position is checked against the next token.
    np.testing.assert_array_equal(tokens[sc.seq, sc.pos + 1], sc.target)
    assert np.all(np.diff(sc.seq) >= 0)


def test_score_default_filter_keeps_distance_at_least_ten(task):
    tokens, lengths = _batch(task)
    sc = task.score(tokens, lengths)
    want = [(i, c[0]) for i, ex in enumerate(EXAMPLES) for c in ex["closers"] if c[2] >= 10]
    assert list(zip(sc.seq.tolist(), sc.pos.tolist(), strict=True)) == want
    assert len(want) == 6  # one in the sixth example, five in the last


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, 3, 4, 23, 24, 2], "does not match"),  # (a (b a) b)
        ([1, 23, 2], "no opener"),
        ([1, 3, 3, 23, 2], "never closed"),
    ],
)
def test_score_rejects_broken_rows(tokens, message):
    with pytest.raises(IllusionsError, match=message):
        score(np.array([tokens]), np.array([len(tokens)]), min_distance=1, n_types=K)


def test_score_rejects_tokens_beyond_length():
    with pytest.raises(IllusionsError, match="beyond its length"):
        score(np.array([[1, 3, 23, 2, 5]]), np.array([4]), min_distance=1, n_types=K)


def test_segment_keys_ignore_types_and_separate_structures(task):
    tokens, lengths = _batch(task)
    keys, row = segment_keys(tokens, K, 126)
    assert np.bincount(row).tolist() == [len(e["segments"]) for e in EXAMPLES]
    flat = [s for e in EXAMPLES for s in e["segments"]]
    key_of: dict[tuple[int, ...], bytes] = {}
    for structure, key in zip(flat, keys.tolist(), strict=True):
        assert (
            key_of.setdefault(structure, key) == key
        )  # same structure, same key, whatever the types
    assert len(set(key_of.values())) == len(key_of)  # different structures, different keys
    assert flat.count((1, 0)) == 3


def test_string_keys_are_width_independent(task):
    tokens, _ = _batch(task)
    wide = np.zeros((tokens.shape[0], tokens.shape[1] + 7), dtype=tokens.dtype)
    wide[:, : tokens.shape[1]] = tokens
    assert string_keys(tokens, 128).tolist() == string_keys(wide, 128).tolist()
    assert len(set(string_keys(tokens, 128).tolist())) == len(EXAMPLES)


def test_depth_after_repeats_depth_on_non_brackets():
    assert depth_after(np.array([1, 3, 4, 24, 23, 2, 0]), K).tolist() == [0, 1, 2, 1, 0, 0, 0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(a (b b)", r"unbalanced: '\(a' at token 1 \(character 1\) is never closed"),
        ("(a a) a)", r"unbalanced: 'a\)' at token 3 \(character 7\) has no open bracket"),
        (
            "(a (b a) b)",
            r"mismatched: 'a\)' at token 3 \(character 7\) closes '\(b' opened at token 2",
        ),
        ("(a x)", r"unknown token 'x\)' at character 4"),
        ("(a u)", r"unknown token 'u\)' at character 4"),  # only a..t with 20 types
        ("(a a) ?? (b", r"unknown token '\?\?' at character 7"),
        ("(a b) ??", r"mismatched"),  # the first problem in reading order wins
        ("(a" * 11 + "a)" * 11, r"too deep: '\(a' at token 11 \(character 21\) reaches depth 11"),
        ("(a a)" * 64, r"too long: token 127 \(character 316\) is past max_len=128"),
        ("(a a) START", r"START may only begin the string, found at character 7"),
        ("(a a) END (b b)", r"'\(b' at character 11 comes after END"),
        ("(a PAD a)", r"PAD is not part of a string"),
    ],
)
def test_parse_reports_first_problem_and_position(task, text, message):
    with pytest.raises(IllusionsError, match=message):
        task.parse(text)


def test_parse_limits_follow_the_config():
    small = DyckTask(
        DyckConfig(
            n_types=2,
            max_depth=2,
            max_len=8,
            short_max_brackets=4,
            ood_depth_min=3,
            ood_depth_max=3,
        )
    )
    assert small.parse("(a (b b) a) (a a)").tolist() == [1, 3, 4, 6, 5, 3, 5, 2]
    with pytest.raises(IllusionsError, match="unknown token"):
        small.parse("(c c)")
    with pytest.raises(IllusionsError, match="too deep"):
        small.parse("(a (a (a a) a) a)")
    with pytest.raises(IllusionsError, match="too long"):
        small.parse("(a a) (a a) (a a) (a a)")
    assert small.parse("").tolist() == [1, 2]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_types": 27}, "n_types"),
        ({"ood_depth_min": 10}, "ood_depth_min"),
        ({"max_len": 20, "short_max_brackets": 10}, "does not fit"),
        ({"short_max_brackets": 126}, "short_max_brackets"),
        ({"min_distance": 0}, "min_distance"),
        ({"n_train": 0}, "n_train"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(IllusionsError, match=message):
        DyckConfig(**changes)


def test_config_from_dict_round_trip_and_unknown_keys():
    cfg = DyckConfig(seed=3, n_train=10)
    assert DyckConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(IllusionsError, match="unknown DyckConfig key"):
        DyckConfig.from_dict({"depth": 3})


def test_meta_is_json_data(task):
    import json

    meta = json.loads(json.dumps(task.meta()))
    assert meta["task"] == "dyck" and meta["config"] == DyckConfig().to_dict()
    assert meta["vocab"][:3] == ["PAD", "START", "END"]
