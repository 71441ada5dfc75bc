"""Gate rules, the registry flow on a local sqlite MLflow, promotion, and gated serving."""

import json
import socket
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipelines.evidence import KEY_ENV, record_evidence, sha256_file, verify_files, verify_version
from pipelines.models import download_model, log_hf_model
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    PromotionLock,
    PromotionRefused,
    judge_and_register,
    promote,
)
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
        registration = judge_and_register(
            client, run.info.run_id, info.model_uri, rules=RULES, after=after, before=BASE, reasons={},
            model_name="forgetful", lineage=fake_lineage(run.info.run_id), evaluation=evaluation(after),
            model_folder=folder)
        return registration, run.info.run_id

    yield client, candidate
    mlflow.set_tracking_uri(None)


def fake_lineage(run_id: str) -> dict:
    return {"base_model": "tiny", "model_form": "full weights, LoRA merged in (r=4, alpha=8, q_proj)",
            "method": "pdu", "forget_split": "forget10", "data": "synthetic",
            "forget_records": 16, "forget_fingerprint": "ab" * 32, "config_hash": "123",
            "mlflow_run_id": run_id}


def test_the_lineage_says_whether_the_weights_are_the_full_models_have_lora_merged_in_or_are_adapters():
    from pipelines.registry import lineage
    from unlearn.config import build_config

    full = lineage(build_config({}, []), "tiny", (16, "ab"), "run")
    lora = build_config({}, ["model.lora.r=4", "model.lora.alpha=8",
                             "model.lora.target_modules=[q_proj, v_proj]"])
    merged = lineage(lora, "tiny", (16, "ab"), "run")
    assert full["model_form"] == "full weights"
    assert merged["model_form"] == "full weights, LoRA merged in (r=4, alpha=8, q_proj/v_proj)"
    assert full["config_hash"] != merged["config_hash"]
    adapters = build_config(lora.model_dump(mode="json"), ["model.lora.merge=false"])
    alone = lineage(adapters, "tiny", (16, "ab"), "run")
    assert alone["model_form"] == "LoRA adapters only (r=4, alpha=8, q_proj/v_proj), on the base model"


def evaluation(after: dict) -> dict:
    """The shape of an evaluation JSON the gate judges (``unlearn.eval.evaluate``)."""
    return {"benchmark": "tofu", "aggregates": after, "unavailable": {}, "per_sample": {}}


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
    # which weights the version holds: a tag and the card's first paragraph
    assert version.tags["model_form"] == "full weights, LoRA merged in (r=4, alpha=8, q_proj)"
    assert "Weights: full weights, LoRA merged in (r=4, alpha=8, q_proj)." in open(card).read()


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
    with pytest.raises(PromotionRefused, match=f"version {rogue.version}: has no passing gate"):
        promote(client, "forgetful", rogue.version)
    assert str(client.get_model_version_by_alias("forgetful", CHAMPION).version) == better.version


