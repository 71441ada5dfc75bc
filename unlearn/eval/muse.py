"""MUSE evaluation: verbatim memorisation, knowledge memorisation, privacy leakage.

- ``verbmem_f``: greedy continuation (128 new tokens) of each ``verbmem/forget`` prompt, ROUGE-L
  F1 x 100 (no stemming) against ``gt`` cut to 128 tokens.
- ``knowmem_f`` / ``knowmem_r``: few-shot QA from ``knowmem/{forget,retain}_qa`` with the
  ``*_icl`` examples as ``Question: ...\\nAnswer: ...\\n\\n`` shots, 32 new tokens, stopping at a
  blank line or "Question"; ROUGE-L F1 x 100.
- ``privleak``: Min-40% AUC of ``privleak/forget`` (members) vs ``privleak/holdout``, relative to
  the reference's AUC.
Prompts are raw text (no chat template), as MUSE evaluates base models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unlearn.data import QARecord, SplitNotFound, VerbatimRecord, load_qa, load_texts, load_verbatim
from unlearn.eval import metrics
from unlearn.eval.report import Aggregates, EvalReference, mean_or_none
from unlearn.eval.scoring import Generation, Likelihood, Request
from unlearn.eval.tofu import privleak_from_reference

VERBMEM_TOKENS = 128
KNOWMEM_TOKENS = 32
KNOWMEM_STOP = ("\n\n", "Question")


@dataclass
class MuseEvalData:
    source: str
    verbmem: list[VerbatimRecord] | None = None
    knowmem: dict[str, tuple[list[QARecord], list[QARecord]]] = field(default_factory=dict)
    privleak: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def load_muse_eval_data(source: str) -> MuseEvalData:
    data = MuseEvalData(source=source)
    try:
        data.verbmem = load_verbatim(source, "verbmem/forget")
    except SplitNotFound as exc:
        data.missing["verbmem_f"] = str(exc)
    for part, key in (("forget", "knowmem_f"), ("retain", "knowmem_r")):
        try:
            questions = load_qa(source, f"knowmem/{part}_qa")
        except SplitNotFound as exc:
            data.missing[key] = str(exc)
            continue
        try:
            shots = load_qa(source, f"knowmem/{part}_qa_icl")
        except SplitNotFound:
            shots = []
        data.knowmem[part] = (questions, shots)
    for part in ("forget", "holdout"):
        try:
            data.privleak[part] = load_texts(source, f"privleak/{part}")
        except SplitNotFound as exc:
            data.missing["privleak"] = str(exc)
    return data


def few_shot_prompt(shots: list[QARecord], question: str) -> str:
    examples = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    return f"{examples}Question: {question}\nAnswer:"


def truncate_tokens(tokenizer, text: str, count: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:count]
    return tokenizer.decode(ids, skip_special_tokens=True)


def plan_muse(data: MuseEvalData) -> tuple[list[Request], dict[str, list[int]]]:
    requests: list[Request] = []
    slots: dict[str, list[int]] = {}

    def add(key: str, request: Request) -> None:
        slots.setdefault(key, []).append(len(requests))
        requests.append(request)

    for item in data.verbmem or []:
        add("verbmem", Generation(item.prompt, chat=False, max_new_tokens=VERBMEM_TOKENS))
    for part, (questions, shots) in data.knowmem.items():
        for record in questions:
            add(f"knowmem_{part}", Generation(few_shot_prompt(shots, record.question), chat=False,
                                              max_new_tokens=KNOWMEM_TOKENS, stop=KNOWMEM_STOP))
    if len(data.privleak) == 2:
        for part, texts in data.privleak.items():
            for text in texts:
                add(f"privleak_{part}", Likelihood(text, None, chat=False))
    return requests, slots


def aggregate_muse(data: MuseEvalData, slots: dict[str, list[int]], results: list[dict], tokenizer,
                   reference: EvalReference | None) -> tuple[Aggregates, dict]:
    agg, per_sample = Aggregates(), {}
    if data.verbmem is not None:
        texts = [results[i]["text"] for i in slots.get("verbmem", [])]
        rouge = [100 * metrics.rouge_l(t, truncate_tokens(tokenizer, item.gt, VERBMEM_TOKENS),
                                       measure="fmeasure", stem=False)
                 for t, item in zip(texts, data.verbmem)]
        per_sample["verbmem"] = {"rouge": rouge, "generation": texts}
        agg.set("verbmem_f", mean_or_none(rouge))
    for part, key in (("forget", "knowmem_f"), ("retain", "knowmem_r")):
        if part not in data.knowmem:
            agg.unavailable(key, data.missing[key])
            continue
        texts = [results[i]["text"] for i in slots.get(f"knowmem_{part}", [])]
        rouge = [100 * metrics.rouge_l(t, r.answer, measure="fmeasure", stem=False)
                 for t, r in zip(texts, data.knowmem[part][0])]
        per_sample[f"knowmem_{part}"] = {"rouge": rouge, "generation": texts}
        agg.set(key, mean_or_none(rouge))
    if data.verbmem is None:
        agg.unavailable("verbmem_f", data.missing["verbmem_f"])
    if len(data.privleak) < 2:
        for key in ("mia_min_k_auc", "mia_loss_auc", "mia_zlib_auc", "mia_min_k_pvalue", "privleak"):
            agg.unavailable(key, data.missing["privleak"])
        return agg, per_sample
    for part, texts in data.privleak.items():
        logprobs = [results[i]["logprobs"] for i in slots[f"privleak_{part}"]]
        per_sample[f"privleak_{part}"] = {
            "min_k": [metrics.min_k_score(lp) for lp in logprobs],
            "loss": [metrics.loss_score(lp) for lp in logprobs],
            "zlib": [metrics.zlib_score(lp, t) for lp, t in zip(logprobs, texts)],
        }
    for score in ("min_k", "loss", "zlib"):
        agg.set(f"mia_{score}_auc", metrics.mia_auc(per_sample["privleak_forget"][score],
                                                    per_sample["privleak_holdout"][score]))
    agg.set("mia_min_k_pvalue", metrics.mia_pvalue(per_sample["privleak_forget"]["min_k"],
                                                   per_sample["privleak_holdout"]["min_k"]))
    privleak_from_reference(agg, reference)
    return agg, per_sample
