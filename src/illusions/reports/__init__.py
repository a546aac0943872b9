"""Self-contained HTML reports of analysis runs (CircuitsVis attention, matplotlib figures).

    write_report_files(run, directory)        report.html + fig_*.png for a finished run
    write_run_with_report(run, out, ...)      the run's directory with those files inside, in one step
    rebuild_report(run_dir)                   the same files again from a saved run directory

Modules: :mod:`.build` gathers a run's data, :mod:`.attention` picks and computes attention
examples, :mod:`.geometry` projects queries and keys, :mod:`.plots` draws static figures,
:mod:`.checkpoints` draws the report over training steps and :mod:`.html` writes the page. Heavy
libraries (torch, matplotlib, circuitsvis) load on first use. This package holds per-run reports only:
the reproduction's document (``docs/RESULTS.md``) is :mod:`illusions.reproduction`.
"""

from illusions.reports.build import (
    REPORT_FILE,
    rebuild_report,
    write_report_files,
    write_run_with_report,
)

__all__ = ["REPORT_FILE", "rebuild_report", "write_report_files", "write_run_with_report"]
