"""Ray Tune on the tiny model: trials over rho and top_k, child runs, Pareto plot, registration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("optuna")

from mlflow import MlflowClient  # noqa: E402

from pipelines.tune import (  # noqa: E402
    best_trial,
    choose_trial,
    gate_each_trial,
    pareto_front,
    run_tune,
    utility_floor,
)
from unlearn.config import ConfigError, build_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACE = '{"dual.rho": {"uniform": [0.5, 3.0]}, "method.params.top_k": {"choice": [5, 20, 100]}}'
# One Ray Train worker per trial: these tests check the search, not FSDP (test_pipeline does);
# a second worker process per trial cost ~10 s of start-up on 2 cores.
ONE_WORKER = "ray.num_workers=1"


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


def test_asha_needs_one_metric_and_yaml_bounds_are_numbers():
    with pytest.raises(ConfigError, match="asha stops trials on one metric"):
        build_config({}, ["tune.scheduler=asha"])
    assert build_config({}, ["tune.metric=forget_prob"]).tune.early_stopping
    assert not build_config({}, ["tune.metric=forget_prob", "tune.scheduler=fifo"]).tune.early_stopping
    assert not build_config({}, []).tune.early_stopping
    # YAML reads 1e-6 (no dot) as a string; the bounds are still numbers, and nonsense is named
    space = build_config({}, ['tune.search_space={"train.lr": {"loguniform": ["1e-6", "1e-3"]}}'])
    assert space.tune.search_space["train.lr"]["loguniform"] == [1e-6, 1e-3]
    with pytest.raises(ConfigError, match="train.lr: loguniform needs two numbers"):
        build_config({}, ['tune.search_space={"train.lr": {"loguniform": ["low", "high"]}}'])


def test_best_trial_follows_the_metric_and_its_direction():
    rows = [{"trial": "a", "forget_prob": 0.5, "forget_quality": 0.2},
            {"trial": "b", "forget_prob": 0.1, "forget_quality": 0.1},
            {"trial": "c", "forget_prob": None, "forget_quality": 0.9}]
    assert best_trial(rows, "forget_prob", "min")["trial"] == "b"
    assert best_trial(rows, "forget_prob", "max")["trial"] == "a"
    assert best_trial(rows, None)["trial"] == "c"
    assert best_trial([], None) is None


def _trial(name, fq, mu, gate=None, status="done"):
    return {"trial": name, "forget_quality": fq, "model_utility": mu, "status": status,
            "model_uri": None if status != "done" else f"models:/m-{name}", "child_run_id": f"run-{name}",
            **({"gate": gate} if gate else {})}


def test_the_registered_trial_is_the_best_that_passes_the_gate_else_the_best_above_the_floor():
    over_forgot = _trial("a", 0.77, 0.389, "FAIL: privleak")
    passes = _trial("b", 0.58, 0.390, "pass")
    crashed = _trial("c", 0.90, 0.5, "pass", status="error")
    assert choose_trial([over_forgot, passes, crashed], None, "max", 0.388)["trial"] == "b"
    # no trial passes: the best above the floor is judged (and refused) on the record
    low = _trial("d", 0.95, 0.2, "FAIL: model_utility")
    assert choose_trial([over_forgot, low, _trial("b", 0.58, 0.39, "FAIL: privleak")], None, "max",
                        0.388)["trial"] == "a"
    assert choose_trial([low], None, "max", 0.388) is None
    # a one-metric search ranks the passing trials by its metric
    rows = [{**_trial("e", 0.1, 0.5, "pass"), "forget_prob": 0.3},
            {**_trial("f", 0.9, 0.5, "pass"), "forget_prob": 0.6}]
    assert choose_trial(rows, "forget_prob", "min", None)["trial"] == "e"


def test_each_finished_trial_is_judged_on_its_logged_evaluation(tmp_path):
    logged = {"run-a": {"forget_quality": 0.77, "model_utility": 0.39, "privleak": -91.0},
              "run-b": {"forget_quality": 0.58, "model_utility": 0.39, "privleak": -20.3},
              "run-d": {"forget_quality": 0.10, "model_utility": 0.30}}

    class Client:  # MlflowClient.download_artifacts: the artifact's local path
        def download_artifacts(self, run_id, path, dst):
            file = Path(dst) / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps({"aggregates": logged[run_id],
                                        "unavailable": {"privleak": "no holdout"}}))
            return str(file)

    rows = [_trial("a", 0.77, 0.39), _trial("b", 0.58, 0.39), _trial("c", None, None, status="error"),
            _trial("d", 0.1, 0.3)]
    rules = ["forget_quality >= 0.05", "model_utility >= 0.95 * base.model_utility",
             "privleak within [-25, 25]"]
    gate_each_trial(Client(), rows, rules, {"model_utility": 0.409}, tmp_path)
    assert [r.get("gate") for r in rows] == ["FAIL: privleak", "pass", None, "FAIL: model_utility, privleak"]
    assert choose_trial(rows, None, "max", 0.95 * 0.409)["trial"] == "b"


def test_a_trial_whose_child_run_finished_is_reported_from_it_not_trained_again(tmp_path, monkeypatch):
    """Interrupted after a trial's run ended but before Tune saved the trial as ended, a resumed
    search restarts the trial: it takes the finished child run's summary instead of training."""
    from pipelines.run import RUN_NAME_TAG
    from pipelines.tune import finished_child

    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config({}, [f"mlflow.tracking_uri={uri}", "run_name=search-trial_1"])
    client = MlflowClient(uri)
    experiment = client.create_experiment(cfg.mlflow.experiment)

    def child(parent, status, summary=None):
        run = client.create_run(experiment, tags={RUN_NAME_TAG: cfg.run_name, "mlflow.parentRunId": parent})
        if summary is not None:
            (tmp_path / "summary.json").write_text(json.dumps(summary))
            client.log_artifact(run.info.run_id, str(tmp_path / "summary.json"))
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    assert finished_child(cfg, "search") is None
    child("search", "KILLED", {"mlflow_run_id": "killed"})  # interrupted mid-run: trained again (resumed)
    child("other-search", "FINISHED", {"mlflow_run_id": "other"})
    child("search", "FINISHED")  # finished without its summary: nothing to report
    assert finished_child(cfg, "search") is None
    done = child("search", "FINISHED", {"mlflow_run_id": "done", "model_uri": "models:/m-1"})
    assert finished_child(cfg, "search") == {"mlflow_run_id": "done", "model_uri": "models:/m-1"}
    assert client.get_run(done).info.status == "FINISHED"


