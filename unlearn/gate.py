"""Evaluation gates: the rules a model must pass to enter the registry.

A rule is one line over the evaluation's aggregates (``unlearn.eval`` keys)::

    forget_quality >= 0.05
    model_utility >= 0.95 * base.model_utility     # base = the model before unlearning
    privleak within [-25, 25]
    forget_prob <= 1.5 * holdout_prob                # another metric of the same evaluation

Operators: ``>=``, ``>``, ``<=``, ``<``, ``within [lo, hi]``. The right side is a number,
``[FACTOR *] base.METRIC`` or ``[FACTOR *] METRIC``. Every rule is evaluated; a metric that could
not be computed (``null``) fails its rule, with the reason.

Two profiles (``gate.profile``): ``retain_model`` (:data:`RETAIN_MODEL_RULES`, TOFU's forget
quality and privleak, which need a retain model) and ``holdout`` (:data:`HOLDOUT_RULES`, for
deployments that have no retain model: the forget set must look like never-seen data).
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass

from unlearn.eval.report import HOLDOUT_METRICS, MUSE_HEADLINE, TOFU_HEADLINE

UTILITY_PARTS = tuple(f"{split}_{part}" for split in ("retain", "real_authors", "world_facts")
                      for part in ("prob", "rouge", "truth_ratio"))
KNOWN_METRICS = frozenset(TOFU_HEADLINE + MUSE_HEADLINE + UTILITY_PARTS + HOLDOUT_METRICS)

#: The gate when a retain model (or its evaluation) is the reference: TOFU's protocol.
RETAIN_MODEL_RULES = ("forget_quality >= 0.05", "model_utility >= 0.95 * base.model_utility",
                      "privleak within [-25, 25]")
#: The gate without a retain model (TOFU-format data with a holdout of never-seen records): the
#: Min-k attack's AUC, forget vs holdout, stays within [0.3, 0.7] in either direction (a forget set
#: pushed below never-seen data fails too); the forget set's Prob and ROUGE are at most 1.5x the
#: holdout's; and utility against the model before. The margins are what models that never saw the
#: forget set stay within on real TOFU (README): AUC 0.50 on forget01 and 0.34 on forget10, where
#: a significance test (``mia_min_k_pvalue``, p = 1e-14 there) fails them, as the two splits differ.
HOLDOUT_RULES = ("mia_min_k_auc within [0.3, 0.7]", "forget_prob <= 1.5 * holdout_prob",
                 "forget_rouge <= 1.5 * holdout_rouge", "model_utility >= 0.95 * base.model_utility")
PROFILES = {"retain_model": RETAIN_MODEL_RULES, "holdout": HOLDOUT_RULES}
OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NAME = r"[A-Za-z_]\w*"
_COMPARE = re.compile(rf"^\s*(\w+)\s*(>=|<=|>|<)\s*"
                      rf"(?:({_NUMBER})|(?:({_NUMBER})\s*\*\s*)?(base\.)?({_NAME}))\s*$")
_WITHIN = re.compile(rf"^\s*(\w+)\s+within\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]\s*$")


class GateError(ValueError):
    """A rule that cannot be parsed or names an unknown metric."""


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str
    op: str  # one of OPERATORS or "within"
    value: float | None = None  # constant threshold
    factor: float | None = None  # threshold = factor * base[base_metric] or factor * metrics[peer_metric]
    base_metric: str | None = None
    peer_metric: str | None = None
    low: float | None = None
    high: float | None = None

    @property
    def higher_is_better(self) -> bool | None:
        """Direction for regression checks (``within``: closer to the middle is better)."""
        return None if self.op == "within" else self.op in (">=", ">")


def parse_rule(text: str) -> Rule:
    if match := _WITHIN.match(text):
        metric, low, high = match.group(1), float(match.group(2)), float(match.group(3))
        if low > high:
            raise GateError(f"gate rule {text!r}: empty range [{low}, {high}]")
        rule = Rule(text.strip(), metric, "within", low=low, high=high)
    elif match := _COMPARE.match(text):
        metric, op, number, factor, of_base, other = match.groups()
        if number is not None:
            rule = Rule(text.strip(), metric, op, value=float(number))
        else:
            rule = Rule(text.strip(), metric, op, factor=float(factor) if factor else 1.0,
                        base_metric=other if of_base else None, peer_metric=None if of_base else other)
    else:
        raise GateError(f"gate rule {text!r} is not 'METRIC OP NUMBER', 'METRIC OP [FACTOR *] "
                        "[base.]METRIC' or 'METRIC within [LO, HI]'")
    for name in filter(None, (rule.metric, rule.base_metric, rule.peer_metric)):
        if name not in KNOWN_METRICS:
            raise GateError(f"gate rule {text!r}: unknown metric {name!r} (known: "
                            f"{', '.join(sorted(KNOWN_METRICS))})")
    return rule


def parse_rules(texts: list[str]) -> list[Rule]:
    return [parse_rule(t) for t in texts]


@dataclass
class Verdict:
    rule: str
    metric: str
    value: float | None
    threshold: str
    passed: bool
    reason: str = ""


def check_rule(rule: Rule, metrics: dict, base: dict | None = None,
               reasons: dict | None = None) -> Verdict:
    value = metrics.get(rule.metric)
    limit = rule.value
    if rule.op == "within":
        threshold = f"[{rule.low:g}, {rule.high:g}]"
    elif rule.value is not None:
        threshold = f"{rule.op} {rule.value:g}"
    elif rule.base_metric is not None:
        base_value = (base or {}).get(rule.base_metric)
        if base_value is None:
            return Verdict(rule.text, rule.metric, value,
                           f"{rule.op} {rule.factor:g} * base.{rule.base_metric}", False,
                           f"base.{rule.base_metric} is not available (no evaluation before unlearning)")
        limit = rule.factor * base_value
        threshold = f"{rule.op} {limit:.6g}"
    else:
        peer_value = metrics.get(rule.peer_metric)
        if peer_value is None:
            why = (reasons or {}).get(rule.peer_metric, "not computed")
            return Verdict(rule.text, rule.metric, value, f"{rule.op} {rule.factor:g} * {rule.peer_metric}",
                           False, f"{rule.peer_metric} is unavailable: {why}")
        limit = rule.factor * peer_value
        threshold = f"{rule.op} {limit:.6g}"
    if value is None:
        why = (reasons or {}).get(rule.metric, "not computed")
        return Verdict(rule.text, rule.metric, None, threshold, False, f"{rule.metric} is unavailable: {why}")
    passed = rule.low <= value <= rule.high if rule.op == "within" else OPERATORS[rule.op](value, limit)
    return Verdict(rule.text, rule.metric, float(value), threshold, bool(passed))


@dataclass
class GateResult:
    passed: bool
    verdicts: list[Verdict]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "verdicts": [asdict(v) for v in self.verdicts]}

    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.passed]

    def brief(self) -> str:
        """``pass``, or ``FAIL:`` and the metrics of the failed rules (a table cell)."""
        return "pass" if self.passed else "FAIL: " + ", ".join(v.metric for v in self.failures())


def evaluate_gate(rules: list[Rule], metrics: dict, base: dict | None = None,
                  reasons: dict | None = None) -> GateResult:
    """Every rule over ``metrics`` (the candidate's aggregates); ``base`` = before unlearning."""
    if not rules:
        raise GateError("a gate needs at least one rule")
    verdicts = [check_rule(rule, metrics, base, reasons) for rule in rules]
    return GateResult(all(v.passed for v in verdicts), verdicts)


def format_gate(gate: dict) -> str:
    """A verdict's lines (``GateResult.to_dict()``), as ``unlearn run`` and ``unlearn gate`` print it."""
    lines = [f"gate: {'PASSED' if gate['passed'] else 'FAILED'}"]
    for v in gate["verdicts"]:
        value = "n/a" if v["value"] is None else f"{v['value']:.4g}"
        mark = "pass" if v["passed"] else "FAIL"
        lines.append(f"  [{mark}] {v['rule']}  (value {value}, needs {v['threshold']})"
                     + (f": {v['reason']}" if v["reason"] else ""))
    return "\n".join(lines)


def regressions(rules: list[Rule], candidate: dict, champion: dict) -> list[str]:
    """The gate's metrics on which ``candidate`` is worse than ``champion`` (for promotion)."""
    worse = []
    for rule in rules:
        new, old = candidate.get(rule.metric), champion.get(rule.metric)
        if old is None:
            continue
        if new is None:
            worse.append(f"{rule.metric}: unavailable (champion {old:.4g})")
            continue
        if rule.op == "within":
            middle = (rule.low + rule.high) / 2
            if abs(new - middle) > abs(old - middle):
                worse.append(f"{rule.metric}: {new:.4g} is further from {middle:g} than the "
                             f"champion's {old:.4g}")
        elif (new < old) if rule.higher_is_better else (new > old):
            worse.append(f"{rule.metric}: {new:.4g} vs the champion's {old:.4g} (rule {rule.text!r})")
    return worse


# --------------------------------------------------------------------------- earlier deletion requests

#: What "still forgotten" compares, per earlier request: (metric, direction). Forget Prob may rise by
#: at most an absolute tolerance; forget quality (a p-value) may fall to a fraction of its gated value.
STILL_FORGOTTEN = (("forget_prob", "lower"), ("forget_quality", "higher"))
STILL_FORGOTTEN_METRICS = tuple(metric for metric, _ in STILL_FORGOTTEN)  # what a request records


@dataclass(frozen=True)
class Tolerance:
    """How much worse an earlier forget set may look than when it was gated."""

    forget_prob: float = 0.02  # absolute rise allowed
    forget_quality: float = 0.5  # the value must stay >= this fraction of the gated value

    def limit(self, metric: str, gated: float) -> tuple[float, str]:
        if metric == "forget_prob":
            return gated + self.forget_prob, f"<= {gated:.4g} + {self.forget_prob:g}"
        return gated * self.forget_quality, f">= {self.forget_quality:g} * {gated:.4g}"


def still_forgotten(label: str, gated: dict, now: dict, tolerance: Tolerance,
                    reasons: dict | None = None) -> list[Verdict]:
    """Verdicts for one earlier request: each metric recorded when it was gated must be no worse
    now (within ``tolerance``). A metric recorded then but unavailable now fails (fail closed)."""
    verdicts = []
    for metric, direction in STILL_FORGOTTEN:
        old = gated.get(metric)
        if old is None:
            continue
        limit, threshold = tolerance.limit(metric, old)
        rule = f"{label}: {metric} {threshold}"
        value = now.get(metric)
        if value is None:
            why = (reasons or {}).get(metric, "not computed")
            verdicts.append(Verdict(rule, metric, None, threshold, False,
                                    f"{metric} of {label} is unavailable now: {why}"))
            continue
        passed = value <= limit if direction == "lower" else value >= limit
        verdicts.append(Verdict(rule, metric, float(value), threshold, bool(passed),
                                "" if passed else f"{label} is less forgotten than when it was gated"))
    return verdicts


def judge(rules: list[str], after: dict, before: dict | None = None, reasons: dict | None = None,
          history: list[dict] | None = None) -> GateResult:
    """The whole gate: ``rules`` over the candidate's aggregates, and each earlier deletion request's
    re-check (``history`` items: ``label``, ``gated``, ``now``, ``tolerance``, ``unavailable``)."""
    gate = evaluate_gate(parse_rules(rules), after, before, reasons)
    for item in history or []:
        gate.verdicts += still_forgotten(item["label"], item["gated"], item["now"],
                                         Tolerance(**item["tolerance"]), item.get("unavailable"))
    gate.passed = all(v.passed for v in gate.verdicts)
    return gate
