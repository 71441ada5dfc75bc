"""Gate rules, the registry flow on a local sqlite MLflow, promotion, and gated serving."""

import json
import socket

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipelines.models import log_hf_model
from pipelines.registry import CHALLENGER, CHAMPION, PromotionRefused, judge_and_register, promote
from unlearn.gate import GateError, evaluate_gate, parse_rule, parse_rules, regressions
from unlearn.models import load_model, load_tokenizer, save_model

RULES = ["forget_quality >= 0.05", "model_utility >= 0.95 * base.model_utility", "privleak within [-25, 25]"]
BASE = {"model_utility": 0.8, "forget_quality": 0.001}


# --------------------------------------------------------------------------- gate logic


def test_gate_passes_when_every_rule_holds():
    metrics = {"forget_quality": 0.3, "model_utility": 0.79, "privleak": -3.0}
    result = evaluate_gate(parse_rules(RULES), metrics, BASE)
    assert result.passed and [v.passed for v in result.verdicts] == [True, True, True]
    assert result.verdicts[1].threshold == ">= 0.76"


@pytest.mark.parametrize("metrics, failing", [
    ({"forget_quality": 0.01, "model_utility": 0.79, "privleak": 0.0}, "forget_quality >= 0.05"),
    ({"forget_quality": 0.3, "model_utility": 0.75, "privleak": 0.0}, RULES[1]),
    ({"forget_quality": 0.3, "model_utility": 0.79, "privleak": 25.5}, "privleak within [-25, 25]"),
])
def test_gate_fails_on_the_rule_that_does_not_hold(metrics, failing):
    result = evaluate_gate(parse_rules(RULES), metrics, BASE)
    assert not result.passed and [v.rule for v in result.failures()] == [failing]


def test_a_missing_metric_fails_its_rule_with_the_reason():
    metrics = {"forget_quality": None, "model_utility": 0.8, "privleak": 1.0}
    result = evaluate_gate(parse_rules(RULES), metrics, BASE, {"forget_quality": "no reference given"})
    failed, = result.failures()
    assert failed.metric == "forget_quality" and "no reference given" in failed.reason
    no_base = evaluate_gate(parse_rules(RULES), {**metrics, "forget_quality": 0.3})
    assert not no_base.passed and "base.model_utility is not available" in no_base.failures()[0].reason


@pytest.mark.parametrize("text, message", [
    ("forget_qualty >= 0.05", "unknown metric 'forget_qualty'"),
    ("privleak within [10, -10]", "empty range"),
    ("model_utility >= 0.9 * base.utility", "unknown metric 'utility'"),
    ("forget_quality is high", "is not 'METRIC OP NUMBER'"),
])
def test_bad_rules_are_rejected_before_anything_runs(text, message):
    with pytest.raises(GateError, match=message):
        parse_rule(text)


def test_regressions_follow_each_rules_direction():
    rules = parse_rules(RULES + ["forget_prob <= 0.2"])
    champion = {"forget_quality": 0.3, "model_utility": 0.8, "privleak": 5.0, "forget_prob": 0.1}
    assert regressions(rules, dict(champion), champion) == []
    worse = regressions(rules, {**champion, "forget_quality": 0.2, "privleak": -8.0, "forget_prob": 0.15},
                        champion)
    assert [w.split(":")[0] for w in worse] == ["forget_quality", "privleak", "forget_prob"]


# --------------------------------------------------------------------------- registry


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    torch.manual_seed(0)
    folder = save_model(load_model("tiny"), load_tokenizer("tiny"), tmp_path / "model")
    client = MlflowClient(uri)

    def candidate(after: dict):
        with mlflow.start_run() as run:
            mlflow.log_metrics({f"after.{k}": v for k, v in after.items() if v is not None})
            info = log_hf_model(folder)
        lineage = {"base_model": "tiny", "method": "pdu", "forget_split": "forget10", "data": "synthetic",
                   "forget_records": 16, "forget_fingerprint": "abc", "config_hash": "123",
                   "mlflow_run_id": run.info.run_id}
        registration = judge_and_register(client, run.info.run_id, info.model_uri, rules=RULES, after=after,
                                          before=BASE, reasons={}, model_name="forgetful", lineage=lineage)
        return registration, run.info.run_id

    yield client, candidate
    mlflow.set_tracking_uri(None)


GOOD = {"forget_quality": 0.3, "model_utility": 0.79, "privleak": -3.0}


def test_passing_model_is_registered_as_challenger_with_lineage(registry):
    client, candidate = registry
    registration, run_id = candidate(GOOD)
    assert registration.gate.passed and registration.version == "1"
    version = client.get_model_version_by_alias("forgetful", CHALLENGER)
    assert str(version.version) == "1" and version.tags["gate"] == "passed"
    assert {"base_model", "method", "config_hash", "forget_fingerprint", "eval_summary"} <= set(version.tags)
    assert json.loads(version.tags["eval_summary"])["forget_quality"] == 0.3
    assert client.get_run(run_id).data.tags["gate"] == "passed"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"gate.json", "model_card.md"} <= artifacts
    card = (client.download_artifacts(run_id, "model_card.md"))
    assert "What was forgotten" in open(card).read()


def test_failing_model_is_not_registered(registry):
    client, candidate = registry
    registration, run_id = candidate({**GOOD, "forget_quality": 0.001})
    assert not registration.gate.passed and registration.version is None
    assert client.get_run(run_id).data.tags["gate"] == "failed"
    assert client.search_model_versions("name='forgetful'") == []


def test_promote_refuses_ungated_and_regressing_versions_and_accepts_a_good_one(registry):
    client, candidate = registry
    first, _ = candidate(GOOD)
    assert promote(client, "forgetful") == "1"
    assert str(client.get_model_version_by_alias("forgetful", CHAMPION).version) == "1"
    worse, _ = candidate({**GOOD, "forget_quality": 0.1})  # passes the gate, but below the champion
    with pytest.raises(PromotionRefused, match="regresses against champion version 1: forget_quality"):
        promote(client, "forgetful", worse.version)
    better, _ = candidate({**GOOD, "forget_quality": 0.6, "model_utility": 0.8, "privleak": 1.0})
    assert promote(client, "forgetful") == better.version  # the challenger by default
    # a version that never passed a gate (registered around it) is refused
    rogue = client.create_model_version("forgetful", client.get_model_version("forgetful", "1").source)
    with pytest.raises(PromotionRefused, match=f"version {rogue.version} has no passing gate"):
        promote(client, "forgetful", rogue.version)
    assert str(client.get_model_version_by_alias("forgetful", CHAMPION).version) == better.version


@pytest.mark.slow
def test_serve_answers_on_loopback_with_the_champion_and_refuses_an_ungated_version(registry):
    import requests
    from ray import serve

    from pipelines.serve import serve_model

    client, candidate = registry
    candidate(GOOD)
    promote(client, "forgetful")
    rogue = client.create_model_version("forgetful", client.get_model_version("forgetful", "1").source)
    with pytest.raises(PromotionRefused, match="no passing gate"):
        serve_model(client, "forgetful", rogue.version, blocking=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = serve_model(client, "forgetful", host="127.0.0.1", port=port, blocking=False)
    try:
        reply = requests.post(url, json={"prompt": "Where was Ada born?", "max_new_tokens": 6}, timeout=120)
        assert reply.status_code == 200
        body = reply.json()
        assert body["version"] == "1" and isinstance(body["text"], str) and body["text"]
        bad = requests.post(url, json={"max_new_tokens": 6}, timeout=60).json()
        assert "prompt" in bad["error"]
    finally:
        serve.shutdown()
