"""Build the pinned code corpus shipped in the package (src/illusions/assets/corpus/).

Reads a fixed list of package archives (Debian ``.deb`` files and npm ``.tgz`` tarballs, each pinned
by name, version and sha256), extracts every function with the code task's own extractors
(:func:`illusions.tasks.code_corpus.python_functions` for Python, ``brace_functions`` for Java and
JavaScript), checks each package's licence, and writes the corpus file and its manifest with
:func:`illusions.tasks.code_corpus.encode_pinned`. Nothing is downloaded here: fetch the archives
first with the package clients (the command for each is printed when one is missing)::

    mkdir -p .cache/corpus-sources && cd .cache/corpus-sources
    apt-get download libpython3.11-minimal=3.11.2-6+deb12u9 ...   # see SOURCES below
    npm pack lodash@4.17.21 ...

then, from the repository root::

    PYTHONPATH=src python tools/build_corpus.py --sources .cache/corpus-sources           # write
    PYTHONPATH=src python tools/build_corpus.py --sources .cache/corpus-sources --check   # compare

``--check`` rebuilds in memory and exits 1 unless the functions equal the shipped file's (and says
whether the compressed bytes are identical too; they are for the same zlib). Python functions are
parsed with the running Python's ``ast``: build with Python 3.11, as the shipped file was.

Debian moves superseded versions out of its main archive; the pinned ones stay available from its
snapshot archive under the same file names, and the sha256 below tells whether a file is the one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path, PurePosixPath

from illusions.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from illusions.tasks.code_corpus import (
    JS_MAX_FILE_BYTES,
    PINNED_MANIFEST,
    Function,
    brace_functions,
    decode_pinned,
    encode_pinned,
    pinned_dir,
    pinned_file_name,
    pinned_manifest,
    python_functions,
)

# Functions kept per language at most (those with the smallest sha256 of their text: a pseudo-random
# sample independent of file order). Python keeps all of the standard library's; Java and JavaScript
# need only enough for their 500-function evaluation splits and a varied sample, and every function
# kept costs about 60 bytes of the shipped file.
MAX_PER_LANGUAGE = {"python": 0, "java": 6000, "javascript": 6000}
# Directories whose files are not used (test suites, and a Python package's vendored copies).
NOTICES_FILE = "NOTICES.txt"
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__tests__"})


@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned package archive and which of its files hold the functions.

    Attributes:
        language: language of the functions taken.
        registry: ``debian`` or ``npm``.
        package, version, arch: the package (``arch`` for Debian file names only).
        sha256: of the archive file.
        licence: SPDX name of the licence the taken files are under; checked against the Debian
            copyright file (``licence_text``) or npm's ``package.json`` ``license`` field.
        root: folder inside the unpacked package whose files are read (Debian: the file system path;
            npm: inside ``package/``).
        suffix: file name ending read.
        exclude: regular expression; paths (relative to ``root``) matching it are skipped.
        licence_text: a phrase the Debian copyright file must contain.
    """

    language: str
    registry: str
    package: str
    version: str
    sha256: str
    licence: str
    root: str
    suffix: str
    arch: str = "all"
    exclude: str = ""
    licence_text: str = ""

    @property
    def file_name(self) -> str:
        if self.registry == "debian":
            version = self.version.split(":", 1)[-1]
            return f"{self.package}_{version}_{self.arch}.deb"
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    @property
    def fetch(self) -> str:
        if self.registry == "debian":
            return f"apt-get download {self.package}={self.version}"
        return f"npm pack {self.package}@{self.version}"

    @property
    def label(self) -> str:
        return f"{self.package}@{self.version}" if self.registry == "npm" else self.package

    def record(self, files: int, functions: int) -> dict[str, object]:
        return {
            "language": self.language,
            "registry": self.registry,
            "package": self.package,
            "version": self.version,
            "file": self.file_name,
            "sha256": self.sha256,
            "licence": self.licence,
            "root": self.root,
            "files": files,
            "functions": functions,
        }


