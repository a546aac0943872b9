"""The machine corpus: functions extracted from this machine's Python standard library (with
:mod:`ast`), a JDK's ``src.zip`` and the npm of the Node.js on ``PATH`` (signatures found by regular
expressions on blanked source, bodies up to the matching brace); see :mod:`illusions.tasks.code_corpus`.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

from illusions.tasks.code_functions import Function, strip_indent

# Bumped whenever extraction changes what a source yields, so stale caches are not reused.
EXTRACTOR_VERSION = 2

# The machine corpus reads at most this many .java files of src.zip (an even stride over the sorted
# names, so every module is represented) and skips JavaScript files over this size (bundles/minified).
JAVA_MAX_FILES = 400
JS_MAX_FILE_BYTES = 200_000
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


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
