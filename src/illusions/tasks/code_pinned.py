"""The pinned corpus shipped with the package: its file format (:func:`encode_pinned`,
:func:`decode_pinned`), its manifest, and :func:`pinned_corpus`, which reads it and checks it against
the manifest; see :mod:`illusions.tasks.code_corpus`."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from illusions.errors import IllusionsError
from illusions.tasks.code_functions import Corpus, Function, fingerprint, make_corpus

PINNED_FORMAT = "illusions-code-corpus"
PINNED_VERSION = 1
"""Format version of the pinned corpus file this code reads."""
PINNED_PREFIX_CHARS = 255
"""Characters kept of each function in the pinned corpus: ``n_ctx - 1`` of the bundled code model."""
PINNED_MANIFEST = "code-corpus.json"
PINNED_DIR = ("assets", "corpus")


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
