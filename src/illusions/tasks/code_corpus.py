"""Source-code corpora for the code-completion task: the pinned corpus shipped with the package,
CodeSearchNet JSONL files, or this machine's code.

A corpus is a sorted, deduplicated tuple of :class:`Function` records (language + source text) with a
**fingerprint**: the sha256 over the sorted ``(language, text)`` pairs (plus the full length of a
function stored as a prefix), which every output records so that a result names exactly the code it
was computed on.

Three sources, named by the task's ``corpus`` setting:

* ``""`` (the default), **the pinned corpus** (:func:`pinned_corpus`): a compressed file shipped in
  the package (``illusions/assets/corpus/``) holding, for each function of a fixed set of permissively
  licensed sources (CPython's standard library from Debian packages, Bazel's Java from Debian, MIT
  npm packages' JavaScript), its language, source path, full length and first
  :data:`PINNED_PREFIX_CHARS` characters: all the task reads, the same bytes on every machine. Its
  manifest records the file's format version and sha256, checked on every load. ``tools/build_corpus.py``
  regenerates it from the named package versions, and the ``README.md`` beside it says where each
  language comes from and under which licence.
* **CodeSearchNet JSONL** (:func:`read_jsonl`), given a file (``.jsonl``, ``.jsonl.gz``, ``.json`` or
  ``.json.gz``) or a folder searched recursively for such files in sorted order. Each line is a JSON
  object; the code is taken from the first of :data:`CODE_FIELDS` present and the language from the
  first of :data:`LANGUAGE_FIELDS` (CodeSearchNet's own files use ``code`` and ``language``; the
  Hugging Face copy uses ``whole_func_string``/``func_code_string`` and ``language``).
* ``"machine"``, **the machine** (:func:`machine_functions`), with no network: the functions and methods of the running
  Python's standard library (``sysconfig``'s ``stdlib`` path; ``site-packages`` and the stdlib's own
  test suites are skipped), extracted with :mod:`ast`; Java methods from a JDK's ``src.zip`` (found
  through ``$JAVA_HOME``, the ``java`` on ``PATH`` and the usual JDK folders); JavaScript functions
  from the npm package that ships with the Node.js on ``PATH``. Java and JavaScript have no parser
  here, so a small extractor finds signatures with a regular expression on the source with comments
  and string contents blanked out, and takes the text up to the matching brace.

Reading JSONL or the machine is cached (gzip JSON, written atomically) under the task's cache folder,
keyed by the sources' paths, sizes and modification times, so a corpus is read once; the pinned corpus
is read straight from the package (no cache: it is as quick to read as one).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import textwrap
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from illusions.config import check_regular
from illusions.errors import IllusionsError
from illusions.io import atomic_write_bytes
from illusions.tasks.jsonl import read_objects

log = logging.getLogger(__name__)

# Bumped whenever extraction changes what a source yields, so stale caches are not reused.
EXTRACTOR_VERSION = 2

CODE_FIELDS = ("code", "original_string", "whole_func_string", "func_code_string", "function")
LANGUAGE_FIELDS = ("language", "lang")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")

# The machine corpus reads at most this many .java files of src.zip (an even stride over the sorted
# names, so every module is represented) and skips JavaScript files over this size (bundles/minified).
JAVA_MAX_FILES = 400
JS_MAX_FILE_BYTES = 200_000
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

MACHINE = "machine"
"""The ``corpus`` value that names the machine corpus (``""`` names the pinned one)."""

PINNED_FORMAT = "illusions-code-corpus"
PINNED_VERSION = 1
"""Format version of the pinned corpus file this code reads."""
PINNED_PREFIX_CHARS = 255
"""Characters kept of each function in the pinned corpus: ``n_ctx - 1`` of the bundled code model."""
PINNED_MANIFEST = "code-corpus.json"
PINNED_DIR = ("assets", "corpus")


@dataclasses.dataclass(frozen=True, order=True)
class Function:
    """One function's source text (dedented, ``\\n`` line ends) and its lowercase language name.

    Attributes:
        language: lowercase language name.
        text: the function's source, or (in the pinned corpus) its first characters.
        length: the whole function's length in characters when ``text`` is a prefix of it; 0 when
            ``text`` is the whole function (see :attr:`n_chars`).
        path: where it came from, for the record (not compared, not fingerprinted).
    """

    language: str
    text: str
    length: int = 0
    path: str = dataclasses.field(default="", compare=False)

    @property
    def n_chars(self) -> int:
        """Length of the whole function in characters (not only of :attr:`text`)."""
        return self.length or len(self.text)

    @property
    def truncated(self) -> bool:
        """Whether :attr:`text` is only the start of the function."""
        return self.length > len(self.text)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A deduplicated, sorted set of functions.

    Attributes:
        functions: sorted by ``(language, text)``, no duplicates.
        fingerprint: sha256 hex digest over the sorted ``(language, text)`` pairs.
        source: the corpus path as given, ``"machine"``, or ``"pinned"``.
        origins: where the functions came from (files, archives, packages), for the record.
        prefix_chars: when positive, functions longer than this are stored as their first
            ``prefix_chars`` characters (the pinned corpus); 0: every function is whole.
    """

    functions: tuple[Function, ...]
    fingerprint: str
    source: str
    origins: tuple[str, ...] = ()
    prefix_chars: int = 0

    def languages(self) -> dict[str, int]:
        """Number of functions per language, sorted by name."""
        counts: dict[str, int] = {}
        for f in self.functions:
            counts[f.language] = counts.get(f.language, 0) + 1
        return dict(sorted(counts.items()))