PSF = "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"
PY = "usr/lib/python3.11/"
JAVA = "usr/src/bazel-bootstrap/src/main/java/"
SOURCES = (
    # CPython 3.11's standard library as Debian 12 packages it (split over six packages).
    Source("python", "debian", "libpython3.11-minimal", "3.11.2-6+deb12u9",
           "69f41cfa3f4ba17284e538f843069d7529c53c207d2ae17a5b02785944870e33",
           "PSF-2.0", PY, ".py", arch="amd64", licence_text=PSF),
    Source("python", "debian", "libpython3.11-stdlib", "3.11.2-6+deb12u9",
           "10f13e000ee757f5f2d2d3569f9e30546214a0c850acd78695feae373bfa3e53",
           "PSF-2.0", PY, ".py", arch="amd64", licence_text=PSF),
    Source("python", "debian", "python3-distutils", "3.11.2-3",
           "a620b555f301860a08e30534c7e6f7d79818e5e1977bfec39a612e7003074318",
           "PSF-2.0", PY, ".py", licence_text=PSF),
    Source("python", "debian", "python3-lib2to3", "3.11.2-3",
           "4e7f5e01e49a0622d10db3d0995666a6ead6a369cd127a996e9a4f9e91696a51",
           "PSF-2.0", PY, ".py", licence_text=PSF),
    Source("python", "debian", "python3-tk", "3.11.2-3",
           "33badffb9316204fda015b1a9d331c03bd322dfbb217930de5dd5ca95b6af7d2",
           "PSF-2.0", PY, ".py", arch="amd64", licence_text=PSF),
    Source("python", "debian", "idle-python3.11", "3.11.2-6+deb12u9",
           "c066b167e4630e16d6aade9a4c1475a4063aec8da9d6f4a5ca9ac9d9645488fd",
           "PSF-2.0", PY, ".py", licence_text=PSF),
    # Bazel's own Java (src/main/java, "Copyright The Bazel Authors", Apache-2.0), as Debian ships it.
    Source("java", "debian", "bazel-bootstrap-source", "4.2.3+ds-9",
           "5267689b1cb59438997f063b05420748131774ae51a514f12ca7f18722248b00",
           "Apache-2.0", JAVA, ".java", licence_text="License: Apache-2.0"),
    # JavaScript: MIT and ISC npm packages indented with spaces (as the Python is: a tab is <unk> in the
    # vocabulary), hand-written sources only (no bundles, minified files, locales).
    Source("javascript", "npm", "lodash", "4.17.21",
           "6a087ac9e5702a0c9d60fbcd48696012646ec8df1491dea472b150e79fcaf804",
           "MIT", "", ".js", exclude=r"^(lodash|core|lodash\.min|core\.min)\.js$|^fp/"),
    Source("javascript", "npm", "underscore", "1.13.7",
           "a252090ea284c52edc7c8a90e05cf97fb56e2d151a1e70c203e8ec27eb50cd66", "MIT", "modules/", ".js"),
    Source("javascript", "npm", "async", "3.2.6",
           "6bb45cfba08cd2eea39eb3ce6eaa94113070fe137ec0bd4a9f122be9a0250e6f", "MIT", "internal/", ".js"),
    Source("javascript", "npm", "bluebird", "3.7.2",
           "c68b0b2a44f58961277e975053c6f0053d93bac8f68cef9dae596f2a04806ddc", "MIT", "js/release/", ".js"),
    Source("javascript", "npm", "express", "4.21.2",
           "fc43a91e7dc7affb53c6ad7123a4f35485ed3c45226ae7a3847b7738e783e008", "MIT", "lib/", ".js"),
    Source("javascript", "npm", "moment", "2.30.1",
           "52219a9fee5e1faade4c72536c173c54cedd5e2619272dd0c251a30aeafcde8c", "MIT", "src/lib/", ".js"),
    Source("javascript", "npm", "eslint", "8.57.1",
           "d1b7839d38cd5738b2242eab4e00771c212e71cc2580468b97934f0fc2f2de3b", "MIT", "lib/", ".js"),
    Source("javascript", "npm", "@npmcli/arborist", "7.5.4",
           "e3892fafb3cb4fc130a6298a99d492b3c7d953db6f2f2861cc287c583b827fe5", "ISC", "lib/", ".js"),
    Source("javascript", "npm", "mocha", "10.8.2",
           "59884ed98aaeaae5bb7ea50be87917e66a77237554106a5d467ce884e2e7293b", "MIT", "lib/", ".js"),
    Source("javascript", "npm", "commander", "12.1.0",
           "56affc6ddafe486f94b428ae2823d059cf60d4dae2f33eaaf1b1ec4306f73173", "MIT", "lib/", ".js"),
    Source("javascript", "npm", "ws", "8.18.0",
           "a08221f2851472c944ca0178d89a9888c7f43fbd9998afc8a7ec6fe417c4ca20", "MIT", "lib/", ".js"),
)


