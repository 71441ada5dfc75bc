"""Gate profiles and same-evaluation rules; ``unlearn gate`` on eval JSONs (no Ray, no MLflow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn import cli
from unlearn.config import ConfigError, build_config
from unlearn.gate import HOLDOUT_RULES, PROFILES, RETAIN_MODEL_RULES, GateError, judge, parse_rule

REPO = Path(__file__).resolve().parents[1]

# A model that never saw the forget set, the target that memorised it, and one pushed below
# never-seen data (the holdout's Prob is 0.2 in all three).
NEVER_SEEN = {"mia_min_k_auc": 0.45, "forget_prob": 0.22, "holdout_prob": 0.2, "forget_rouge": 0.40,
              "holdout_rouge": 0.38, "model_utility": 0.6}
MEMORISED = {**NEVER_SEEN, "mia_min_k_auc": 0.99, "forget_prob": 0.95, "forget_rouge": 0.97}
OVER_FORGOTTEN = {**NEVER_SEEN, "mia_min_k_auc": 0.05, "forget_prob": 0.01, "forget_rouge": 0.05}
BEFORE = {"model_utility": 0.6}


def test_a_rule_may_compare_two_metrics_of_the_same_evaluation():
    rule = parse_rule("forget_prob <= 1.5 * holdout_prob")
    assert (rule.peer_metric, rule.factor, rule.base_metric) == ("holdout_prob", 1.5, None)
    assert parse_rule("forget_prob <= holdout_prob").factor == 1.0
    assert parse_rule("forget_quality >= 0").value == 0.0  # a bare number stays a number
    gate = judge(["forget_prob <= 1.5 * holdout_prob"], {"forget_prob": 0.31, "holdout_prob": 0.2})
    assert not gate.passed and gate.verdicts[0].threshold == "<= 0.3"
    assert judge(["forget_prob <= 1.5 * holdout_prob"], {"forget_prob": 0.29, "holdout_prob": 0.2}).passed
    missing = judge(["forget_prob <= holdout_prob"], {"forget_prob": 0.1, "holdout_prob": None},
                    reasons={"holdout_prob": "no holdout split"})
    assert not missing.passed
    assert "holdout_prob is unavailable: no holdout split" in missing.verdicts[0].reason
    with pytest.raises(GateError, match="unknown metric 'holdout_probability'"):
        parse_rule("forget_prob <= 2 * holdout_probability")


@pytest.mark.parametrize("after, brief", [
    (NEVER_SEEN, "pass"),
    (MEMORISED, "FAIL: mia_min_k_auc, forget_prob, forget_rouge"),
    # below never-seen data: only the two-sided attack band catches it
    (OVER_FORGOTTEN, "FAIL: mia_min_k_auc"),
])
def test_the_holdout_profile_passes_never_seen_and_fails_memorised_and_over_forgotten(after, brief):
    gate = judge(list(HOLDOUT_RULES), after, BEFORE)
    assert gate.passed is (brief == "pass")
    assert gate.brief() == brief


@pytest.mark.parametrize("overrides, reference, rules", [
    ([], None, HOLDOUT_RULES),
    ([], "outputs/retain", RETAIN_MODEL_RULES),
    (["eval.reference=outputs/retain"], None, RETAIN_MODEL_RULES),
    (["gate.profile=holdout"], "outputs/retain", HOLDOUT_RULES),
    (["gate.profile=retain_model"], None, RETAIN_MODEL_RULES),
    (['gate.rules=["forget_prob <= 0.5"]'], None, ("forget_prob <= 0.5",)),
    (["data.benchmark=muse"], None, RETAIN_MODEL_RULES),
])
def test_the_profile_follows_whether_a_retain_model_is_given(overrides, reference, rules):
    cfg = build_config({}, overrides)
    assert cfg.gate_rules(reference) == list(rules)
    assert cfg.with_gate_rules(reference).gate.rules == list(rules)


@pytest.mark.parametrize("overrides, message", [
    (["gate.profile=none"], "gate.profile"),
    (["gate.profile=holdout", "data.benchmark=muse"], "for MUSE give gate.rules"),
    (["gate.rules=[]"], "a gate needs at least one rule"),
    (['gate.rules=["forget_prob <= 2 * holdout"]'], "unknown metric 'holdout'"),
])
def test_bad_gate_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_every_profile_rule_parses():
    for rules in PROFILES.values():
        for text in rules:
            parse_rule(text)


def _eval_json(folder: Path, name: str, aggregates: dict, reference=None) -> Path:
    path = folder / name
    unavailable = {k: "not computed" for k, v in aggregates.items() if v is None}
    path.write_text(json.dumps({"benchmark": "tofu", "reference": reference, "aggregates": aggregates,
                                "unavailable": unavailable}))
    return path


def test_cli_gate_judges_eval_jsons_from_another_directory(tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    _eval_json(evals, "unlearned.json", NEVER_SEEN)
    _eval_json(evals, "target.json", MEMORISED)
    _eval_json(evals, "before.json", BEFORE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def gate(*args):
        return subprocess.run([sys.executable, "-m", "unlearn.cli", "gate", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    passed = gate("evals/unlearned.json", "--before", "evals/before.json")
    assert passed.returncode == 0, passed.stderr
    assert "the holdout profile" in passed.stdout and "gate: PASSED" in passed.stdout
    failed = gate("evals/target.json", "--before", "evals/before.json")
    assert failed.returncode == 1 and "[FAIL] forget_prob <= 1.5 * holdout_prob" in failed.stdout
    no_base = gate("evals/unlearned.json")
    assert no_base.returncode == 1 and "base.model_utility is not available" in no_base.stdout


def test_help_and_gate_answer_without_importing_torch(tmp_path):
    """Neither loads a model, so neither pays for torch, scipy or scikit-learn (~3 s)."""
    _eval_json(tmp_path, "a.json", {"forget_quality": 0.3, "model_utility": 0.6, "privleak": 3.0},
               reference="retain.json")
    code = ("import sys\n"
            "from unlearn import cli\n"
            "cli.build_parser().format_help()\n"
            "codes = [cli.main(['gate', 'a.json', '--rule', 'privleak within [-5, 5]']),\n"
            "         cli.main(['gate', 'no.json'])]\n"
            "heavy = ('torch', 'scipy', 'sklearn', 'transformers')\n"
            "print(codes, sorted(m for m in heavy if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.splitlines()[-1] == "[0, 2] []", done.stdout + done.stderr
    assert "[pass] privleak within [-5, 5]" in done.stdout
    assert "no.json: cannot read it as JSON" in done.stderr


def test_cli_gate_rules_profile_and_bad_input(tmp_path, capsys):
    with_reference = _eval_json(tmp_path, "a.json", {"forget_quality": 0.3, "model_utility": 0.6,
                                                     "privleak": 3.0}, reference="retain.json")
    before = _eval_json(tmp_path, "b.json", BEFORE)
    assert cli.main(["gate", str(with_reference), "--before", str(before)]) == 0
    assert "the retain_model profile" in capsys.readouterr().out
    assert cli.main(["gate", str(with_reference), "--rule", "privleak within [-1, 1]"]) == 1
    assert "[FAIL] privleak within [-1, 1]" in capsys.readouterr().out
    assert cli.main(["gate", str(with_reference), "--rule", "privleak is low"]) == 2
    assert "is not 'METRIC OP NUMBER'" in capsys.readouterr().err
    assert cli.main(["gate", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read it as JSON" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert cli.main(["gate", str(tmp_path / "other.json")]) == 2
    assert "not an evaluation JSON" in capsys.readouterr().err


def test_a_run_pins_its_profile_s_rules_before_anything_is_handed_to_ray(tmp_path, monkeypatch):
    from pipelines.run import driver_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "retain").mkdir()
    cfg, _, reference = driver_paths(build_config({}, []), "tiny", None)
    assert cfg.gate.rules == list(HOLDOUT_RULES) and reference is None
    cfg, _, reference = driver_paths(build_config({}, []), "tiny", "retain")
    assert cfg.gate.rules == list(RETAIN_MODEL_RULES) and reference == str(tmp_path / "retain")
    explicit = build_config({}, ['gate.rules=["forget_prob <= 0.5"]'])
    assert driver_paths(explicit, "tiny", None)[0].gate.rules == ["forget_prob <= 0.5"]


@pytest.mark.parametrize("overrides, reference, refused", [
    ([], None, True),
    (["tune.metric=privleak", "tune.mode=min"], None, True),
    (["tune.metric=mia_min_k_pvalue"], None, False),
    ([], "outputs/retain", False),
    (["eval.reference=retain.json"], None, False),
])
def test_tune_without_a_retain_model_must_rank_trials_by_an_available_metric(overrides, reference, refused):
    from pipelines.run import PipelineError
    from pipelines.tune import check_ranking

    cfg = build_config({}, overrides)
    if refused:
        with pytest.raises(PipelineError, match="tune.metric=mia_min_k_pvalue"):
            check_ranking(cfg, reference)
    else:
        check_ranking(cfg, reference)
