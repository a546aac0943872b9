"""The pinned code corpus shipped in the package: what it holds, how it is checked on load, how
tools/build_corpus.py makes it, and that the code task run on it opens none of the machine's code."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from illusions.errors import IllusionsError
from illusions.tasks import code_corpus
from illusions.tasks.code import CodeConfig, CodeTask
from illusions.tasks.code_corpus import (
    PINNED_MANIFEST,
    PINNED_PREFIX_CHARS,
    Function,
    decode_pinned,
    encode_pinned,
    fingerprint,
    load_corpus,
    pinned_corpus,
    pinned_dir,
)

ROOT = Path(__file__).resolve().parents[1]
PERMISSIVE = {"PSF-2.0", "Apache-2.0", "MIT", "ISC"}


def _manifest() -> dict:
    return json.loads((pinned_dir() / PINNED_MANIFEST).read_text())


def test_shipped_corpus_is_small_checked_and_holds_the_three_languages():
    manifest = _manifest()
    path = pinned_dir() / manifest["file"]
    data = path.read_bytes()
    assert len(data) == manifest["bytes"] < 5 * 2**20
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    corpus = pinned_corpus()
    assert corpus.source == "pinned" and corpus.prefix_chars == PINNED_PREFIX_CHARS == 255
    assert corpus.fingerprint == manifest["fingerprint"] == fingerprint(corpus.functions)
    assert corpus.languages() == manifest["languages"]
    assert set(corpus.languages()) == {"python", "java", "javascript"}
    assert corpus.languages()["python"] > 14500  # the recipe trains on 14,000 shallow ones
    assert all(f.path and (len(f.text) == 255 if f.truncated else f.length == 0) for f in corpus.functions)
    assert any(f.truncated for f in corpus.functions) and list(corpus.functions) == sorted(corpus.functions)
    header, _ = decode_pinned(data)
    assert {s["licence"] for s in header["sources"]} <= PERMISSIVE
    assert sum(s["functions"] for s in header["sources"]) == len(corpus.functions)
    assert all(len(s["sha256"]) == 64 and s["version"] for s in header["sources"])
    # The README beside it names every source package with its version and licence.
    readme = (pinned_dir() / "README.md").read_text()
    for s in header["sources"]:
        assert f"`{s['package']}` {s['version']}" in readme, s["package"]
    assert (pinned_dir() / "NOTICES.txt").is_file()


def test_the_default_corpus_is_the_pinned_one_and_machine_names_the_machine():
    assert CodeConfig().corpus == ""
    assert load_corpus("") is pinned_corpus()
    assert code_corpus.corpus_cache_path("", Path("unused")) is None
    assert code_corpus.MACHINE == "machine"
    assert code_corpus.describe_corpus("machine").startswith("the machine corpus")
    capped = load_corpus("", max_per_language=100)
    assert capped.languages() == {"java": 100, "javascript": 100, "python": 100}
    assert capped.prefix_chars == 255 and capped.source == "pinned"


def _functions() -> list[Function]:
    long = "def long(x):\n" + "".join(f"    y{i} = x + {i}\n" for i in range(40))
    return [
        Function("python", "def a():\n    return 1", 0, "p:a.py"),
        Function("python", long, 0, "p:long.py"),
        Function("python", long + "    return y0", 0, "p:long2.py"),
        Function("python", long, 0, "p:copy.py"),  # same text, another file: kept once, smallest path
        Function("java", "int f() { return 1; }", 0, "j:F.java"),
    ]


def test_encode_is_deterministic_and_decode_gives_prefixes_with_lengths():
    fs = _functions()
    data = encode_pinned(fs, sources=[{"package": "p"}], prefix_chars=100)
    assert encode_pinned(list(reversed(fs)), sources=[{"package": "p"}], prefix_chars=100) == data
    header, got = decode_pinned(data)
    assert header["functions"] == 4 and header["languages"] == {"java": 1, "python": 3}
    assert [f.language for f in got] == ["java", "python", "python", "python"]
    long = [f for f in got if f.truncated]
    assert len(long) == 2 and all(len(f.text) == 100 for f in long)
    assert sorted(f.n_chars for f in long) == sorted(len(t.text) for t in fs[1:3])
    assert {f.path for f in long} == {"p:copy.py", "p:long2.py"}
    # A prefix and the whole function it starts fingerprint differently (the length counts).
    assert fingerprint(long[:1]) != fingerprint([Function("python", long[0].text)])
    with pytest.raises(ValueError, match="whole functions"):
        encode_pinned(long, sources=[])


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(pinned_dir(), folder)
    return folder


def test_a_damaged_replaced_or_newer_corpus_is_refused_in_one_line(tmp_path):
    folder = _copy(tmp_path)
    manifest = json.loads((folder / PINNED_MANIFEST).read_text())
    data_path = folder / manifest["file"]
    data = bytearray(data_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_path.write_bytes(bytes(data))
    with pytest.raises(IllusionsError, match="sha256 .* but its manifest records"):
        pinned_corpus(folder)

    # A consistent file and manifest of another format version: named, not misread.
    other = _copy(tmp_path / "v2")
    small = encode_pinned(_functions(), sources=[], prefix_chars=100)
    raw = gzip.decompress(small).decode()
    header, rest = raw.split("\n", 1)
    v2 = gzip.compress((json.dumps({**json.loads(header), "version": 2}) + "\n" + rest).encode(), mtime=0)
    (other / manifest["file"]).write_bytes(v2)
    new = dict(manifest, sha256=hashlib.sha256(v2).hexdigest())
    (other / PINNED_MANIFEST).write_text(json.dumps(new))
    with pytest.raises(IllusionsError, match="format version 2; this illusions reads version 1"):
        pinned_corpus(other)
    (other / PINNED_MANIFEST).write_text(json.dumps(dict(new, version=2)))
    with pytest.raises(IllusionsError, match="format version 2"):
        pinned_corpus(other)

    # A valid file whose functions are not those the manifest fingerprints.
    (other / manifest["file"]).write_bytes(small)
    (other / PINNED_MANIFEST).write_text(json.dumps(dict(manifest, sha256=hashlib.sha256(small).hexdigest())))
    with pytest.raises(IllusionsError, match="does not match the fingerprint"):
        pinned_corpus(other)
    (other / manifest["file"]).unlink()
    with pytest.raises(IllusionsError, match="cannot read the pinned corpus"):
        pinned_corpus(other)
    with pytest.raises(IllusionsError, match="manifest"):
        pinned_corpus(tmp_path / "nowhere")
    with pytest.raises(IllusionsError, match="damaged"):
        decode_pinned(gzip.compress(b'{"format": "illusions-code-corpus", "version": 1}\n'))


def test_a_context_longer_than_the_pinned_prefix_is_refused(tmp_path):
    task = CodeTask(CodeConfig(n_ctx=300, n_train=10, n_eval=5), cache_dir=tmp_path)
    with pytest.raises(IllusionsError, match=r"first 255 characters .* n_ctx can be at most 256 with it \(got 300\)"):
        task.splits()


def test_pinned_splits_use_the_full_lengths_for_the_length_filter(tmp_path):
    corpus = pinned_corpus()
    longest = max(f.n_chars for f in corpus.functions if f.language == "python")
    assert longest > 5000  # so that max_chars = 5000 (the recipe's) drops some functions
    cfg = CodeConfig(n_train=50, n_eval=10, max_scored=500, min_chars=300, max_chars=400)
    task = CodeTask(cfg, cache_dir=tmp_path)
    kept = sum(1 for f in corpus.functions if f.language == "python" and 300 <= f.n_chars <= 400)
    assert 0 < kept < 3000
    splits = task.splits()
    # Every row is a 255-character prefix (the functions are at least 300 long).
    assert all(int(n) == 256 for s in splits.values() for n in s.lengths)


# ----------------------------------------------------------------------------- build script


def _build_module():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "tools" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_build_script_extracts_checks_licences_and_sha256(tmp_path, monkeypatch):
    build = _build_module()
    py = "import os\n\ndef first(a):\n    return a + 1\n\nclass K:\n    def method(self):\n        return 2\n"
    js = "function plain (a, b) {\n  return a + b\n}\n"
    deb = _ar({
        "debian-binary": b"2.0\n",
        "data.tar.xz": _tar({
            "./usr/lib/python3.11/mod.py": py.encode(),
            "./usr/lib/python3.11/test/test_mod.py": b"def skipped():\n    pass\n",
            "./usr/share/doc/fake-py/copyright": b"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n",
        }, "w:xz"),
    })
    tgz = _tar({"package/package.json": b'{"license": "MIT"}', "package/LICENSE": b"MIT licence text",
                "package/lib/a.js": js.encode(), "package/lib/a.min.js": js.encode()}, "w:gz")
    src = tmp_path / "src"
    src.mkdir()
    (src / "fake-py_1.0_all.deb").write_bytes(deb)
    (src / "fake-js-2.0.tgz").write_bytes(tgz)
    sources = (
        build.Source("python", "debian", "fake-py", "1.0", hashlib.sha256(deb).hexdigest(), "PSF-2.0",
                     "usr/lib/python3.11/", ".py", licence_text=build.PSF),
        build.Source("javascript", "npm", "fake-js", "2.0", hashlib.sha256(tgz).hexdigest(), "MIT", "lib/", ".js"),
    )
    monkeypatch.setattr(build, "SOURCES", sources)
    out = tmp_path / "out"
    assert build.main(["--sources", str(src), "--out", str(out)]) == 0
    manifest = json.loads((out / PINNED_MANIFEST).read_text())
    corpus = pinned_corpus(out)
    assert corpus.languages() == {"javascript": 1, "python": 2} == manifest["languages"]
    assert {f.path for f in corpus.functions} == {"fake-py:mod.py", "fake-js@2.0:a.js"}
    assert "MIT licence text" in (out / "NOTICES.txt").read_text()
    assert build.main(["--sources", str(src), "--out", str(out), "--check"]) == 0

    (src / "fake-js-2.0.tgz").write_bytes(tgz + b"\0")
    with pytest.raises(build.BuildError, match="has sha256"):
        build.build(src, say=lambda _: None)
    gpl = _tar({"package/package.json": b'{"license": "GPL-3.0"}', "package/lib/a.js": js.encode()}, "w:gz")
    (src / "fake-js-2.0.tgz").write_bytes(gpl)
    monkeypatch.setattr(build, "SOURCES", (sources[0], build.Source(
        "javascript", "npm", "fake-js", "2.0", hashlib.sha256(gpl).hexdigest(), "MIT", "lib/", ".js")))
    with pytest.raises(build.BuildError, match="declares licence 'GPL-3.0', expected MIT"):
        build.build(src, say=lambda _: None)
    (src / "fake-js-2.0.tgz").unlink()
    with pytest.raises(build.BuildError, match="npm pack fake-js@2.0"):
        build.build(src, say=lambda _: None)


# ----------------------------------------------------------------------------- machine independence


def _run_isolated(mode: str, cache: Path, isolate: Path | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / "isolated_code_task.py"), mode, str(cache)]
    if isolate is not None:
        # No java, node or npm on PATH, JAVA_HOME names an empty folder, and sysconfig's stdlib too.
        env.update(PATH=str(isolate), JAVA_HOME=str(isolate))
        cmd += ["--isolate", str(isolate)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["splits", "analyze"])
def test_code_task_gives_the_same_results_without_the_machines_sources(tmp_path, mode):
    """The pinned corpus makes splits and metrics (and `analyze code --rank 8`) independent of the
    machine: with no JDK or Node.js reachable and the stdlib lookup pointed at an empty folder, each
    built from scratch, the split bytes and the figures equal the normal run's, and an audit hook saw
    no file of the standard library, a JDK or Node.js opened (a deliberate read shows it would)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    normal = _run_isolated(mode, tmp_path / "cache-normal", None)
    isolated = _run_isolated(mode, tmp_path / "cache-isolated", empty)
    assert isolated["flagged"] == [] and normal["flagged"] == []
    assert len(isolated["control"]) == 2  # the check sees a stdlib module read as text and a walk
    assert {k: v for k, v in isolated.items() if k != "control"} == {
        k: v for k, v in normal.items() if k != "control"
    }
    if mode == "splits":
        assert isolated["digest"] and isolated["fingerprint"] == pinned_corpus().fingerprint
        assert set(isolated["metrics"]) == {"train", "iid", "deep_nesting", "java", "javascript"}
    else:
        assert isolated["table"]