class BuildError(Exception):
    """A missing, altered or unexpected source archive."""


def read_ar(data: bytes) -> dict[str, bytes]:
    """Members of a Debian ``ar`` archive (``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise BuildError("not an ar archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def package_files(source: Source, data: bytes) -> dict[str, bytes]:
    """Every regular file of a package archive, by path (Debian: file system path; npm: in package/)."""
    if source.registry == "debian":
        members = read_ar(data)
        name = next((n for n in members if n.startswith("data.tar")), None)
        if name is None:
            raise BuildError(f"{source.file_name} has no data.tar member")
        blob, strip = members[name], "./"
    else:
        blob, strip = data, "package/"
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        for member in tar:
            if not member.name.startswith(strip):
                continue
            if member.issym():  # kept as "-> target", for the Debian doc folder linked to a dependency's
                out[member.name[len(strip) :]] = f"-> {member.linkname}".encode()
            elif member.isfile() and (fh := tar.extractfile(member)) is not None:
                out[member.name[len(strip) :]] = fh.read()
    return out


def licence_notice(source: Source, files: dict[str, bytes], copyrights: dict[str, str]) -> str:
    """The package's licence text to ship beside the corpus (its LICENSE file, or Debian copyright)."""
    if source.registry == "debian":
        return copyrights[source.package]
    names = sorted(n for n in files if "/" not in n and re.fullmatch(r"(?i)licen[cs]e(\.md|\.txt)?", n))
    if not names:
        raise BuildError(f"{source.label} ships no LICENSE file")
    return files[names[0]].decode("utf-8", "replace").strip()


def check_licence(source: Source, files: dict[str, bytes], copyrights: dict[str, str]) -> None:
    """Raise unless the package states the expected licence.

    npm: ``package.json``'s ``license``. Debian: the package's copyright file, or the one of the
    package its doc folder links to (e.g. libpython3.11-stdlib's is libpython3.11-minimal's), which
    ``copyrights`` holds once that package was read.
    """
    if source.registry == "npm":
        declared = json.loads(files["package.json"]).get("license")
        if declared != source.licence:
            raise BuildError(f"{source.label} declares licence {declared!r}, expected {source.licence}")
        return
    doc = f"usr/share/doc/{source.package}"
    link = files.get(doc, b"").decode()
    if link.startswith("-> ") and "/" not in link[3:]:
        text = copyrights.get(link[3:], "")
    else:
        text = files.get(f"{doc}/copyright", b"").decode("utf-8", "replace")
    if not text:
        raise BuildError(f"{source.file_name} has no {doc}/copyright (nor a link to a package read before)")
    if source.licence_text not in text:
        raise BuildError(f"the copyright file of {source.file_name} does not state {source.licence_text!r}")
    copyrights[source.package] = text


def extract(source: Source, files: dict[str, bytes]) -> tuple[int, list[Function]]:
    """``(files read, functions)`` of one package, each function with its ``package:path``."""
    exclude = re.compile(source.exclude) if source.exclude else None
    n_files, out = 0, []
    for path in sorted(files):
        if not path.startswith(source.root) or not path.endswith(source.suffix):
            continue
        rel = path[len(source.root) :]
        if SKIP_DIRS.intersection(PurePosixPath(rel).parts[:-1]) or (exclude and exclude.search(rel)):
            continue
        data = files[path]
        if source.language == "javascript" and (rel.endswith(".min.js") or len(data) > JS_MAX_FILE_BYTES):
            continue
        try:
            text = data.decode("utf-8")
            texts = python_functions(text) if source.language == "python" else brace_functions(text, source.language)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # e.g. a Python 2 file kept as test data: not a source of this corpus
        n_files += 1
        where = f"{source.label}:{rel}"
        out.extend(Function(source.language, t, 0, where) for t in texts if t)
    return n_files, out


def cap(functions: list[Function], limit: int) -> list[Function]:
    """The ``limit`` functions with the smallest sha256 of their text (0: all)."""
    unique: dict[str, Function] = {}
    for f in functions:
        if f.text not in unique or f.path < unique[f.text].path:
            unique[f.text] = f
    kept = sorted(unique.values(), key=lambda f: hashlib.sha256(f.text.encode("utf-8")).digest())
    return kept[:limit] if limit else kept


