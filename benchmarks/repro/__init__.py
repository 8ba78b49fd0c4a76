"""The stages of ``benchmarks/reproduce.py``, one module each; that script parses the flags and dispatches.

- ``common``: paths, constants, JSON I/O, logging and the environment record every stage shares.
- ``config``: the runs and sizes of the full and the ``--quick`` setup, and ``Ctx`` (paths and options).
- ``data``: the Shakespeare corpus, its train/validation split and the validation documents.
- ``plan`` and ``train``: the step plan from a throughput probe, and the ``train-2k`` / ``train-8k`` stages.
- ``eval_tova``, ``eval_megabyte``, ``eval_gla``: the evaluation stage of each experiment.
- ``report`` with ``report_tova``, ``report_megabyte``, ``report_gla`` and ``report_format``: the markdown
  report and its plots, built from the result JSON only.
- ``runner``: skipping finished stages, recording wall time, parallel eval stages and ``--export``.
"""
