"""Task ``custom``: JSONL splits you bring, on a Hugging Face or illusions model, through the CLI.

Every bad input is one line on stderr, exit 2, nothing written, and is caught before any weight is
loaded (the loader is replaced by one that fails the test)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from hf_fixtures import N_CTX, VOCAB, save_hf, word_tokenizer, write_jsonl, write_splits
from illusions.analyses.run import AnalysisSpec, run_analysis
from illusions.cli import app
from illusions.errors import IllusionsError
from illusions.model_folders import folder_tokens, inspect_model_folder
from illusions.models import ModelConfig, build_model, save_model
from illusions.reports import rebuild_report
from illusions.tasks.custom import CustomConfig, CustomTask

runner = CliRunner()
FAST = ["--threads", "1", "--n-boot", "50"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """HF GPT-2 (with a tokenizer) and GPT-NeoX folders, an illusions checkpoint, and a data folder."""
    root = tmp_path_factory.mktemp("custom")
    gpt2 = save_hf("gpt2", root / "gpt2", tokenizer=True)
    neox = save_hf("neox", root / "neox")
    illusions_model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX,
                                              d_vocab=VOCAB), seed=0)
    vocab = [f"t{i}" for i in range(VOCAB)]
    save_model(illusions_model, root / "ckpt", meta={"task": {"task": "toy", "vocab": vocab, "pad_id": 0,
                                                              "bos_id": 1}})
    data = write_splits(root / "data")
    return {"gpt2": gpt2, "neox": neox, "ckpt": root / "ckpt", "data": data, "root": root}


def _ok(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _agreements(doc):
    return {s: e["agreement"]["value"] for s, e in doc["splits"].items()}


@pytest.mark.parametrize("model", ["gpt2", "neox", "ckpt"])
def test_full_rank_svd_agrees_on_every_split_and_low_rank_does_not(env, model, tmp_path):
    args = ["analyze", "custom", "--data", str(env["data"]), "--model", str(env[model]), "--layer", "0",
            "--layer", "1", "--no-report", "--json", *FAST]
    full = json.loads(_ok([*args, "--rank", "8", "--out", str(tmp_path / "full")]).stdout)
    assert set(full["splits"]) == {"iid", "long"}
    assert _agreements(full) == {"iid": 1.0, "long": 1.0}
    low = json.loads(_ok([*args, "--rank", "1", "--out", str(tmp_path / "low")]).stdout)
    assert min(_agreements(low).values()) < 1.0  # the check above can fail


def test_run_directory_table_report_and_meta_breakdowns(env, tmp_path):
    out = tmp_path / "run"
    result = _ok(["analyze", "custom", "--data", str(env["data"]), "--model", str(env["gpt2"]), "--rank", "2",
                  "--by", "parity", "--out", str(out), *FAST])
    assert "custom: svd(rank=2)" in result.stdout and "GPT2LMHeadModel" in result.stdout
    assert "by parity" in result.stdout and "even" in result.stdout and "odd" in result.stdout
    assert {"config.json", "metrics.json", "metrics.csv", "records.npz", "report.html",
            "fig_meta_parity.png", "fig_meta_position.png"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["data"] == str(env["data"]) and config["task"]["reference_split"] == "iid"
    assert config["task"]["group_names"] == {"parity": ["even", "odd"]}
    assert config["task"]["discrete"] == ["parity"]  # 'position' has more values than MAX_DISCRETE: binned
    csv = (out / "metrics.csv").read_text()
    assert ",parity,even," in csv and ",position,0-4," in csv and ",length," in csv
    doc = json.loads((out / "metrics.json").read_text())
    gap = doc["splits"]["long"]["gaps"]["agreement"]["vs_iid"]["value"]
    assert gap == pytest.approx(_agreements(doc)["long"] - _agreements(doc)["iid"])
    html = (out / "report.html").read_text()
    assert "Agreement by parity" in html and "Split definitions" in html
    before = (out / "report.html").read_bytes()
    rebuild_report(out)
    assert (out / "report.html").read_bytes() == before


def test_rebuilding_a_report_after_the_data_changed_is_refused(env, tmp_path):
    data = write_splits(tmp_path / "data")
    out = tmp_path / "run"
    _ok(["analyze", "custom", "--data", str(data), "--model", str(env["gpt2"]), "--rank", "2", "--out", str(out),
         "--no-report", *FAST])
    write_jsonl(data / "iid.jsonl", [{"tokens": [1, 2, 3]}] * 3)
    with pytest.raises(IllusionsError, match="changed since the run"):
        rebuild_report(out)


def test_sweep_over_ranks(env, tmp_path):
    result = _ok(["sweep", "custom", "--data", str(env["data"]), "--model", str(env["neox"]), "--ranks", "1,8",
                  "--layer", "0", "--layer", "1", "--out", str(tmp_path / "sweep"), "--json", *FAST])
    doc = json.loads(result.stdout)
    assert [p["label"] for p in doc["proxies"]] == ["svd(rank=1)", "svd(rank=8)"]
    assert {s: e["agreement"]["value"] for s, e in doc["proxies"][1]["splits"].items()} == {"iid": 1.0, "long": 1.0}
    assert (tmp_path / "sweep" / "report.html").is_file()


def test_without_iid_there_is_no_gap(env, tmp_path):
    data = tmp_path / "data"
    write_splits(data)
    (data / "iid.jsonl").rename(data / "other.jsonl")
    doc = json.loads(_ok(["analyze", "custom", "--data", str(data), "--model", str(env["gpt2"]), "--rank", "2",
                          "--out", str(tmp_path / "run"), "--no-report", "--json", *FAST]).stdout)
    assert set(doc["splits"]) == {"other", "long"} and all(not e["gaps"] for e in doc["splits"].values())


def test_text_lines_use_the_folder_tokenizer_and_candidates_restrict_predictions(env, tmp_path):
    data = write_splits(tmp_path / "data")
    write_jsonl(data / "text.jsonl", [{"text": "<bos> w3 w4 w5 w6 w7", "meta": {"parity": ["a"] * 5}}] * 4)
    (tmp_path / "cands.txt").write_text("2\n3\n\n4\n5\n")
    spec = AnalysisSpec(task="custom", data=str(data), model=str(env["gpt2"]), ranks=(2,), n_boot=20,
                        candidates=str(tmp_path / "cands.txt"))
    run = run_analysis(spec)
    text = run.task.splits()["text"]
    assert text.tokens[0].tolist() == word_tokenizer()("<bos> w3 w4 w5 w6 w7")["input_ids"] == [1, 5, 6, 7, 8, 9]
    assert run.task.vocab.tokens[5] == "w3"
    for (_, _), rec in run.analysis.records.items():
        assert set(rec.original_pred.tolist()) | set(rec.proxy_pred.tolist()) <= {2, 3, 4, 5}
    assert run.task_meta["group_names"]["parity"] == ["a", "even", "odd"]  # one coding across splits


def _long_text(rng, n_words):
    return " ".join(f"w{i}" for i in rng.integers(2, VOCAB - 2, n_words))


def test_text_longer_than_the_context_is_cut_into_windows_with_the_bos_in_each(env, tmp_path):
    """A ``text`` line longer than the context (or ``window``) is cut into windows, not refused: each
    window starts with the BOS the folder's tokenizer puts in front of any text, never scored; windows
    start every ``stride`` text tokens and each text token after the first is predicted once."""
    folder = save_hf("llama-gqa", tmp_path / "llama", tokenizer=True, bos=True)
    tokens = folder_tokens(inspect_model_folder(folder))
    rng = np.random.default_rng(0)
    texts = [_long_text(rng, n) for n in (70, 10, 33)]
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": t} for t in texts])
    write_jsonl(data / "iid.jsonl", [{"text": t} for t in texts])

    def task(window=0, stride=0):
        return CustomTask(CustomConfig(data=str(data), window=window, stride=stride), d_vocab=VOCAB, n_ctx=N_CTX,
                          encode=tokens.encode, encode_parts=tokens.encode_parts, bos_id=tokens.bos_id)

    for window, stride in ((0, 0), (16, 5), (9, 8), (N_CTX, 1)):
        split = task(window, stride).splits()["iid"]
        width = window or N_CTX
        assert split.lengths.max() <= width
        assert (split.tokens[:, 0] == 1).all()  # the BOS opens every window
        assert not (split.scored.pos == 0).any()  # and is never scored
        # The windows of each line, in order, predict every text token after the first exactly once
        # (with stride == window - 1, side by side, a window's first text token has no context).
        predicted = [int(split.tokens[s, p + 1]) for s, p in zip(split.scored.seq, split.scored.pos, strict=True)]
        np.testing.assert_array_equal(split.scored.target, predicted)
        per_line: list[list[int]] = []
        row = 0
        for text in texts:
            body = tokens.encode(text)[1:]
            room, step = width - 1, stride or width - 1
            later = -(-max(len(body) - room, 0) // step)  # windows after the first, until one reaches the end
            alone = step == room and later and len(body) - later * step == 1  # a last window of one token scores nothing
            rows = list(range(row, row + later + 1 - alone))
            row += len(rows)
            got = [int(split.tokens[s, p + 1]) for s, p in zip(split.scored.seq, split.scored.pos, strict=True)
                   if s in rows]
            skipped = set(range(width - 1, len(body), width - 1)) if (stride or width - 1) == width - 1 else set()
            assert got == [t for i, t in enumerate(body) if i >= 1 and i not in skipped], (window, stride, text)
            per_line.append(rows)
        assert row == len(split)
        if (window, stride) == (0, 0):  # a line that fits is one sequence, as the tokenizer encodes it
            [short] = per_line[1]
            assert split.tokens[short, : split.lengths[short]].tolist() == tokens.encode(texts[1])
            assert split.scored.pos[split.scored.seq == short].tolist() == list(range(1, split.lengths[short] - 1))
    again = task(16, 5)
    np.testing.assert_array_equal(again.splits()["iid"].tokens, task(16, 5).splits()["iid"].tokens)  # deterministic
    # two long lines in each of the two splits
    assert again.meta()["text_windows"]["lines_cut"] == 4 and again.meta()["text_windows"]["window"] == 16


def test_text_windows_through_the_cli_and_their_bad_values(env, tmp_path):
    folder = save_hf("gpt2", tmp_path / "gpt2", tokenizer=True, bos=True)
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": _long_text(rng, 50)} for _ in range(6)])
    write_jsonl(data / "iid.jsonl", [{"text": _long_text(rng, 50)} for _ in range(4)])
    common = ["analyze", "custom", "--data", str(data), "--model", str(folder), "--rank", "2", "--no-report", *FAST]
    _ok([*common, "--window", "20", "--stride", "10", "--out", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["spec"]["window"] == 20 and config["spec"]["stride"] == 10
    for extra, message in ((["--stride", "32"], "stride 32 is longer than a window's 31 text tokens"),
                           (["--window", "99"], f"window 99 is longer than the context of model {folder} (32"),
                           (["--window", "1"], "--window must be at least 2"),
                           (["--window", "-3"], "--window must be at least 0")):
        result = runner.invoke(app, [*common, *extra, "--out", str(tmp_path / "bad")])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (extra, result.output)
        assert not (tmp_path / "bad").exists()
    write_jsonl(data / "iid.jsonl", [{"text": _long_text(rng, 50), "score": [3]}])
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "cannot be cut into windows because it gives score" in result.stderr


def test_reader_defaults_and_explicit_targets(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"tokens": [1, 2, 3, 4]}])
    write_jsonl(data / "iid.jsonl", [{"tokens": [1, 2, 3], "score": [2], "target": [7], "meta": {"ok": [True]}},
                                     {"tokens": [1, 5], "score": [0], "meta": {"ok": [False]}}])
    task = CustomTask(CustomConfig(data=str(data)), d_vocab=10, n_ctx=8)
    train, iid = task.splits()["train"], task.splits()["iid"]
    assert train.scored.pos.tolist() == [0, 1, 2] and train.scored.target.tolist() == [2, 3, 4]
    assert iid.scored.seq.tolist() == [0, 1] and iid.scored.pos.tolist() == [2, 0]
    assert iid.scored.target.tolist() == [7, 5]  # the last position is scored when a target is given
    assert iid.tokens.tolist() == [[1, 2, 3], [1, 5, 0]] and iid.lengths.tolist() == [3, 2]
    assert task.meta()["group_names"] == {"ok": ["false", "true"]} and iid.scored.meta["ok"].tolist() == [1, 0]
    assert list(task.splits()) == ["train", "iid"] and task.candidates is None


GOOD = [{"tokens": [1, 2, 3, 4]}]
BAD_INPUTS = {
    "missing-train": ({"iid.jsonl": GOOD}, [], "has no train.jsonl"),
    "not-json": ({"train.jsonl": GOOD, "iid.jsonl": ["{tokens: [1, 2]}"]}, [], "iid.jsonl:1 is not valid JSON"),
    "token-outside-vocab": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1, VOCAB]}]}, [],
                            f"token id {VOCAB} is outside the vocabulary"),
    "longer-than-context": ({"train.jsonl": [{"tokens": [1] * (N_CTX + 1)}], "iid.jsonl": GOOD}, [],
                            "more than the context of model"),
    "score-out-of-range": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1, 2, 3], "score": [2]}]}, [],
                           "score position 2 is out of range 0..1"),
    "score-target-lengths": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1, 2, 3], "score": [0, 1],
                                                                  "target": [4]}]}, [],
                             "target has 1 entries but 2 positions are scored"),
    "meta-length": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1, 2, 3], "meta": {"kind": ["a"]}}]}, [],
                    "meta 'kind' has 1 values but 2 positions are scored"),
    "text-without-tokenizer": ({"train.jsonl": GOOD, "iid.jsonl": [{"text": "w1 w2"}]}, ["--model-neox"],
                               "has text but model"),
    "empty-split": ({"train.jsonl": GOOD, "iid.jsonl": ["", ""]}, [], "holds no sequence (an empty split)"),
    "nothing-scored": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1]}]}, [], "has no scored position"),
    "only-train": ({"train.jsonl": GOOD}, [], "holds only train.jsonl"),
    "unknown-key": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1, 2], "labels": [1]}]}, [],
                    "unknown key(s) labels"),
    "reserved-meta": ({"train.jsonl": GOOD, "iid.jsonl": [{"tokens": [1, 2], "meta": {"length": [1]}}]}, [],
                      "meta name 'length' is reserved"),
    "candidate-outside-vocab": ({"train.jsonl": GOOD, "iid.jsonl": GOOD}, ["--candidates", "99"],
                                "token id 99 is outside the vocabulary"),
    "unknown-by-column": ({"train.jsonl": GOOD, "iid.jsonl": GOOD}, ["--by", "nosuch"],
                          "no meta column nosuch in"),
    "unknown-split": ({"train.jsonl": GOOD, "iid.jsonl": GOOD}, ["--split", "nosuch"], "unknown split(s) nosuch"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written_before_loading_weights(env, tmp_path, monkeypatch, case):
    files, extra, message = BAD_INPUTS[case]
    data = tmp_path / "data"
    data.mkdir()
    for name, lines in files.items():
        write_jsonl(data / name, lines)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr("illusions.model_folders.load_model_folder", no_weights)
    model = env["neox"] if "--model-neox" in extra else env["gpt2"]
    extra = [e for e in extra if e != "--model-neox"]
    if extra[:1] == ["--candidates"]:
        (tmp_path / "cands.txt").write_text(f"2\n{extra[1]}\n")
        extra = ["--candidates", str(tmp_path / "cands.txt")]
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "custom", "--data", str(data), "--model", str(model), "--rank", "2",
                                 "--out", str(out), *extra, *FAST], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data", *(["cands.txt"] if "cands.txt" in str(extra) else [])])


@pytest.mark.parametrize(("args", "message"), [
    (["analyze", "custom", "--rank", "2"], "--data is required for task 'custom'"),
    (["analyze", "custom", "--data", "d", "--rank", "2"], "--model is required for task 'custom'"),
    (["analyze", "dyck", "--data", "d", "--rank", "2"], "--data is only for task 'custom'"),
    (["sweep", "dyck", "--candidates", "c", "--ranks", "1,2"], "--candidates is only for task 'custom'"),
    (["analyze", "dyck", "--window", "16"], "--window is only for task 'custom'"),
    (["analyze", "custom", "--data", "d", "--model", "m", "--by", "not-a-name"], "--by has unknown value(s)"),
    (["data", "custom"], "needs data"),
])
def test_spec_refuses_custom_options_out_of_place(args, message, tmp_path):
    result = runner.invoke(app, [*args, *(["--out", str(tmp_path / "r")] if args[0] != "data" else [])])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "r").exists()


def test_an_illusions_checkpoint_gives_its_saved_vocabulary(env):
    tokens = folder_tokens(inspect_model_folder(env["ckpt"]))
    assert tokens.encode is None and tokens.bos_id == 1
    task = CustomTask(CustomConfig(data=str(env["data"])), d_vocab=VOCAB, n_ctx=N_CTX, vocab_tokens=tokens.tokens)
    assert task.vocab.tokens[:3] == ("t0", "t1", "t2")
    assert len(task.splits()["long"]) == 30 and np.all(task.splits()["long"].lengths >= 15)


def test_custom_recipe(env, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(f'name = "mine"\n[analysis]\ntask = "custom"\ndata = "{env["data"]}"\nmodel = "{env["gpt2"]}"\n'
                      'ranks = [8]\nlayers = [0, 1]\nn_boot = 20\n')
    doc = json.loads(_ok(["analyze", str(recipe), "--json", "--threads", "1", "--no-report",
                          "--out", str(tmp_path / "run")]).stdout)
    assert _agreements(doc) == {"iid": 1.0, "long": 1.0}
    refused = runner.invoke(app, ["analyze", str(recipe), "--data", str(env["data"])])
    assert refused.exit_code == 2 and "--data cannot be combined with a recipe" in refused.stderr


@pytest.mark.parametrize(("change", "message", "unsaid"), [
    ({"vocab_size": -5}, "vocab_size must be a whole number of at least 1, got -5", "0..-6"),
    ({"n_embd": 64}, "the config does not describe these weights", "above report"),
])
def test_a_folder_whose_config_does_not_fit_its_weights_is_one_line(env, tmp_path, change, message, unsaid):
    folder = tmp_path / "model"
    shutil.copytree(env["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "custom", "--data", str(env["data"]), "--model", str(folder), "--rank",
                                 "2", "--out", str(out), *FAST])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert unsaid not in result.stderr and not out.exists()