def _tune_config(tmp_path, source, overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, [f"output_dir={tmp_path / 'out'}", f"data.source={source}", "eval.max_new_tokens=16",
                 f"mlflow.tracking_uri={uri}", "tune.max_concurrent_trials=1", ONE_WORKER, *overrides]


def _children(client, parent_id):
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_asha_stops_trials_below_the_rung_cutoff_after_one_epoch(finetuned, tmp_path, monkeypatch):
    """One metric (forget_prob, minimised) evaluated after each epoch; with trials run one at a
    time, ASHA stops a trial whose epoch-1 value is worse than the median of the earlier trials'."""
    _, report, source = finetuned
    monkeypatch.chdir(tmp_path)
    uri, overrides = _tune_config(tmp_path, source, [
        "run_name=asha", "train.epochs=2", "tune.num_samples=3", "tune.metric=forget_prob", "tune.mode=min",
        'tune.search_space={"train.lr": {"loguniform": [1.0e-6, 1.0e-3]}}', "registry.model_name=asha",
        'gate.rules=["model_utility >= 0.9 * base.model_utility"]'])
    summary = run_tune(build_config({}, overrides), report["target"], reference=report["retain"])
    client = MlflowClient(uri)
    children = _children(client, summary["parent_run_id"])
    assert len(children) == 3
    # the rule, replayed on the per-epoch values each trial logged
    epoch1 = [c.data.metrics["epoch.forget_prob"] for c in children]
    expected_stopped = [i > 0 and -epoch1[i] < np.percentile([-v for v in epoch1[:i]], 50) for i in range(3)]
    stopped = [c.info.status == "KILLED" and c.data.tags.get("tune.stopped_early") == "true"
               for c in children]
    assert stopped == expected_stopped and any(stopped)  # the seeded lrs (4e-5, 1.4e-4, 6e-5) stop one
    rows = {r["child_run_id"]: r for r in summary["trials"] if r["child_run_id"]}
    for child, was_stopped in zip(children, stopped):
        if not was_stopped:
            assert child.info.status == "FINISHED"
            row = rows[child.info.run_id]
            assert row["epochs"] == 2
            assert row["forget_prob"] == pytest.approx(child.data.metrics["after.forget_prob"])
    assert [r["status"] for r in summary["trials"]].count("stopped early") == sum(stopped)
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"epoch_curves.png", "pareto.png"} <= artifacts
    done = [r for r in summary["trials"] if r["status"] == "done"]
    assert summary["best"]["forget_prob"] == min(r["forget_prob"] for r in done
                                                 if r["model_utility"] >= summary["utility_floor"])


