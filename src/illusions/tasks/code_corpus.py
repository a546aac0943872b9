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

This module reads JSONL, caches and loads; the records are in :mod:`~illusions.tasks.code_functions`,
the machine's extractors in :mod:`~illusions.tasks.code_extract`, the pinned corpus in
:mod:`~illusions.tasks.code_pinned` (all their names are importable from here too).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from illusions.config import check_regular
from illusions.errors import IllusionsError
from illusions.io import atomic_write_bytes
from illusions.tasks.code_extract import (
    _STDLIB_SKIP_DIRS,
    EXTRACTOR_VERSION,
    JAVA_MAX_FILES,
    JS_MAX_FILE_BYTES,
    _balanced,
    _blank,
    _java_names,
    _js_files,
    _matching_brace,
    _stat_key,
    _stdlib_files,
    brace_functions,
    find_npm,
    find_src_zip,
    machine_functions,
    machine_sources,
    python_functions,
)
from illusions.tasks.code_functions import (
    Corpus,
    Function,
    _fingerprint_sorted,
    _order,
    fingerprint,
    make_corpus,
    normalize,
    strip_indent,
)
from illusions.tasks.code_pinned import (
    PINNED_DIR,
    PINNED_FORMAT,
    PINNED_MANIFEST,
    PINNED_PREFIX_CHARS,
    PINNED_VERSION,
    decode_pinned,
    encode_pinned,
    pinned_corpus,
    pinned_dir,
    pinned_file_name,
    pinned_manifest,
)
from illusions.tasks.jsonl import read_objects

# The corpus records, the machine's extractors and the pinned corpus live in their own modules;
# their names stay importable from here, where callers have always found them.
__all__ = [
    "CODE_FIELDS", "EXTRACTOR_VERSION", "JAVA_MAX_FILES", "JSONL_SUFFIXES", "JS_MAX_FILE_BYTES",
    "LANGUAGE_FIELDS", "MACHINE", "PINNED_DIR", "PINNED_FORMAT", "PINNED_MANIFEST", "PINNED_PREFIX_CHARS",
    "PINNED_VERSION", "Corpus", "Function", "_STDLIB_SKIP_DIRS", "_balanced", "_blank", "_fingerprint_sorted",
    "_java_names", "_js_files", "_matching_brace", "_order", "_stat_key", "_stdlib_files", "brace_functions",
    "corpus_cache_path", "decode_pinned", "describe_corpus", "encode_pinned", "find_npm", "find_src_zip",
    "fingerprint", "jsonl_files", "load_corpus", "machine_functions", "machine_sources", "make_corpus",
    "normalize", "pinned_corpus", "pinned_dir", "pinned_file_name", "pinned_manifest", "python_functions",
    "read_jsonl", "strip_indent",
]

log = logging.getLogger(__name__)

CODE_FIELDS = ("code", "original_string", "whole_func_string", "func_code_string", "function")
LANGUAGE_FIELDS = ("language", "lang")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")

MACHINE = "machine"
"""The ``corpus`` value that names the machine corpus (``""`` names the pinned one)."""


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