def normalize(text: str) -> str:
    """Unix line ends, no trailing whitespace at the end, common indentation removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return textwrap.dedent(text).strip("\n").rstrip()


def strip_indent(text: str) -> str:
    """Remove the first line's indentation from every line that starts with it, then :func:`normalize`.

    Plain dedenting removes nothing when a multi-line string literal in the body has lines at column
    0; the first line (the signature) says what the function's own indentation was.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    first = text.lstrip("\n")
    prefix = first[: len(first) - len(first.lstrip(" \t"))]
    if prefix:
        text = "\n".join(ln[len(prefix) :] if ln.startswith(prefix) else ln for ln in text.split("\n"))
    return normalize(text)


def _order(f: Function) -> tuple[str, str, int]:
    """The sort key of a function: its dataclass order (language, text, length) as a plain tuple,
    which sorts several times faster than the generated ``__lt__``."""
    return (f.language, f.text, f.length)


def fingerprint(functions: Iterable[Function]) -> str:
    """sha256 over the sorted, deduplicated ``(language, text)`` pairs (NUL-separated).

    A function stored as a prefix (``length`` set) adds ``\\x01`` and its full length after its text,
    so the fingerprint of a corpus of whole functions is what it was before prefixes existed.
    """
    return _fingerprint_sorted(sorted(set(functions), key=_order))


def _fingerprint_sorted(functions: list[Function]) -> str:
    h = hashlib.sha256()
    for f in functions:
        h.update(f.language.encode("utf-8") + b"\0" + f.text.encode("utf-8"))
        if f.length:
            h.update(b"\x01" + str(f.length).encode("ascii"))
        h.update(b"\0")
    return h.hexdigest()


def make_corpus(
    functions: Iterable[Function],
    *,
    source: str,
    origins: Iterable[str] = (),
    max_per_language: int = 0,
    prefix_chars: int = 0,
) -> Corpus:
    """Deduplicate, optionally cap each language, sort and fingerprint.

    Args:
        functions: raw records (duplicates allowed).
        source: the corpus path as given, ``"machine"`` or ``"pinned"``.
        origins: files or archives read, for the record.
        max_per_language: if positive, keep at most this many functions per language: those with the
            smallest sha256 of their text, a pseudo-random sample independent of file order.
        prefix_chars: see :class:`Corpus`.

    Returns:
        The corpus.
    """
    unique = sorted(set(functions), key=_order)
    if max_per_language > 0:
        by_lang: dict[str, list[Function]] = {}
        for f in unique:
            by_lang.setdefault(f.language, []).append(f)
        unique = []
        for fs in by_lang.values():
            if len(fs) > max_per_language:
                fs = sorted(fs, key=lambda f: hashlib.sha256(f.text.encode("utf-8")).digest())
                fs = fs[:max_per_language]
            unique.extend(fs)
        unique.sort(key=_order)
    return Corpus(tuple(unique), _fingerprint_sorted(unique), source, tuple(origins), prefix_chars)


# ----------------------------------------------------------------------------- CodeSearchNet JSONL


