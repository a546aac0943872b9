"""Self-contained HTML reports of analysis runs (CircuitsVis attention, matplotlib figures).

    write_report_files(run, directory)        report.html + fig_*.png for a finished run
    write_run_with_report(run, out, ...)      the run's directory with those files inside, in one step
    rebuild_report(run_dir)                   the same files again from a saved run directory

Modules: :mod:`.build` gathers a run's data, :mod:`.verdict` states it in sentences, :mod:`.attention`
picks the example sequences and computes their attention, :mod:`.geometry` places queries and keys
relative to the proxy's kept subspace, :mod:`.latents` finds a sparse dictionary's out-of-distribution
latents, :mod:`.signals` shows whether the warning signals flag the proxy's failures, :mod:`.plots` draws
static figures, :mod:`.interactive` holds the page's scripts and the HTML they act on, and :mod:`.html`
writes the page. Heavy libraries (torch, matplotlib, circuitsvis) load on first use. This package holds
per-run reports only: the reproduction's document (``docs/RESULTS.md``) is :mod:`illusions.reproduction`.
"""

from illusions.reports.build import (
    REPORT_FILE,
    rebuild_report,
    write_report_files,
    write_run_with_report,
)

__all__ = ["REPORT_FILE", "rebuild_report", "write_report_files", "write_run_with_report"]
