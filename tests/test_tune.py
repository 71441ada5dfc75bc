"""Ray Tune on the tiny model: 3 trials over rho and top_k, child runs, Pareto plot, registration."""

import pytest

pytest.importorskip("ray")
pytest.importorskip("optuna")

from mlflow import MlflowClient  # noqa: E402

from pipelines.tune import pareto_front, run_tune, utility_floor  # noqa: E402
from unlearn.config import ConfigError, build_config  # noqa: E402

SPACE = '{"dual.rho": {"uniform": [0.5, 3.0]}, "method.params.top_k": {"choice": [5, 20, 100]}}'


def test_pareto_front_by_hand():
    points = [(0.1, 0.9), (0.5, 0.5), (0.05, 0.8), (0.5, 0.4), (0.9, 0.1)]
    assert pareto_front(points) == [True, True, False, False, True]


def test_utility_floor_comes_from_the_gate():
    cfg = build_config({}, [])
    assert utility_floor(cfg, {"model_utility": 0.8}) == pytest.approx(0.76)
    assert utility_floor(cfg, None) is None
    assert utility_floor(build_config({}, ['gate.rules=["model_utility >= 0.5"]']), None) == 0.5


@pytest.mark.parametrize("space, message", [
    ('{"train.epochs": {"choice": [1, 2]}}', "unknown parameter 'train.epochs'"),
    ('{"dual.eps": {"uniform": [0.5, 0.1]}}', "empty range"),
    ('{"dual.eps": {"gaussian": [0.5, 0.1]}}', "give exactly one of"),
])
def test_bad_search_spaces_fail_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, [f"tune.search_space={space}"])


@pytest.mark.slow
def test_tune_runs_child_trials_plots_the_pareto_front_and_registers_the_best(finetuned, tmp_path,
                                                                            monkeypatch):
    _, report, source = finetuned
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The test's own gate: this checks the search and the registration flow, not how well one
    # epoch of unlearning works.
    gate = 'gate.rules=["model_utility >= 0.9 * base.model_utility", "forget_quality >= 0"]'
    cfg = build_config({}, [f"output_dir={tmp_path / 'out'}", "run_name=tune-test", f"data.source={source}",
                            "train.epochs=1", "eval.max_new_tokens=16", f"mlflow.tracking_uri={uri}",
                            "tune.num_samples=3", f"tune.search_space={SPACE}", "registry.model_name=tuned",
                            gate])
    summary = run_tune(cfg, report["target"], reference=report["retain"])
    trials = summary["trials"]
    assert len(trials) == 3 and all(t["status"] == "done" for t in trials)
    assert all(1 <= t["method.params.top_k"] and 0.5 <= t["dual.rho"] <= 3.0 for t in trials)
    client = MlflowClient(uri)
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(children) == 3 and all("after.forget_quality" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"pareto.png", "tune_trials.json", "tune_trials.txt"} <= artifacts
    best = summary["best"]
    assert best["forget_quality"] == max(t["forget_quality"] for t in trials
                                         if t["model_utility"] >= summary["utility_floor"])
    assert summary["gate"]["passed"] and summary["registered_version"] == "1"
    version = client.get_model_version_by_alias("tuned", "challenger")
    assert version.run_id == best["child_run_id"] and version.tags["gate"] == "passed"
