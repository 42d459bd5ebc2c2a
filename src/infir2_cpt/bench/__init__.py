"""`infir2 bench`: FP8 against BF16 (and any other variant) through the real launcher and training loop.

Each variant is one `infir2 train` run in a child process (torchrun -> infir2_cpt.runtime.entry -> Megatron's
pretrain), on mock data (or, with --fidelity, on a prepared dataset), one after the other, each in its own
experiment folder <experiments root>/bench-<timestamp>/<variant>. Every figure comes from Megatron's own log lines
(reports/runlog.py); on top of them the bench computes tokens/s per GPU, model FLOPs with an explicit formula
(recipe/shape.py), MFU against the GPU's dense peak for the variant's precision, and ratios against a baseline.

    variants.py  the variant language (built-ins, --variant NAME:ITEMS, --variants-file)
    plan.py      the request and every variant planned by the launcher's own planner, before anything runs
    run.py       the GPU probe, one child process per variant, the results after every variant
    metrics.py   a run's figures from its log, GPU peaks and MFU, ratios and the fidelity gap
    report.py    bench.json, the Markdown table, the plots
    trace.py     a profiler trace's GPU time by kernel category (--profile)
    memory.py    what is live at the memory peak of a CUDA memory snapshot (--memory-snapshot)
"""
