from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from illusions.errors import IllusionsError
from illusions.tasks.base import Task
from illusions.tasks.code import (
    BRACKET,
    CATEGORIES,
    COPY,
    IDENTIFIER,
    OTHER,
    UNK,
    WHITESPACE,
    CodeConfig,
    CodeTask,
    bracket_depths,
    deep_threshold,
    label,
    make_vocab,
)
from illusions.tasks.code_corpus import Function, fingerprint, load_corpus, make_corpus, read_jsonl

# One hand-checked example: each line, the category of each of its characters (newline included)
# and the depth of each. b=bracket w=whitespace c=copy i=identifier o=other.
EXAMPLE = [
    ("def add(left, right):", "iiiwiiibiiiiowiiiiibow", "0000000011111111111000"),
    ("    if left:", "wwwwiiwicccow", "1111111111111"),
    ("        return add(left[0],", "wwwwwwwwiiiiiiwiccbicccbobow", "2222222222222222222333334333"),
    ("                   right)", "wwwwwwwwwwwwwwwwwwwiccccbw", "333333333333333333333333" "22"),
    ("    return right", "wwwwiiiiiiwiccccw", "11111111111111111"),
]
CODES = {"b": BRACKET, "w": WHITESPACE, "c": COPY, "i": IDENTIFIER, "o": OTHER}


def test_labels_of_the_hand_checked_example():
    text = "\n".join(line for line, _, _ in EXAMPLE)
    cats = "".join(c for _, c, _ in EXAMPLE)[: len(text)]
    depths = "".join(d for _, _, d in EXAMPLE)[: len(text)]
    for line, c, d in EXAMPLE:  # the table itself is consistent
        assert len(c) == len(d) == len(line) + 1, line
    lab = label(text, "python")
    assert lab.category.tolist() == [CODES[c] for c in cats]
    assert lab.depth.tolist() == [int(d) for d in depths]
    # Copy sources: the second "add" copies from the first (text 4..6 -> tokens 5..7), "left" from
    # its latest occurrence in line 2 (text 29), "right" in the last line from line 4 (text 82).
    second_add = text.index("add", 10)
    assert lab.key_pos[second_add : second_add + 3].tolist() == [-1, 6, 7]
    left = text.index("left[")
    assert lab.key_pos[left + 1 : left + 4].tolist() == [31, 32, 33]
    last_right = text.rindex("right")
    assert lab.key_pos[last_right + 1 : last_right + 5].tolist() == [84, 85, 86, 87]
    copies = np.flatnonzero(lab.category == COPY)
    assert [text[k - 1] for k in lab.key_pos[copies]] == [text[i] for i in copies]
    assert (lab.key_pos[lab.category != COPY] == -1).all()


def test_keywords_and_numbers_never_copy_and_brace_blocks_count_once():
    lab = label("if x1: return 10 if return 10", "python")
    assert COPY not in lab.category[: len("if x1: return 10 if")].tolist()
    assert lab.category[-2:].tolist() == [OTHER, OTHER]  # digits
    java = "void run() {\n    if (ok) {\n        go();\n    }\n}"
    d = label(java, "java").depth
    assert d[java.index("go")] == 2  # two braces, indentation not counted again
    assert d[java.index("if")] == 1 and d[len(java) - 1] == 0


def test_bracket_depth_clamps_unmatched_closers():
    assert bracket_depths("a)(b]").tolist() == [0, 0, 0, 1, 0]


def test_deep_threshold_rule():
    assert deep_threshold(np.array([1, 1, 2, 2, 3, 5]), 0.2) == 4
    # every function at the maximum: fall back to the maximum so that deep_nesting is not empty
    assert deep_threshold(np.array([1, 3, 3, 3]), 0.1) == 3


# ------------------------------------------------------------------------------- small corpora


def _python_function(i: int, depth: int) -> str:
    lines = [f"def fn_{i}(val, out):"]
    for d in range(1, depth + 1):
        lines.append("  " * d + f"if val > {d}:")
    lines.append("  " * (depth + 1) + f"return out(val) + {i}")
    lines.append("  return val")
    return "\n".join(lines)