def build(sources_dir: Path, *, say=print) -> tuple[bytes, dict[str, object], str]:
    """The corpus file's bytes, its manifest and its licence notices, from the archives in ``sources_dir``."""
    missing = [s for s in SOURCES if not (sources_dir / s.file_name).is_file()]
    if missing:
        raise BuildError(
            f"missing in {sources_dir}: {', '.join(s.file_name for s in missing)}; fetch them there with:\n"
            + "\n".join(f"  {s.fetch}" for s in missing)
        )
    by_language: dict[str, list[Function]] = {}
    copyrights: dict[str, str] = {}
    notices: dict[str, list[str]] = {}  # licence text -> the packages it covers
    stats = []
    for source in SOURCES:
        data = (sources_dir / source.file_name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != source.sha256:
            raise BuildError(f"{source.file_name} has sha256 {digest}, expected {source.sha256}")
        files = package_files(source, data)
        check_licence(source, files, copyrights)
        notices.setdefault(licence_notice(source, files, copyrights), []).append(f"{source.package} {source.version}")
        n_files, functions = extract(source, files)
        by_language.setdefault(source.language, []).extend(functions)
        stats.append((source, n_files, functions))
        say(f"{source.language:<10} {source.label:<28} {n_files:5d} files {len(functions):6d} functions")
    kept: list[Function] = []
    for language, functions in sorted(by_language.items()):
        chosen = cap(functions, MAX_PER_LANGUAGE.get(language, 0))
        say(f"{language:<10} {len(chosen):6d} functions kept of {len(functions)}")
        kept.extend(chosen)
    built_with = f"Python {sys.version.split()[0]} ast"
    # Encode once to learn which functions survive (the prefix deduplication), then record per
    # package how many of its functions the file holds.
    _, rows = decode_pinned(encode_pinned(kept, sources=[], built_with=built_with))
    held: dict[str, int] = {}
    for f in rows:
        label = f.path.split(":", 1)[0]
        held[label] = held.get(label, 0) + 1
    records = [source.record(n_files, held.get(source.label, 0)) for source, n_files, _ in stats]
    data = encode_pinned(kept, sources=records, built_with=built_with)
    header, decoded = decode_pinned(data)
    parts = [
        "Licence notices of the packages the pinned code corpus (code-corpus-v*.jsonl.gz) was extracted\n"
        "from, as each package ships them (npm: its LICENSE file; Debian: its copyright file). Written by\n"
        "tools/build_corpus.py; see README.md beside this file.\n"
    ]
    for text, labels in notices.items():
        parts.append("=" * 78 + "\n" + "\n".join(labels) + "\n" + "=" * 78 + "\n\n" + text.strip() + "\n")
    return data, pinned_manifest(data, decoded, header), "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=Path, default=Path(".cache/corpus-sources"),
                        help="folder holding the package archives (default .cache/corpus-sources)")
    parser.add_argument("--out", type=Path, default=pinned_dir(),
                        help="folder to write the corpus and manifest to (default: the package's)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the corpus in --out instead of writing; exit 1 if they differ")
    args = parser.parse_args(argv)
    try:
        data, manifest, notices = build(args.sources)
    except (BuildError, OSError, tarfile.TarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = args.out / str(manifest["file"])
    if args.check:
        if not target.is_file():
            print(f"error: {target} does not exist", file=sys.stderr)
            return 2
        shipped = target.read_bytes()
        rows = [[(f.language, f.text, f.length, f.path) for f in decode_pinned(d)[1]] for d in (shipped, data)]
        same_rows = rows[0] == rows[1]
        print(f"functions {'identical' if same_rows else 'DIFFERENT'}; "
              f"bytes {'identical' if shipped == data else 'different'} ({len(data):,} bytes rebuilt, "
              f"{len(shipped):,} shipped)")
        return 0 if same_rows else 1
    atomic_write_bytes(target, data)
    atomic_write_json(args.out / PINNED_MANIFEST, manifest)
    atomic_write_text(args.out / NOTICES_FILE, notices)
    print(f"wrote {target} ({len(data):,} bytes, sha256 {manifest['sha256']}), {PINNED_MANIFEST} "
          f"and {NOTICES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["SOURCES", "Source", "build", "main", "pinned_file_name"]