class _ScriptedLockStore:
    """A client whose create_registered_model answers from a script (an error code, or None to
    succeed), as the tracking store answers promoters racing for the lock."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers, self.created, self.deleted = list(answers), 0, []

    def create_registered_model(self, name, description=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos import databricks_pb2

        code = self.answers.pop(0)
        if code is not None:
            raise MlflowException(f"{name}: {code}", error_code=getattr(databricks_pb2, code))
        self.created += 1

    def get_registered_model(self, name):
        from mlflow.exceptions import MlflowException

        raise MlflowException(f"{name} not found")

    def delete_registered_model(self, name):
        self.deleted.append(name)


def test_the_promotion_lock_waits_out_a_holder_that_releases_while_the_store_reports_the_clash():
    # The sqlalchemy store reports a name clash by looking the holder up; a holder that released in
    # between turns that into RESOURCE_DOES_NOT_EXIST, which is contention, not a failure.
    store = _ScriptedLockStore(["RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", None])
    with PromotionLock(store, "forgetful", timeout_s=10):
        assert store.created == 1 and store.answers == []
    assert store.deleted == ["forgetful.promotion-lock"]
    with pytest.raises(Exception, match="PERMISSION_DENIED"):
        with PromotionLock(_ScriptedLockStore(["PERMISSION_DENIED"]), "forgetful", timeout_s=10):
            pass


# --------------------------------------------------------------------------- evidence, not tags


def test_a_registered_version_pins_its_evidence_and_verifies(registry):
    client, candidate = registry
    registration, run_id = candidate(GOOD)
    tags = client.get_model_version("forgetful", registration.version).tags
    for name in ("eval", "before", "requests", "files"):
        assert len(tags[f"evidence.{name}"]) == 64
    evidence = verify_version(client, "forgetful", registration.version)
    assert evidence.gate.passed and evidence.after == GOOD and evidence.run_id == run_id
    assert [r["model_version"] for r in evidence.requests] == ["1"]
    manifest = evidence.documents["files"]
    assert "model.safetensors" in manifest and "config.json" in manifest
    verify_files(download_model("models:/forgetful/1"), evidence)


def test_a_hand_set_passed_tag_is_refused(registry, tmp_path):
    from pipelines.serve import serve_model

    client, candidate = registry
    candidate(GOOD)
    honest = client.get_model_version("forgetful", "1")
    torch.manual_seed(1)  # another model: say, the one before unlearning
    other = save_model(load_model("tiny"), load_tokenizer("tiny"), tmp_path / "other")
    with mlflow.start_run() as run:
        other_uri = log_hf_model(other).model_uri
    rogue = client.create_model_version("forgetful", other_uri, run_id=run.info.run_id).version
    client.set_model_version_tag("forgetful", rogue, "gate", "passed")
    with pytest.raises(PromotionRefused, match=f"version {rogue}: its tag says passed, but it has no "
                                               "recorded evidence"):
        promote(client, "forgetful", rogue)
    # the honest version's tags do not help: the digest binds them to its run
    for key, value in honest.tags.items():
        client.set_model_version_tag("forgetful", rogue, key, value)
    with pytest.raises(PromotionRefused, match="evidence tags were edited after registration"):
        promote(client, "forgetful", rogue)
    with pytest.raises(PromotionRefused, match="evidence tags were edited"):
        serve_model(client, "forgetful", rogue, blocking=False)
    # nor does claiming the honest version's run: the registered model is not the evaluated one
    claimed = client.create_model_version("forgetful", other_uri, run_id=honest.run_id).version
    for key, value in honest.tags.items():
        client.set_model_version_tag("forgetful", claimed, key, value)
    with pytest.raises(PromotionRefused, match=f"version {claimed}: its model {other_uri} is not the model "
                                               "that was evaluated"):
        promote(client, "forgetful", claimed)
    assert promote(client, "forgetful", "1") == "1"


def _artifact_file(client, run_id: str, path: str) -> Path:
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(client.get_run(run_id).info.artifact_uri)) / path


def test_an_edited_evaluation_is_refused_even_with_its_tag_updated(registry):
    client, candidate = registry
    candidate(GOOD)
    registration, run_id = candidate({**GOOD, "forget_quality": 0.2})  # version 2
    version = registration.version
    after = _artifact_file(client, run_id, "eval/after.json")
    edited = json.loads(after.read_text())
    edited["aggregates"]["forget_quality"] = 0.9  # would beat the champion's 0.3
    after.write_text(json.dumps(edited))
    with pytest.raises(PromotionRefused, match=f"version {version}: evidence eval/after.json of run {run_id} "
                                               "was altered after the gate"):
        promote(client, "forgetful", version)
    client.set_model_version_tag("forgetful", version, "evidence.eval", sha256_file(after))
    with pytest.raises(PromotionRefused, match="evidence tags were edited"):
        promote(client, "forgetful", version)


def test_missing_evidence_is_refused(registry):
    client, candidate = registry
    registration, run_id = candidate(GOOD)
    _artifact_file(client, run_id, "lineage/requests.json").unlink()
    with pytest.raises(PromotionRefused, match="evidence lineage/requests.json is missing from run"):
        promote(client, "forgetful", registration.version)


def test_a_failing_evaluation_with_forged_consistent_hashes_is_refused_and_a_key_stops_the_forger(
        registry, monkeypatch):
    """A forger who knows the scheme takes a run that failed the gate and records a consistent set
    of hashes for it: the re-judged evaluation still fails. With a deployment key the forger does
    not hold, even an honest-looking set of hashes is refused."""
    client, candidate = registry
    honest, _ = candidate(GOOD)  # registered without a key
    failed, run_id = candidate({**GOOD, "forget_quality": 0.001})
    assert failed.version is None
    source = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")[0].model_id
    rogue = client.create_model_version("forgetful", f"models:/{source}", run_id=run_id).version
    tags = record_evidence(client, run_id, RULES, f"models:/{source}", download_model(f"models:/{source}"),
                           {"eval": evaluation({**GOOD, "forget_quality": 0.001}),
                            "before": {"aggregates": BASE}, "requests": []})
    for key, value in {**tags, "gate": "passed"}.items():
        client.set_model_version_tag("forgetful", rogue, key, value)
    with pytest.raises(PromotionRefused, match="recorded evaluation fails the gate: forget_quality >= 0.05"):
        promote(client, "forgetful", rogue)

    monkeypatch.setenv(KEY_ENV, "the deployment's secret")
    with pytest.raises(PromotionRefused, match="not signed with this deployment's UNLEARN_EVIDENCE_KEY"):
        promote(client, "forgetful", honest.version)
    signed, _ = candidate(GOOD)
    assert promote(client, "forgetful", signed.version) == signed.version
    monkeypatch.setenv(KEY_ENV, "a forger's guess")
    with pytest.raises(PromotionRefused, match="not signed"):
        promote(client, "forgetful", signed.version)


def test_swapped_weights_are_refused_by_serve_and_by_a_run_starting_from_the_version(registry, tmp_path):
    from pipelines.lineage import BaseError, registered_base
    from pipelines.serve import serve_model

    client, candidate = registry
    registration, _ = candidate(GOOD)
    promote(client, "forgetful")
    source = client.get_model_version("forgetful", registration.version).source
    from mlflow.utils.file_utils import local_file_uri_to_path
    from safetensors.torch import load_file, save_file

    logged = client.get_logged_model(source.removeprefix("models:/"))
    stored, = Path(local_file_uri_to_path(logged.artifact_location)).rglob("model.safetensors")
    weights = load_file(stored)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # a quiet edit: the model still loads and answers
    save_file(weights, stored, metadata={"format": "pt"})
    with pytest.raises(PromotionRefused, match=r"not the files that were evaluated \(changed: model\."):
        serve_model(client, "forgetful", blocking=False)
    with pytest.raises(BaseError, match="cannot start from models:/forgetful@champion: .*changed: model"):
        registered_base(client, "models:/forgetful@champion", tmp_path / "base")


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