def jsonl_files(path: Path) -> list[Path]:
    """The JSONL files a corpus path names: the file itself, or those under a folder, sorted.

    In a folder, every entry named like a JSONL file that is not itself a folder is returned, so
    one that is not a readable regular file (a FIFO, a dangling symlink) is refused when it is read
    instead of being left out silently.
    """
    if not path.exists() and not path.is_symlink():
        raise IllusionsError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith(JSONL_SUFFIXES) and not p.is_dir())
        if not files:
            raise IllusionsError(
                f"corpus folder {path} holds no {', '.join(JSONL_SUFFIXES)} files"
            )
        for file in files:
            check_regular(file, what="corpus file")
        return files
    check_regular(path, what="corpus file")
    return [path]


def read_jsonl(path: Path) -> Iterator[tuple[Function, str]]:
    """Yield ``(function, origin)`` for every line of one CodeSearchNet-style JSONL file.

    Blank lines are skipped. The file and its lines are read by :func:`illusions.tasks.jsonl.read_objects`
    (a regular UTF-8 file, each line one JSON object without a repeated key); a line that lacks a
    code or language field raises an :class:`IllusionsError` naming the file and line.
    """
    path = Path(path)
    for where, record in read_objects(path, what="corpus file", line_label="corpus line "):
        code = next((record[k] for k in CODE_FIELDS if isinstance(record.get(k), str)), None)
        lang = next((record[k] for k in LANGUAGE_FIELDS if isinstance(record.get(k), str)), None)
        if code is None or lang is None:
            raise IllusionsError(
                f"{where} has no code field ({', '.join(CODE_FIELDS)}) "
                f"or no language field ({', '.join(LANGUAGE_FIELDS)})"
            )
        text = strip_indent(code)
        if text:
            yield Function(lang.strip().lower(), text), str(path)


# ----------------------------------------------------------------------------- Python (stdlib, ast)


def python_functions(source: str) -> list[str]:
    """Every function and method of a Python module, dedented (decorators excluded).

    Equivalent to :func:`ast.get_source_segment` per ``def`` node, but slicing the split lines once:
    ``get_source_segment`` re-splits the whole module per call, which is ~10x slower on the stdlib.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno is None:
            continue
        seg = [ln.encode("utf-8") for ln in lines[node.lineno - 1 : node.end_lineno]]
        seg[-1] = seg[-1][: node.end_col_offset]  # col offsets are byte offsets
        prefix = seg[0][: node.col_offset]
        # Keep the real indentation of the def line so dedent lines it up with the body.
        seg[0] = (prefix if not prefix.strip() else b" " * len(prefix)) + seg[0][node.col_offset :]
        out.append(strip_indent(b"".join(seg).decode("utf-8")))
    return out


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return root, files


# ----------------------------------------------------------------------------- Java / JavaScript

_JAVA_BLANK = re.compile(
    r'//[^\n]*|/\*.*?\*/|"""(?:\\.|[^\\])*?"""|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
    re.S,
)
# The last alternative is a regex literal: a "/" right after one of ( , = : [ ! & | ? { } ; (where a
# division cannot stand), up to the next unescaped "/" outside a character class, on one line.
_JS_BLANK = re.compile(
    r'//[^\n]*|/\*.*?\*/|`(?:\\.|[^`\\])*`|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''
    r"|(?<=[(,=:\[!&|?{};])[ \t]*/(?![/*])(?:\\.|\[(?:\\.|[^\]\\\n])*\]|[^/\\\n\[])+/",
    re.S,
)
_JAVA_MODIFIERS = r"(?:(?:public|protected|private|static|final|synchronized|abstract|native|default|strictfp)\s+)*"
_JAVA_SIG = re.compile(
    r"^[ \t]*" + _JAVA_MODIFIERS + r"(?:<[^;{}()\n]*>\s+)?"
    r"(?:(?P<type>[\w$.]+(?:<[^;{}()\n]*>)?(?:\[\])*)\s+)?"
    r"(?P<name>[\w$]+)\s*\([^;{}]*\)\s*(?:throws\s+[\w$.,\s]+?)?\s*\{",
    re.M,
)
_JS_PARAMS = r"\([^;{}()]*\)"
_JS_SIG = re.compile(
    r"^[ \t]*(?:"
    r"(?:export\s+)?(?:default\s+)?(?:async\s+)?function\b\s*\*?\s*(?P<fname>[\w$]*)\s*" + _JS_PARAMS + r"\s*\{"
    r"|(?:(?:const|let|var)\s+)?(?P<vname>[\w$.]+)\s*[:=]\s*(?:async\s+)?"
    r"(?:function\b\s*\*?\s*[\w$]*\s*" + _JS_PARAMS + r"\s*|(?:" + _JS_PARAMS + r"|[\w$]+)\s*=>\s*)\{"
    r"|(?:static\s+)?(?:async\s+)?(?:[gs]et\s+)?\*?\s*(?P<mname>#?[\w$]+)\s*" + _JS_PARAMS + r"\s*\{"
    r")",
    re.M,
)
_NOT_A_NAME = frozenset(
    "if for while switch catch return new else do try throw synchronized super this typeof await "
    "function class record case with".split()
)
_NOT_A_TYPE = frozenset("new return throw else record class case".split())
_OPEN, _CLOSE = "([{", ")]}"


def _blank(pattern: re.Pattern[str], text: str) -> str:
    """``text`` with comments and string literals replaced by spaces (newlines kept, same length)."""
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def _matching_brace(code: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``start`` in blanked code, or None if unbalanced."""
    stack = []
    for i in range(start, len(code)):
        c = code[i]
        if c in _OPEN:
            stack.append(_CLOSE[_OPEN.index(c)])
        elif c in _CLOSE:
            if not stack or stack.pop() != c:
                return None
            if not stack:
                return i
    return None


