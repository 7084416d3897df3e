"""Explanation drift: what changed between two explanations (two models, two data sets, a
production batch against the audited explanation).

Modules: ``summary`` (one side of a comparison, from a stage state or an explain run's files),
``compare`` (the pure comparison and its verdict), ``documents`` (``drift.json`` and its plot),
``workflow`` (the three forms of ``mlflow-governance compare`` and their logging), ``monitor``
(one production batch as one step of a monitoring run).
"""