JAVA = [
    "public int size() {\n    return count;\n}",
    "private void put(String key, int value) {\n    if (key != null) {\n        map.put(key, value);\n    }\n}",
    "static long twice(long x) {\n    return x * 2L;\n}",
]
JS = [
    "function greet (name) {\n  return `hello ${name}`\n}",
    "const add = (a, b) => {\n  return a + b\n}",
]


def _python_corpus() -> list[str]:
    return [_python_function(i, 1 + i % 4 + (3 if i % 10 == 0 else 0)) for i in range(40)]


def _write_jsonl(path: Path, records: list[dict], *, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    root = tmp_path / "csn"
    root.mkdir()
    py = [{"code": t, "language": "python", "repo": "x"} for t in _python_corpus()]
    _write_jsonl(root / "python_train_0.jsonl", py[:25])
    _write_jsonl(root / "python_train_1.jsonl.gz", py[25:] + py[:3], gz=True)  # 3 duplicates
    _write_jsonl(root / "java.jsonl", [{"original_string": t, "lang": "Java"} for t in JAVA])
    _write_jsonl(root / "js.jsonl.gz", [{"whole_func_string": t, "language": "javascript"} for t in JS], gz=True)
    (root / "README.txt").write_text("not a corpus file")
    return root


def _small(corpus: Path, **kw) -> CodeConfig:
    base = dict(corpus=str(corpus), n_ctx=256, n_train=20, n_eval=10, min_chars=10,
                min_char_count=2, max_scored=500)
    return CodeConfig(**{**base, **kw})


def test_reader_accepts_plain_gz_and_known_field_names(corpus_dir):
    records = list(read_jsonl(corpus_dir / "java.jsonl"))
    assert [f for f, _ in records] == [Function("java", t) for t in JAVA]
    js = [f for f, _ in read_jsonl(corpus_dir / "js.jsonl.gz")]
    assert [f.text for f in js] == JS and {f.language for f in js} == {"javascript"}
    crlf = _write_jsonl(corpus_dir.parent / "crlf.jsonl", [{"code": "    def f():\r\n        pass\r\n", "language": "python"}])
    assert [f.text for f, _ in read_jsonl(crlf)] == ["def f():\n    pass"]


def test_folder_corpus_is_deduplicated_and_fingerprinted(corpus_dir, tmp_path):
    corpus = load_corpus(str(corpus_dir), cache_dir=tmp_path / "cache")
    assert corpus.languages() == {"java": 3, "javascript": 2, "python": 40}
    assert list(corpus.functions) == sorted(set(corpus.functions))
    again = load_corpus(str(corpus_dir), cache_dir=tmp_path / "cache")  # from the cache
    assert again == corpus
    shuffled = list(corpus.functions)[::-1] + list(corpus.functions[:5])
    assert fingerprint(shuffled) == corpus.fingerprint
    changed = list(corpus.functions[1:]) + [Function("python", corpus.functions[0].text + " ")]
    assert fingerprint(changed) != corpus.fingerprint
    capped = make_corpus(corpus.functions, source="x", max_per_language=2)
    assert capped.languages() == {"java": 2, "javascript": 2, "python": 2}


def test_vocabulary_maps_rare_characters_to_unk():
    vocab = make_vocab(["aab", "ab€"], min_count=2, max_size=10)
    assert vocab.tokens == ("<pad>", "<bos>", UNK, "a", "b")
    assert make_vocab(["aaabbc"], min_count=1, max_size=2).tokens[3:] == ("a", "b")
    assert make_vocab([], min_count=1, max_size=5, chars="zy").tokens[3:] == ("y", "z")


def test_task_splits_membership_and_scoring(corpus_dir, tmp_path):
    task = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache")
    assert isinstance(task, Task) and task.candidates is None
    splits = task.splits()
    assert set(splits) == {"train", "iid", "deep_nesting", "java", "javascript"}
    texts = {name: {task.decode(row) for row in s.tokens} for name, s in splits.items()}
    assert not texts["train"] & texts["iid"] and not texts["train"] & texts["deep_nesting"]
    meta = task.meta()
    deep = meta["deep_depth"]

    def max_depth(t: str, lang: str = "python") -> int:
        return int(label(t, lang).depth.max())

    assert max(max_depth(t) for t in texts["train"] | texts["iid"]) < deep
    assert min(max_depth(t) for t in texts["deep_nesting"]) >= deep
    # Java characters never seen in Python training (e.g. "{", "p") become <unk>.
    assert texts["java"] == {task.decode(task.encode(t)) for t in JAVA}
    assert (splits["java"].tokens == task.unk_id).any() and not (splits["train"].tokens == task.unk_id).any()
    for s in splits.values():
        sc = s.scored
        assert s.tokens.dtype == np.int64 and (s.tokens[:, 0] == task.vocab.bos_id).all()
        assert (s.tokens[np.arange(s.tokens.shape[1]) >= s.lengths[:, None]] == task.vocab.pad_id).all()
        assert (sc.target == s.tokens[sc.seq, sc.pos + 1]).all() and (sc.pos + 1 < s.lengths[sc.seq]).all()
        assert set(sc.meta) == {"category", "depth", "key_pos", "distance", "length"}
        assert all(v.dtype == np.int64 and v.shape == sc.seq.shape for v in sc.meta.values())
        assert set(np.unique(sc.meta["category"])) <= set(range(len(CATEGORIES)))
        copy = sc.meta["category"] == COPY
        assert (s.tokens[sc.seq[copy], sc.meta["key_pos"][copy]] == sc.target[copy]).all()
        back = sc.pos[copy] + 1 - sc.meta["distance"][copy]  # distance: from the target back to its source
        assert (s.tokens[sc.seq[copy], back] == sc.target[copy]).all() and (sc.meta["distance"][copy] > 1).all()
        assert (sc.meta["key_pos"][~copy] == -1).all() and (sc.meta["distance"][~copy] == -1).all()
        assert len(sc) <= 500
    assert len(splits["train"].scored) == 500  # subsampled: 20 functions of >= 60 characters
    assert meta["vocab"] == list(task.vocab.tokens) and meta["corpus_fingerprint"] == task.corpus().fingerprint
    json.dumps(meta)


def test_same_seed_same_splits_and_cache_round_trip(corpus_dir, tmp_path):
    a = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "a").splits()
    b = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "b").splits()
    cached = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "a")
    c = cached.splits()
    assert len(list((tmp_path / "a").glob("splits-*.npz"))) == 1
    for name in a:
        for x, y in ((a[name], b[name]), (a[name], c[name])):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_array_equal(x.scored.pos, y.scored.pos)
            for k in x.scored.meta:
                np.testing.assert_array_equal(x.scored.meta[k], y.scored.meta[k])
            assert x.description == y.description
    other = CodeTask(_small(corpus_dir, seed=1), cache_dir=tmp_path / "a").splits()
    assert not np.array_equal(other["train"].scored.pos, a["train"].scored.pos)


