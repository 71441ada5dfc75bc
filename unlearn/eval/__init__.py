"""Evaluation: TOFU and MUSE metrics of a model, against a reference (the retain model).

    result = evaluate_model("outputs/demo/target", EvalSettings(data="outputs/demo/data/tofu-seed0"),
                            reference=EvalReference.from_file("retain_eval.json"))
    result["aggregates"]["forget_quality"]

An evaluation reads and validates its data, plans a flat list of requests, lets one scorer
answer them all (this process: :class:`LocalScorer`; a Ray cluster: ``pipelines.eval``), and
aggregates. Metric formulas: :mod:`unlearn.eval.metrics`.
"""

from __future__ import annotations

import importlib

# Each name is imported from its module on first use. unlearn.eval.evaluation pulls in torch,
# scipy and scikit-learn (~3 s), which the light modules (report, cache) and their users, such as
# the gate and the CLI's help, do not need.
_HOMES = {"EvalReference": "report", "compare_table": "report", "format_aggregates": "report",
          "write_result": "report", "LocalScorer": "scoring"}
__all__ = [
    "BENCHMARKS", "DEFAULT_DATA", "EvalReference", "EvalSettings", "LocalScorer", "compare_table",
    "evaluate", "evaluate_model", "evaluate_once", "format_aggregates", "load_eval_data", "load_reference",
    "local_scorer", "write_result",
]


def __getattr__(name: str):
    if name not in __all__:  # a submodule not imported yet, or a name the package lacks
        raise AttributeError(f"module 'unlearn.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unlearn.eval.{_HOMES.get(name, 'evaluation')}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
