"""Deletion requests over time, through the Ray pipeline: three successive requests, each run
starting from the champion, and a version that relearned the first request refused by the gate."""

import json
from pathlib import Path

import pytest

pytest.importorskip("ray")

from mlflow import MlflowClient  # noqa: E402

from pipelines.evidence import verify_version  # noqa: E402
from pipelines.registry import CHAMPION, promote  # noqa: E402
from pipelines.run import PipelineError, run_pipeline  # noqa: E402
from unlearn.config import build_config  # noqa: E402
from unlearn.data import load_qa  # noqa: E402

REQUESTS = {"request1": slice(0, 6), "request2": slice(6, 11), "request3": slice(11, 16)}


def write_requests(source: str, folder: Path) -> Path:
    """The synthetic TOFU splits, plus three disjoint deletion requests cut from forget10 (which the
    target was trained on and retain90 does not contain), each with its perturbed split."""
    folder.mkdir()
    for path in Path(source).iterdir():
        (folder / path.name).symlink_to(path)
    forget, perturbed = load_qa(source, "forget10"), load_qa(source, "forget10_perturbed")
    assert [r.question for r in forget] == [r.question for r in perturbed]
    for name, rows in REQUESTS.items():
        (folder / f"{name}.json").write_text(json.dumps([r.to_dict() for r in forget[rows]]))
        (folder / f"{name}_perturbed.json").write_text(json.dumps([r.to_dict() for r in perturbed[rows]]))
    return folder


@pytest.fixture(scope="module")
def requests_setup(finetuned, tmp_path_factory):
    _, report, source = finetuned
    out = tmp_path_factory.mktemp("lineage")
    data = write_requests(source, out / "data")
    uri = f"sqlite:///{out}/mlflow.db"

    def make(name, split, *extra):
        return build_config({}, [f"output_dir={out / name}", f"run_name={name}", f"data.source={data}",
                                 f"data.forget_split={split}", "eval.holdout_split=holdout10",
                                 "stop.enabled=false", "train.epochs=6", "eval.before=false",
                                 "eval.max_new_tokens=16", f"mlflow.tracking_uri={uri}",
                                 "registry.model_name=forgetful", 'gate.rules=["forget_prob <= 0.97"]',
                                 # one Ray Train worker: this checks the requests' lineage, not FSDP
                                 "ray.num_workers=1", *extra])

    return make, report, MlflowClient(uri)


@pytest.mark.slow
def test_three_requests_accumulate_and_a_version_that_relearned_the_first_is_refused(requests_setup):
    make, report, client = requests_setup
    first = run_pipeline(make("first", "request1"), report["target"], reference=report["retain"])
    assert first["registered_version"] == "1", first["gate"]
    promote(client, "forgetful")
    versions = ["1"]
    for name in ("request2", "request3"):
        summary = run_pipeline(make(name, name), f"models:/forgetful@{CHAMPION}", reference=report["retain"])
        print(name, json.dumps(summary["rechecked"], indent=1), summary["gate"])
        assert summary["base_version"] == f"models:/forgetful/{versions[-1]}"
        assert summary["registered_version"] == str(len(versions) + 1), summary["gate"]
        assert [item["forget_split"] for item in summary["rechecked"]] == list(REQUESTS)[:len(versions)]
        versions.append(promote(client, "forgetful"))
    evidence = verify_version(client, "forgetful", "3")
    assert [r["forget_split"] for r in evidence.requests] == list(REQUESTS)
    assert [r["model_version"] for r in evidence.requests] == ["1", "2", "3"]
    for request, split in zip(evidence.requests, REQUESTS):
        records = load_qa(make("x", split).data.source, split)
        assert request["forget_records"] == len(records)
    card = client.get_model_version("forgetful", "3").description
    assert "## Deletion requests" in card and "Every forget set this version has forgotten (3)" in card
    for split in REQUESTS:
        assert f"`{split}` of" in card
    assert len(evidence.documents["history"]) == 2
    assert all(v.passed for v in evidence.gate.verdicts if v.rule.startswith("request "))

    # A run whose retain set holds the first request's records (a misconfigured retain split) and
    # whose objective only descends on it (GradDiff without its forget term): it relearns them,
    # and the re-check of request 1 refuses the version.
    relearn = make("relearn", "request3", "method.name=grad_diff", "method.params.gamma=0",
                   "data.retain_split=request1", "train.epochs=4")
    relearned = run_pipeline(relearn, f"models:/forgetful@{CHAMPION}", reference=report["retain"])
    print(json.dumps(relearned["rechecked"], indent=1), relearned["gate"])
    assert relearned["registered_version"] is None
    failed = [v for v in relearned["gate"]["verdicts"] if not v["passed"]]
    first_request = [v for v in failed if v["rule"].startswith("request 1 (request1")
                     and v["metric"] == "forget_prob"]
    assert first_request and "less forgotten than when it was gated" in first_request[0]["reason"]
    assert not any(v["rule"] == "forget_prob <= 0.97" for v in failed)  # its own rule passed
    assert str(client.get_model_version_by_alias("forgetful", CHAMPION).version) == "3"


def test_a_run_from_an_unknown_registered_version_fails_before_training(requests_setup):
    make, _, _ = requests_setup
    with pytest.raises(PipelineError, match="models:/nobody@champion: no such registered version"):
        run_pipeline(make("unknown", "request1"), "models:/nobody@champion")