def _balanced(code: str) -> bool:
    stack = []
    for c in code:
        if c in _OPEN:
            stack.append(_CLOSE[_OPEN.index(c)])
        elif c in _CLOSE and (not stack or stack.pop() != c):
            return False
    return not stack


def brace_functions(text: str, language: str) -> list[str]:
    """Top-level methods/functions of a Java or JavaScript file (nested ones stay inside their parent).

    Signatures are matched on a copy of the source whose comments and string literals are blanked
    out; the function runs from the start of its signature line to the matching ``}``, and is dropped
    if its brackets do not balance (e.g. a JavaScript regex literal confused the blanking).
    """
    blank_re, sig_re = (_JAVA_BLANK, _JAVA_SIG) if language == "java" else (_JS_BLANK, _JS_SIG)
    code = _blank(blank_re, text)
    out = []
    pos = 0
    while True:
        m = sig_re.search(code, pos)
        if m is None:
            return out
        groups = m.groupdict()
        name = groups.get("name") or groups.get("fname") or groups.get("vname") or groups.get("mname") or ""
        if name.split(".")[-1] in _NOT_A_NAME or (groups.get("type") or "") in _NOT_A_TYPE:
            pos = m.end()
            continue
        end = _matching_brace(code, m.end() - 1)
        if end is None or not _balanced(code[m.start() : end + 1]):
            pos = m.end()
            continue
        # The pattern may begin on blanked comment lines above the signature: start at its own line.
        first = m.start() + len(code[m.start() : m.end()]) - len(code[m.start() : m.end()].lstrip())
        start = code.rfind("\n", 0, first) + 1
        out.append(strip_indent(text[start : end + 1]))
        pos = end + 1


def find_src_zip() -> Path | None:
    """A readable JDK ``src.zip``: under ``$JAVA_HOME``, the ``java`` on PATH, or the usual JDK folders."""
    homes: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        homes.append(Path(os.environ["JAVA_HOME"]))
    java = shutil.which("java")
    if java:
        homes.append(Path(java).resolve().parent.parent)
    for base in (Path("/usr/lib/jvm"), Path("/usr/java"), Path("/Library/Java/JavaVirtualMachines")):
        try:
            homes.extend(sorted(p for p in base.iterdir() if p.is_dir()))
        except OSError:
            continue
    for home in homes:
        for cand in (home / "lib" / "src.zip", home / "src.zip", home / "Contents/Home/lib/src.zip"):
            try:
                if cand.is_file() and zipfile.is_zipfile(cand):
                    return cand
            except OSError:  # e.g. a symlink loop, as some distributions ship
                continue
    return None


def find_npm() -> Path | None:
    """The npm package folder of the Node.js on PATH (``<prefix>/lib/node_modules/npm``)."""
    node = shutil.which("node")
    if not node:
        return None
    prefix = Path(node).resolve().parent.parent
    for cand in (prefix / "lib" / "node_modules" / "npm", prefix / "node_modules" / "npm"):
        if cand.is_dir():
            return cand
    return None