def test_a_damaged_splits_cache_is_noticed_and_rebuilt(corpus_dir, tmp_path, caplog):
    import io
    import zipfile

    first = CodeTask(_small(corpus_dir), cache_dir=tmp_path).splits()
    (path,) = tmp_path.glob("splits-*.npz")
    # One token changed inside a still valid archive whose stored checksums are the old ones.
    damaged = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            raw = src.read(name)
            if name == "1.tokens.npy":
                tokens = np.load(io.BytesIO(raw))
                tokens[0, 1] = (tokens[0, 1] + 1) % 5
                buf = io.BytesIO()
                np.save(buf, tokens)
                raw = buf.getvalue()
            dst.writestr(name, raw)
    path.write_bytes(damaged.getvalue())
    with caplog.at_level("WARNING", logger="illusions"):
        again = CodeTask(_small(corpus_dir), cache_dir=tmp_path).splits()
    assert any("damaged" in r.getMessage() and "1.tokens" in r.getMessage() for r in caplog.records)
    for name in first:
        np.testing.assert_array_equal(first[name].tokens, again[name].tokens)


def test_corpus_errors_are_clear(tmp_path):
    def err(path, **kw) -> str:
        with pytest.raises(IllusionsError) as exc:
            CodeTask(CodeConfig(corpus=str(path), **kw), cache_dir=tmp_path / "cache").splits()
        return str(exc.value)

    assert "does not exist" in err(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "contains no functions" in err(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    assert "holds no" in err(tmp_path / "folder")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    msg = err(tmp_path / "bad.jsonl.gz")
    assert msg.startswith("cannot read corpus file") and "bad.jsonl.gz" in msg
    (tmp_path / "broken.jsonl").write_text('{"code": "def f(): pass", "language": "python"}\n{oops\n')
    assert "broken.jsonl:2 is not valid JSON" in err(tmp_path / "broken.jsonl")
    _write_jsonl(tmp_path / "nofield.jsonl", [{"text": "x", "language": "python"}])
    assert "no code field" in err(tmp_path / "nofield.jsonl")
    _write_jsonl(tmp_path / "java_only.jsonl", [{"code": t, "language": "java"} for t in JAVA])
    assert "usable python functions" in err(tmp_path / "java_only.jsonl", min_chars=5)



def test_corpus_entries_that_are_not_files_and_repeated_keys_are_refused(tmp_path):
    """A FIFO or a dangling link named like a JSONL file in a corpus folder is refused, not skipped (a
    FIFO is never opened for reading, so nothing blocks); so is a line giving one key twice."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", [{"code": "def f():\n    return 1", "language": "python"}])

    def err() -> str:
        with pytest.raises(IllusionsError) as exc:
            load_corpus(str(folder))
        return str(exc.value)

    os.mkfifo(folder / "b.jsonl")
    assert err() == f"corpus file {folder / 'b.jsonl'} is a FIFO (named pipe), not a readable file"
    (folder / "b.jsonl").unlink()
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    assert "b.jsonl is a dangling symlink" in err()
    (folder / "b.jsonl").unlink()
    (folder / "b.jsonl").write_text('{"code": "def g(): pass", "language": "python", "code": "x = 1"}\n')
    assert err() == f"corpus line {folder / 'b.jsonl'}:1 gives the key 'code' twice"

def test_config_rejects_bad_values():
    with pytest.raises(IllusionsError, match="unknown CodeConfig key"):
        CodeConfig.from_dict({"n_ctxx": 5})
    with pytest.raises(IllusionsError, match="n_ctx must be at least 3"):
        CodeConfig.from_dict({"n_ctx": 2})
    assert CodeConfig.from_dict(CodeConfig().to_dict()) == CodeConfig()


def test_functions_the_model_cannot_tell_apart_appear_once(corpus_dir, tmp_path):
    # Two functions equal in their first n_ctx - 1 characters give one sequence, not one per split.
    twin = _python_function(99, 2)
    extra = [{"code": twin + "\n  # tail " + "x" * k, "language": "python"} for k in (300, 301)]
    _write_jsonl(corpus_dir / "twins.jsonl", extra)
    cfg = _small(corpus_dir, n_ctx=len(twin) + 5, n_train=100, n_eval=100)
    task = CodeTask(cfg, cache_dir=tmp_path / "cache")
    rows = [task.decode(r) for name in ("train", "iid", "deep_nesting") for r in task.splits()[name].tokens]
    assert len(rows) == len(set(rows)) == 41
    assert sum(r.startswith("def fn_99(") for r in rows) == 1


def test_a_changed_corpus_is_read_again_not_served_from_cache(corpus_dir, tmp_path):
    before = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache").meta()["corpus_fingerprint"]
    # Edited in place: same file names, new content.
    with open(corpus_dir / "python_train_0.jsonl", "a") as fh:
        fh.write(json.dumps({"code": _python_function(77, 1), "language": "python"}) + "\n")
    after = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache")
    assert after.meta()["corpus_fingerprint"] != before
    assert after.meta()["corpus_languages"]["python"] == 41


def test_stats_cache_state_and_progress_for_the_data_command(corpus_dir, tmp_path):
    task = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache")
    assert not task.is_cached()
    messages: list[str] = []
    splits = task.splits(progress=messages.append)
    assert messages[0].startswith("reading corpus") and any("building splits" in m for m in messages)
    assert task.is_cached() and task.cache_path.is_file()
    fresh = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache")
    assert fresh.is_cached()
    messages.clear()
    fresh.splits(progress=messages.append)
    assert not any("building" in m for m in messages)
    stats = task.split_stats(splits["deep_nesting"])
    texts = [task.decode(r) for r in splits["deep_nesting"].tokens]
    assert stats["n"] == len(texts) and stats["length_max"] == max(len(t) for t in texts)
    assert stats["depth_max"] == max(int(label(t, "python").depth.max()) for t in texts)
    assert stats["depth_max"] >= task.meta()["deep_depth"]
    assert sum(stats[f"share_{c}"] for c in CATEGORIES) == pytest.approx(1.0)
    assert stats["unk"] == 0.0 and task.split_stats(splits["java"])["unk"] > 0


def test_from_meta_rebuilds_the_training_task_with_its_vocabulary(corpus_dir, tmp_path):
    task = CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache")
    meta = json.loads(json.dumps(task.meta()))  # as read back from a checkpoint's config.json
    again = CodeTask.from_meta(meta, cache_dir=tmp_path / "cache")
    assert again.vocab == task.vocab
    for name, split in task.splits().items():
        np.testing.assert_array_equal(again.splits()[name].tokens, split.tokens)
    # The saved vocabulary wins over the one the corpus would give.
    fewer = dict(meta, vocab=meta["vocab"][:-1])
    assert CodeTask.from_meta(fewer, cache_dir=tmp_path / "cache").vocab.tokens == tuple(fewer["vocab"])
    with open(corpus_dir / "java.jsonl", "a") as fh:
        fh.write(json.dumps({"code": "def g(): return 1", "language": "python"}) + "\n")
    with pytest.raises(IllusionsError, match="fingerprint"):
        CodeTask.from_meta(meta, cache_dir=tmp_path / "cache")
    loose = CodeTask.from_meta(meta, cache_dir=tmp_path / "cache", strict=False)
    assert loose.vocab == task.vocab
    with pytest.raises(IllusionsError, match="code task"):
        CodeTask.from_meta({"task": "dyck"})


def test_data_command_reads_the_pinned_corpus_by_default_and_a_jsonl_one_when_given(corpus_dir, tmp_path):
    from typer.testing import CliRunner

    from illusions.cli import app
    from illusions.tasks.code_corpus import pinned_corpus

    runner = CliRunner()
    small = ["--n-train", "40", "--n-eval", "8", "--cache-dir", str(tmp_path / "cache"), "--json"]
    result = runner.invoke(app, ["data", "code", *small])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["config"]["corpus"] == "" and out["corpus_source"] == "pinned"
    assert out["corpus_fingerprint"] == pinned_corpus().fingerprint
    assert set(out["splits"]) == {"train", "iid", "deep_nesting", "java", "javascript"}
    result = runner.invoke(app, ["data", "code", *small, "--corpus", str(corpus_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["corpus_source"] == str(corpus_dir)
    result = runner.invoke(app, ["data", "code", *small, "--corpus", str(tmp_path / "nowhere.jsonl")])
    assert result.exit_code == 2 and result.stderr.startswith("error: corpus path") and result.stderr.count("\n") == 1
    result = runner.invoke(app, ["data", "dyck", "--corpus", "machine"])
    assert result.exit_code == 2 and "--corpus can only be used with the code task" in result.stderr


def test_a_model_of_another_corpus_is_refused_with_what_to_do(corpus_dir, tmp_path):
    meta = json.loads(json.dumps(CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache").meta()))
    pinned = dict(meta, config=dict(meta["config"], corpus=""), corpus_fingerprint="0" * 64)
    with pytest.raises(IllusionsError, match="the pinned corpus here has fingerprint .* another version of the pinned corpus"):
        CodeTask.from_meta(pinned, cache_dir=tmp_path / "cache")


def test_a_model_saved_when_the_empty_corpus_named_the_machine_still_reads_the_machine(corpus_dir, tmp_path):
    meta = json.loads(json.dumps(CodeTask(_small(corpus_dir), cache_dir=tmp_path / "cache").meta()))
    old = dict(meta, config=dict(meta["config"], corpus=""), corpus_source="machine")
    assert CodeTask.from_meta(old, strict=False).config.corpus == "machine"
    assert CodeTask.from_meta(dict(old, corpus_source="pinned"), strict=False).config.corpus == ""
