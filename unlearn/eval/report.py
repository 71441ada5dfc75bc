"""Aggregates with reasons for what could not be computed, the reference, the table and JSON.

The JSON an evaluation writes::

    {"benchmark": "tofu", "model": ..., "data": ..., "forget_split": ..., "reference": ...,
     "aggregates": {"forget_quality": 0.43, "privleak": null, ...},
     "unavailable": {"privleak": "no reference (retain model or its eval JSON) given"},
     "per_sample": {"forget": {"prob": [...], "truth_ratio": [...], ...}, ...}, ...}

``aggregates`` keys are stable snake_case names (the registry gate reads them); a metric that
could not be computed is ``null`` there and its reason is under the same key in
``unavailable``. Per-sample lists are indexed by the row of their split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.data import DataError
from unlearn.report import format_table

SCHEMA_VERSION = 1

# Row order of the terminal table; the first group is the headline.
TOFU_HEADLINE = ("forget_quality", "model_utility", "forget_prob", "forget_rouge",
                 "forget_truth_ratio", "privleak", "extraction_strength")
MUSE_HEADLINE = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")

#: What the holdout split gives (None without one): every membership attack's AUC, the Min-k
#: attack's two-sided p-value, and the Prob and ROUGE of never-seen answers.
HOLDOUT_METRICS = ("mia_min_k_auc", "mia_loss_auc", "mia_zlib_auc", "mia_min_k_pvalue",
                   "holdout_prob", "holdout_rouge")


def headline(benchmark: str) -> tuple[str, ...]:
    """The metrics a person reads first for ``benchmark`` (tables, before/after comparisons)."""
    return TOFU_HEADLINE if benchmark == "tofu" else MUSE_HEADLINE


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None


@dataclass
class Aggregates:
    values: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: float | None) -> None:
        if value is not None and not math.isfinite(value):
            self.unavailable(key, f"not finite ({value})")
            return
        self.values[key] = value
        self.reasons.pop(key, None)

    def unavailable(self, key: str, reason: str) -> None:
        self.values[key] = None
        self.reasons[key] = reason


@dataclass
class EvalReference:
    """What forget quality and privleak need from the retain model's evaluation."""

    origin: str
    benchmark: str
    forget_split: str | None
    truth_ratios: list[float] | None
    mia_auc: float | None

    @classmethod
    def from_result(cls, result: dict, origin: str) -> EvalReference:
        for key in ("benchmark", "aggregates", "per_sample"):
            if key not in result:
                raise DataError(f"reference {origin}: not an evaluation JSON (no {key!r} field)")
        forget = result["per_sample"].get("forget", {})
        return cls(origin=origin, benchmark=result["benchmark"], forget_split=result.get("forget_split"),
                   truth_ratios=forget.get("truth_ratio"),
                   mia_auc=result["aggregates"].get("mia_min_k_auc"))

    @classmethod
    def from_file(cls, path: str | Path) -> EvalReference:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"reference {path}: cannot read it as JSON ({exc})") from None
        return cls.from_result(result, str(path))

    def check_matches(self, benchmark: str, forget_split: str | None) -> None:
        if self.benchmark != benchmark:
            raise DataError(f"reference {self.origin} is a {self.benchmark} evaluation, not {benchmark}")
        if forget_split is not None and self.forget_split not in (None, forget_split):
            raise DataError(f"reference {self.origin} was evaluated on forget split "
                            f"{self.forget_split!r}, not {forget_split!r}")

    def check_count(self, what: str, reference_count: int, count: int) -> None:
        if reference_count != count:
            raise DataError(f"reference {self.origin} has {reference_count} {what}, this evaluation "
                            f"{count}: they were not made on the same data")


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def format_aggregates(result: dict) -> str:
    """The aggregates as a table: headline metrics first, then the rest; reasons below."""
    first = headline(result["benchmark"])
    aggregates = result["aggregates"]
    keys = [k for k in first if k in aggregates] + sorted(k for k in aggregates if k not in first)
    table = format_table(["metric", "value"], [[k, _cell(aggregates[k])] for k in keys])
    notes = [f"  {k}: {reason}" for k, reason in result.get("unavailable", {}).items() if k in first]
    return table + ("\nunavailable:\n" + "\n".join(notes) if notes else "")


def compare_table(results: dict[str, dict], keys: Sequence[str]) -> str:
    """Several evaluations side by side (e.g. before/after), one column each."""
    names = list(results)
    rows = [[k] + [_cell(results[n]["aggregates"].get(k)) for n in names] for k in keys]
    return format_table(["metric", *names], rows)


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path