@pytest.mark.slow
def test_a_crashed_trial_is_recorded_failed_and_the_search_goes_on(finetuned, tmp_path, monkeypatch):
    _, report, source = finetuned
    monkeypatch.chdir(tmp_path)
    # every trial's worker dies at step 1 and may not restart
    uri, overrides = _tune_config(tmp_path, source, [
        "run_name=crash", "train.epochs=1", "tune.num_samples=2", "ray.fail_at_step=1", "ray.max_failures=0",
        'tune.search_space={"dual.rho": {"uniform": [0.5, 3.0]}}'])
    summary = run_tune(build_config({}, overrides), report["target"], reference=report["retain"])
    assert [r["status"] for r in summary["trials"]] == ["failed", "failed"]  # the second trial still ran
    assert all(r["error"] for r in summary["trials"])
    assert summary["best"] is None and summary["registered_version"] is None
    client = MlflowClient(uri)
    assert [c.info.status for c in _children(client, summary["parent_run_id"])] == ["FAILED", "FAILED"]
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_an_interrupted_search_resumes_then_plots_gates_and_registers_its_best(finetuned, tmp_path):
    """Ctrl+C after the first trial: exit 130, the parent run stays open; the same command again
    resumes the search (Tuner.restore) and the interrupted trial's own child run. The resumed
    search then ends as any search does: every trial a child run, the Pareto plot and trial table
    on the parent, each trial gated, and the best passing trial registered."""
    _, report, source = finetuned
    # The test's own gate: this checks the search and the registration flow, not how well one
    # epoch of unlearning works.
    uri, overrides = _tune_config(tmp_path, source, [
        "run_name=resume", "train.epochs=1", "tune.num_samples=2", "ray.checkpoint_every=2",
        f"tune.search_space={SPACE}", "registry.model_name=tuned",
        'gate.rules=["model_utility >= 0.9 * base.model_utility", "forget_quality >= 0"]'])
    config = REPO / "configs" / "tofu_tiny.yaml"
    command = [sys.executable, "-m", "unlearn.cli", "tune", str(config), *overrides,
               "--model", report["target"], "--reference", report["retain"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    client = MlflowClient(uri)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and first.poll() is None:
            time.sleep(2)
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          filter_string="attributes.status = 'FINISHED'")
            except Exception:  # noqa: BLE001 - the database is not there yet
                continue
            if any("mlflow.parentRunId" in r.data.tags for r in runs):
                break
        assert first.poll() is None, first.communicate()[0][-3000:]
        os.kill(first.pid, signal.SIGINT)  # the driver only, as Ctrl+C in its terminal would
        output, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, output[-3000:]
    assert "run the same command again to resume" in output
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string="tags.`unlearn.kind` = 'tune'")
    assert len(parents) == 1 and parents[0].info.status != "FINISHED"
    before = {c.info.run_id: c.info.status for c in _children(client, parents[0].info.run_id)}
    assert list(before.values()).count("FINISHED") == 1

    cfg = build_config(yaml.safe_load(config.read_text()), overrides)
    os.chdir(tmp_path)
    try:
        summary = run_tune(cfg, report["target"], reference=report["retain"])
    finally:
        os.chdir(REPO)
    assert summary["parent_run_id"] == parents[0].info.run_id
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    assert [r["status"] for r in summary["trials"]] == ["done", "done"]
    children = _children(client, summary["parent_run_id"])
    after = {c.info.run_id: c.info.status for c in children}
    assert set(before) <= set(after) and list(after.values()) == ["FINISHED", "FINISHED"]

    trials = summary["trials"]
    assert all(1 <= t["method.params.top_k"] and 0.5 <= t["dual.rho"] <= 3.0 for t in trials)
    assert all("after.forget_quality" in c.data.metrics for c in children)
    # early stopping's target, measured once on the retain model, is the same for every trial
    targets = {c.data.params["stop.auc"] for c in children}
    assert len(targets) == 1 and 0 < float(targets.pop()) < 1
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"pareto.png", "tune_trials.json", "tune_trials.txt"} <= artifacts
    # with this gate, passing it is exactly reaching the utility floor
    assert all((t["gate"] == "pass") == (t["model_utility"] >= summary["utility_floor"]) for t in trials)
    best = summary["best"]
    assert best["forget_quality"] == max(t["forget_quality"] for t in trials if t["gate"] == "pass")
    assert summary["gate"]["passed"] and summary["registered_version"] == "1"
    version = client.get_model_version_by_alias("tuned", "challenger")
    assert version.run_id == best["child_run_id"] and version.tags["gate"] == "passed"


