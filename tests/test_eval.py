"""Evaluation with models: batching equivalence, the spec's sanity anchors, bad input, CLI."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from unlearn import cli
from unlearn.data import DataError, generate_muse, generate_tofu, write_muse, write_tofu
from unlearn.eval import EvalReference, EvalSettings, LocalScorer, evaluate, evaluate_model, metrics
from unlearn.eval.scoring import (
    Generation,
    Likelihood,
    cut_at_stop,
    greedy_generate,
    request_from_json,
    request_to_json,
)
from unlearn.eval.tofu import HOLDOUT_METRICS, load_tofu_eval_data
from unlearn.models import load_model, load_tokenizer

TOFU_KEYS = {"forget_quality", "model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio",
             "privleak", "extraction_strength"}
MUSE_KEYS = {"verbmem_f", "knowmem_f", "knowmem_r", "privleak"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny"), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def tofu_dir(tmp_path_factory):
    return write_tofu(generate_tofu(seed=3), tmp_path_factory.mktemp("tofu"))


def _requests():
    records = generate_tofu(seed=5)["forget10_perturbed"][:5]
    requests = []
    for r in records:
        requests += [Likelihood(r.answer, r.question), Likelihood(r.paraphrased_answer, r.question),
                     *[Likelihood(p, r.question) for p in r.perturbed_answers[:2]],
                     Likelihood(r.answer, None, chat=False), Likelihood(r.answer, r.question, chat=False),
                     Generation(r.question, max_new_tokens=12),
                     Generation(r.answer[:20], chat=False, max_new_tokens=9, stop=(".",))]
    return requests


def test_batched_and_one_by_one_likelihoods_agree(tiny):
    model, tokenizer = tiny
    requests = [r for r in _requests() if isinstance(r, Likelihood)]
    batched = LocalScorer(model, tokenizer, batch_size=8).run(requests)
    for request, result in zip(requests, batched):
        single = LocalScorer(model, tokenizer, batch_size=1).run([request])[0]
        assert len(result["logprobs"]) == len(single["logprobs"]) > 0
        np.testing.assert_allclose(result["logprobs"], single["logprobs"], rtol=0, atol=1e-5)
        assert result["correct"] == single["correct"]


def test_likelihood_matches_the_full_logits_reference(tiny):
    model, tokenizer = tiny
    request = Likelihood("Paris is the capital.", "Where?")
    from unlearn.eval.scoring import encode_likelihood

    feature = encode_likelihood(tokenizer, request, 128)
    ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor(feature["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    target = labels[1:]
    keep = target != -100
    expected = logp[keep].gather(1, target[keep][:, None]).squeeze(1)
    result = LocalScorer(model, tokenizer).run([request])[0]
    np.testing.assert_allclose(result["logprobs"], expected.numpy(), atol=1e-5)
    assert result["correct"] == (logp[keep].argmax(-1) == target[keep]).tolist()
    # EOS is part of the answer (it is supervised in training)
    assert len(result["logprobs"]) == len(tokenizer(" Paris is the capital.", add_special_tokens=False)
                                          ["input_ids"]) + 1


def test_batched_and_one_by_one_generation_give_the_same_text(tiny):
    model, tokenizer = tiny
    requests = [r for r in _requests() if isinstance(r, Generation)]
    batched = LocalScorer(model, tokenizer, batch_size=8).run(requests)
    single = [LocalScorer(model, tokenizer, batch_size=1).run([r])[0] for r in requests]
    assert [b["text"] for b in batched] == [s["text"] for s in single]
    assert all("." not in b["text"] for b, r in zip(batched, requests) if r.stop)


class _ScriptedModel(nn.Module):
    """generate() returns the prompt followed by scripted tokens (text, EOS, then more text)."""

    def __init__(self, continuation):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.continuation = continuation

    def generate(self, input_ids, attention_mask, generation_config, tokenizer=None):
        extra = torch.tensor([self.continuation] * input_ids.shape[0])
        return torch.cat([input_ids, extra], dim=1)


def test_generation_is_cut_at_eos_before_rouge(tiny):
    _, tokenizer = tiny
    answer = "The cat sat on the mat."
    after = tokenizer(" and then many other words about dogs", add_special_tokens=False)["input_ids"]
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] + after
    text, = greedy_generate(_ScriptedModel(ids), tokenizer, [[5, 6, 7]], max_new_tokens=len(ids))
    assert text == answer
    assert metrics.rouge_l(text, answer, measure="fmeasure") == pytest.approx(1.0)
    assert cut_at_stop("Paris\n\nQuestion: next", ("\n\n", "Question")) == "Paris"


def test_requests_round_trip_through_json():
    for request in _requests()[:8]:
        assert request_from_json(request_to_json(request)) == request
    with pytest.raises(ValueError):
        request_from_json('{"kind": "Other"}')


def test_missing_perturbed_answers_name_the_split_and_field(tmp_path):
    splits = generate_tofu(seed=0)
    write_tofu(splits, tmp_path)
    rows = json.loads((tmp_path / "forget10_perturbed.json").read_text())
    del rows[2]["perturbed_answer"]
    (tmp_path / "forget10_perturbed.json").write_text(json.dumps(rows))
    needle = r"forget10_perturbed\.json row 2: field 'perturbed_answer' is missing"
    with pytest.raises(DataError, match=needle):
        load_tofu_eval_data(str(tmp_path), "forget10")


def test_absent_splits_make_their_metrics_unavailable_with_a_reason(tiny, tmp_path):
    splits = generate_tofu(seed=0)
    keep = {k: v for k, v in splits.items() if k in ("forget10", "retain_perturbed")}
    write_tofu(keep, tmp_path)
    model, tokenizer = tiny
    settings = EvalSettings(data=str(tmp_path), max_new_tokens=4)
    result = evaluate(LocalScorer(model, tokenizer), tokenizer, settings)
    agg, why = result["aggregates"], result["unavailable"]
    assert agg["forget_prob"] is not None and agg["forget_rouge"] is not None
    for key in ("forget_quality", "forget_truth_ratio", "privleak", "model_utility", *HOLDOUT_METRICS):
        assert agg[key] is None and why[key]
    assert "forget10_perturbed" in why["forget_truth_ratio"]
    assert "real_authors_perturbed" in why["model_utility"]


def test_holdout_metrics_come_from_the_holdout_samples(tiny, tofu_dir):
    model, tokenizer = tiny
    settings = EvalSettings(data=str(tofu_dir), max_new_tokens=6)
    result = evaluate(LocalScorer(model, tokenizer), tokenizer, settings)
    agg, samples = result["aggregates"], result["per_sample"]
    forget, holdout = samples["forget"], samples["holdout"]
    assert len(holdout["generation"]) == len(holdout["rouge"]) == len(holdout["prob"]) == len(
        load_tofu_eval_data(str(tofu_dir), "forget10").splits["holdout"])
    assert agg["holdout_prob"] == pytest.approx(np.mean(holdout["prob"]))
    assert agg["holdout_rouge"] == pytest.approx(np.mean(holdout["rouge"]))
    assert agg["mia_min_k_pvalue"] == pytest.approx(metrics.mia_pvalue(forget["min_k"], holdout["min_k"]))
    assert agg["mia_min_k_auc"] == pytest.approx(metrics.mia_auc(forget["min_k"], holdout["min_k"]))


def test_extraction_strength_follows_the_chosen_definition(tiny, tofu_dir):
    model, tokenizer = tiny  # random weights: most answers end on a wrong token
    per_sample = {}
    for variant in ("reference", "strict"):
        settings = EvalSettings(data=str(tofu_dir), max_new_tokens=2, extraction_strength=variant)
        result = evaluate(LocalScorer(model, tokenizer), tokenizer, settings)
        per_sample[variant] = result["per_sample"]["forget"]["extraction_strength"]
        assert result["aggregates"]["extraction_strength"] == pytest.approx(
            sum(per_sample[variant]) / len(per_sample[variant]))
    pairs = list(zip(per_sample["reference"], per_sample["strict"]))
    assert all(ref == strict or (strict == 0 and ref > 0) for ref, strict in pairs)
    assert any(strict == 0 and ref > 0 for ref, strict in pairs)  # the definitions differ here
    with pytest.raises(ValueError, match="extraction_strength must be one of"):
        EvalSettings(data=str(tofu_dir), extraction_strength="loose")


def test_muse_evaluation_reports_every_metric(tiny, tmp_path):
    write_muse(generate_muse(seed=0), tmp_path)
    model, tokenizer = tiny
    settings = EvalSettings(data=str(tmp_path), benchmark="muse")
    result = evaluate(LocalScorer(model, tokenizer), tokenizer, settings)
    assert MUSE_KEYS <= set(result["aggregates"])
    assert 0 <= result["aggregates"]["verbmem_f"] <= 100
    assert result["aggregates"]["privleak"] is None and "reference" in result["unavailable"]["privleak"]
    assert len(result["per_sample"]["verbmem"]["rouge"]) == 6
    # the model against its own evaluation: no leakage relative to itself
    again = evaluate(LocalScorer(model, tokenizer), tokenizer, settings,
                     reference=EvalReference.from_result(result, "self"))
    assert again["aggregates"]["privleak"] == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- anchors


@pytest.fixture(scope="module")
def retain_eval(finetuned):
    _, report, source = finetuned
    return evaluate_model(report["retain"], EvalSettings(data=source), progress=False)


@pytest.mark.slow
def test_retain_model_against_itself_has_forget_quality_one(finetuned, retain_eval):
    _, report, source = finetuned
    reference = EvalReference.from_result(retain_eval, "retain")
    again = evaluate_model(report["retain"], EvalSettings(data=source), reference=reference, progress=False)
    assert again["aggregates"]["forget_quality"] == pytest.approx(1.0)
    assert again["aggregates"]["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert TOFU_KEYS <= set(again["aggregates"])
    assert retain_eval["aggregates"]["forget_quality"] is None
    assert "no reference" in retain_eval["unavailable"]["forget_quality"]


@pytest.mark.slow
def test_memorised_target_against_retain_model_has_low_forget_quality(finetuned, retain_eval):
    _, report, source = finetuned
    reference = EvalReference.from_result(retain_eval, "retain")
    target = evaluate_model(report["target"], EvalSettings(data=source), reference=reference, progress=False)
    agg = target["aggregates"]
    print("target:", {k: agg[k] for k in sorted(TOFU_KEYS)})
    print("retain:", {k: retain_eval["aggregates"][k] for k in sorted(TOFU_KEYS)})
    assert agg["forget_quality"] < 0.05
    assert agg["forget_prob"] > 0.8 and agg["forget_rouge"] > 0.8
    assert agg["privleak"] > 0, "the target still leaks its forget set"
    assert agg["model_utility"] > 0.5


@pytest.mark.slow
def test_cli_eval_writes_json_and_reuses_the_reference(finetuned, tmp_path, capsys):
    _, report, source = finetuned
    out = tmp_path / "target.json"
    code = cli.main(["eval", "--model", report["target"], "--data", source, "--reference", report["retain"],
                     "--output", str(out), "--max-new-tokens", "40"])
    assert code == 0
    first = json.loads(out.read_text())
    reference_json = tmp_path / "target.reference.json"
    assert reference_json.is_file() and TOFU_KEYS <= set(first["aggregates"])
    assert "forget_quality" in capsys.readouterr().out
    again = tmp_path / "again.json"
    assert cli.main(["eval", "--model", report["target"], "--data", source, "--reference",
                     str(reference_json), "--output", str(again), "--max-new-tokens", "40"]) == 0
    assert json.loads(again.read_text())["aggregates"] == first["aggregates"]
    # bad input: a clear error and exit code 2
    assert cli.main(["eval", "--model", report["target"], "--data", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_eval_on_a_missing_cuda_device_fails_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["eval", "--model", "tiny", "--data", "synthetic", "--device", "cuda",
                     "--output", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device is visible" in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()
