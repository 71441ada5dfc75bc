"""TOFU evaluation: plan the requests, let a scorer answer them, aggregate.

Splits read from the data source for ``forget_split = forgetXX``:

- ``forgetXX_perturbed`` (question, answer, paraphrased_answer, perturbed_answer): Prob, ROUGE-L
  recall, truth ratio, extraction strength, MIA scores. Without that split the plain
  ``forgetXX`` is scored and the truth-ratio metrics are reported unavailable.
- ``holdoutXX``: never-seen authors: the non-members of the membership-inference attacks
  (privleak, the forget-vs-holdout AUC and its p-value), and the Prob and ROUGE that a model
  gives data it never saw (the gate without a retain model compares the forget set's with them).
- ``retain_perturbed``, ``real_authors_perturbed``, ``world_facts_perturbed``: model utility.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from unlearn.data import DataError, QARecord, SplitNotFound, load_qa
from unlearn.eval import metrics
from unlearn.eval.report import HOLDOUT_METRICS, Aggregates, EvalReference, mean_or_none
from unlearn.eval.scoring import Generation, Likelihood, Request

TRUTH_FIELDS = ("paraphrased_answer", "perturbed_answer")
UTILITY_SPLITS = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
                  "world_facts": "world_facts_perturbed"}
MAX_NEW_TOKENS = 200


@dataclass
class TofuEvalData:
    source: str
    forget_split: str
    splits: dict[str, list[QARecord]] = field(default_factory=dict)  # role -> records
    names: dict[str, str] = field(default_factory=dict)  # role -> split name read
    truth_ratio: dict[str, bool] = field(default_factory=dict)  # role -> has perturbations
    missing: dict[str, str] = field(default_factory=dict)  # role -> why it is absent


def holdout_split_for(forget_split: str) -> str | None:
    match = re.fullmatch(r"forget(\d+)(_perturbed)?", forget_split)
    return f"holdout{match.group(1)}" if match else None


def load_tofu_eval_data(source: str, forget_split: str = "forget10", *,
                        holdout_split: str | None = None) -> TofuEvalData:
    """Read every split the evaluation needs; a split that is present but lacks a field the
    truth ratio needs is an error naming the split file, row and field."""
    data = TofuEvalData(source=source, forget_split=forget_split)
    base = forget_split.removesuffix("_perturbed")
    try:
        _put(data, "forget", f"{base}_perturbed", load_qa(source, f"{base}_perturbed", require=TRUTH_FIELDS),
             truth=True)
    except SplitNotFound:
        _put(data, "forget", base, load_qa(source, base), truth=False)
        data.missing["forget_truth_ratio"] = (f"split {base}_perturbed (paraphrased and perturbed "
                                              f"answers) is not in {source}")
    holdout = holdout_split or holdout_split_for(forget_split)
    if holdout is None:
        data.missing["holdout"] = (f"no holdout split known for forget split {forget_split!r}; "
                                   "pass holdout_split")
    else:
        _optional(data, "holdout", holdout, ())
    _optional(data, "retain", UTILITY_SPLITS["retain"], TRUTH_FIELDS, truth=True)
    for role in ("real_authors", "world_facts"):
        _optional(data, role, UTILITY_SPLITS[role], ("perturbed_answer",), truth=True)
    return data


def _put(data: TofuEvalData, role: str, name: str, records: list[QARecord], *, truth: bool) -> None:
    data.splits[role], data.names[role], data.truth_ratio[role] = records, name, truth


def _optional(data: TofuEvalData, role: str, name: str, require: tuple[str, ...], *,
              truth: bool = False) -> None:
    try:
        _put(data, role, name, load_qa(data.source, name, require=require), truth=truth)
    except SplitNotFound as exc:
        data.missing[role] = str(exc)


# --------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    requests: list[Request] = field(default_factory=list)
    # (role, record index) -> request slots: answer, generation, paraphrase, perturbations
    slots: dict[tuple[str, int], dict] = field(default_factory=dict)

    def add(self, request: Request) -> int:
        self.requests.append(request)
        return len(self.requests) - 1


def plan_tofu(data: TofuEvalData, *, max_new_tokens: int = MAX_NEW_TOKENS) -> _Plan:
    plan = _Plan()
    for role, records in data.splits.items():
        for i, record in enumerate(records):
            slot = {"answer": plan.add(Likelihood(record.answer, record.question)),
                    "generation": plan.add(Generation(record.question, max_new_tokens=max_new_tokens))}
            if data.truth_ratio.get(role):
                para = record.paraphrased_answer or record.answer
                slot["paraphrase"] = (slot["answer"] if para == record.answer
                                      else plan.add(Likelihood(para, record.question)))
                slot["perturbed"] = [plan.add(Likelihood(p, record.question))
                                     for p in record.perturbed_answers]
                if not slot["perturbed"]:
                    raise DataError(f"{data.source} split {data.names[role]} row {i}: field "
                                    "'perturbed_answer' is empty (the truth ratio needs at least one)")
            plan.slots[(role, i)] = slot
    return plan


# --------------------------------------------------------------------------- aggregate


def _split_values(data: TofuEvalData, plan: _Plan, results: list[dict], role: str,
                  es_variant: str = "reference") -> dict[str, list]:
    records = data.splits[role]
    values: dict[str, list] = {"prob": [], "min_k": [], "loss": [], "zlib": [], "rouge": [],
                               "generation": []}
    if role == "forget":
        values["extraction_strength"] = []
    if data.truth_ratio.get(role):
        values["truth_ratio"] = []
        if role in ("real_authors", "world_facts"):
            values["normalised_prob"] = []
    for i, record in enumerate(records):
        slot = plan.slots[(role, i)]
        answer = results[slot["answer"]]
        logprobs = answer["logprobs"]
        values["prob"].append(metrics.prob(logprobs))
        values["min_k"].append(metrics.min_k_score(logprobs))
        values["loss"].append(metrics.loss_score(logprobs))
        values["zlib"].append(metrics.zlib_score(logprobs, record.answer))
        text = results[slot["generation"]]["text"]
        values["generation"].append(text)
        values["rouge"].append(metrics.rouge_l(text, record.answer, measure="recall", stem=True))
        if role == "forget":
            values["extraction_strength"].append(metrics.extraction_strength(answer["correct"], es_variant))
        if "truth_ratio" in values:
            para = metrics.mean_nll(results[slot["paraphrase"]]["logprobs"])
            perturbed = [metrics.mean_nll(results[j]["logprobs"]) for j in slot["perturbed"]]
            values["truth_ratio"].append(metrics.truth_ratio(para, perturbed))
            if "normalised_prob" in values:
                true_nll = metrics.mean_nll(logprobs)
                values["normalised_prob"].append(metrics.normalised_prob(true_nll, perturbed))
    return values


def aggregate_tofu(data: TofuEvalData, plan: _Plan, results: list[dict],
                   reference: EvalReference | None, *,
                   es_variant: str = "reference") -> tuple[Aggregates, dict]:
    per_sample = {role: _split_values(data, plan, results, role, es_variant) for role in data.splits}
    agg = Aggregates()
    forget = per_sample["forget"]
    agg.set("forget_prob", mean_or_none(forget["prob"]))
    agg.set("forget_rouge", mean_or_none(forget["rouge"]))
    agg.set("extraction_strength", mean_or_none(forget["extraction_strength"]))
    if "truth_ratio" in forget:
        agg.set("forget_truth_ratio", metrics.forget_truth_ratio_score(forget["truth_ratio"]))
        if reference is None:
            agg.unavailable("forget_quality", "no reference (retain model or its eval JSON) given")
        elif reference.truth_ratios is None:
            agg.unavailable("forget_quality", f"the reference {reference.origin} has no forget truth ratios")
        else:
            reference.check_count("forget truth ratios", len(reference.truth_ratios),
                                  len(forget["truth_ratio"]))
            agg.set("forget_quality", metrics.forget_quality(forget["truth_ratio"], reference.truth_ratios))
    else:
        reason = data.missing["forget_truth_ratio"]
        agg.unavailable("forget_truth_ratio", reason)
        agg.unavailable("forget_quality", reason)
    _mia(agg, per_sample, data, reference)
    _utility(agg, per_sample, data)
    return agg, per_sample


def _mia(agg: Aggregates, per_sample: dict, data: TofuEvalData, reference: EvalReference | None) -> None:
    if "holdout" not in per_sample:
        reason = f"no holdout split: {data.missing.get('holdout', 'not read')}"
        for key in HOLDOUT_METRICS + ("privleak",):
            agg.unavailable(key, reason)
        return
    forget, holdout = per_sample["forget"], per_sample["holdout"]
    for score in ("min_k", "loss", "zlib"):
        agg.set(f"mia_{score}_auc", metrics.mia_auc(forget[score], holdout[score]))
    agg.set("mia_min_k_pvalue", metrics.mia_pvalue(forget["min_k"], holdout["min_k"]))
    agg.set("holdout_prob", mean_or_none(holdout["prob"]))
    agg.set("holdout_rouge", mean_or_none(holdout["rouge"]))
    privleak_from_reference(agg, reference)


def privleak_from_reference(agg: Aggregates, reference: EvalReference | None) -> None:
    if reference is None:
        agg.unavailable("privleak", "no reference (retain model or its eval JSON) given")
    elif reference.mia_auc is None:
        agg.unavailable("privleak", f"the reference {reference.origin} has no Min-k AUC")
    else:
        agg.set("privleak", metrics.privleak(agg.values["mia_min_k_auc"], reference.mia_auc))


def _utility(agg: Aggregates, per_sample: dict, data: TofuEvalData) -> None:
    components = []
    for role in UTILITY_SPLITS:
        if role not in per_sample:
            for part in ("prob", "rouge", "truth_ratio"):
                agg.unavailable(f"{role}_{part}", data.missing[role])
            continue
        values = per_sample[role]
        prob_key = "normalised_prob" if role != "retain" else "prob"
        agg.set(f"{role}_prob", mean_or_none(values[prob_key]))
        agg.set(f"{role}_rouge", mean_or_none(values["rouge"]))
        agg.set(f"{role}_truth_ratio", metrics.retain_truth_ratio_score(values["truth_ratio"]))
        components += [agg.values[f"{role}_{p}"] for p in ("prob", "rouge", "truth_ratio")]
    missing = [role for role in UTILITY_SPLITS if role not in per_sample]
    if missing:
        agg.unavailable("model_utility", "missing split(s): " + ", ".join(UTILITY_SPLITS[r] for r in missing))
    else:
        agg.set("model_utility", metrics.model_utility(components))
