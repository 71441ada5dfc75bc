"""Both gate profiles over evaluation JSONs (``unlearn eval``), side by side: what the holdout
profile (no retain model) decides against what TOFU's retain-model gate decides.

    python bench/holdout_gate.py --before evals/target.json --reference evals/retain.json \
        evals/retain.json evals/target.json evals/pdu.json

``--before``: the model before unlearning (``base.*``); ``--reference``: the retain model's
evaluation, used only for the retain-model profile (forget quality and privleak are recomputed
from the per-sample values, so the JSONs need not have been written with a reference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unlearn.eval import metrics
from unlearn.gate import HOLDOUT_RULES, RETAIN_MODEL_RULES, judge
from unlearn.report import format_table

COLUMNS = ("forget_prob", "holdout_prob", "forget_rouge", "holdout_rouge", "mia_min_k_auc",
           "mia_min_k_pvalue", "model_utility", "forget_quality", "privleak")


def with_reference(result: dict, reference: dict) -> dict:
    """The aggregates with forget quality and privleak against ``reference``'s per-sample values."""
    agg = dict(result["aggregates"])
    ratios = result["per_sample"]["forget"].get("truth_ratio")
    reference_ratios = reference["per_sample"]["forget"].get("truth_ratio")
    if ratios and reference_ratios:
        agg["forget_quality"] = metrics.forget_quality(ratios, reference_ratios)
    if agg.get("mia_min_k_auc") is not None and reference["aggregates"].get("mia_min_k_auc"):
        agg["privleak"] = metrics.privleak(agg["mia_min_k_auc"], reference["aggregates"]["mia_min_k_auc"])
    return agg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluations", nargs="+", help="eval JSONs to judge")
    parser.add_argument("--before", required=True, help="eval JSON of the model before unlearning")
    parser.add_argument("--reference", required=True, help="eval JSON of the retain model")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    before, reference = load(args.before)["aggregates"], load(args.reference)
    rows = []
    for path in args.evaluations:
        agg = with_reference(load(path), reference)
        holdout = judge(list(HOLDOUT_RULES), agg, before)
        retain = judge(list(RETAIN_MODEL_RULES), agg, before)
        rows.append({"model": Path(path).stem, **{k: agg.get(k) for k in COLUMNS},
                     "holdout_gate": holdout.brief(), "retain_model_gate": retain.brief()})
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
