"""Run the code task in a subprocess and report what it computed and which machine sources it touched.

Used by tests/test_pinned_corpus.py, not collected by pytest. Usage::

    python isolated_code_task.py MODE CACHE_DIR [--isolate EMPTY_DIR]

MODE ``splits`` builds small splits of the default (pinned) corpus and scores the bundled code model
on them; MODE ``analyze`` runs ``illusions analyze code --simplify svd --rank 8`` (small sizes) on the
bundled model. Prints one JSON object: a digest of the split arrays, the metrics, and the ``flagged``
events: the reads of machine code sources an audit hook saw while the task ran (a ``.py`` file of
the standard library that no imported module came from, a directory walk of the standard library,
anything under a JDK or Node.js folder). ``--isolate`` points the standard-library lookup
(``sysconfig``'s ``stdlib`` path) at ``EMPTY_DIR``, which ``JAVA_HOME`` and ``PATH`` should name too.
``control`` lists what the same check flags for one deliberate stdlib read and walk, so a test can
see that the check is able to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])
SKIP = ("site-packages", "dist-packages")
MACHINE_DIRS = ["/usr/lib/jvm", "/usr/java", "/Library/Java", "src.zip", "node_modules/npm"]


def _is_machine_source(event: str, path: str, imported: set[str]) -> bool:
    real = os.path.realpath(path)
    if any(d in real for d in MACHINE_DIRS):
        return True
    if not real.startswith(STDLIB + os.sep) and real != STDLIB:
        return False
    if any(part in SKIP for part in Path(real).relative_to(STDLIB).parts):
        return False
    if event == "os.scandir":  # Path.rglob walks with scandir; imports list folders with listdir
        return True
    return event == "open" and real.endswith(".py") and real not in imported


def flagged(events: list[tuple[str, str]]) -> list[str]:
    """The events that read machine sources (imports of stdlib modules excluded)."""
    imported = {os.path.realpath(f) for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    return sorted({f"{e} {p}" for e, p in events if _is_machine_source(e, p, imported)})


def split_digest(splits) -> str:
    h = hashlib.sha256()
    for name, s in splits.items():
        h.update(name.encode())
        arrays = [s.tokens, s.lengths, s.scored.seq, s.scored.pos, s.scored.target]
        arrays += [s.scored.meta[k] for k in sorted(s.scored.meta)]
        for a in arrays:
            h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def main() -> None:
    mode, cache = sys.argv[1], Path(sys.argv[2])
    if "--isolate" in sys.argv:
        empty = sys.argv[sys.argv.index("--isolate") + 1]
        real_get_paths = sysconfig.get_paths
        sysconfig.get_paths = lambda *a, **k: {**real_get_paths(*a, **k), "stdlib": empty}

    # Import what the run needs first, so that imports do not mingle with the reads under test.
    import numpy as np  # noqa: F401

    from illusions.bundled import load_bundled
    from illusions.cli import app
    from illusions.tasks.code import CodeConfig, CodeTask
    from illusions.training import evaluate

    events: list[tuple[str, str]] = []

    def hook(event: str, args: tuple) -> None:
        if event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], str | bytes | os.PathLike):
            events.append((event, os.fsdecode(args[0])))

    sys.addaudithook(hook)
    out: dict = {}
    if mode == "splits":
        model, meta = load_bundled("code")
        vocab = "".join(meta["task"]["vocab"][3:])
        task = CodeTask(CodeConfig(n_train=300, n_eval=40, max_scored=3000, vocab_chars=vocab), cache_dir=cache)
        splits = task.splits()
        out["digest"] = split_digest(splits)
        out["functions"] = task.meta()["split_functions"]
        out["fingerprint"] = task.meta()["corpus_fingerprint"]
        out["metrics"] = evaluate(model, splits, None, {name: None for name in splits})
    else:
        from typer.testing import CliRunner

        os.environ["ILLUSIONS_CACHE"] = str(cache)
        args = ["analyze", "code", "--simplify", "svd", "--rank", "8", "--fit-n", "64", "--max-seqs", "24",
                "--n-boot", "50", "--threads", "1", "--no-report", "--json", "--out", str(cache / "run")]
        result = CliRunner().invoke(app, args)
        if result.exit_code != 0:
            raise SystemExit(f"analyze failed ({result.exit_code}): {result.output}")
        table = json.loads(result.stdout)
        out["table"] = {k: v for k, v in table.items() if k not in ("out", "run_dir", "seconds", "timing")}
        out["digest"] = None
    out["flagged"] = flagged(events)
    imported = {os.path.realpath(f) for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    unread = next(n for n in sorted(os.listdir(STDLIB)) if n.endswith(".py") and os.path.join(STDLIB, n) not in imported)
    mark = len(events)
    # The control: one stdlib module read as text (not imported) and one walk of a stdlib folder.
    (Path(STDLIB) / unread).read_text(encoding="utf-8")
    next((Path(STDLIB) / "json").rglob("*.py"))
    out["control"] = flagged(events[mark:])
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
