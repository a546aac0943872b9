"""The reproduction: every analysis recipe on every training seed of every model family, then
``docs/RESULTS.md`` (``illusions reproduce``).

One module per job, in the order the command runs them:

    plan        which runs: recipes x families x seeds -> Jobs and their folders (<recipe>/seed<N>/)
    outputs     whether every output may be written, checked before any work
    run         run or reuse the jobs (this process, worker processes or Slurm); reproduce.json
    aggregate   the runs read back and combined across training seeds (mean, 95% t-interval)
    metrics     the metrics the document shows: ranges, headers, decimals, figure labels
    judges      the rules that judge a claim on the runs
    claims      the claims table: each claim, the recipes it reads and its rule
    figures     the document's figures
    document    the Markdown document (render, write_document)

This package sits above the analyses and the reports (it writes each run's files and report); no
layer below imports it. Modules load their heavy libraries on first use.
"""
