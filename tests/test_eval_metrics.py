"""Evaluation metrics on small constructed inputs, against values computed by hand."""

import collections
import itertools
import math
import random

import pytest

from unlearn.eval import metrics
from unlearn.eval.report import Aggregates, EvalReference, format_aggregates
from unlearn.data import DataError


def test_prob_is_exp_of_minus_mean_nll():
    assert metrics.prob([-1.0, -3.0]) == pytest.approx(math.exp(-2.0))
    assert metrics.mean_nll([-0.5, -1.5]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.prob([])


def test_truth_ratio_by_hand():
    # P_pert = exp(-mean(2, 4)) = exp(-3), P_para = exp(-1): tr = exp(-2)
    assert metrics.truth_ratio(1.0, [2.0, 4.0]) == pytest.approx(math.exp(-2.0))
    # geometric mean over perturbations, not the arithmetic mean of probabilities
    arithmetic = (math.exp(-2.0) + math.exp(-4.0)) / 2 / math.exp(-1.0)
    assert metrics.truth_ratio(1.0, [2.0, 4.0]) != pytest.approx(arithmetic)
    with pytest.raises(ValueError):
        metrics.truth_ratio(1.0, [])


def test_truth_ratio_is_one_when_true_and_false_answers_are_equally_likely():
    assert metrics.truth_ratio(2.5, [2.5, 2.5, 2.5]) == pytest.approx(1.0)
    assert metrics.forget_truth_ratio_score([1.0, 1.0]) == pytest.approx(1.0)
    assert metrics.retain_truth_ratio_score([1.0]) == 0.0


def test_truth_ratio_scores_by_hand():
    assert metrics.forget_truth_ratio_score([2.0, 0.5, 1.0]) == pytest.approx(2 / 3)
    assert metrics.retain_truth_ratio_score([0.25, 2.0]) == pytest.approx(0.375)


def test_normalised_prob_by_hand():
    # P(true) = 1/2, P(perturbed) = 1/4 each -> 0.5 / (0.5 + 0.5)
    assert metrics.normalised_prob(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)
    assert metrics.normalised_prob(0.0, []) == pytest.approx(1.0)


@pytest.mark.parametrize("correct, reference, strict", [
    ([True, True, True], 1.0, 1.0),
    ([False, True, True, True], 0.75, 0.75),
    ([True, False, True, True], 0.5, 0.5),
    ([True, True, False], 1 / 3, 0.0),  # no suffix matches: the reference keeps k = |y| - 1
    ([False, False, True], 1 / 3, 1 / 3),
    ([False], 1.0, 0.0),
])
def test_extraction_strength_on_constructed_cases(correct, reference, strict):
    assert metrics.extraction_strength(correct) == pytest.approx(reference)
    assert metrics.extraction_strength(correct, "strict") == pytest.approx(strict)


def _naive_reference_es(correct: list[bool]) -> float:
    """OpenUnlearning's loop, literally: the first k whose suffix is all correct, else the last k."""
    n = len(correct)
    for k in range(n):
        if all(correct[k:]):
            break
    return 1 - k / n


def test_extraction_strength_matches_the_reference_loop_on_random_cases():
    import random

    rng = random.Random(0)
    for _ in range(500):
        correct = [rng.random() < 0.7 for _ in range(rng.randint(1, 12))]
        assert metrics.extraction_strength(correct) == pytest.approx(_naive_reference_es(correct))
    with pytest.raises(ValueError, match="unknown extraction strength variant 'loose'"):
        metrics.extraction_strength([True], "loose")


def test_min_k_takes_the_lowest_fraction():
    logprobs = [-3.0, -1.0, -5.0, -2.0, -4.0]
    assert metrics.min_k_score(logprobs, 0.4) == pytest.approx(-4.5)  # two lowest: -5, -4
    assert metrics.min_k_score(logprobs, 0.1) == pytest.approx(-5.0)  # at least one token
    assert metrics.min_k_score(logprobs, 1.0) == pytest.approx(-3.0)  # the mean
    with pytest.raises(ValueError):
        metrics.min_k_score(logprobs, 0.0)


def test_zlib_and_loss_scores():
    text = "abc abc abc"
    import zlib

    assert metrics.zlib_score([-1.0, -2.0], text) == pytest.approx(-3.0 / len(zlib.compress(text.encode())))
    assert metrics.loss_score([-1.0, -2.0]) == pytest.approx(-1.5)


def test_auc_orientation_members_scoring_higher_give_auc_one():
    # members are the positive class and a higher score means "more likely a member"
    assert metrics.mia_auc([-1.0, -0.5], [-3.0, -2.0]) == 1.0
    assert metrics.mia_auc([-3.0, -2.0], [-1.0, -0.5]) == 0.0
    assert metrics.mia_auc([-1.0, -3.0], [-2.0, -4.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.mia_auc([], [1.0])


def _u_statistic(members, nonmembers):
    return sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)


def _exact_two_sided_p(members, nonmembers):
    """Naive permutation test: every split of the pooled scores into groups of the same sizes."""
    pooled, k = list(members) + list(nonmembers), len(members)
    centre = k * len(nonmembers) / 2
    observed = abs(_u_statistic(members, nonmembers) - centre)
    splits = list(itertools.combinations(range(len(pooled)), k))
    extreme = 0
    for chosen in splits:
        group = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += abs(_u_statistic(group, rest) - centre) >= observed - 1e-12
    return extreme / len(splits)


def _normal_two_sided_p(members, nonmembers):
    """The normal approximation written out: tie-corrected variance, continuity correction 0.5."""
    n1, n2 = len(members), len(nonmembers)
    n = n1 + n2
    counts = collections.Counter(list(members) + list(nonmembers)).values()
    variance = n1 * n2 / 12 * ((n + 1) - sum(t ** 3 - t for t in counts) / (n * (n - 1)))
    z = (abs(_u_statistic(members, nonmembers) - n1 * n2 / 2) - 0.5) / math.sqrt(variance)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


def test_mia_p_value_matches_the_permutation_test_on_small_sets_and_the_normal_one_on_larger():
    rng = random.Random(0)
    for _ in range(30):  # small, no ties: exact
        n1, n2 = rng.randint(1, 6), rng.randint(1, 6)
        values = rng.sample(range(100), n1 + n2)
        members, nonmembers = values[:n1], values[n1:]
        expected = _exact_two_sided_p(members, nonmembers)
        assert metrics.mia_pvalue(members, nonmembers) == pytest.approx(expected)
    for _ in range(30):  # 40 vs 40 as forget01/holdout01, with ties: normal approximation
        members = [rng.randint(0, 30) + rng.choice([0, 5]) for _ in range(40)]
        nonmembers = [rng.randint(0, 30) for _ in range(40)]
        expected = _normal_two_sided_p(members, nonmembers)
        assert metrics.mia_pvalue(members, nonmembers) == pytest.approx(expected, rel=1e-9)
        auc = metrics.mia_auc(members, nonmembers)
        assert auc == pytest.approx(_u_statistic(members, nonmembers) / 1600)


def test_mia_p_value_is_two_sided_and_symmetric():
    high, low = [-1.0, -0.5, -0.7, -0.2, -0.9], [-3.0, -2.0, -2.5, -4.0, -3.5]
    assert metrics.mia_pvalue(high, low) == metrics.mia_pvalue(low, high) < 0.05  # AUC 1 and AUC 0 alike
    assert metrics.mia_pvalue([-1.0, -2.0, -3.0], [-1.5, -2.5]) > 0.5
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        metrics.mia_pvalue([-1.0], [])


def test_privleak_by_hand_and_sign():
    assert metrics.privleak(0.75, 0.5) == pytest.approx(50.0)  # still leaks: positive
    assert metrics.privleak(0.25, 0.5) == pytest.approx(-50.0)  # over-unlearned: negative
    assert metrics.privleak(0.6, 0.6) == 0.0
    with pytest.raises(ValueError):
        metrics.privleak(0.5, 0.0)


def test_forget_quality_is_the_ks_p_value():
    assert metrics.forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    # disjoint samples of 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1
    assert metrics.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        metrics.forget_quality([], [1.0])


def test_model_utility_is_the_harmonic_mean():
    assert metrics.model_utility([1.0, 0.5]) == pytest.approx(2 / 3)
    assert metrics.model_utility([0.2] * 9) == pytest.approx(0.2)
    assert metrics.model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        metrics.model_utility([0.5, -0.1])


def test_rouge_l_recall_with_stemming_and_f1_without():
    reference, prediction = "the cat sat on the mat", "the cats sat"
    assert metrics.rouge_l(prediction, reference, measure="recall", stem=True) == pytest.approx(3 / 6)
    assert metrics.rouge_l(prediction, reference, measure="recall", stem=False) == pytest.approx(2 / 6)
    p, r = 2 / 3, 2 / 6
    assert metrics.rouge_l(prediction, reference, measure="fmeasure", stem=False) == \
        pytest.approx(2 * p * r / (p + r))
    assert metrics.rouge_l("", reference) == 0.0
    with pytest.raises(ValueError):
        metrics.rouge_l(prediction, reference, measure="f2")


def test_aggregates_record_a_reason_for_every_missing_value():
    agg = Aggregates()
    agg.set("forget_prob", 0.5)
    agg.unavailable("forget_quality", "no reference")
    agg.set("privleak", float("nan"))
    assert agg.values == {"forget_prob": 0.5, "forget_quality": None, "privleak": None}
    assert set(agg.reasons) == {"forget_quality", "privleak"}
    table = format_aggregates({"benchmark": "tofu", "aggregates": agg.values, "unavailable": agg.reasons})
    assert "forget_quality" in table and "n/a" in table and "no reference" in table


def test_reference_checks_benchmark_split_and_count():
    result = {"benchmark": "tofu", "forget_split": "forget10", "aggregates": {"mia_min_k_auc": 0.6},
              "per_sample": {"forget": {"truth_ratio": [0.5, 0.7]}}}
    ref = EvalReference.from_result(result, "ref.json")
    assert ref.truth_ratios == [0.5, 0.7] and ref.mia_auc == 0.6
    ref.check_matches("tofu", "forget10")
    with pytest.raises(DataError, match="is a tofu evaluation, not muse"):
        ref.check_matches("muse", None)
    with pytest.raises(DataError, match="forget split 'forget10', not 'forget05'"):
        ref.check_matches("tofu", "forget05")
    with pytest.raises(DataError, match="not made on the same data"):
        ref.check_count("forget truth ratios", 2, 3)
    with pytest.raises(DataError, match="not an evaluation JSON"):
        EvalReference.from_result({"aggregates": {}}, "x.json")