@pytest.mark.slow
def test_tune_with_lora_on_two_workers_trains_only_the_adapters_and_registers_them_alone(finetuned, tmp_path,
                                                                                         monkeypatch):
    """A trial of 2 FSDP2 workers with LoRA and a metric per epoch: the epoch's evaluation scores
    the sharded model; the registered version is the adapter folder (model.lora.merge=false), which
    loads as the base model with only the adapted layers changed."""
    import math

    from pipelines.models import download_model
    from unlearn.models import load_model

    _, report, source = finetuned
    monkeypatch.chdir(tmp_path)
    uri, overrides = _tune_config(tmp_path, source, [
        "run_name=lora", "train.epochs=2", "tune.num_samples=1", "tune.metric=forget_prob", "tune.mode=min",
        'tune.search_space={"train.lr": {"choice": [0.001]}}', "registry.model_name=lora-tuned",
        "model.lora.r=4", "model.lora.merge=false", "ray.num_workers=2",
        'gate.rules=["model_utility >= 0.5 * base.model_utility"]'])
    summary = run_tune(build_config({}, overrides), report["target"], reference=report["retain"])
    assert [t["status"] for t in summary["trials"]] == ["done"] and summary["registered_version"] == "1"
    client = MlflowClient(uri)
    (child,) = _children(client, summary["parent_run_id"])
    assert math.isfinite(child.data.metrics["epoch.forget_prob"])  # epoch 1, scored on the shards
    version = client.get_model_version("lora-tuned", "1")
    form = "LoRA adapters only (r=4, alpha=16, q_proj/k_proj/v_proj/o_proj), on the base model"
    assert version.tags["model_form"] == form  # the default modules
    registered = Path(download_model(summary["best"]["model_uri"], tmp_path / "registered"))
    assert (registered / "adapter_config.json").is_file() and not (registered / "config.json").exists()
    tuned = load_model(str(registered)).state_dict()  # the base named in the folder, adapters merged in
    target = load_model(report["target"]).state_dict()
    assert set(tuned) == set(target)
    adapted = tuple(f"self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    changed = {name for name, value in target.items() if not torch.equal(tuned[name], value)}
    assert changed and all(name.endswith(adapted) for name in changed)