def _js_files(npm: Path) -> list[Path]:
    files = []
    for p in sorted(npm.rglob("*.js")):
        try:
            if p.is_file() and not p.name.endswith(".min.js") and p.stat().st_size <= JS_MAX_FILE_BYTES:
                files.append(p)
        except OSError:
            continue
    return files


def _java_names(zf: zipfile.ZipFile) -> list[str]:
    names = sorted(n for n in zf.namelist() if n.endswith(".java"))
    step = max(1, -(-len(names) // JAVA_MAX_FILES))  # ceil division
    return names[::step]


# ----------------------------------------------------------------------------- machine corpus


def _stat_key(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def machine_sources() -> dict[str, Any]:
    """What the machine corpus would read, with sizes and mtimes: the key of its cache."""
    root, files = _stdlib_files()
    src_zip, npm = find_src_zip(), find_npm()
    js = _js_files(npm) if npm else []
    return {
        "extractor": EXTRACTOR_VERSION,
        "python": sys.version.split()[0],
        "stdlib": [_stat_key(p) for p in files],
        "java": _stat_key(src_zip) if src_zip else None,
        "java_max_files": JAVA_MAX_FILES,
        "javascript": [_stat_key(p) for p in js],
        "js_max_file_bytes": JS_MAX_FILE_BYTES,
    }


def machine_functions() -> tuple[list[Function], list[str]]:
    """Extract every function of the machine's sources: ``(functions, origins)``."""
    functions: list[Function] = []
    origins: list[str] = []
    root, files = _stdlib_files()
    origins.append(f"python stdlib {root} ({len(files)} files)")
    for p in files:
        try:
            source = p.read_text(encoding="utf-8")
            texts = python_functions(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a stdlib file this Python cannot read or parse is not worth failing for
        functions.extend(Function("python", t) for t in texts)
    src_zip = find_src_zip()
    if src_zip is not None:
        with zipfile.ZipFile(src_zip) as zf:
            names = _java_names(zf)
            origins.append(f"java {src_zip} ({len(names)} files)")
            for name in names:
                text = zf.read(name).decode("utf-8", errors="replace")
                functions.extend(Function("java", t) for t in brace_functions(text, "java"))
    npm = find_npm()
    if npm is not None:
        js = _js_files(npm)
        origins.append(f"javascript {npm} ({len(js)} files)")
        for p in js:
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            functions.extend(Function("javascript", t) for t in brace_functions(text, "javascript"))
    return functions, origins


# ----------------------------------------------------------------------------- the pinned corpus


def pinned_dir() -> Path:
    """The package folder holding the pinned corpus, its manifest and its README."""
    return Path(__file__).resolve().parents[1].joinpath(*PINNED_DIR)


def pinned_file_name(version: int = PINNED_VERSION) -> str:
    """File name of the pinned corpus of format ``version``."""
    return f"code-corpus-v{version}.jsonl.gz"


def encode_pinned(
    functions: Iterable[Function],
    *,
    sources: list[dict[str, Any]],
    prefix_chars: int = PINNED_PREFIX_CHARS,
    built_with: str = "",
) -> bytes:
    """The bytes of a pinned corpus file holding ``functions`` (whole texts), cut to ``prefix_chars``.

    The file is gzip (level 9, no name, mtime 0) of UTF-8 JSON lines: a header object (format,
    version, prefix length, counts, ``sources``), then one ``[language, path, length, prefix]`` array
    per function, sorted by language, prefix, length and path; of functions with the same language,
    prefix and length only the first (smallest path) is kept, as the task could not tell them apart.

    Args:
        functions: whole functions, each with its ``path``.
        sources: where the functions came from (package, version, sha256, licence, ...), recorded
            in the header.
        prefix_chars: characters kept of each function.
        built_with: what extracted the functions (e.g. the Python version whose ``ast`` parsed them).

    Returns:
        The compressed file contents (the same for the same input and zlib).
    """
    rows: dict[tuple[str, str, int], str] = {}
    for f in functions:
        if f.truncated:
            raise ValueError("encode_pinned takes whole functions, not prefixes")
        key = (f.language, f.text[:prefix_chars], len(f.text))
        if key not in rows or f.path < rows[key]:
            rows[key] = f.path
    ordered = sorted(rows.items())
    languages: dict[str, int] = {}
    for (lang, _, _), _ in ordered:
        languages[lang] = languages.get(lang, 0) + 1
    header = {
        "format": PINNED_FORMAT,
        "version": PINNED_VERSION,
        "prefix_chars": prefix_chars,
        "functions": len(ordered),
        "languages": dict(sorted(languages.items())),
        "sources": sources,
        "built_with": built_with,
    }
    lines = [json.dumps(header, ensure_ascii=False, sort_keys=True)]
    lines += [json.dumps([lang, path, n, text], ensure_ascii=False) for (lang, text, n), path in ordered]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    return gzip.compress(payload, compresslevel=9, mtime=0)


def decode_pinned(data: bytes, *, where: str = "pinned corpus") -> tuple[dict[str, Any], list[Function]]:
    """Header and functions of a pinned corpus file's bytes (:func:`encode_pinned`).

    Raises:
        IllusionsError: the data is not a pinned corpus of format :data:`PINNED_VERSION`, or is damaged.
    """
    try:
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != PINNED_FORMAT:
            raise ValueError("not a pinned corpus file")
        if header.get("version") != PINNED_VERSION:
            raise IllusionsError(
                f"{where} has format version {header.get('version')}; this illusions reads version "
                f"{PINNED_VERSION}"
            )
        prefix = int(header["prefix_chars"])
        functions = []
        for row in json.loads("[" + ",".join(line for line in lines[1:] if line) + "]"):
            lang, path, n, text = row
            if not (isinstance(lang, str) and isinstance(path, str) and isinstance(text, str)):
                raise ValueError("a row is not [language, path, length, text]")
            if int(n) < len(text) or len(text) > prefix or (int(n) > len(text) and len(text) != prefix):
                raise ValueError(f"row {path!r} has {len(text)} characters of {n}")
            functions.append(Function(lang, text, int(n) if int(n) > len(text) else 0, path))
        if len(functions) != header["functions"]:
            raise ValueError(f"{len(functions)} rows, the header says {header['functions']}")
    except IllusionsError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise IllusionsError(f"{where} is damaged ({exc})") from None
    return header, functions


def pinned_manifest(data: bytes, functions: list[Function], header: dict[str, Any]) -> dict[str, Any]:
    """The manifest written beside a pinned corpus file: file name, version, size, sha256, fingerprint."""
    return {
        "format": PINNED_FORMAT,
        "version": header["version"],
        "file": pinned_file_name(header["version"]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "fingerprint": fingerprint(functions),
        "prefix_chars": header["prefix_chars"],
        "functions": header["functions"],
        "languages": header["languages"],
    }


@functools.lru_cache(maxsize=4)
def pinned_corpus(directory: Path | None = None) -> Corpus:
    """The pinned corpus shipped with the package, checked against its manifest.

    Reads only the package's own files (nothing of the machine's standard library, JDK or Node.js):
    the manifest, then the file it names, whose sha256 and format version must be the recorded ones.

    Args:
        directory: where the corpus lies (default :func:`pinned_dir`; tests pass a copy).

    Raises:
        IllusionsError: the file or manifest is missing, of another version, or does not match.
    """
    folder = Path(directory) if directory is not None else pinned_dir()
    manifest_path = folder / PINNED_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        version, name, want = manifest["version"], manifest["file"], manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IllusionsError(f"cannot read the pinned corpus manifest {manifest_path} ({exc})") from None
    if version != PINNED_VERSION:
        raise IllusionsError(
            f"the pinned corpus in {folder} has format version {version}; this illusions reads version "
            f"{PINNED_VERSION}"
        )
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IllusionsError(f"cannot read the pinned corpus {path} ({exc})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise IllusionsError(
            f"the pinned corpus {path} has sha256 {got[:12]}, but its manifest records {want[:12]}: "
            "the file is damaged or was replaced; reinstall illusions or rebuild it with tools/build_corpus.py"
        )
    header, functions = decode_pinned(data, where=f"the pinned corpus {path}")
    corpus = make_corpus(
        functions,
        source="pinned",
        origins=[f"{s['language']}: {s['package']} {s['version']} ({s['licence']})" for s in header["sources"]],
        prefix_chars=int(header["prefix_chars"]),
    )
    if len(corpus.functions) != len(functions) or corpus.fingerprint != manifest.get("fingerprint"):
        raise IllusionsError(f"the pinned corpus {path} does not match the fingerprint its manifest records")
    return corpus


# ----------------------------------------------------------------------------- loading with a cache


def _write_cache(path: Path, corpus: Corpus) -> None:
    data = {
        "fingerprint": corpus.fingerprint,
        "source": corpus.source,
        "origins": list(corpus.origins),
        "functions": [[f.language, f.text] for f in corpus.functions],
    }
    try:
        atomic_write_bytes(path, gzip.compress(json.dumps(data).encode("utf-8"), compresslevel=6, mtime=0))
    except OSError as exc:
        log.warning("could not write the corpus cache %s (%s); continuing without it", path, exc.strerror or exc)


def _read_cache(path: Path) -> Corpus | None:
    """The cached corpus; None (rebuild) when it is missing or damaged (gzip's CRC-32 catches
    changed bytes)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        data = json.loads(gzip.decompress(raw))
        functions = tuple(Function(lang, text) for lang, text in data["functions"])
        return Corpus(functions, data["fingerprint"], data["source"], tuple(data["origins"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error) as exc:
        log.warning("the cached corpus %s is damaged (%s); reading the sources again", path, exc)
        return None


def _corpus_key(path: str, max_per_language: int) -> tuple[str, list[Path]]:
    if path == MACHINE:
        files, key_data = [], machine_sources()
    else:
        files = jsonl_files(Path(path))
        try:
            key_data: Any = [_stat_key(p) for p in files]
        except OSError as exc:
            raise IllusionsError(f"cannot read corpus {path} ({exc})") from None
    key = hashlib.sha256(
        json.dumps([EXTRACTOR_VERSION, path, max_per_language, key_data]).encode("utf-8")
    ).hexdigest()[:16]
    return key, files


def describe_corpus(path: str) -> str:
    """How messages name the corpus a ``corpus`` setting selects."""
    if not path:
        return "the pinned corpus"
    if path == MACHINE:
        return "the machine corpus (Python stdlib, JDK src.zip, npm)"
    return f"corpus {path}"


def corpus_cache_path(path: str, cache_dir: Path, *, max_per_language: int = 0) -> Path | None:
    """Where :func:`load_corpus` caches this corpus (keyed by its sources' sizes and mtimes).

    None for the pinned corpus (``path`` empty), which is read from the package without a cache.
    """
    if not path:
        return None
    return Path(cache_dir) / f"corpus-{_corpus_key(path, max_per_language)[0]}.json.gz"


def load_corpus(path: str, *, cache_dir: Path | None = None, max_per_language: int = 0) -> Corpus:
    """The corpus a task's ``corpus`` setting names.

    Args:
        path: ``""`` for the pinned corpus shipped with the package; ``"machine"`` for this machine's
            Python stdlib, JDK ``src.zip`` and npm; else a CodeSearchNet JSONL file or folder.
        cache_dir: where to cache the parsed JSONL or machine corpus (None: no cache).
        max_per_language: passed to :func:`make_corpus`.

    Returns:
        The corpus.

    Raises:
        IllusionsError: the path is missing, unreadable or malformed, or yields no function; or the
            pinned corpus does not match its manifest.
    """
    if not path:
        corpus = pinned_corpus()
        if max_per_language > 0 and max(corpus.languages().values()) > max_per_language:
            corpus = make_corpus(
                corpus.functions,
                source=corpus.source,
                origins=corpus.origins,
                max_per_language=max_per_language,
                prefix_chars=corpus.prefix_chars,
            )
        return corpus
    key, files = _corpus_key(path, max_per_language)
    cache = Path(cache_dir) / f"corpus-{key}.json.gz" if cache_dir is not None else None
    if cache is not None and (hit := _read_cache(cache)) is not None:
        return hit
    if path == MACHINE:
        functions, origins = machine_functions()
    else:
        functions = []
        for file in files:
            functions.extend(f for f, _ in read_jsonl(file))
        origins = [str(f) for f in files]
    corpus = make_corpus(functions, source=path, origins=origins, max_per_language=max_per_language)
    if not corpus.functions:
        where = "the machine's standard library, JDK src.zip and npm" if path == MACHINE else f"corpus {path}"
        raise IllusionsError(f"{where} contains no functions")
    if cache is not None:
        _write_cache(cache, corpus)
    return corpus
